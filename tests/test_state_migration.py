"""Session state v1 -> v2 on a real worker: v1 table values (rows of vocabulary indices,
as the code before STATE_VERSION 2 wrote them) in the changelog topic are restored by a
v2 worker, migrated (counted in clickscore_state_migrations_total) and the sessions go
on with scores equal to offline.

    .venv/bin/python -m pytest tests/test_state_migration.py -q

`v1_value` writes the old layout; the unit test below shows it reproduces, byte for
byte, the values the v1 code wrote (tests/fixtures/state_v1/sessions.json).
"""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench.workerkit import CLICKSCORE, WorkerProcess, offline_scores, produce, read_topic, values  # noqa: E402
from conftest import free_port  # noqa: E402
from test_worker import (LONG_TIMEOUT, TOP_K, assert_every_event_scored, assert_matches_offline,  # noqa: E402
                         by_session, event_dicts, expected_buyer_events, read_accounted, topics)

from stream.events import EVENT_TYPES  # noqa: E402
from stream.features import FeatureArtefacts  # noqa: E402
from stream.session_state import EVENT_ROW_V1  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "state_v1" / "sessions.json"
PARTITIONS = 4


def v1_value(events: list[dict], offsets: list[int], artefacts: FeatureArtefacts, partition: int,
             window: int = 100) -> bytes:
    """The v1 table value after `events` (one session, no idle gap): a 16-byte header, the
    last `window` rows of vocabulary indices (25 bytes each), their input offsets."""
    n = len(events)
    rows = np.zeros(n, EVENT_ROW_V1)
    rows["event_type"] = [EVENT_TYPES[e["event_type"]] for e in events]
    rows["item"] = [artefacts.item_index(e["item_id"]) for e in events]
    rows["category"] = [artefacts.category_index(e.get("category_id")) for e in events]
    rows["timestamp"] = [e["timestamp"] for e in events]
    rows["price"] = [np.nan if e.get("price") is None else e["price"] for e in events]
    ts = np.array([e["timestamp"] for e in events], dtype=np.int64)
    rows["gap"] = np.concatenate([[np.nan], np.diff(ts) / 1000.0])
    bought = [e["event_type"] == "transaction" for e in events]
    flags = (1 if any(bought) else 0) | (2 if any(e["event_type"] == "addtocart" for e in events) else 0) \
        | (4 if any(bought[:-1]) else 0)
    last_ms = int(ts.max())
    return (struct.pack("<BBHIq", 1, flags, partition, n, last_ms) + rows[-window:].tobytes()
            + np.asarray(offsets[-window:], dtype="<i8").tobytes())


def test_the_v1_writer_here_reproduces_what_the_v1_code_wrote():
    data = json.loads(FIXTURE.read_text())
    artefacts = FeatureArtefacts.from_dict(data["features"])
    for name, session in data["sessions"].items():
        events = session["events"]
        assert v1_value(events, [e["offset"] for e in events], artefacts, data["partition"]).hex() == \
            session["v1_hex"], name


def migrations(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("clickscore_state_migrations_total"))


