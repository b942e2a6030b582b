"""A hostile stream against a real worker on the real broker: more than 10,000 hostile
messages (random bytes, mutated valid events, structural attacks on JSON, Unicode and
numbers, bad and missing keys, oversized keys and values) interleaved with valid events.
The worker must stay up, score every valid event, and dead-letter everything else with a
reason: scored + dead-lettered = produced, position by position."""
from __future__ import annotations

import base64
import json
import random
import sys
import time
import uuid
from collections import Counter
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # bench/ is not an installed package

from bench.workerkit import WorkerProcess, produce, read_topic, values  # noqa: E402
from conftest import free_port  # noqa: E402

MAX_MESSAGE_BYTES = 16384
T0 = 1_767_571_253_772
N_HOSTILE = 10_500
N_VALID = 3_000



def valid_event(rng: random.Random, i: int) -> dict:
    session = f"v{rng.randrange(400)}"
    return {"session_id": session, "event_type": rng.choice(["view", "view", "view", "addtocart", "click"]),
            "item_id": str(rng.randrange(3000)), "category_id": str(rng.randrange(40)),
            "price": round(rng.uniform(1, 200), 2), "timestamp": T0 + 1000 * i, "event_id": f"valid-{i}"}


def mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randrange(1, 6)):
        op = rng.randrange(4)
        pos = rng.randrange(len(data) + 1)
        if op == 0 and data:
            data[min(pos, len(data) - 1)] = rng.randrange(256)
        elif op == 1:
            data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8)))
        elif op == 2 and data:
            del data[pos:pos + rng.randrange(1, 8)]
        else:
            data = data[:pos]
    return bytes(data)


def hostile_messages(rng: random.Random, n: int) -> list[tuple[bytes | None, bytes | None]]:
    """(key, value) pairs, each an attack; some may happen to be valid events."""
    base = {"session_id": "h1", "event_type": "view", "item_id": "5", "timestamp": T0}
    numbers = ["1e999", "-1e999", "NaN", "Infinity", "-Infinity", "1" * 5000, "-0", "0.5", "1e-400",
               "true", "null", '"1767571253772"', "1767571253772.75", "-1767571253772", "9" * 25, "[]", "{}"]
    ids = ['"s\\ud800"', '"\\udfff"', '"a\\u0000b"', '"\\u202e\\u202d"', '"\U0001f600"', '""', '"' + "x" * 300 + '"',
           "123", "1.5", "true", "[1]", '{"a":1}', '"\\ud83d\\ude00"', '"\\uDBFF\\uDFFF"']
    out: list[tuple[bytes | None, bytes | None]] = []
    for i in range(n):
        kind = i % 12
        key: bytes | None = b"h1"
        if kind == 0:       # random bytes, any length up to past the limit
            value = rng.randbytes(rng.choice([0, 1, 7, 100, 2000, MAX_MESSAGE_BYTES + 10]))
        elif kind == 1:     # mutated valid event
            event = dict(base, session_id=f"m{i % 50}")
            key = event["session_id"].encode()
            value = mutate(rng, json.dumps(event).encode())
        elif kind == 2:     # deep nesting of every kind
            depth = rng.choice([100, 1000, 5000, 15000])
            opener = rng.choice(["[", '{"a":', '{"session_id":['])
            value = (opener * depth).encode()[:MAX_MESSAGE_BYTES - 1]
        elif kind == 3:     # numbers where the contract wants numbers (and elsewhere)
            field = rng.choice(["timestamp", "price", "item_id", "session_id"])
            body = json.dumps(dict(base, session_id="h1")).replace(
                f'"{field}": ' + json.dumps(base.get(field, "h1")), f'"{field}": {rng.choice(numbers)}')
            value = body.encode()
        elif kind == 4:     # Unicode attacks on ids
            field = rng.choice(["session_id", "item_id", "category_id", "event_id", "user_id"])
            attack = rng.choice(ids)
            body = json.dumps(base)[:-1] + f', "{field}": {attack}}}'
            value = body.encode()
            key = rng.choice([b"h1", "s\udc80".encode("utf-8", "surrogateescape"), b"s"])
        elif kind == 5:     # invalid UTF-8, overlong forms, BOM, UTF-16
            value = rng.choice([b"\xc0\xaf", b"\xed\xa0\x80", b"\xef\xbb\xbf" + json.dumps(base).encode(),
                                json.dumps(base).encode("utf-16"), b'{"session_id":"\xff"}',
                                b"\x00" * 50, b" \t\n "])
        elif kind == 6:     # wrong top-level types and duplicate keys
            value = rng.choice([b"[]", b"1", b'"s"', b"null", b"true", b"[" + json.dumps(base).encode() + b"]",
                                b'{"session_id":"h1","session_id":"h2","event_type":"view","item_id":"1",'
                                b'"timestamp":1767571253772}', b'{"1":2}'])
            key = rng.choice([b"h1", b"h2", None])
        elif kind == 7:     # missing and mismatched keys
            key = rng.choice([None, b"", b"other", b"h1 ", b"\xff"])
            value = json.dumps(base).encode()
        elif kind == 8:     # oversized keys
            key = rng.choice([b"k" * 300, b"k" * 70_000, b"\xff" * 5000])
            value = json.dumps(base).encode()
        elif kind == 9:     # oversized values, around and far past the limit
            size = rng.choice([MAX_MESSAGE_BYTES - 5, MAX_MESSAGE_BYTES + 1, 40_000, 100_000])
            value = json.dumps(dict(base, pad="x" * size)).encode()
        elif kind == 10:    # null values (tombstones) and empty messages
            value = rng.choice([None, b""])
        else:               # missing / wrong-typed fields, unknown event types
            event = dict(base)
            event.pop(rng.choice(list(event)))
            if rng.random() < 0.5:
                event["event_type"] = rng.choice(["wishlist", "", " ", "VIEW ", None, 3, ["view"]])
            value = json.dumps(event).encode()
            key = b"h1"
        out.append((key, value))
    return out


