"""Every Kafka compression codec, end to end on the real embedded broker.

- A third-party client (librdkafka, the confluent-kafka wheel) and `clickscore replay`
  each produce click events with none, gzip, snappy, lz4 and zstd into one topic
  (different sessions per codec and producer); one real `clickscore worker`, itself
  producing lz4, scores every event equal to offline scoring.
- Both Python clients of the project (aiokafka: worker and sink; kafka-python: replay
  and the test readers) decode every codec, checked on batches whose codec is read
  back from the broker, so a broker that re-compressed could not fake a pass.
- A batch the worker cannot decompress stops it with exit status 65 and a message
  naming codec, partition and offset, in the log and in
  clickscore_unreadable_batches_total.

    .venv/bin/python -m pytest tests/test_codecs.py -q -s     # -s prints events per codec
"""
from __future__ import annotations

import asyncio
import json
import os
import struct
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import polars as pl
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # bench/ is not an installed package

from bench.workerkit import (CLICKSCORE, WorkerProcess, offline_scores, produce,  # noqa: E402
                             read_topic, values)
from conftest import free_port  # noqa: E402
from stream.kafka_compat import CODEC_NAMES, COMPRESSION_TYPES  # noqa: E402

TOP_K = 5
PRODUCERS = ("librdkafka", "replay")
PARTITIONS = 3
LONG_TIMEOUT = ["--session-timeout-s", str(100 * 86400)]   # compare with whole-log sessions


# -- helpers: raw record batches on the broker -------------------------------------------------

async def _client(broker: str, topic: str):
    from aiokafka.client import AIOKafkaClient

    client = AIOKafkaClient(bootstrap_servers=broker)
    await client.bootstrap()
    client.add_topic(topic)
    await client.force_metadata_update()
    return client


def stored_codecs(broker: str, topic: str) -> Counter:
    """Codec name -> record batches of `topic` stored with it, read with raw Fetch
    requests (no consumer in between that could hide what the broker holds)."""
    from aiokafka.protocol.fetch import FetchRequest
    from aiokafka.record.memory_records import MemoryRecords
    from aiokafka.structs import TopicPartition

    async def fetch_all() -> Counter:
        client = await _client(broker, topic)
        codecs: Counter = Counter()
        try:
            for partition in sorted(client.cluster.partitions_for_topic(topic)):
                leader = client.cluster.leader_for_partition(TopicPartition(topic, partition))
                offset, highwater = 0, None
                while highwater is None or offset < highwater:
                    request = FetchRequest(max_wait_time=100, min_bytes=1, max_bytes=8 << 20,
                                           isolation_level=0,
                                           topics=[(topic, [(partition, offset, 8 << 20)])])
                    response = await client.send(leader, request)
                    _, error_code, highwater, *_, message_set = response.topics[0][1][0]
                    assert error_code == 0, f"fetch {topic}/{partition}@{offset}: error {error_code}"
                    records = MemoryRecords(bytes(message_set or b""))
                    moved = False
                    while records.has_next():
                        batch = records.next_batch()
                        codecs[CODEC_NAMES[batch.compression_type]] += 1
                        offset, moved = batch.next_offset, True
                    if not moved:
                        break
        finally:
            await client.close()
        return codecs
    return asyncio.run(fetch_all())


def relabelled_batch(codec_id: int, records: list[tuple[bytes, bytes]]) -> bytes:
    """An uncompressed v2 record batch whose attributes claim `codec_id` (CRC redone):
    what a producer with a broken or foreign codec would send."""
    from kafka.record.default_records import DefaultRecordBatchBuilder as Builder
    from kafka.record.util import calc_crc32c

    builder = Builder(magic=2, compression_type=0, is_transactional=0, producer_id=-1,
                      producer_epoch=-1, base_sequence=-1, batch_size=1 << 20)
    now = int(time.time() * 1000)
    for i, (key, value) in enumerate(records):
        builder.append(i, timestamp=now, key=key, value=value, headers=[])
    buffer = bytearray(builder.build())
    (attributes,) = struct.unpack_from(">h", buffer, Builder.ATTRIBUTES_OFFSET)
    struct.pack_into(">h", buffer, Builder.ATTRIBUTES_OFFSET, (attributes & ~0x07) | codec_id)
    struct.pack_into(">I", buffer, Builder.CRC_OFFSET, calc_crc32c(memoryview(buffer)[Builder.ATTRIBUTES_OFFSET:]))
    return bytes(buffer)


