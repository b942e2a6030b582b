"""The streaming scorer end to end: a real `clickscore worker` subprocess on the real
embedded broker, a model made by the real `clickscore train` + `clickscore export`,
real Taobao events (with purchases) and simulated sessions (some longer than the
100-event window), malformed input, and a SIGKILL in the middle of the stream."""
from __future__ import annotations

import base64
import os
import re
import signal
import json
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

from bench.stream import events_consumed, scrape_cache  # noqa: E402
from bench.workerkit import (CLICKSCORE, WorkerProcess, child_pids, offline_scores, proc_stat,  # noqa: E402
                             produce, read_topic, values)
from conftest import free_port  # noqa: E402

TOP_K = 5
MAX_MESSAGE_BYTES = 4096
LONG_TIMEOUT = ["--session-timeout-s", str(100 * 86400)]   # compare with whole-log sessions


@pytest.fixture(params=["memory://", "rocksdb://"], ids=["memory", "rocksdb"])
def store(request, monkeypatch) -> str:
    """Both table stores: memory (rebuilt from the changelog on every start) and RocksDB
    (a local copy under --data-dir). The tests where state matters most run on each."""
    if request.param == "rocksdb://":
        allow_rocksdb_restart_on_embedded_broker(monkeypatch)
    return request.param


def allow_rocksdb_restart_on_embedded_broker(monkeypatch) -> None:
    # The embedded broker reports a changelog's end as its last batch's start + 1, so
    # the offset RocksDB persisted before a stop or kill can look "beyond the end", and
    # Faust's recovery consistency check then refuses to start (ConsistencyError).
    # Faust reads the switch from the environment, which the worker inherits; until
    # stream/app.py sets recovery_consistency_check=False itself.
    monkeypatch.setenv("RECOVERY_CONSISTENCY_CHECK", "false")


def assert_store_used(store: str, data_dir: Path) -> None:
    """RocksDB leaves its files (CURRENT, *.sst/*.log) under --data-dir; memory leaves none."""
    rocksdb_files = list(data_dir.rglob("CURRENT"))
    assert bool(rocksdb_files) == (store == "rocksdb://"), (store, sorted(data_dir.rglob("*"))[:20])



def topics() -> dict[str, str]:
    run = uuid.uuid4().hex[:8]
    return {name: f"{name}-{run}" for name in ("input", "scores", "next_items", "dlq", "triggers")}


def event_dicts(frame: pl.DataFrame, prefix: str) -> list[dict]:
    out = []
    for i, row in enumerate(frame.iter_rows(named=True)):
        event = {k: row[k] for k in ("session_id", "event_type", "item_id", "category_id", "price",
                                     "timestamp", "user_id", "event_id") if row.get(k) is not None}
        event["session_id"] = f"{prefix}{event['session_id']}"
        event["event_id"] = f"{prefix}{i}"
        out.append(event)
    return out


@pytest.fixture(scope="module")
def click_log(datasets, tmp_path_factory) -> list[dict]:
    """Real Taobao sessions (about 10% buy) and simulated ones, interleaved by event time
    within each source, as a shop would send them."""
    from training.readers import taobao

    real = taobao.read(datasets / "taobao-userbehavior", 30.0)
    buyers = real.filter(pl.col("event_type") == "transaction")["session_id"].unique().sort().head(40)
    others = real["session_id"].unique().sort().head(160)
    real = real.filter(pl.col("session_id").is_in(buyers.to_list()) | pl.col("session_id").is_in(others.to_list()))
    sim_path = tmp_path_factory.mktemp("sim") / "sim.parquet"
    subprocess.run([CLICKSCORE, "simulate", "--sessions", "250", "--seed", "11", "--buy-share", "0.2",
                    "--out", str(sim_path)], check=True, capture_output=True)
    sim = pl.read_parquet(sim_path)
    events = event_dicts(real.sort("timestamp", maintain_order=True), "tb-") + \
        event_dicts(sim.sort("timestamp", maintain_order=True), "sim-")
    lengths = Counter(e["session_id"] for e in events)
    assert max(lengths.values()) > 100, "the log must hold a session longer than the window"
    assert any(e["event_type"] == "transaction" and e["session_id"].startswith("tb-") for e in events)
    return events


def by_session(events: list[dict]) -> dict[str, list[dict]]:
    sessions: dict[str, list[dict]] = defaultdict(list)
    for e in events:
        sessions[e["session_id"]].append(e)
    return sessions


def expected_buyer_events(events: list[dict]) -> tuple[set[str], set[str]]:
    """(event ids that get a buy probability, event ids of each session's first transaction)."""
    scored, outcomes = set(), set()
    for session in by_session(events).values():
        for e in session:
            if e["event_type"] == "transaction":
                outcomes.add(e["event_id"])
                break
            scored.add(e["event_id"])
    return scored, outcomes


