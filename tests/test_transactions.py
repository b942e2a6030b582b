"""Input written by a transactional producer (tests on the real embedded broker).

Every committed transaction leaves a commit marker in each partition it wrote to: an
offset with no record. The worker's in-order guard (stream/offsets.py) must tell such a
hole from records Faust dropped after a fetch: it reads what aiokafka's fetcher skipped
(`offsets.ABSENT`). Before, each marker held its partition back for seconds (the guard
sought back to it and waited) and the commit stalled behind it.
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import polars as pl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # bench/ is not an installed package

from bench.workerkit import CLICKSCORE, WorkerProcess, offline_scores, read_topic, values  # noqa: E402
from conftest import free_port  # noqa: E402
from test_worker import assert_matches_offline, by_session, event_dicts, expected_buyer_events  # noqa: E402
from stream import offsets  # noqa: E402

TOP_K = 5


def transactional_produce(broker: str, topic: str, records: list[tuple[bytes, bytes]], per_transaction: int,
                          partitions: int | None = None) -> None:
    """librdkafka's transactional producer (aiokafka's does not work on the embedded broker,
    ../shared/docs/PLATFORM.md); murmur2 keys, as Kafka's Java clients and Faust place them."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": broker, "transactional.id": f"tx-{uuid.uuid4().hex[:8]}",
                         "enable.idempotence": True, "partitioner": "murmur2_random",
                         "log_level": 3})
    producer.init_transactions(30)
    for start in range(0, len(records), per_transaction):
        producer.begin_transaction()
        for key, value in records[start:start + per_transaction]:
            if partitions is None:
                producer.produce(topic, key=key, value=value)
            else:
                producer.produce(topic, key=key, value=value, partition=partitions)
        producer.commit_transaction(30)
    producer.flush(30)


def create_topic(broker: str, topic: str, partitions: int) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=broker)
    admin.create_topics([NewTopic(topic, partitions, 1)])
    admin.close()


def committed_offsets(broker: str, group: str, topic: str, last: dict[int, int], timeout: float) -> dict[int, int]:
    """The group's committed offsets of `topic`, polled until each partition's passes
    `last[partition]` or `timeout` runs out (a consumer that joins no group: it only asks
    the coordinator, so the worker keeps its partitions)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=broker, group_id=group, enable_auto_commit=False)
    try:
        deadline = time.monotonic() + timeout
        while True:
            got = {p: consumer.committed(TopicPartition(topic, p)) for p in last}
            got = {p: o for p, o in got.items() if o is not None}
            if all(got.get(p, -1) > o for p, o in last.items()) or time.monotonic() > deadline:
                return got
            time.sleep(0.5)
    finally:
        consumer.close(autocommit=False)


def test_the_fetcher_records_the_offsets_the_log_skips(broker):
    # aiokafka skips each transaction's commit marker; install() makes it say where.
    topic = f"tx-{uuid.uuid4().hex[:10]}"
    create_topic(broker, topic, 1)
    transactional_produce(broker, topic, [(b"k", f"{i}".encode()) for i in range(9)], per_transaction=3,
                          partitions=0)
    offsets.install(topic)

    async def read() -> list[int]:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        consumer = AIOKafkaConsumer(bootstrap_servers=broker, enable_auto_commit=False)
        await consumer.start()
        try:
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            consumer.seek(tp, 0)
            got: list[int] = []
            deadline = time.monotonic() + 20
            while len(got) < 9 and time.monotonic() < deadline:
                batch = await consumer.getmany(tp, timeout_ms=500)
                got += [r.offset for r in batch.get(tp, [])]
            return got
        finally:
            await consumer.stop()

    got = asyncio.run(read())
    assert len(got) == 9
    holes = sorted(set(range(got[-1] + 1)) - set(got))
    assert holes, f"no commit markers between the records: {got}"
    for hole in holes:                               # each marker is known absent
        assert offsets.ABSENT.covers(topic, 0, hole, hole + 1)
    assert not offsets.ABSENT.covers(topic, 0, got[0], got[0] + 1)   # a record is not


def test_worker_scores_transactional_input_in_order_without_holding_partitions(broker, model_dir, scorer,
                                                                               tmp_path):
    sim = tmp_path / "sim.parquet"
    subprocess.run([CLICKSCORE, "simulate", "--sessions", "60", "--seed", "7", "--out", str(sim)],
                   check=True, capture_output=True)
    log = event_dicts(pl.read_parquet(sim).sort("timestamp", maintain_order=True), "tx-")
    t = {name: f"{name}-{uuid.uuid4().hex[:8]}" for name in ("input", "scores", "next_items", "dlq", "triggers")}
    app_id = f"app-{uuid.uuid4().hex[:8]}"
    worker = WorkerProcess(broker, model_dir, t, app_id, tmp_path / "worker.log", free_port(),
                           ["--top-k", str(TOP_K), "--batch-size", "32", "--session-timeout-s", str(100 * 86400)])
    with worker:
        deadline = time.monotonic() + 120
        while "Worker ready" not in worker.log() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "Worker ready" in worker.log(), worker.log()[-3000:]
        # A transaction every 5 events: about one marker per partition every 5 events.
        transactional_produce(broker, t["input"], [(e["session_id"].encode(), json.dumps(e).encode())
                                                   for e in log], per_transaction=5)
        items = read_topic(broker, t["next_items"],
                           lambda r: {json.loads(x.value)["event_id"] for x in r} >= {e["event_id"] for e in log},
                           timeout=90, settle=0.5)
        want_scored, want_outcomes = expected_buyer_events(log)
        scores = read_topic(broker, t["scores"], lambda r: len(r) >= len(want_scored) + len(want_outcomes),
                            timeout=30, settle=1.0)
        dead = read_topic(broker, t["dlq"], lambda r: True, timeout=3, settle=1.0)
        # The commit moves past the markers too (they count as acked once known absent).
        inputs = read_topic(broker, t["input"], lambda r: len(r) >= len(log), timeout=30, settle=0)
        last = {}
        for r in inputs:
            last[r.partition] = max(last.get(r.partition, -1), r.offset)
        committed = committed_offsets(broker, app_id, t["input"], last, timeout=30)
        assert worker.proc.poll() is None, worker.log()[-3000:]
    assert all(committed.get(p, -1) > offset for p, offset in last.items()), (committed, last)
    text = worker.log()
    assert not dead, [json.loads(d.value)["reason"] for d in dead]
    assert "accepted as a gap" not in text and "never reached the agent" not in text, text[-3000:]
    # In session order: every output equals the offline score of its session prefix.
    item_values, score_values = values(items), values(scores)
    assert sorted(v["event_id"] for v in item_values) == sorted(e["event_id"] for e in log)   # once each
    assert_matches_offline(score_values, item_values, offline_scores(scorer, by_session(log), TOP_K))