def produce_raw_batch(broker: str, topic: str, partition: int, batch: bytes) -> tuple[int, int]:
    """Send one ready-made record batch with a plain Produce request; (error code, base offset)."""
    from aiokafka.protocol.produce import ProduceRequest
    from aiokafka.structs import TopicPartition

    async def send():
        client = await _client(broker, topic)
        try:
            leader = client.cluster.leader_for_partition(TopicPartition(topic, partition))
            response = await client.send(leader, ProduceRequest(
                transactional_id=None, required_acks=-1, timeout=10000,
                topics=[(topic, [(partition, batch)])]))
        finally:
            await client.close()
        _, error_code, offset, *_ = response.topics[0][1][0]
        return error_code, offset
    return asyncio.run(send())


def create_topic(broker: str, topic: str, partitions: int) -> None:
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    admin = KafkaAdminClient(bootstrap_servers=broker)
    try:
        admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        admin.close()


def librdkafka_produce(broker: str, topic: str, events: list[dict], codec: str) -> int:
    """Send events keyed by session with a librdkafka producer; returns how many were acked."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": broker, "compression.type": codec,
                         "enable.idempotence": False, "linger.ms": 20,
                         "max.in.flight.requests.per.connection": 1})   # keeps a session in order
    acked, errors = [], []

    def delivered(error, message):
        (errors if error else acked).append(error or message.offset())

    for event in events:
        producer.produce(topic, key=event["session_id"].encode(), value=json.dumps(event).encode(),
                         on_delivery=delivered)
        producer.poll(0)
    assert producer.flush(30) == 0, "librdkafka did not deliver everything within 30 s"
    assert not errors, errors[:3]
    return len(acked)


def topics() -> dict[str, str]:
    run = uuid.uuid4().hex[:8]
    return {name: f"{name}-{run}" for name in ("input", "scores", "next_items", "dlq", "triggers")}


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def groups(tmp_path_factory) -> dict[tuple[str, str], list[dict]]:
    """(producer, codec) -> simulated events of its own sessions, in event-time order."""
    path = tmp_path_factory.mktemp("sim") / "sim.parquet"
    subprocess.run([CLICKSCORE, "simulate", "--sessions", "200", "--seed", "21", "--buy-share", "0.2",
                    "--out", str(path)], check=True, capture_output=True)
    frame = pl.read_parquet(path).sort("timestamp", maintain_order=True)
    keys = [(producer, codec) for producer in PRODUCERS for codec in COMPRESSION_TYPES]
    sessions = sorted(frame["session_id"].unique().to_list())
    group_of = {s: keys[i % len(keys)] for i, s in enumerate(sessions)}
    out: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for i, row in enumerate(frame.iter_rows(named=True)):
        producer, codec = group_of[row["session_id"]]
        event = {k: row[k] for k in ("session_id", "event_type", "item_id", "category_id", "price",
                                     "timestamp", "user_id") if row.get(k) is not None}
        event["session_id"] = f"{producer}-{codec}-{row['session_id']}"
        event["event_id"] = f"{producer}-{codec}-{i}"
        out[(producer, codec)].append(event)
    assert all(out[k] for k in keys)
    return dict(out)


# -- tests ---------------------------------------------------------------------------------------

def test_every_client_has_every_codec():
    from stream.kafka_compat import missing_codecs
    assert missing_codecs("aiokafka") == []
    assert missing_codecs("kafka-python") == []


def test_missing_codec_library_fails_at_once_naming_the_package(monkeypatch):
    from aiokafka import codec as aiokafka_codec
    from kafka import codec as kafka_codec

    from stream.errors import ClickscoreError
    from stream.kafka_compat import require_codecs

    monkeypatch.setattr(aiokafka_codec, "has_zstd", lambda: False)
    with pytest.raises(ClickscoreError, match=r"aiokafka cannot read or write zstd .*install cramjam"):
        require_codecs("aiokafka")
    monkeypatch.setattr(kafka_codec, "has_snappy", lambda: False)
    with pytest.raises(ClickscoreError, match=r"kafka-python .* snappy .*install python-snappy"):
        require_codecs("kafka-python", ["snappy", "gzip"])
    require_codecs("kafka-python", ["none", "gzip", "lz4"])   # the ones still there pass


def test_a_future_codec_id_is_named_with_partition_and_offset(monkeypatch):
    """The embedded broker refuses codec ids above 4 at produce time (it answers
    UnknownServerError), so this batch is decoded by aiokafka's real fetcher classes
    in-process, as it would arrive from a newer Kafka."""
    from aiokafka.consumer.fetcher import PartitionRecords
    from aiokafka.errors import UnsupportedCodecError
    from aiokafka.record.memory_records import MemoryRecords
    from aiokafka.structs import TopicPartition

    from stream.kafka_compat import guard_fetcher

    monkeypatch.setattr(PartitionRecords, "_unpack_records", PartitionRecords._unpack_records)
    seen = []
    guard_fetcher(seen.append)
    good = relabelled_batch(0, [(b"s", b"ok-0"), (b"s", b"ok-1")])
    # The second batch starts at offset 2: patch its base offset (not covered by the CRC).
    future = bytearray(relabelled_batch(6, [(b"s", b"future")]))
    struct.pack_into(">q", future, 0, 2)
    records = PartitionRecords(TopicPartition("clicks", 3), MemoryRecords(good + bytes(future)), [], 0,
                               None, None, True, 0)
    read = []
    with pytest.raises(UnsupportedCodecError) as raised:
        for record in records:
            read.append(record.value)
    assert read == [b"ok-0", b"ok-1"]   # the readable batch before it still comes through
    message = str(raised.value)
    assert "topic clicks partition 3 offset 2" in message and "codec unknown (id 6)" in message
    assert [(u.partition, u.offset, u.codec) for u in seen] == [(3, 2, "unknown (id 6)")]


def test_librdkafka_batches_of_every_codec_decode_with_both_python_clients(broker):
    topic = f"codecs-{uuid.uuid4().hex[:8]}"
    create_topic(broker, topic, 1)
    sent = {}
    for codec in COMPRESSION_TYPES:
        events = [{"session_id": f"s-{codec}", "event_type": "view", "item_id": str(i),
                   "timestamp": 1767571253772 + i, "event_id": f"{codec}-{i}"} for i in range(40)]
        sent[codec] = librdkafka_produce(broker, topic, events, codec)
    assert stored_codecs(broker, topic).keys() == set(COMPRESSION_TYPES)
    total = sum(sent.values())
    # kafka-python (replay's client, the tests' reader)
    records = read_topic(broker, topic, lambda r: len(r) >= total, timeout=60, settle=0.5)
    assert Counter(json.loads(r.value)["event_id"].split("-")[0] for r in records) == Counter(sent)

    # aiokafka (the worker's and the sink's client)
    async def consume() -> Counter:
        from aiokafka import AIOKafkaConsumer
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=broker, group_id=None,
                                    auto_offset_reset="earliest")
        await consumer.start()
        got: Counter = Counter()
        try:
            deadline = time.monotonic() + 60
            while sum(got.values()) < total and time.monotonic() < deadline:
                for batch in (await consumer.getmany(timeout_ms=500)).values():
                    got.update(json.loads(m.value)["event_id"].split("-")[0] for m in batch)
        finally:
            await consumer.stop()
        return got
    assert asyncio.run(consume()) == Counter(sent)


def test_worker_scores_every_codec_from_librdkafka_and_replay_like_offline(
        broker, model_dir, scorer, groups, tmp_path):
    t = topics()
    create_topic(broker, t["input"], PARTITIONS)
    worker = WorkerProcess(broker, model_dir, t, f"app-{uuid.uuid4().hex[:8]}", tmp_path / "worker.log",
                           free_port(), ["--top-k", str(TOP_K), "--partitions", str(PARTITIONS),
                                         "--compression-type", "lz4", *LONG_TIMEOUT])
    sent: dict[tuple[str, str], int] = {}
    with worker:
        for codec in COMPRESSION_TYPES:
            sent[("librdkafka", codec)] = librdkafka_produce(broker, t["input"], groups[("librdkafka", codec)],
                                                             codec)
        from_librdkafka = stored_codecs(broker, t["input"])
        for codec in COMPRESSION_TYPES:
            path = tmp_path / f"replay-{codec}.jsonl"
            path.write_text("".join(json.dumps(e) + "\n" for e in groups[("replay", codec)]))
            done = subprocess.run([CLICKSCORE, "replay", "--input", str(path), "--topic", t["input"],
                                   "--broker", broker, "--compression-type", codec, "--progress", "false",
                                   "--json"], capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            summary = json.loads(done.stdout.strip().splitlines()[-1])
            assert summary["failed"] == 0
            sent[("replay", codec)] = summary["sent"]
        expected = sum(len(events) for events in groups.values())
        assert sum(sent.values()) == expected
        items = read_topic(broker, t["next_items"], lambda r: len(r) >= expected, timeout=180)
        scores = read_topic(broker, t["scores"], lambda r: True, timeout=30, settle=1.0)
        assert worker.proc.poll() is None, worker.log()[-3000:]

    # Every codec really reached the broker as such, from each producer (replay added
    # batches of every codec), and the worker's outputs are lz4 (read back above by kafka-python).
    assert from_librdkafka.keys() == set(COMPRESSION_TYPES)
    after_replay = stored_codecs(broker, t["input"])
    assert all(after_replay[codec] > from_librdkafka[codec] for codec in COMPRESSION_TYPES), \
        (from_librdkafka, after_replay)
    assert stored_codecs(broker, t["next_items"]).keys() == {"lz4"}

    emitted_items, emitted_scores = values(items), values(scores)
    scored = Counter(tuple(r["event_id"].split("-")[:2]) for r in emitted_items)
    print("\nproducer    codec   sent  scored (next-items)")
    for (producer, codec), n in sent.items():
        print(f"{producer:<11} {codec:<6} {n:>5}  {scored[(producer, codec)]:>6}")
    assert dict(scored) == sent, "every event of every codec is scored exactly once"
    assert len(read_topic(broker, t["dlq"], lambda r: True, timeout=5, settle=0.5)) == 0

    sessions: dict[str, list[dict]] = defaultdict(list)
    for events in groups.values():
        for e in events:
            sessions[e["session_id"]].append(e)
    reference = offline_scores(scorer, sessions, TOP_K)
    worst = 0.0
    for record in emitted_items:
        _, _, offline, count = reference[record["event_id"]]
        assert record["event_count"] == count
        worst = max(worst, float(np.max(np.abs(np.array(record["scores"]) - np.array(offline)))))
    buy_scored = 0
    for record in emitted_scores:
        if record["outcome"] is None:
            worst = max(worst, abs(record["buy_probability"] - reference[record["event_id"]][0]))
            buy_scored += 1
    assert buy_scored > 0.5 * expected
    assert worst <= 1e-5, f"streaming differs from offline by {worst}"


def test_worker_stops_on_a_batch_it_cannot_decompress(broker, model_dir, tmp_path):
    """A batch labelled snappy whose payload is not snappy (the embedded broker stores it;
    it refuses unknown codec ids): the worker must stop, not skip it or die unexplained."""
    t = topics()
    create_topic(broker, t["input"], 1)
    event = lambda s, i: json.dumps({"session_id": s, "event_type": "view", "item_id": str(i),  # noqa: E731
                                     "timestamp": 1767571253772 + i}).encode()
    produce(broker, t["input"], [(b"s1", event("s1", i)) for i in range(3)])
    error_code, bad_offset = produce_raw_batch(broker, t["input"], 0,
                                               relabelled_batch(2, [(b"s2", event("s2", 1))]))
    assert error_code == 0 and bad_offset == 3
    produce(broker, t["input"], [(b"s3", event("s3", 1))])
    assert stored_codecs(broker, t["input"])["snappy"] == 1

    metrics_port = free_port()
    worker = WorkerProcess(broker, model_dir, t, f"app-{uuid.uuid4().hex[:8]}", tmp_path / "worker.log",
                           free_port(), ["--metrics-port", str(metrics_port), "--partitions", "1"])
    counted = None
    with worker:
        deadline = time.monotonic() + 120
        while worker.proc.poll() is None and time.monotonic() < deadline:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=1).read()
                counted = [line for line in body.decode().splitlines()
                           if line.startswith("clickscore_unreadable_batches_total{")] or counted
            except OSError:
                pass   # not serving yet, or already gone
            time.sleep(0.1)
        status = worker.proc.wait(timeout=5)
    log = worker.log()
    assert status == 65, log[-3000:]
    want = f"topic {t['input']} partition 0 offset {bad_offset}: compression codec snappy"
    assert any("CRITICAL" in line and want in line for line in log.splitlines()), log[-3000:]
    # The worker holds the counter up for a scrape interval before it stops.
    assert counted == [f'clickscore_unreadable_batches_total{{codec="snappy",partition="0",'
                       f'topic="{t["input"]}"}} 1.0'], counted
    # Nothing past the unreadable batch was scored.
    items = read_topic(broker, t["next_items"], lambda r: False, timeout=2, settle=0)
    assert not any(json.loads(r.value)["session_id"] == "s3" for r in items)


def test_worker_without_the_codec_library_refuses_to_start(broker, model_dir, tmp_path):
    """cramjam hidden from a real worker process: it exits 2 at start-up naming the
    package, instead of crashing on the first compressed batch it fetches."""
    blocker = tmp_path / "no_cramjam"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        "class _NoCramjam(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'cramjam':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r} (blocked by the test)')\n"
        "sys.meta_path.insert(0, _NoCramjam())\n")
    t = topics()
    worker = WorkerProcess(broker, model_dir, t, f"app-{uuid.uuid4().hex[:8]}", tmp_path / "worker.log",
                           free_port())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(blocker), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(worker.argv, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert ("clickscore worker: error: aiokafka cannot read or write snappy, lz4, zstd record batches "
            "here: install cramjam") in done.stderr
