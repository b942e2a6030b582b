"""Faults on real processes: a real `clickscore worker` (subprocess) on the real embedded
broker, hit by SIGKILL, SIGSTOP past its session timeout, a paused broker and a
scaled consumer group. After each, every event must be scored, and scored exactly as
an uninterrupted run scores it (the offline scores of the same log); each test
prints its figures (time to recover, duplicates, stale writes).

    .venv/bin/python -m pytest tests/test_faults.py -q -s      # -s shows the figures
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import polars as pl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # bench/ is not an installed package

from bench.workerkit import CLICKSCORE, WorkerProcess, offline_scores, produce, read_topic, values  # noqa: E402
from conftest import free_port  # noqa: E402
from test_worker import (assert_every_event_scored, assert_matches_offline, by_session,  # noqa: E402
                         event_dicts, expected_buyer_events, read_accounted, topics, wait_for_log)

TOP_K = 5
LONG_TIMEOUT = ["--session-timeout-s", str(100 * 86400)]   # compare with whole-log sessions
ARGS = ["--top-k", str(TOP_K), "--batch-size", "32", "--partitions", "4", *LONG_TIMEOUT]
GROUP_SESSION_TIMEOUT_S = 6.0   # WorkerProcess passes --session-timeout-ms 6000



def simulated_log(tmp_path: Path, sessions: int, seed: int, prefix: str) -> list[dict]:
    path = tmp_path / f"sim-{seed}.parquet"
    subprocess.run([CLICKSCORE, "simulate", "--sessions", str(sessions), "--seed", str(seed), "--buy-share", "0.2",
                    "--out", str(path)], check=True, capture_output=True)
    return event_dicts(pl.read_parquet(path).sort("timestamp", maintain_order=True), prefix)


def keyed(events: list[dict]) -> list[tuple[bytes, bytes]]:
    return [(e["session_id"].encode(), json.dumps(e).encode()) for e in events]


def distinct_ids(records) -> set[str]:
    return {json.loads(r.value)["event_id"] for r in records}


def read_all_scored(broker: str, t: dict, log: list[dict], timeout: float = 240) -> tuple[list, list, dict]:
    """next-items and buyer-scores records, read until every event of `log` has its
    next items or a dead letter (tests/test_worker.py read_accounted), and the dead
    letters by event id."""
    items, dead = read_accounted(broker, t, log, timeout)
    want_scored, want_outcomes = expected_buyer_events(log)
    scores = read_topic(broker, t["scores"],
                        lambda r: len(distinct_ids(r)) >= len((want_scored | want_outcomes) - set(dead)), timeout=60)
    return items, scores, dead


def assert_every_event_scored_like_offline(items, scores, log: list[dict], scorer, dead: dict) -> None:
    """Each event has its next items (and its buy probability or outcome), re-delivered
    events of sessions longer than the window included (no dead letter at all); every
    copy of every output equals the offline score."""
    item_values, score_values = values(items), values(scores)
    assert_every_event_scored(dead, log)
    assert {v["event_id"] for v in item_values} == {e["event_id"] for e in log}
    want_scored, want_outcomes = expected_buyer_events(log)
    assert (want_scored | want_outcomes) - set(dead) <= {v["event_id"] for v in score_values} <= want_scored | want_outcomes
    assert_matches_offline(score_values, item_values, offline_scores(scorer, by_session(log), TOP_K))


def assert_none_stalled(items, log: list[dict], workers: list[WorkerProcess], dead: dict) -> None:
    """Every event scored or dead-lettered by live workers. Faust 0.15.3 can drop fetched
    records around a rebalance (bench/stall_repro.py shows it with a plain Faust app);
    stream/offsets.py keeps the commit from passing them and seeks back to re-read them,
    and stream/changelog_ends.py restores every session whole, so none may be missing."""
    missing = {e["event_id"] for e in log} - distinct_ids(items) - set(dead)
    for w in workers:
        assert w.proc is not None and w.proc.poll() is None, w.log()[-3000:]
    assert not missing, (f"{len(missing)} of {len(log)} events neither scored nor dead-lettered in 240 s "
                         f"by live workers")


def first_output_ms(records) -> dict[str, int]:
    """event_id -> CreateTime (worker wall clock, ms) of its first output."""
    out: dict[str, int] = {}
    for r in records:
        event_id = json.loads(r.value)["event_id"]
        out[event_id] = min(out.get(event_id, r.timestamp), r.timestamp)
    return out


# -- a. SIGKILL -------------------------------------------------------------------------

def test_sigkill_mid_stream_rescored_from_offsets_and_changelog(broker, model_dir, scorer, tmp_path):
    t = topics()
    log = simulated_log(tmp_path, 400, 21, "k-")
    app_id = f"app-{uuid.uuid4().hex[:8]}"
    metadata = produce(broker, t["input"], keyed(log))
    input_partition = {e["session_id"]: m.partition for e, m in zip(log, metadata)}
    first = WorkerProcess(broker, model_dir, t, app_id, tmp_path / "first.log", free_port(), ARGS).start()
    try:
        read_topic(broker, t["next_items"], lambda r: len(r) >= len(log) // 3, timeout=180, settle=0)
    finally:
        first.kill()   # SIGKILL: no commit, no flush, no goodbye
    killed_ms = time.time() * 1000
    before = distinct_ids(read_topic(broker, t["next_items"], lambda r: True, timeout=5, settle=0.5))
    assert 0 < len(before) < len(log), "the kill must land mid-stream"

    restarted = time.monotonic()
    with WorkerProcess(broker, model_dir, t, app_id, tmp_path / "second.log", free_port(), ARGS) as second:
        items, scores, dead = read_all_scored(broker, t, log)
        assert_none_stalled(items, log, [second], dead)
        caught_up_s = time.monotonic() - restarted
        assert second.proc.poll() is None, second.log()[-3000:]

    assert_every_event_scored_like_offline(items, scores, log, scorer, dead)
    duplicates = len(items) - len(distinct_ids(items))   # re-delivered, not committed before the kill
    # Each session's changelog records sit in the partition of its input events (a batch
    # spans partitions; a write to the batch's last event's partition would be restored
    # by the wrong worker after a rebalance).
    changelog = read_topic(broker, f"{app_id}-sessions-changelog", lambda r: False, timeout=5, settle=0)
    assert changelog
    for record in changelog:
        assert record.partition == input_partition[record.key.decode()], record.key
    resumed = [ms for eid, ms in first_output_ms(items).items() if eid not in before and ms >= killed_ms]
    assert resumed
    first_new_s = (min(resumed) - killed_ms) / 1000
    unscorable = sum(reason == "redelivered_unscorable" for reason in dead.values())
    print(f"\nSIGKILL after {len(before)} of {len(log)} events: {unscorable} redelivered_unscorable; "
          f"{duplicates} duplicates "
          f"({10_000 * duplicates / len(log):.1f} per 10,000 events); first new output {first_new_s:.1f} s "
          f"after the kill (restart included), all caught up {caught_up_s:.1f} s after the restart")


# -- b. SIGSTOP past the session timeout -------------------------------------------------

def count_records(broker: str, topic: str, at_least: int = 1) -> int:
    """Records in the topic: read until `at_least` arrived, then 3 s more for any others."""
    return len(read_topic(broker, topic, lambda r: len(r) >= at_least, timeout=30, settle=3.0))


def consumed_events(metrics_port: int) -> int:
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    return int(sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("clickscore_events_consumed_total")))


def test_frozen_worker_loses_its_partitions_and_stays_harmless_after_sigcont(broker, model_dir, scorer, tmp_path):
    t = topics()
    log = simulated_log(tmp_path, 400, 22, "f-")
    app_id = f"app-{uuid.uuid4().hex[:8]}"
    sessions = list(by_session(log))
    frozen_metrics = free_port()
    # Part 1 starts every session; part 2 continues them, so the survivor can only score
    # part 2 right if it restored the frozen worker's sessions from the changelog.
    cut = {sid: len(events) // 2 for sid, events in by_session(log).items()}
    seen: dict[str, int] = {}
    part1, part2 = [], []
    for e in log:
        k = seen.get(e["session_id"], 0)
        seen[e["session_id"]] = k + 1
        (part1 if k < max(1, cut[e["session_id"]]) else part2).append(e)
    assert part2 and len(sessions) > 50

    frozen = WorkerProcess(broker, model_dir, t, app_id, tmp_path / "frozen.log", free_port(),
                           [*ARGS, "--log-level", "info", "--metrics-port", str(frozen_metrics)]).start()
    survivor = WorkerProcess(broker, model_dir, t, app_id, tmp_path / "survivor.log", free_port(),
                             [*ARGS, "--log-level", "info"])
    try:
        wait_for_log(frozen, "Worker ready")
        survivor.start()
        wait_for_log(survivor, "Worker ready")
        time.sleep(2.0)   # the first worker's rebalance after the second joined
        produce(broker, t["input"], keyed(part1))
        read_topic(broker, t["next_items"], lambda r: len(distinct_ids(r)) >= len(part1), timeout=180, settle=0)
        # The frozen worker owned partitions and scored part of part 1: the survivor
        # needs those sessions' state from the changelog to score part 2 right.
        frozen_consumed = consumed_events(frozen_metrics)
        assert 0 < frozen_consumed < len(part1), frozen_consumed

        # Freeze it mid-stream, with part 2 fetched and partly scored: a woken zombie
        # then holds buffered events of partitions it no longer owns.
        produce(broker, t["input"], keyed(part2))
        read_topic(broker, t["next_items"], lambda r: len(distinct_ids(r)) >= len(part1) + len(part2) // 10,
                   timeout=120, settle=0)
        frozen.proc.send_signal(signal.SIGSTOP)
        stopped_ms = time.time() * 1000
        stopped = time.monotonic()
        items, scores, dead = read_all_scored(broker, t, log, timeout=240)
        assert_none_stalled(items, log, [survivor], dead)
        recovered_s = time.monotonic() - stopped
        firsts = first_output_ms(items)
        part2_ids = {e["event_id"] for e in part2}
        last_part2_s = (max(firsts[i] for i in part2_ids) - stopped_ms) / 1000
        assert survivor.proc.poll() is None, survivor.log()[-3000:]
        # Everything is scored without the frozen worker: quiet now, so what follows is its own.
        items_before, scores_before = count_records(broker, t["next_items"], len(items)), \
            count_records(broker, t["scores"], len(scores))
        changelog = f"{app_id}-sessions-changelog"
        changelog_before = count_records(broker, changelog)
        frozen_for_s = time.monotonic() - stopped
        assert frozen_for_s > GROUP_SESSION_TIMEOUT_S
        log_at_stop = len(frozen.log())
        frozen.proc.send_signal(signal.SIGCONT)
        woke_ms = time.time() * 1000
        # Anything the woken worker writes before it has re-joined the group is a zombie
        # write (output or changelog for partitions it lost); after the rejoin it owns
        # what it is given, and re-delivery from committed offsets is ordinary.
        deadline = time.monotonic() + 60
        while "Joined group" not in frozen.log()[log_at_stop:] and time.monotonic() < deadline:
            time.sleep(0.1)
        rejoined_ms = time.time() * 1000
        time.sleep(GROUP_SESSION_TIMEOUT_S)   # the rebalance and any re-delivery settle
        after = {name: read_topic(broker, topic, lambda r, n=n: len(r) >= n, timeout=30, settle=3.0)
                 for name, topic, n in (("items", t["next_items"], items_before),
                                        ("scores", t["scores"], scores_before),
                                        ("changelog", changelog, changelog_before))}
        zombie = {name: sum(woke_ms <= r.timestamp <= rejoined_ms for r in records)
                  for name, records in after.items()}
        stale_outputs, stale_changelog = zombie["items"] + zombie["scores"], zombie["changelog"]
        redelivered = len(after["items"]) + len(after["scores"]) - items_before - scores_before - stale_outputs
        rejoin_s = (rejoined_ms - woke_ms) / 1000
        assert frozen.proc.poll() is None, frozen.log()[-3000:]
        assert survivor.proc.poll() is None, survivor.log()[-3000:]
        fenced = "fenced:" in frozen.log() or "process was suspended" in frozen.log()
    finally:
        if frozen.proc is not None and frozen.proc.poll() is None:
            frozen.proc.send_signal(signal.SIGCONT)   # a stopped process ignores SIGTERM
        frozen.stop()
        survivor.stop()

    assert_every_event_scored_like_offline(items, scores, log, scorer, dead)
    # The stale worker, woken, must not write for partitions it lost.
    assert fenced, frozen.log()[-3000:]
    assert stale_outputs == 0, (stale_outputs, stale_changelog)
    # Changelog writes made just before the freeze sit in Faust's producer buffer and are
    # sent on waking (stale_changelog is printed, not asserted: exactly-once on real
    # Kafka is what fences those).
    print(f"\nthe frozen worker had scored {frozen_consumed} of {len(part1)} part-1 events; "
          f"SIGSTOP {frozen_for_s:.1f} s (> {GROUP_SESSION_TIMEOUT_S:g} s session timeout): part 2 "
          f"({len(part2)} events) fully scored {recovered_s:.1f} s after the stop (last first-output "
          f"{last_part2_s:.1f} s); after SIGCONT the stale worker sent {stale_outputs} outputs and "
          f"{stale_changelog} changelog writes in the {rejoin_s:.1f} s before it re-joined; "
          f"{redelivered} outputs re-delivered after the rebalance")


# -- c. the broker paused --------------------------------------------------------------

def test_paused_broker_worker_recovers_without_restart_and_loses_nothing(model_dir, scorer, tmp_path):
    from stream.broker import EmbeddedBroker

    t = topics()
    log = simulated_log(tmp_path, 400, 23, "p-")
    own = EmbeddedBroker()
    bootstrap = own.start()
    pause_s = 10.0
    try:
        produce(bootstrap, t["input"], keyed(log))
        with WorkerProcess(bootstrap, model_dir, t, f"app-{uuid.uuid4().hex[:8]}", tmp_path / "worker.log",
                           free_port(), ARGS) as worker:
            read_topic(bootstrap, t["next_items"], lambda r: len(r) >= len(log) // 4, timeout=180, settle=0)
            os.kill(own.process.pid, signal.SIGSTOP)
            paused_ms = time.time() * 1000
            try:
                time.sleep(pause_s)
                assert worker.proc.poll() is None, worker.log()[-3000:]
            finally:
                os.kill(own.process.pid, signal.SIGCONT)
            resumed_ms = time.time() * 1000
            resumed = time.monotonic()
            items, scores, dead = read_all_scored(bootstrap, t, log, timeout=240)
            assert_none_stalled(items, log, [worker], dead)
            caught_up_s = time.monotonic() - resumed
            assert worker.proc.poll() is None, worker.log()[-3000:]   # recovered without a restart
            pid = worker.proc.pid
        assert worker.proc.pid == pid
    finally:
        own.stop()

    assert_every_event_scored_like_offline(items, scores, log, scorer, dead)
    after = sorted(ms for ms in first_output_ms(items).values() if ms >= resumed_ms)
    assert after, "nothing was scored after the broker came back"
    print(f"\nbroker paused {pause_s:g} s: first new output {(after[0] - resumed_ms) / 1000:.1f} s after it "
          f"resumed ({(after[0] - paused_ms) / 1000:.1f} s after the pause began), every event scored "
          f"{caught_up_s:.1f} s after it resumed; "
          f"{len(items) - len(log)} duplicates in {len(log)} events")


# -- d. scaling 2 -> 3 -> 2 ------------------------------------------------------------

def test_scaling_two_three_two_during_a_replay_scores_like_one_worker(broker, model_dir, scorer, tmp_path):
    t = topics()
    log = simulated_log(tmp_path, 500, 24, "s-")
    app_id = f"app-{uuid.uuid4().hex[:8]}"
    args = [*ARGS, "--log-level", "info"]
    workers = [WorkerProcess(broker, model_dir, t, app_id, tmp_path / f"w{i}.log", free_port(), args)
               for i in range(3)]
    rate = max(50.0, len(log) / 45.0)   # the replay lasts about 45 s
    produced_ms: dict[str, float] = {}
    failed: list[BaseException] = []

    def replay() -> None:
        from kafka import KafkaProducer
        try:
            producer = KafkaProducer(bootstrap_servers=broker, linger_ms=5)
            start = time.monotonic()
            for i, (e, (key, value)) in enumerate(zip(log, keyed(log))):
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                producer.send(t["input"], key=key, value=value)
                produced_ms[e["event_id"]] = time.time() * 1000
            producer.flush()
            producer.close()
        except BaseException as exc:   # surfaced by the test thread below
            failed.append(exc)

    changes: list[tuple[str, float]] = []
    try:
        workers[0].start()
        workers[1].start()
        wait_for_log(workers[0], "Worker ready")
        wait_for_log(workers[1], "Worker ready")
        feeder = threading.Thread(target=replay, daemon=True)
        feeder.start()
        time.sleep(12)
        workers[2].start()                      # 2 -> 3
        changes.append(("2->3", time.time() * 1000))
        wait_for_log(workers[2], "Worker ready")
        time.sleep(12)
        workers[0].stop()                       # 3 -> 2 (SIGTERM: a planned scale-in)
        changes.append(("3->2", time.time() * 1000))
        feeder.join(timeout=180)
        assert not feeder.is_alive() and not failed, failed
        items, scores, dead = read_all_scored(broker, t, log, timeout=240)
        assert_none_stalled(items, log, workers[1:], dead)
        for w in workers[1:]:
            assert w.proc.poll() is None, w.log()[-3000:]
    finally:
        for w in workers:
            w.stop()

    assert_every_event_scored_like_offline(items, scores, log, scorer, dead)
    # Disruption of each change: the worst end-to-end delay of events produced in the
    # 10 s after it (time from our send to the first output for the event).
    firsts = first_output_ms(items)
    figures = []
    for name, at in changes:
        delays = [firsts[eid] - ms for eid, ms in produced_ms.items() if at <= ms < at + 10_000]
        figures.append(f"{name}: worst delay {max(delays) / 1000:.1f} s" if delays else f"{name}: no events")
    baseline = [firsts[eid] - ms for eid, ms in produced_ms.items() if ms < changes[0][1]]
    print(f"\nscaled 2->3->2 during a {len(log)}-event replay at {rate:.0f}/s: {len(items) - len(log)} duplicates; "
          f"before scaling worst delay {max(baseline) / 1000:.1f} s; " + "; ".join(figures))