MALFORMED = [  # (key, value, reason)
    (b"k1", b"\xff\xfe\x00 not utf-8", "undecodable"),
    (b"k2", b'{"session_id": "s", "event_type": ', "invalid_json"),
    (b"k3", json.dumps({"event_type": "view", "item_id": "1", "timestamp": 1767571253772}).encode(),
     "missing_field"),
    (b"s4", json.dumps({"session_id": "s4", "event_type": "wishlist", "item_id": "1",
                        "timestamp": 1767571253772}).encode(), "unknown_event_type"),
    (b"s5", json.dumps({"session_id": "s5", "event_type": "view", "item_id": "1",
                        "timestamp": 1767571253772, "pad": "x" * MAX_MESSAGE_BYTES}).encode(), "oversized_message"),
    (b"other-key", json.dumps({"session_id": "s6", "event_type": "view", "item_id": "1",
                               "timestamp": 1767571253772}).encode(), "key_mismatch"),
    (b"s7", None, "empty_message"),
]


def assert_matches_offline(emitted_scores: list[dict], emitted_items: list[dict], reference: dict) -> None:
    worst = 0.0
    for record in emitted_scores:
        if record["outcome"] is None:
            buy, _, _, count = reference[record["event_id"]]
            worst = max(worst, abs(record["buy_probability"] - buy))
            assert record["event_count"] == count
    assert worst <= 1e-5, f"streaming buy probability differs from offline by {worst}"
    for record in emitted_items:
        _, items, scores, count = reference[record["event_id"]]
        assert record["event_count"] == count
        assert np.max(np.abs(np.array(record["scores"]) - np.array(scores))) <= 1e-5
        if record["items"] != items:   # only a near-tie may swap places
            for a, b, sa, sb in zip(record["items"], items, record["scores"], scores):
                assert a == b or abs(sa - sb) <= 1e-5, (record["event_id"], record["items"], items)


def dead_letters_by_event(broker: str, dlq_topic: str) -> dict[str, str]:
    """event_id -> reason of every dead letter whose original message is a JSON event."""
    out: dict[str, str] = {}
    for letter in values(read_topic(broker, dlq_topic, lambda r: False, timeout=2, settle=0)):
        try:
            out[json.loads(base64.b64decode(letter["original_b64"]))["event_id"]] = letter["reason"]
        except (ValueError, KeyError, TypeError):
            continue
    return out


def read_accounted(broker: str, t: dict[str, str], log: list[dict], timeout: float = 240.0):
    """(next-items records, {event_id: dead-letter reason}) read until every event of `log`
    has a next-items record or a dead letter.

    After a crash the events applied to the state but not committed are re-delivered; the
    state keeps their rows (stream/session_state.py, the replay margin), so they are scored
    again as the first time: the fault tests require no dead letter for a valid event
    (assert_every_event_scored)."""
    want = {e["event_id"] for e in log}
    deadline = time.monotonic() + timeout
    while True:
        dead = dead_letters_by_event(broker, t["dlq"])
        items = read_topic(broker, t["next_items"],
                           lambda r: not want - {json.loads(x.value)["event_id"] for x in r} - set(dead),
                           timeout=max(1.0, min(20.0, deadline - time.monotonic())), settle=0.5)
        seen = {json.loads(x.value)["event_id"] for x in items}
        if not want - seen - set(dead) or time.monotonic() > deadline:
            return items, dead


def assert_every_event_scored(dead: dict[str, str], log: list[dict], window: int = 100) -> None:
    """No valid event of `log` was dead-lettered: a re-delivered one included (even of a
    session longer than the window). The message gives the reasons and session lengths."""
    lengths = Counter(e["session_id"] for e in log)
    session_of = {e["event_id"]: e["session_id"] for e in log}
    ours = {event_id: reason for event_id, reason in dead.items() if event_id in session_of}
    long_ones = sum(lengths[session_of[event_id]] > window for event_id in ours)
    assert not ours, (f"{len(ours)} valid events dead-lettered ({long_ones} of sessions longer than the window), "
                      f"by reason {dict(Counter(ours.values()))}")