def commit(broker: str, group: str, offsets: dict[int, int], topic: str) -> None:
    """Commit `offsets` (partition -> next offset to read) for the consumer group, as the
    v1 worker would have before it stopped."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.structs import OffsetAndMetadata

    consumer = KafkaConsumer(bootstrap_servers=broker, group_id=group, enable_auto_commit=False)
    tps = {p: TopicPartition(topic, p) for p in offsets}
    consumer.assign(list(tps.values()))
    consumer.commit({tps[p]: OffsetAndMetadata(o, "", -1) for p, o in offsets.items()})
    assert all(consumer.committed(tps[p]) == o for p, o in offsets.items())
    consumer.close()


def test_a_v2_worker_restores_v1_changelog_values_and_scores_on_like_offline(broker, model_dir, scorer, tmp_path):
    from kafka import KafkaProducer
    from kafka.admin import KafkaAdminClient, NewTopic

    sim = tmp_path / "sim.parquet"
    subprocess.run([CLICKSCORE, "simulate", "--sessions", "80", "--seed", "31", "--buy-share", "0.3",
                    "--out", str(sim)], check=True, capture_output=True)
    log = event_dicts(pl.read_parquet(sim).sort("timestamp", maintain_order=True), "m-")
    # and one session longer than the window, its v1 value holding only its last 100 rows
    items = scorer.artefacts.items
    log += [{"session_id": "m-long", "event_type": "addtocart" if k == 40 else "view", "item_id": items[k % 7],
             "timestamp": log[0]["timestamp"] + 20_000 * k, "event_id": f"m-long-{k}"} for k in range(230)]
    t = topics()
    app_id = f"app-{uuid.uuid4().hex[:8]}"
    changelog = f"{app_id}-sessions-changelog"
    admin = KafkaAdminClient(bootstrap_servers=broker)
    admin.create_topics([NewTopic(t["input"], PARTITIONS, 1), NewTopic(changelog, PARTITIONS, 1)])
    admin.close()
    # What a v1 worker did before it stopped: it read the first half of every session (up
    # to 150 events: longer than the window), committed it, and its table holds v1 values
    # for those sessions. (All history is produced first: per partition it is then a prefix.)
    sessions = by_session(log)
    first = {e["event_id"] for events in sessions.values() for e in events[:min(150, len(events) // 2 + 1)]}
    history = [e for e in log if e["event_id"] in first]
    rest = [e for e in log if e["event_id"] not in first]
    metadata = produce(broker, t["input"], [(e["session_id"].encode(), json.dumps(e).encode()) for e in history])
    placed: dict[str, list[tuple[dict, int, int]]] = {}
    next_offset: dict[int, int] = {p: 0 for p in range(PARTITIONS)}
    for event, meta in zip(history, metadata):
        placed.setdefault(event["session_id"], []).append((event, meta.partition, meta.offset))
        next_offset[meta.partition] = max(next_offset[meta.partition], meta.offset + 1)
    # One record a request: this broker reports a partition's end as its last batch's
    # start + 1 (docs/PLATFORM.md), and Faust restores a changelog only up to that end.
    producer = KafkaProducer(bootstrap_servers=broker, linger_ms=0)
    for session_id, events in placed.items():
        partition = events[0][1]
        value = v1_value([e for e, _, _ in events], [o for _, _, o in events], scorer.artefacts, partition)
        producer.send(changelog, key=session_id.encode(), value=value, partition=partition).get(timeout=30)
    producer.close()
    commit(broker, app_id, next_offset, t["input"])
    produce(broker, t["input"], [(e["session_id"].encode(), json.dumps(e).encode()) for e in rest])
    continued = {e["session_id"] for e in rest} & set(placed)
    assert len(continued) > 10

    metrics_port = free_port()
    with WorkerProcess(broker, model_dir, t, app_id, tmp_path / "worker.log", free_port(),
                       ["--top-k", str(TOP_K), "--batch-size", "32", "--metrics-port", str(metrics_port),
                        *LONG_TIMEOUT]) as worker:
        items, dead = read_accounted(broker, t, rest, timeout=180)
        want_scored, want_outcomes = expected_buyer_events(log)
        want = (want_scored | want_outcomes) & {e["event_id"] for e in rest}
        scores = read_topic(broker, t["scores"], lambda r: len({json.loads(x.value)["event_id"] for x in r})
                            >= len(want), timeout=60)
        assert worker.proc.poll() is None, worker.log()[-3000:]
        counted = migrations(metrics_port)

    assert_every_event_scored(dead, rest)
    item_values, score_values = values(items), values(scores)
    # Only what was not committed is read; every such event is scored...
    assert {v["event_id"] for v in item_values} == {e["event_id"] for e in rest}
    assert {v["event_id"] for v in score_values} == want
    # ...equal to offline over the whole log: the migrated sessions carry their history
    # (without it the continued sessions' scores and event counts would differ).
    assert_matches_offline(score_values, item_values, offline_scores(scorer, by_session(log), TOP_K))
    assert counted == len(continued), (counted, len(continued))      # each read once, then written as v2
    last = {}
    for record in read_topic(broker, changelog, lambda r: False, timeout=5, settle=0):
        last[record.key] = record.value
    assert all(last[s.encode()][0] == 2 for s in continued)
    longest = max(len(placed[s]) for s in continued)
    print(f"\n{len(continued)} v1 sessions migrated and continued (longest history {longest} events); "
          f"{len(rest)} events scored like offline")