def test_hostile_stream_every_message_accounted_for(broker, model_dir, tmp_path):
    from stream import pipeline
    from stream.scoring import ModelScorer

    rng = random.Random(20261202)
    run = uuid.uuid4().hex[:8]
    t = {name: f"hostile-{name}-{run}" for name in ("input", "scores", "next_items", "dlq", "triggers")}
    valid = [valid_event(rng, i) for i in range(N_VALID)]
    hostile = hostile_messages(rng, N_HOSTILE)
    stream: list[tuple[bytes | None, bytes | None]] = [(e["session_id"].encode(), json.dumps(e).encode())
                                                       for e in valid]
    for message in hostile:                       # interleave at random places, valid order kept
        stream.insert(rng.randrange(len(stream) + 1), message)

    worker = WorkerProcess(broker, model_dir, t, f"hostile-{run}", tmp_path / "worker.log", free_port(),
                           ["--max-message-bytes", str(MAX_MESSAGE_BYTES), "--batch-size", "256",
                            "--session-timeout-s", str(100 * 86400), "--partitions", "2"])
    started = time.monotonic()
    with worker:
        metadata = produce(broker, t["input"], stream, max_request_size=1_000_000)
        # What the worker must do with each message, from the same pure code it runs:
        # every record through pipeline.prepare in partition order.
        scorer = ModelScorer(model_dir, provider="cpu", threads=1)
        records = sorted((pipeline.Record(t["input"], m.partition, m.offset, k, v, None)
                          for (k, v), m in zip(stream, metadata)), key=lambda r: (r.partition, r.offset))
        expected = pipeline.prepare(records, {}.get, scorer.artefacts, 100 * 86400 * 1000, MAX_MESSAGE_BYTES)
        n_valid = len(expected.accepted)
        n_rejected = len(expected.rejected)
        assert n_valid + n_rejected == len(stream)
        items = read_topic(broker, t["next_items"], lambda r: len(r) >= n_valid, timeout=600)
        dlq = read_topic(broker, t["dlq"], lambda r: len(r) >= n_rejected, timeout=120)
        alive = worker.proc.poll() is None
        log_tail = worker.log()[-4000:]
    elapsed = time.monotonic() - started
    assert alive, log_tail

    item_values, dlq_values = values(items), values(dlq)
    # Every valid event of the clean log has its next-items record...
    assert {e["event_id"] for e in valid} <= {v["event_id"] for v in item_values}
    # ...every message is scored or dead-lettered, and nothing twice.
    assert len(item_values) == n_valid and len(dlq_values) == n_rejected
    assert len(item_values) + len(dlq_values) == len(stream)
    positions = {(v["partition"], v["offset"]) for v in dlq_values}
    assert len(positions) == len(dlq_values)
    want = {(records[r.index].partition, records[r.index].offset): r.reason for r in expected.rejected}
    got = {(v["partition"], v["offset"]): v["reason"] for v in dlq_values}
    assert got == want
    assert all(v["reason"] and v["detail"] for v in dlq_values)
    reasons = Counter(v["reason"] for v in dlq_values)
    assert "internal_error" not in reasons, reasons
    print(f"\n{len(stream)} messages ({N_HOSTILE} hostile) in {elapsed:.1f} s: "
          f"{len(item_values)} scored, {len(dlq_values)} dead-lettered: {dict(reasons.most_common())}")