def test_worker_scores_every_event_like_offline_and_dead_letters_bad_input(
        broker, model_dir, scorer, click_log, tmp_path, store):
    # model_dir is trained with the defaults, so it carries the item-neighbour mixture
    # (training/models/neighbours.py): the parity below covers the in-graph table too
    fitted = json.loads((model_dir.parent / "ck" / "train_log.json").read_text())["neighbours"]
    assert fitted["mix"] > 0 and fitted["top_n"] == 100
    t = topics()
    records = [(e["session_id"].encode(), json.dumps(e).encode()) for e in click_log]
    # Malformed messages spread through the stream: the worker must carry on past each.
    step = len(records) // (len(MALFORMED) + 1)
    stream = list(records)
    for i, (key, value, _) in enumerate(MALFORMED):
        stream.insert((i + 1) * step + i, (key, value))
    started = time.monotonic()
    app_id = f"app-{uuid.uuid4().hex[:8]}"
    worker = WorkerProcess(broker, model_dir, t, app_id, tmp_path / "worker.log",
                           free_port(), ["--top-k", str(TOP_K), "--max-message-bytes", str(MAX_MESSAGE_BYTES),
                                         "--batch-size", "64", "--store", store, *LONG_TIMEOUT])
    with worker:
        produce(broker, t["input"], stream)
        n_valid = len(click_log)
        items = read_topic(broker, t["next_items"], lambda r: len(r) >= n_valid, timeout=240)
        want_scored, want_outcomes = expected_buyer_events(click_log)
        scores = read_topic(broker, t["scores"],
                            lambda r: len(r) >= len(want_scored) + len(want_outcomes), timeout=60)
        dlq = read_topic(broker, t["dlq"], lambda r: len(r) >= len(MALFORMED), timeout=60)
        assert worker.proc.poll() is None, worker.log()[-3000:]
    elapsed = time.monotonic() - started
    assert_store_used(store, tmp_path / f"data-{app_id}")

    item_values, score_values, dlq_values = values(items), values(scores), values(dlq)
    # One next-item event per valid event, one buy probability per event before the
    # session's first transaction, one outcome event per buying session, nothing more.
    assert sorted(v["event_id"] for v in item_values) == sorted(e["event_id"] for e in click_log)
    probabilities = [v["event_id"] for v in score_values if v["outcome"] is None]
    assert sorted(probabilities) == sorted(want_scored)
    outcomes = [v for v in score_values if v["outcome"] == "transaction"]
    assert sorted(v["event_id"] for v in outcomes) == sorted(want_outcomes)
    assert all(v["buy_probability"] is None for v in outcomes)
    assert all(0.0 <= v["buy_probability"] <= 1.0 for v in score_values if v["outcome"] is None)
    # Dead letters: reason, detail and the original bytes, position included.
    assert sorted(v["reason"] for v in dlq_values) == sorted(reason for _, _, reason in MALFORMED)
    originals = {reason: value or b"" for _, value, reason in MALFORMED}
    for v in dlq_values:
        assert base64.b64decode(v["original_b64"]) == originals[v["reason"]]
        assert v["detail"] and v["topic"] == t["input"] and v["offset"] >= 0 and v["partition"] >= 0
    assert len(stream) == len(item_values) + len(dlq_values)      # in = scored + dead-lettered
    # Keyed by session, carrying the model and the input's time.
    first = item_values[0]
    assert {"session_id", "event_id", "timestamp", "event_count", "model_name", "model_version",
            "processing_ms", "items", "scores"} <= set(first)
    assert first["model_name"] == "testgru" and first["model_version"] == "3"
    assert all(r.key == json.loads(r.value)["session_id"].encode() for r in items[:50])
    assert all(len(v["items"]) == TOP_K for v in item_values)
    # Streaming equals offline on the same log, sessions beyond the window included.
    reference = offline_scores(scorer, by_session(click_log), TOP_K)
    assert_matches_offline(score_values, item_values, reference)
    long_ids = {e["event_id"] for s in by_session(click_log).values() if len(s) > 100 for e in s[100:]}
    assert long_ids & {v["event_id"] for v in item_values}
    print(f"\n{len(stream)} messages scored in {elapsed:.1f} s (worker start included)")


