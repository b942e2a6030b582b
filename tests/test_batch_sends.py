"""Batched sends (--batch-sends, stream/kafka_compat.py batch_sender): a micro-batch's
outputs go as one producer batch per topic-partition. The pure grouping
(pipeline.group_by_partition), pipeline.deliver's handling of a shared delivery report
(a failed batch is narrowed down output by output; only an output that is too large on
its own is dead-lettered), and a real worker on the real broker: every output lands on
the partition its key hashes to, in its session's order."""
from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections import defaultdict
from pathlib import Path

from hypothesis import given, strategies as st

from stream import pipeline

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # bench/ is not an installed package

from bench.workerkit import WorkerProcess, produce, read_topic  # noqa: E402
from conftest import free_port  # noqa: E402


def record(offset: int) -> pipeline.Record:
    return pipeline.Record("clicks", 0, offset, b"k", b"{}", 1.0)


outputs_st = st.lists(st.tuples(st.sampled_from(["scores", "next", "dlq"]),
                                st.one_of(st.none(), st.sampled_from([b"a", b"b", b"c", b"d", b"e"]))),
                      max_size=60)


@given(outputs_st, st.integers(1, 5))
def test_grouping_keeps_every_output_once_in_order_on_its_keys_partition(pairs, partitions):
    outputs = [pipeline.Output(topic, key, b"v", i) for i, (topic, key) in enumerate(pairs)]
    asked: list[tuple[str, bytes | None]] = []

    def partition_of(topic: str, key: bytes | None) -> int:
        asked.append((topic, key))
        return (sum(key) if key is not None else len(asked)) % partitions

    groups = pipeline.group_by_partition(outputs, partition_of)
    positions = [p for group in groups.values() for p in group]
    assert sorted(positions) == list(range(len(outputs)))          # each output once
    for (topic, partition), group in groups.items():
        assert group == sorted(group)                                # output order kept
        for p in group:
            out = outputs[p]
            assert out.topic == topic
            if out.key is not None:
                assert partition == sum(out.key) % partitions         # where its key hashes to
    keyed = [(o.topic, o.key) for o in outputs if o.key is not None]
    assert sorted(a for a in asked if a[1] is not None) == sorted(set(keyed))   # the hash once per key


class BatchingProducer:
    """One shared delivery report per topic (like a producer batch); a batch holding a value
    longer than `limit` (dead letters aside) fails as too large, and so does such a value sent alone."""

    def __init__(self, limit: int = 100, send_all_fails: bool = False):
        self.limit = limit
        self.send_all_fails = send_all_fails
        self.delivered: list[pipeline.Output] = []
        self.batches = 0

    def _report(self, outs: list[pipeline.Output]):
        from aiokafka.errors import MessageSizeTooLargeError
        report = asyncio.get_running_loop().create_future()
        if any(len(o.value) > self.limit and o.topic != "dlq" for o in outs):
            report.set_exception(MessageSizeTooLargeError("too big"))
        else:
            self.delivered.extend(outs)
            report.set_result("metadata")
        return report

    async def send(self, out: pipeline.Output):
        return self._report([out])

    async def send_all(self, outs: list[pipeline.Output]) -> list:
        if self.send_all_fails:
            raise ConnectionError("metadata unavailable")
        by_topic: dict[str, list[int]] = defaultdict(list)
        for i, out in enumerate(outs):
            by_topic[out.topic].append(i)
        reports: list = [None] * len(outs)
        for positions in by_topic.values():
            self.batches += 1
            report = self._report([outs[i] for i in positions])
            for i in positions:
                reports[i] = report
        return reports


def test_a_batch_refused_as_too_large_dead_letters_only_the_output_too_large_alone():
    outs = [pipeline.Output("next", b"k", b"x" * (500 if i == 2 else 10), i) for i in range(5)]
    outs.append(pipeline.Output("scores", b"k", b"y", 5))
    producer = BatchingProducer()
    asyncio.run(pipeline.deliver(producer.send, outs, [record(i) for i in range(6)], "dlq", attempts=3,
                                 backoff_s=0.001, send_all=producer.send_all))
    assert producer.batches == 2     # the first round went as one batch per topic
    delivered = sorted((o.topic, o.index) for o in producer.delivered)
    assert delivered == [("dlq", 2), ("next", 0), ("next", 1), ("next", 3), ("next", 4), ("scores", 5)]
    letter = json.loads(next(o.value for o in producer.delivered if o.topic == "dlq"))
    assert letter["reason"] == "output_undeliverable" and letter["offset"] == 2


def test_when_batching_fails_before_queueing_every_output_goes_alone():
    outs = [pipeline.Output("next", b"k", b"v", i) for i in range(4)]
    producer = BatchingProducer(send_all_fails=True)
    asyncio.run(pipeline.deliver(producer.send, outs, [record(i) for i in range(4)], "dlq", attempts=2,
                                 backoff_s=0.001, send_all=producer.send_all))
    assert sorted(o.index for o in producer.delivered) == [0, 1, 2, 3]


def test_batched_outputs_land_on_their_keys_partition_in_session_order(broker, model_dir, tmp_path):
    from kafka.partitioner.default import murmur2   # the key hash of Java clients, kafka-python and aiokafka

    run = uuid.uuid4().hex[:8]
    t = {name: f"{name}-{run}" for name in ("input", "scores", "next_items", "dlq", "triggers")}
    sessions = [f"s{run}-{n}" for n in range(24)]
    events = []
    for i in range(240):   # interleaved sessions, produced at once: batches of many outputs
        session = sessions[i % len(sessions)]
        events.append({"session_id": session, "event_type": "view", "item_id": str(i % 11),
                       "timestamp": 1_700_000_000_000 + 1000 * i, "event_id": f"{session}-{i}"})
    with WorkerProcess(broker, model_dir, t, f"app-{run}", tmp_path / "worker.log", free_port(),
                       ["--partitions", "4", "--batch-sends", "true"]) as worker:
        produce(broker, t["input"], [(e["session_id"].encode(), json.dumps(e).encode()) for e in events])
        items = read_topic(broker, t["next_items"], lambda r: len(r) >= len(events), timeout=120)
        scores = read_topic(broker, t["scores"], lambda r: len(r) >= len(events), timeout=60)
        assert worker.proc.poll() is None, worker.log()[-3000:]
    assert "not delivered" not in worker.log()   # every batch went through at the first try
    for topic_records in (items, scores):
        assert len(topic_records) == len(events)
        order: dict[str, list[int]] = defaultdict(list)
        for r in sorted(topic_records, key=lambda r: (r.partition, r.offset)):
            body = json.loads(r.value)
            assert r.key == body["session_id"].encode()
            assert r.partition == (murmur2(r.key) & 0x7FFFFFFF) % 4   # where a plain keyed send puts it
            order[body["session_id"]].append(int(body["event_id"].rsplit("-", 1)[1]))
        assert all(seen == sorted(seen) for seen in order.values())   # per-session order kept
        assert sorted(i for seen in order.values() for i in seen) == list(range(len(events)))
