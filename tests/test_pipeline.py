"""The worker's batch logic (stream/pipeline.py) driven without Faust: a dict for the table,
the real default model for scoring, and plain functions where a fault must be injected."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from stream import metrics, pipeline
from stream.scoring import ModelScorer

REPO = Path(__file__).resolve().parents[1]
TOPICS = pipeline.Topics("scores", "next", "dlq", "triggers")
MODEL = pipeline.ModelTag("m", "1")
T0 = 1_767_571_253_772


@pytest.fixture(scope="module")
def scorer() -> ModelScorer:
    return ModelScorer(REPO / "onnx_models" / "default", provider="cpu", threads=1)


def event(session: str, i: int, kind: str = "view", item: str | None = None, **extra) -> bytes:
    body = {"session_id": session, "event_type": kind, "item_id": item or str(i % 7),
            "timestamp": T0 + 1000 * i, "event_id": f"{session}-{i}", **extra}
    return json.dumps(body).encode()


def records(pairs) -> list[pipeline.Record]:
    return [pipeline.Record("clicks", 0, offset, key, value, 1.0) for offset, (key, value) in enumerate(pairs)]


def run(scorer, recs, store=None, score=None, read_state=None):
    store = {} if store is None else store
    batch = pipeline.prepare(recs, read_state or store.get, scorer.artefacts, 3_600_000, 16384)
    for key, (value, _) in batch.state_writes.items():
        store[key] = value
    scores = pipeline.score_isolated(score or scorer.score, batch.windows, 5)
    return batch, pipeline.finish(batch, scores, TOPICS, scorer.item_ids, MODEL)


def by_topic(done) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for o in done.outputs:
        out.setdefault(o.topic, []).append(json.loads(o.value))
    return out


def test_every_record_is_scored_or_dead_lettered_with_its_reason(scorer):
    pairs = [(b"a", event("a", 0)), (b"a", b"\xff not utf-8"), (b"b", event("b", 1)),
             (b"wrong", event("c", 2)), (b"a", event("a", 3, kind="cart")), (None, None),
             (b"d", b"[" * 16000), (b"e", json.dumps({"session_id": "e\ud800", "event_type": "view",
                                                        "item_id": "1", "timestamp": T0}).encode())]
    batch, done = run(scorer, records(pairs))
    topics = by_topic(done)
    assert done.scored == 3 and len(topics["next"]) == 3
    assert sum(done.dead_lettered.values()) == 5
    assert done.scored + sum(done.dead_lettered.values()) == len(pairs)
    reasons = {d["offset"]: d["reason"] for d in topics["dlq"]}
    assert reasons[1] == "undecodable" and reasons[3] == "key_mismatch" and reasons[5] == "empty_message"
    assert set(reasons) == {1, 3, 5, 6, 7}
    assert all(r != "internal_error" for r in reasons.values()), reasons
    # Outputs come in input order, each answering its own record.
    assert [o.index for o in done.outputs] == sorted(o.index for o in done.outputs)
    assert base64.b64decode(topics["dlq"][0]["original_b64"]) == b"\xff not utf-8"


def test_an_unforeseen_exception_dead_letters_only_its_record(scorer):
    store: dict[bytes, bytes] = {}

    def read_state(key: bytes):
        if key == b"boom":
            raise KeyError("a store that breaks on one key")
        return store.get(key)

    before = metrics.INTERNAL_ERRORS.labels(exception="KeyError")._value.get()
    pairs = [(b"x", event("x", 0)), (b"boom", event("boom", 1)), (b"y", event("y", 2))]
    _, done = run(scorer, records(pairs), store=store, read_state=read_state)
    dlq = by_topic(done)["dlq"]
    assert done.scored == 2 and len(dlq) == 1
    assert dlq[0]["reason"] == "internal_error" and dlq[0]["offset"] == 1
    assert dlq[0]["detail"].startswith("KeyError")
    assert metrics.INTERNAL_ERRORS.labels(exception="KeyError")._value.get() == before + 1
    assert b"boom" not in store   # a failed record does not change any state


def test_model_faults_fail_only_the_events_that_cause_them(scorer):
    from stream.features import id_hash
    poisoned = id_hash("1")   # a real vocabulary item, as window rows hold it

    def flaky_score(windows, top_k):
        if any((w["item"] == poisoned).any() for w in windows):
            raise RuntimeError("the runtime fails on this item")
        result = scorer.score(windows, top_k)
        buy = result.buy_probability.copy()
        for j, w in enumerate(windows):
            if len(w) == 3:            # and returns NaN for 3-event windows
                buy[j] = np.nan
        return type(result)(buy, result.top_items, result.top_scores)

    pairs = [(f"s{i}".encode(), event(f"s{i}", i, item="1" if i in (3, 11) else "2")) for i in range(16)]
    pairs += [(b"long", event("long", 100 + i, item="2")) for i in range(3)]
    _, done = run(scorer, records(pairs), score=flaky_score)
    dlq = by_topic(done)["dlq"]
    failed = sorted(d["offset"] for d in dlq)
    assert failed == [3, 11, 18], failed           # the two poisoned events and the NaN one
    assert {d["reason"] for d in dlq} == {"scoring_failed"}
    assert done.scored == len(pairs) - 3


def test_scores_equal_an_unsplit_batch(scorer):
    pairs = [(f"s{i % 5}".encode(), event(f"s{i % 5}", i)) for i in range(40)]
    batch, done = run(scorer, records(pairs))
    direct = scorer.score(batch.windows, 5)
    got = [r["buy_probability"] for r in by_topic(done)["scores"]]
    assert np.allclose(got, direct.buy_probability, atol=0, rtol=0)


def test_a_redelivered_record_is_scored_again_as_it_was_without_applying_it_twice(scorer):
    store: dict[bytes, bytes] = {}
    recs = records([(b"r", event("r", i)) for i in range(4)])
    _, first = run(scorer, recs, store=store)
    _, again = run(scorer, recs[2:], store=store)      # a crash re-delivers offsets 2 and 3
    first_scores = [json.loads(o.value) for o in first.outputs if o.topic == "scores"][2:]
    again_scores = [json.loads(o.value) for o in again.outputs if o.topic == "scores"]
    for a, b in zip(first_scores, again_scores):
        assert a["buy_probability"] == b["buy_probability"] and a["event_count"] == b["event_count"]
    from stream.session_state import SessionState
    assert SessionState.from_bytes(store[b"r"]).event_count == 4


def test_dead_letters_stay_bounded_for_huge_keys_and_values():
    record = pipeline.Record("clicks", 1, 9, b"k" * 5_000_000, b"v" * 5_000_000, 1.0)
    out = pipeline.dead_letter(record, "oversized_message", "x" * 10_000, "dlq", 0)
    body = json.loads(out.value)
    assert len(out.value) < 100_000 and out.key is None
    assert body["original_truncated"] and body["original_bytes"] == 5_000_000
    assert len(body["detail"]) <= pipeline.DETAIL_CHARS
    # Text that cannot be encoded as UTF-8 still makes a valid dead letter.
    odd = pipeline.dead_letter(pipeline.Record("clicks", 0, 0, None, "s\ud800", None), "r", "d\ud800", "dlq", 0)
    assert json.loads(odd.value)["reason"] == "r"


# -- delivery -------------------------------------------------------------------------------

class FlakyProducer:
    """Queues records like Faust's producer.send: returns a delivery report (a future)
    that fails for the first `failures[topic]` sends of each topic."""

    def __init__(self, failures: dict[str, int], error: Exception | None = None):
        import asyncio
        self.asyncio = asyncio
        self.failures = dict(failures)
        self.error = error or ConnectionError("broker gone")
        self.delivered: list[pipeline.Output] = []

    async def send(self, out: pipeline.Output):
        report = self.asyncio.get_running_loop().create_future()
        if self.failures.get(out.topic, 0) > 0:
            self.failures[out.topic] -= 1
            report.set_exception(self.error)
        else:
            self.delivered.append(out)
            report.set_result(("metadata", out.topic))
        return report


def outputs_for(n: int) -> tuple[list[pipeline.Output], list[pipeline.Record]]:
    recs = records([(b"k", event("k", i)) for i in range(n)])
    outs = [pipeline.Output("next", b"k", b"{}", i) for i in range(n)]
    return outs, recs


def test_failed_sends_are_retried_until_delivered():
    import asyncio
    outs, recs = outputs_for(6)
    producer = FlakyProducer({"next": 4})
    asyncio.run(pipeline.deliver(producer.send, outs, recs, "dlq", attempts=3, backoff_s=0.001))
    assert sorted(o.index for o in producer.delivered) == list(range(6))


def test_undeliverable_outputs_raise_so_the_batch_is_not_acked():
    import asyncio
    outs, recs = outputs_for(3)
    producer = FlakyProducer({"next": 10 ** 6})
    with pytest.raises(pipeline.DeliveryFailed, match="3 outputs undelivered after 3 attempts"):
        asyncio.run(pipeline.deliver(producer.send, outs, recs, "dlq", attempts=3, backoff_s=0.001))
    assert producer.delivered == []


def test_an_output_too_large_for_the_broker_becomes_a_dead_letter_of_its_input():
    import asyncio
    from aiokafka.errors import MessageSizeTooLargeError
    outs, recs = outputs_for(2)
    producer = FlakyProducer({"next": 1}, MessageSizeTooLargeError("too big"))
    asyncio.run(pipeline.deliver(producer.send, outs, recs, "dlq", attempts=2, backoff_s=0.001))
    topics = sorted((o.topic, o.index) for o in producer.delivered)
    assert topics == [("dlq", 0), ("next", 1)]
    letter = json.loads(next(o.value for o in producer.delivered if o.topic == "dlq"))
    assert letter["reason"] == "output_undeliverable" and letter["offset"] == 0