def test_killed_worker_resumes_from_offsets_and_restored_state(broker, model_dir, scorer, tmp_path, store):
    t = topics()
    sim_path = tmp_path / "sim.parquet"
    subprocess.run([CLICKSCORE, "simulate", "--sessions", "300", "--seed", "12", "--buy-share", "0.2",
                    "--out", str(sim_path)], check=True, capture_output=True)
    log = event_dicts(pl.read_parquet(sim_path).sort("timestamp", maintain_order=True), "k-")
    app_id = f"app-{uuid.uuid4().hex[:8]}"
    args = ["--top-k", str(TOP_K), "--batch-size", "32", "--store", store, *LONG_TIMEOUT]
    metadata = produce(broker, t["input"], [(e["session_id"].encode(), json.dumps(e).encode()) for e in log])
    input_partition = {e["session_id"]: m.partition for e, m in zip(log, metadata)}

    first = WorkerProcess(broker, model_dir, t, app_id, tmp_path / "first.log", free_port(), args).start()
    try:
        read_topic(broker, t["next_items"], lambda r: len(r) >= len(log) // 3, timeout=180, settle=0)
    finally:
        first.kill()   # SIGKILL: no commit, no flush, no goodbye
    emitted_before = values(read_topic(broker, t["next_items"], lambda r: True, timeout=5, settle=0.5))
    before_restart = {v["event_id"] for v in emitted_before}
    sessions_before = {v["session_id"] for v in emitted_before}
    assert 0 < len(before_restart) < len(log), "the kill must land mid-stream"

    with WorkerProcess(broker, model_dir, t, app_id, tmp_path / "second.log", free_port(), args) as second:
        items, dead = read_accounted(broker, t, log)
        want_scored, want_outcomes = expected_buyer_events(log)
        scores = read_topic(broker, t["scores"], lambda r: len({json.loads(x.value)["event_id"] for x in r})
                            >= len((want_scored | want_outcomes) - set(dead)), timeout=60)
        assert second.proc.poll() is None, second.log()[-3000:]

    item_values, score_values = values(items), values(scores)
    # Every event scored, re-delivered ones of sessions longer than the window included;
    # duplicates (re-delivery of what was not committed) are allowed, and every copy
    # carries the same numbers: dedupe by event id.
    assert_every_event_scored(dead, log)
    assert {v["event_id"] for v in item_values} == {e["event_id"] for e in log}
    assert (want_scored | want_outcomes) - set(dead) <= {v["event_id"] for v in score_values} <= want_scored | want_outcomes
    duplicates = len(item_values) - len(log)
    # ...and equal an uninterrupted run (= offline, shown by the test above): state
    # restored from the changelog, not restarted empty.
    reference = offline_scores(scorer, by_session(log), TOP_K)
    assert_matches_offline(score_values, item_values, reference)
    resumed = [v for v in item_values if v["event_id"] not in before_restart]
    assert any(v["session_id"] in sessions_before for v in resumed)   # sessions spanning the kill
    # Each session's changelog records sit in the partition of its input events (a
    # batch spans partitions; a write to the batch's last event's partition would be
    # restored by the wrong worker after a rebalance).
    changelog = read_topic(broker, f"{app_id}-sessions-changelog", lambda r: False, timeout=5, settle=0)
    assert changelog
    for record in changelog:
        assert record.partition == input_partition[record.key.decode()], record.key
    assert_store_used(store, tmp_path / f"data-{app_id}")
    print(f"\n{len(resumed)} events scored after the restart, {duplicates} duplicates")


def test_rocksdb_worker_stopped_and_restarted_keeps_its_sessions(broker, model_dir, scorer, tmp_path, monkeypatch):
    """The case RocksDB is for: a clean stop (SIGTERM), then a restart over the same
    --data-dir, with sessions that span the restart scored as one uninterrupted run."""
    allow_rocksdb_restart_on_embedded_broker(monkeypatch)
    t = topics()
    sim_path = tmp_path / "sim.parquet"
    subprocess.run([CLICKSCORE, "simulate", "--sessions", "80", "--seed", "15", "--out", str(sim_path)],
                   check=True, capture_output=True)
    log = event_dicts(pl.read_parquet(sim_path).sort("timestamp", maintain_order=True), "rs-")
    half = len(log) // 2
    app_id = f"app-{uuid.uuid4().hex[:8]}"
    args = ["--top-k", str(TOP_K), "--store", "rocksdb://", *LONG_TIMEOUT]
    as_records = lambda events: [(e["session_id"].encode(), json.dumps(e).encode()) for e in events]  # noqa: E731
    with WorkerProcess(broker, model_dir, t, app_id, tmp_path / "first.log", free_port(), args) as first:
        produce(broker, t["input"], as_records(log[:half]))
        read_topic(broker, t["next_items"], lambda r: len(r) >= half, timeout=120, settle=0)
    assert first.proc.returncode is not None and "Traceback" not in first.log(), first.log()[-3000:]
    assert_store_used("rocksdb://", tmp_path / f"data-{app_id}")

    with WorkerProcess(broker, model_dir, t, app_id, tmp_path / "second.log", free_port(), args) as second:
        produce(broker, t["input"], as_records(log[half:]))
        items = read_topic(broker, t["next_items"],
                           lambda r: len({json.loads(x.value)["event_id"] for x in r}) >= len(log), timeout=180)
        want_scored, want_outcomes = expected_buyer_events(log)
        scores = read_topic(broker, t["scores"], lambda r: len({json.loads(x.value)["event_id"] for x in r})
                            >= len(want_scored) + len(want_outcomes), timeout=60)
        assert second.proc.poll() is None, second.log()[-3000:]
    item_values = values(items)
    assert {v["event_id"] for v in item_values} == {e["event_id"] for e in log}
    spanning = {e["session_id"] for e in log[:half]} & {e["session_id"] for e in log[half:]}
    assert spanning, "some sessions must span the restart"
    # Event counts and scores equal one uninterrupted run: the sessions came back.
    assert_matches_offline(values(scores), item_values, offline_scores(scorer, by_session(log), TOP_K))


@pytest.mark.parametrize("processes", [1, 3])
def test_worker_refuses_a_model_that_does_not_match(broker, model_dir, tmp_path, processes):
    # With --processes the parent checks the model before it starts any process: one
    # message, the same exit status, no process started.
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    features = json.loads((bad / "features.json").read_text())
    features["items"] = features["items"][:-1]
    features.pop("vocab_hash")
    (bad / "features.json").write_text(json.dumps(features))
    started = time.monotonic()
    done = subprocess.run([CLICKSCORE, "worker", "--broker", broker, "--model", str(bad), "--metrics-port", "0",
                           "--web-port", str(free_port()), "--processes", str(processes)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "vocab_hash" in done.stderr and "error" in done.stderr
    assert done.stderr.count("vocab_hash") == 1 and "worker process 0" not in done.stderr, done.stderr[-3000:]
    assert time.monotonic() - started < 15


def test_idle_sessions_are_evicted_on_the_event_time_watermark(broker, model_dir, tmp_path, store):
    # Both stores: the scan lists the table's keys a slice at a time and reads each value
    # when its slice is decided, outside any event's context (RocksDB: raw, from the key's
    # own partition database, session_state.key_slices).
    t = topics()
    sim_path = tmp_path / "sim.parquet"
    subprocess.run([CLICKSCORE, "simulate", "--sessions", "60", "--seed", "13", "--out", str(sim_path)],
                   check=True, capture_output=True)
    log = event_dicts(pl.read_parquet(sim_path).sort("timestamp", maintain_order=True), "old-")
    last = max(e["timestamp"] for e in log)
    # Sessions that start a month later move every partition's watermark past the old ones.
    late = [{"session_id": f"late-{i}", "event_type": "view", "item_id": "1", "timestamp": last + 30 * 86_400_000,
             "event_id": f"late-{i}"} for i in range(24)]
    app_id = f"app-{uuid.uuid4().hex[:8]}"
    data_dir = tmp_path / "data"
    with WorkerProcess(broker, model_dir, t, app_id, tmp_path / "worker.log", free_port(),
                       ["--session-timeout-s", "1800", "--store", store, "--data-dir", str(data_dir)]) as worker:
        metadata = produce(broker, t["input"], [(e["session_id"].encode(), json.dumps(e).encode()) for e in log])
        read_topic(broker, t["next_items"], lambda r: len(r) >= len(log), timeout=120, settle=0)
        time.sleep(6)   # the next batch after EVICTION_SCAN_S runs a scan
        late_metadata = produce(broker, t["input"],
                                [(e["session_id"].encode(), json.dumps(e).encode()) for e in late])
        read_topic(broker, t["next_items"], lambda r: len(r) >= len(log) + len(late), timeout=60, settle=0)
        changelog_name = f"{app_id}-sessions-changelog"
        old_sessions = {e["session_id"] for e in log}
        changelog = read_topic(broker, changelog_name, lambda r: {x.key.decode() for x in r if x.value is None}
                               >= old_sessions, timeout=30, settle=0.5)
        assert worker.proc.poll() is None, worker.log()[-3000:]
        pid = worker.proc.pid
    partition_of = {e["session_id"]: m.partition for e, m in zip(log + late, metadata + late_metadata)}
    tombstones = [r for r in changelog if r.value is None]
    assert {r.key.decode() for r in tombstones} == old_sessions      # every old session, no late one
    assert all(r.partition == partition_of[r.key.decode()] for r in tombstones)
    # every line names its process: set-up lines in clickscore's format, then Faust's
    assert f"stream.scoring[{pid}]: model " in worker.log() and f"[{pid}] [INFO] evicted" in worker.log()
    assert_store_used(store, data_dir)


def test_triggers_fire_as_the_rule_engine_says_on_the_streamed_probabilities(broker, model_dir, scorer, tmp_path):
    from stream.triggers import ScoreObservation, parse_rules

    t = topics()
    sim_path = tmp_path / "sim.parquet"
    subprocess.run([CLICKSCORE, "simulate", "--sessions", "120", "--seed", "14", "--buy-share", "0.2",
                    "--out", str(sim_path)], check=True, capture_output=True)
    log = event_dicts(pl.read_parquet(sim_path).sort("timestamp", maintain_order=True), "tr-")
    reference = offline_scores(scorer, by_session(log), TOP_K)
    want_scored, _ = expected_buyer_events(log)
    # Thresholds from this model's own probabilities, so both rules fire on some sessions.
    seen = np.unique([reference[i][0] for i in want_scored])

    def between(q: float) -> float:
        """A threshold halfway between two observed probabilities: float noise cannot flip a rule."""
        i = int(np.clip(np.searchsorted(seen, np.percentile(seen, q)), 1, len(seen) - 1))
        return float((seen[i - 1] + seen[i]) / 2)

    p25, p40, p50, p60 = (between(q) for q in (25, 40, 50, 60))
    rules_text = f"""
[[rule]]
name = "hot"
kind = "high_intent"
fire_above = {p50}
rearm_below = {p25}
cooldown_s = 60

[[rule]]
name = "cooling"
kind = "abandonment"
armed_above = {p60}
fire_below = {p40}
once_per_session = true
"""
    (tmp_path / "rules.toml").write_text(rules_text)
    rules = parse_rules(rules_text)
    expected = set()
    for session in by_session(log).values():
        state, has_cart = None, False
        for k, e in enumerate(session):
            if e["event_type"] == "transaction":
                break
            has_cart = has_cart or e["event_type"] == "addtocart"
            state, fired = rules.evaluate(state, ScoreObservation(
                e["session_id"], reference[e["event_id"]][0], e["timestamp"], has_cart, k + 1, e["event_id"]))
            expected |= {f.trigger_id for f in fired}
    assert expected

    with WorkerProcess(broker, model_dir, t, f"app-{uuid.uuid4().hex[:8]}", tmp_path / "worker.log", free_port(),
                       ["--rules", str(tmp_path / "rules.toml"), *LONG_TIMEOUT]) as worker:
        produce(broker, t["input"], [(e["session_id"].encode(), json.dumps(e).encode()) for e in log])
        read_topic(broker, t["next_items"], lambda r: len(r) >= len(log), timeout=120, settle=0)
        triggers = values(read_topic(broker, t["triggers"], lambda r: len(r) >= len(expected), timeout=30))
        assert worker.proc.poll() is None, worker.log()[-3000:]
    assert sorted(v["trigger_id"] for v in triggers) == sorted(expected)
    assert {v["rule"] for v in triggers} == {"hot", "cooling"}


def test_serving_modules_import_and_score_without_torch(tmp_path):
    """The worker tests above already run `clickscore worker` with torch blocked
    (bench/workerkit.py puts tests/no_torch on PYTHONPATH); this checks the blocker
    itself works and that every serving module and the default model load without it."""
    from bench.workerkit import NO_TORCH

    code = ("import stream.app, stream.broker, stream.scoring, stream.replay, stream.demo, stream.sink, "
            "stream.triggers, stream.metrics\n"
            "from stream.scoring import ModelScorer\n"
            "from stream.features import empty_window\n"
            "s = ModelScorer('onnx_models/default')\n"
            "print(s.info.provider)\n"
            "try:\n    import torch\nexcept ModuleNotFoundError:\n    print('torch blocked')\n")
    env = {**os.environ, "PYTHONPATH": str(NO_TORCH)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr
    provider, *rest = done.stdout.split()
    assert provider.endswith("ExecutionProvider") and rest == ["torch", "blocked"]


# -- the model-state cache (stream/model_cache.py) on real workers ----------------------

@pytest.fixture(scope="module")
def dilated_dir(tmp_path_factory) -> Path:
    """A small dilated-convolution model, made like model_dir (same vocabulary)."""
    from bench.workerkit import build_model
    return build_model(tmp_path_factory.mktemp("dilated"), kind="dilated", name="testdilated")


def wait_for_log(worker: WorkerProcess, text: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in worker.log():
            return
        assert worker.proc.poll() is None, worker.log()[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in the worker log after {timeout} s:\n{worker.log()[-3000:]}")


@pytest.mark.parametrize("kind", ["gru", "dilated"])
def test_cached_model_state_scores_like_offline_across_rebalances_and_a_restart(
        broker, model_dir, dilated_dir, tmp_path, kind):
    """Step scoring from cached per-session state (cache on) equals the window model for
    every event while the state is carried, rebuilt after a rebalance (a worker that gets
    partitions back holds stale states: they must miss, not be stepped from), and rebuilt
    after a restart (empty cache), for both model kinds. Sessions run through all four
    parts, so every part continues sessions that another worker or process advanced."""
    from stream.scoring import ModelScorer

    model = model_dir if kind == "gru" else dilated_dir
    scorer = ModelScorer(model, provider="cpu")
    # the GRU made with the training defaults carries the stacked LightGBM buy head and
    # its window state (training/models/stack.py): its stepping is what is checked here
    assert ("stack_window" in scorer.state_shapes) == (kind == "gru"), scorer.state_shapes
    t = topics()
    sim_path = tmp_path / "sim.parquet"
    subprocess.run([CLICKSCORE, "simulate", "--sessions", "200", "--seed", "13", "--buy-share", "0.2",
                    "--out", str(sim_path)], check=True, capture_output=True)
    log = event_dicts(pl.read_parquet(sim_path).sort("timestamp", maintain_order=True), f"c{kind[0]}-")
    sessions = by_session(log)
    position = {e["event_id"]: k for s in sessions.values() for k, e in enumerate(s)}
    length = {e["event_id"]: len(sessions[e["session_id"]]) for e in log}
    parts = [[e for e in log if position[e["event_id"]] * 4 // length[e["event_id"]] == p] for p in range(4)]
    assert all(parts)
    keyed = lambda events: [(e["session_id"].encode(), json.dumps(e).encode()) for e in events]  # noqa: E731
    app_id = f"app-{uuid.uuid4().hex[:8]}"
    args = ["--top-k", str(TOP_K), "--batch-size", "32", "--partitions", "4", "--model-cache-bytes",
            str(64 << 20), *LONG_TIMEOUT]
    ports = {name: free_port() for name in ("a", "b", "a2")}
    worker = {name: WorkerProcess(broker, model, t, app_id, tmp_path / f"{name}.log", free_port(),
                                  [*args, "--metrics-port", str(ports[name])]) for name in ports}

    def scored_through(n_parts: int) -> None:
        want = {e["event_id"] for part in parts[:n_parts] for e in part}
        read_topic(broker, t["next_items"], lambda r: want <= {json.loads(x.value)["event_id"] for x in r},
                   timeout=180, settle=0)

    try:
        worker["a"].start()
        wait_for_log(worker["a"], "Worker ready")
        produce(broker, t["input"], keyed(parts[0]))
        scored_through(1)                                   # a alone: carries every session's state
        worker["b"].start()
        wait_for_log(worker["b"], "Executing _on_partitions_assigned")
        time.sleep(2.0)                                     # the rebalance after b joined settles
        produce(broker, t["input"], keyed(parts[1]))
        scored_through(2)                                   # b advanced the sessions of its partitions
        counters_b = scrape_cache(ports["b"])
        assert counters_b["hits"] + counters_b["misses"] > 0, "b must have scored part of part 2"
        worker["b"].stop()                                  # a gets them back, its states for them stale
        produce(broker, t["input"], keyed(parts[2]))
        scored_through(3)
        counters_a = scrape_cache(ports["a"])
        worker["a"].stop()                                  # a restart: a new process, an empty cache
        worker["a2"].start()
        produce(broker, t["input"], keyed(parts[3]))
        items, dead = read_accounted(broker, t, log)
        want_scored, want_outcomes = expected_buyer_events(log)
        scores = read_topic(broker, t["scores"], lambda r: len({json.loads(x.value)["event_id"] for x in r})
                            >= len((want_scored | want_outcomes) - set(dead)), timeout=60)
        counters_a2 = scrape_cache(ports["a2"])
        assert worker["a2"].proc.poll() is None, worker["a2"].log()[-3000:]
    finally:
        for w in worker.values():
            w.stop()

    item_values, score_values = values(items), values(scores)
    assert_every_event_scored(dead, log)
    assert {v["event_id"] for v in item_values} | set(dead) == {e["event_id"] for e in log}
    # The cache did the work, and rebuilt what it could not know.
    print(f"\n{kind}: worker a {counters_a}, b {counters_b}, restarted a {counters_a2}")
    assert counters_b["misses"] > 0, counters_b                            # a's sessions, new to b
    assert counters_a["hits"] > counters_a["misses"] > 0, counters_a     # b's sessions came back
    assert counters_a2["hits"] > 0 and counters_a2["misses"] > 0, counters_a2
    assert counters_a["too_long"] + counters_a2["too_long"] > 0            # sessions past 100 events
    # Every output equals the window model, the sessions' newest state included: recovery
    # reads each changelog to its true end (stream/changelog_ends.py), so a session that
    # moves between workers comes back whole.
    reference = offline_scores(scorer, sessions, TOP_K)
    stale = sorted(v["event_id"] for v in item_values + score_values
                   if v["event_count"] != reference[v["event_id"]][3])
    assert not stale, f"{len(stale)} outputs scored on a session restored without its newest state: {stale[:10]}"
    assert_matches_offline(score_values, item_values, reference)


@pytest.mark.parametrize("kind", ["gru", "dilated"])
def test_inference_process_scores_like_offline_and_survives_its_death(
        broker, model_dir, dilated_dir, click_log, tmp_path, kind):
    """`--inference-process true` (stream/inference.py): the model runs in a child of the
    worker. Streaming still equals offline for every event, the child's model-state cache
    does the stepping (its counters reach the worker's metrics), and a child killed
    mid-stream loses no event: the worker starts another, which rebuilds states from windows."""
    from stream.scoring import ModelScorer

    model = model_dir if kind == "gru" else dilated_dir
    scorer = ModelScorer(model, provider="cpu")
    t = topics()
    # The real sessions whole and the simulated sessions' first halves, then the simulated
    # second halves: the second child continues sessions the first one carried. (The two
    # sources lie years apart: the real ones must end before the simulated event time
    # starts, or the watermark would expire them as idle.)
    sessions = by_session(click_log)
    position = {e["event_id"]: k for s in sessions.values() for k, e in enumerate(s)}
    late = [e for e in click_log if e["session_id"].startswith("sim-")
            and 2 * position[e["event_id"]] >= len(sessions[e["session_id"]])]
    late_ids = {e["event_id"] for e in late}
    early = [e for e in click_log if e["event_id"] not in late_ids]
    keyed = lambda events: [(e["session_id"].encode(), json.dumps(e).encode()) for e in events]  # noqa: E731
    port = free_port()
    worker = WorkerProcess(broker, model, t, f"app-{uuid.uuid4().hex[:8]}", tmp_path / "worker.log", free_port(),
                           ["--top-k", str(TOP_K), "--batch-size", "64", "--metrics-port", str(port),
                            "--inference-process", "true", *LONG_TIMEOUT])

    with worker:
        wait_for_log(worker, "Worker ready")
        produce(broker, t["input"], keyed(early))
        first = {e["event_id"] for e in early}
        read_topic(broker, t["next_items"], lambda r: first <= {json.loads(x.value)["event_id"] for x in r},
                   timeout=240, settle=0)
        before = scrape_cache(port)
        (child,) = child_pids(worker.proc.pid)
        os.kill(child, signal.SIGKILL)
        produce(broker, t["input"], keyed(late))
        items, dead = read_accounted(broker, t, click_log)
        want_scored, want_outcomes = expected_buyer_events(click_log)
        scores = read_topic(broker, t["scores"], lambda r: len(r) >= len(want_scored) + len(want_outcomes),
                            timeout=60)
        after = scrape_cache(port)
        assert worker.proc.poll() is None, worker.log()[-3000:]
        now = child_pids(worker.proc.pid)
        assert now and child not in now
        metrics_text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert_every_event_scored(dead, click_log)
    item_values = values(items)
    assert sorted(v["event_id"] for v in item_values) == sorted(e["event_id"] for e in click_log)
    assert_matches_offline(values(scores), item_values, offline_scores(scorer, by_session(click_log), TOP_K))
    # The first child stepped the first half from its cache; the second rebuilt the states
    # of the sessions it had not seen (misses) and stepped on from there.
    assert before["hits"] > before["misses"], before
    assert after["misses"] > before["misses"] and after["hits"] > before["hits"], (before, after)
    starts = [line for line in metrics_text.splitlines() if line.startswith("clickscore_inference_process_starts_total")]
    assert starts and float(starts[0].split()[-1]) == 2.0, starts


def ready_processes(worker: WorkerProcess) -> set[str]:
    """Pids of the worker processes whose Faust recovery logged "Worker ready" (their
    lines share the parent's log, each tagged with its pid)."""
    return set(re.findall(r"\] \[(\d+)\] \[INFO\] \[\^---Recovery\]: Worker ready", worker.log()))


def wait_for_processes(worker: WorkerProcess, n: int, timeout: float = 120.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = child_pids(worker.proc.pid)
        if len(children) == n and {str(c) for c in children} <= ready_processes(worker):
            return sorted(children)
        assert worker.proc.poll() is None, worker.log()[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"{n} ready worker processes expected after {timeout} s:\n{worker.log()[-3000:]}")


def test_worker_processes_share_the_partitions_score_like_offline_and_stop_together(
        broker, model_dir, scorer, click_log, tmp_path, monkeypatch):
    """`clickscore worker --processes 2` (stream/processes.py): two processes in one group,
    each with a share of the partitions and its own RocksDB folder (RocksDB locks it: a
    shared one would stop the second). Every event is scored once, as offline; SIGTERM
    to the parent stops both, which commit what they did (exit 0)."""
    allow_rocksdb_restart_on_embedded_broker(monkeypatch)
    t = topics()
    port = free_port()
    app_id = f"app-{uuid.uuid4().hex[:8]}"
    worker = WorkerProcess(broker, model_dir, t, app_id, tmp_path / "worker.log", free_port(),
                           ["--processes", "2", "--partitions", "4", "--store", "rocksdb://", "--top-k", str(TOP_K),
                            "--batch-size", "64", "--metrics-port", str(port), *LONG_TIMEOUT])
    try:
        worker.start()
        children = wait_for_processes(worker, 2)
        produce(broker, t["input"], [(e["session_id"].encode(), json.dumps(e).encode()) for e in click_log])
        items, dead = read_accounted(broker, t, click_log)
        want_scored, want_outcomes = expected_buyer_events(click_log)
        scores = read_topic(broker, t["scores"], lambda r: len(r) >= len(want_scored) + len(want_outcomes),
                            timeout=60)
        consumed = [events_consumed(p) for p in (port, port + 1)]
        assert worker.proc.poll() is None, worker.log()[-3000:]
        worker.proc.send_signal(signal.SIGTERM)
        status = worker.proc.wait(timeout=30)
    finally:
        worker.stop()
    assert status == 0, worker.log()[-3000:]
    assert all(process_state(pid) in ("gone", "Z") for pid in children), "a worker process outlived its parent"
    assert_every_event_scored(dead, click_log)
    item_values = values(items)
    assert sorted(v["event_id"] for v in item_values) == sorted(e["event_id"] for e in click_log)  # once each
    assert_matches_offline(values(scores), item_values, offline_scores(scorer, by_session(click_log), TOP_K))
    # Both processes took part (each its own metrics port), and together they consumed the log.
    assert all(n > 0 for n in consumed) and sum(consumed) == len(click_log), consumed
    for index in (0, 1):
        assert list((tmp_path / f"data-{app_id}" / f"process-{index}").rglob("CURRENT")), index


def process_state(pid: int) -> str:
    """/proc's state letter of `pid` (Z: exited, not yet reaped), or "gone"."""
    try:
        return proc_stat(pid)[0]
    except OSError:
        return "gone"


def test_worker_processes_leave_together_when_one_dies(broker, model_dir, tmp_path):
    """A process that dies (here SIGKILL) takes the set down with its status, so that the
    supervisor above (systemd, Kubernetes) restarts the set: the parent restarting it
    itself would hide a crash loop."""
    worker = WorkerProcess(broker, model_dir, topics(), f"app-{uuid.uuid4().hex[:8]}", tmp_path / "worker.log",
                           free_port(), ["--processes", "2", "--partitions", "2"])
    try:
        worker.start()
        first, second = wait_for_processes(worker, 2)
        os.kill(second, signal.SIGKILL)
        status = worker.proc.wait(timeout=30)
    finally:
        worker.stop()
    assert status == 128 + signal.SIGKILL, worker.log()[-3000:]
    assert process_state(first) in ("gone", "Z"), "the other process must be stopped too"
    assert f"(pid {second}) exited with status {128 + signal.SIGKILL}: stopping the other 1" in worker.log()


def test_worker_refuses_more_processes_than_partitions(broker, model_dir, tmp_path):
    t = topics()
    done = subprocess.run([CLICKSCORE, "worker", "--broker", broker, "--model", str(model_dir),
                           "--input-topic", t["input"], "--scores-topic", t["scores"],
                           "--next-items-topic", t["next_items"], "--dlq-topic", t["dlq"],
                           "--triggers-topic", t["triggers"], "--partitions", "2", "--processes", "3",
                           "--metrics-port", "0"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"--processes 3 is more than the 2 partitions of {t['input']}" in done.stderr
    assert "Use --processes 2 or fewer" in done.stderr