def poisoned_copy(model_dir: Path, out: Path, price_above: float) -> Path:
    """The same model, except that its buy probability is NaN for any window holding an
    event whose normalised price feature exceeds `price_above`: a real ONNX graph that
    fails on some inputs, as a corrupt or badly exported model would."""
    import shutil

    import onnx
    from onnx import TensorProto, helper

    shutil.copytree(model_dir, out)
    # Both graphs: the worker scores a session's events with the step graph (model_step.onnx,
    # price (B,)) while it carries their state, and with the window graph (price (B, T)) otherwise.
    for name, reduce in (("model.onnx", True), ("model_step.onnx", False)):
        if not (out / name).exists():
            continue
        model = onnx.load(out / name)
        graph = model.graph
        for node in graph.node:
            node.output[:] = ["buy_probability_clean" if o == "buy_probability" else o for o in node.output]
        graph.node.extend([
            helper.make_node("ReduceMax", ["price"], ["max_price"], axes=[1], keepdims=0) if reduce else
            helper.make_node("Identity", ["price"], ["max_price"]),
            helper.make_node("Constant", [], ["threshold"], value=helper.make_tensor("t", TensorProto.FLOAT, [], [price_above])),
            helper.make_node("Constant", [], ["nan"], value=helper.make_tensor("n", TensorProto.FLOAT, [], [float("nan")])),
            helper.make_node("Greater", ["max_price", "threshold"], ["poisoned"]),
            helper.make_node("Where", ["poisoned", "nan", "buy_probability_clean"], ["buy_probability"]),
        ])
        onnx.checker.check_model(model)
        onnx.save(model, out / name)
    return out


def test_model_faults_dead_letter_only_the_events_that_cause_them(broker, model_dir, tmp_path):
    """A model that returns NaN for some windows: those events are dead-lettered as
    scoring_failed, every other event of the same batches is scored as the clean model
    scores it, and the worker stays up."""
    from stream.scoring import ModelScorer

    bad_model = poisoned_copy(model_dir, tmp_path / "poisoned", price_above=10.0)
    clean = ModelScorer(model_dir, provider="cpu", threads=1)
    rng = random.Random(7)
    run = uuid.uuid4().hex[:8]
    t = {name: f"fault-{name}-{run}" for name in ("input", "scores", "next_items", "dlq", "triggers")}
    events = []
    for i in range(600):
        e = valid_event(rng, i)
        e["session_id"] = f"p{i}"                     # one event per session: windows of one
        if i % 50 == 7:
            e["price"] = 1e11                         # normalised log price far above 10
        events.append(e)
    poisoned_ids = {e["event_id"] for e in events if e["price"] == 1e11}
    with WorkerProcess(broker, bad_model, t, f"fault-{run}", tmp_path / "worker.log", free_port(),
                       ["--batch-size", "128", "--top-k", "5"]) as worker:
        produce(broker, t["input"], [(e["session_id"].encode(), json.dumps(e).encode()) for e in events])
        items = values(read_topic(broker, t["next_items"], lambda r: len(r) >= len(events) - len(poisoned_ids)))
        dlq = values(read_topic(broker, t["dlq"], lambda r: len(r) >= len(poisoned_ids), timeout=60))
        scores = values(read_topic(broker, t["scores"], lambda r: len(r) >= len(items), timeout=60))
        assert worker.proc.poll() is None, worker.log()[-3000:]
    assert {json.loads(base64.b64decode(d["original_b64"]))["event_id"] for d in dlq} == poisoned_ids
    assert {d["reason"] for d in dlq} == {"scoring_failed"}
    assert {v["event_id"] for v in items} == {e["event_id"] for e in events} - poisoned_ids
    from stream.features import append_event, empty_window
    from stream.events import validate
    by_id = {e["event_id"]: e for e in events}
    windows = [append_event(empty_window(), validate(by_id[v["event_id"]]), clean.artefacts) for v in scores]
    expected = clean.score(windows, 5).buy_probability
    got = [v["buy_probability"] for v in scores]
    assert max(abs(a - b) for a, b in zip(got, expected)) <= 1e-5
