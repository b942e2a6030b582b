"""Soak benchmark: one worker on an endless-looking stream stays bounded (not a test).

    .venv/bin/python -m bench.soak                                    # 1,000,000 events, ~120,000 sessions
    nice -n 10 .venv/bin/python -m bench.soak --events 200000 --sample-s 5   # a shorter run

Starts a fresh embedded broker (Tansu keeps everything in memory, so a soak never
shares one) and one real `clickscore worker`, then produces simulated click events in
chunks, never more than --max-lag ahead of the worker. Event time advances by
--step-ms per event and sessions end (a pool of --open-sessions sessions, each
closed after a few events and replaced by a new one), so with --session-timeout-s
well below the run's event-time span the worker's idle eviction must keep the table
bounded. Every --sample-s seconds it records the worker's resident memory
(/proc/PID/status VmRSS) and its Prometheus gauges clickscore_active_sessions and
clickscore_session_state_bytes. At the end it checks outputs = inputs (the
next-items topic, read back and counted by event id, and the worker's counters) and
whether memory, table entries and state bytes plateaued: the second half of the
run's maximum is compared with the first half's.

Prints one JSON line and appends it to bench/results/soak-<date>.json.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np

from bench.record import append_result, machine
from bench.workerkit import WorkerProcess
from stream.broker import EmbeddedBroker, free_port

REPO = Path(__file__).resolve().parents[1]


def session_events(n_events: int, open_sessions: int, step_ms: int, seed: int, items: list[str]):
    """(key, value) of n_events click events, in event-time order: `open_sessions`
    sessions are open at a time; each is closed after 3..17 events (the buy rate is
    ~5% of sessions) and replaced by a fresh one, so sessions keep going idle."""
    rng = np.random.default_rng(seed)
    start_ms = int(time.time() * 1000) - n_events * step_ms - 86_400_000   # ends a day ago
    next_id = 0
    remaining = {}

    def open_one() -> str:
        nonlocal next_id
        sid = f"soak-{seed}-{next_id}"
        next_id += 1
        remaining[sid] = int(rng.integers(3, 18))
        return sid

    pool = [open_one() for _ in range(open_sessions)]
    picks = rng.integers(0, open_sessions, size=n_events)
    item_picks = rng.integers(0, len(items), size=n_events)
    for i in range(n_events):
        slot = int(picks[i])
        sid = pool[slot]
        remaining[sid] -= 1
        last = remaining[sid] == 0
        event_type = "transaction" if last and rng.random() < 0.05 else ("addtocart" if rng.random() < 0.03 else "view")
        event = {"session_id": sid, "event_type": event_type, "item_id": items[int(item_picks[i])],
                 "price": round(float(rng.uniform(1, 200)), 2), "timestamp": start_ms + i * step_ms,
                 "event_id": f"e{i}"}
        yield sid.encode(), json.dumps(event, separators=(",", ":")).encode()
        if last:
            del remaining[sid]
            pool[slot] = open_one()


def scrape(port: int) -> dict[str, float]:
    """The worker's clickscore_* samples, label sets folded into the name."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"(clickscore_\w+)(\{[^}]*\})? (\S+)$", line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def count_by_event_id(broker: str, topic: str, expected: int, timeout: float = 600.0) -> tuple[int, int]:
    """(records, distinct event ids) of a topic, read from the start until `expected`
    distinct ids or the timeout."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=broker, enable_auto_commit=False, group_id=None,
                             auto_offset_reset="earliest", max_poll_records=5000,
                             fetch_max_bytes=32 * 1024 * 1024)
    tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    ids: set[str] = set()
    records = 0
    deadline = time.monotonic() + timeout
    idle_polls = 0
    while time.monotonic() < deadline and idle_polls < 25:
        got = consumer.poll(timeout_ms=200)
        idle_polls = 0 if got else idle_polls + 1
        for batch in got.values():
            for r in batch:
                records += 1
                ids.add(re.search(rb'"event_id":"([^"]+)"', r.value).group(1).decode())
        if len(ids) >= expected and not got:
            break
    consumer.close()
    return records, len(ids)


def plateau(points: list[float]) -> dict:
    """Max of the first and second half: bounded if the second is not far above the first."""
    half = len(points) // 2
    first, second = max(points[:half] or [0]), max(points[half:] or [0])
    return {"first_half_max": round(first, 1), "second_half_max": round(second, 1),
            "growth": round(second / first, 3) if first else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--open-sessions", type=int, default=1000, help="sessions open at any time")
    parser.add_argument("--step-ms", type=int, default=100, help="event time between consecutive events")
    parser.add_argument("--session-timeout-s", type=float, default=300.0,
                        help="the worker's idle timeout (event time); far below events * step")
    parser.add_argument("--max-lag", type=int, default=40_000, help="most events produced ahead of the worker")
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--model", default=str(REPO / "onnx_models" / "default"))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)

    items = json.loads((Path(args.model) / "features.json").read_text())["items"]
    work = Path(tempfile.mkdtemp(prefix="clickscore-soak-"))
    run = uuid.uuid4().hex[:8]
    topics = {name: f"soak-{name}-{run}" for name in ("input", "scores", "next_items", "dlq", "triggers")}
    metrics_port = free_port()
    samples: list[dict] = []
    produced = 0
    session_keys: set[bytes] = set()

    with EmbeddedBroker() as broker:
        worker = WorkerProcess(broker, Path(args.model), topics, f"soak-{run}", work / "worker.log", free_port(),
                               ["--metrics-port", str(metrics_port), "--partitions", str(args.partitions),
                                "--batch-size", str(args.batch_size),
                                "--session-timeout-s", str(args.session_timeout_s), "--log-level", "warning"])
        stop = threading.Event()

        def consumed() -> float:
            try:
                return scrape(metrics_port).get(
                    f'clickscore_events_consumed_total{{topic="{topics["input"]}"}}', 0.0)
            except OSError:
                return 0.0

        def producer_loop() -> None:
            nonlocal produced
            from kafka import KafkaProducer
            producer = KafkaProducer(bootstrap_servers=broker, linger_ms=20, batch_size=256 * 1024)
            chunk = []
            for key, value in session_events(args.events, args.open_sessions, args.step_ms, args.seed, items):
                chunk.append((key, value))
                session_keys.add(key)
                if len(chunk) < 10_000:
                    continue
                while produced - consumed() > args.max_lag and not stop.is_set():
                    time.sleep(1.0)
                for k, v in chunk:
                    producer.send(topics["input"], key=k, value=v)
                producer.flush()
                produced += len(chunk)
                chunk = []
            for k, v in chunk:
                producer.send(topics["input"], key=k, value=v)
            producer.flush()
            produced += len(chunk)
            producer.close()

        with worker:
            started = time.monotonic()
            feeder = threading.Thread(target=producer_loop, daemon=True)
            feeder.start()
            try:
                while True:
                    time.sleep(args.sample_s)
                    if worker.proc.poll() is not None:
                        raise RuntimeError(f"worker exited:\n{worker.log()[-3000:]}")
                    try:
                        m = scrape(metrics_port)
                    except OSError:
                        continue
                    done = m.get(f'clickscore_events_consumed_total{{topic="{topics["input"]}"}}', 0.0)
                    sample = {"t_s": round(time.monotonic() - started, 1), "produced": produced,
                              "consumed": int(done), "rss_mib": round(rss_mib(worker.proc.pid), 1),
                              "active_sessions": int(m.get("clickscore_active_sessions", -1)),
                              "state_bytes": int(m.get("clickscore_session_state_bytes", -1))}
                    samples.append(sample)
                    print(json.dumps(sample), file=sys.stderr, flush=True)
                    if not feeder.is_alive() and done >= args.events:
                        break
                time.sleep(2 * 5.0)   # one more eviction scan, then the final figures
                final = scrape(metrics_port)
                samples.append({"t_s": round(time.monotonic() - started, 1), "produced": produced,
                                "consumed": int(done), "rss_mib": round(rss_mib(worker.proc.pid), 1),
                                "active_sessions": int(final.get("clickscore_active_sessions", -1)),
                                "state_bytes": int(final.get("clickscore_session_state_bytes", -1))})
            finally:
                stop.set()
            elapsed = time.monotonic() - started
        records, distinct = count_by_event_id(broker, topics["next_items"], args.events)

    scored = final.get(f'clickscore_events_scored_total{{topic="{topics["next_items"]}"}}', 0.0)
    dead = sum(v for k, v in final.items() if k.startswith("clickscore_events_dead_lettered_total"))
    every = max(1, len(samples) // 12)
    record = {
        "benchmark": "soak", "events": args.events, "produced": produced,
        "sessions": len(session_keys),
        "open_sessions": args.open_sessions, "step_ms": args.step_ms,
        "session_timeout_s": args.session_timeout_s, "elapsed_s": round(elapsed, 1),
        "events_per_s": round(args.events / elapsed, 1),
        "next_items_records": records, "next_items_distinct_event_ids": distinct,
        "worker_scored_next_items": int(scored), "worker_dead_lettered": int(dead),
        "outputs_equal_inputs": distinct == produced == args.events,
        "rss_mib": plateau([s["rss_mib"] for s in samples]),
        "active_sessions": plateau([s["active_sessions"] for s in samples]),
        "state_bytes": plateau([s["state_bytes"] for s in samples]),
        "curve": samples[::every] + ([samples[-1]] if (len(samples) - 1) % every else []),
        "machine": machine(),
    }
    append_result("soak", record)
    return 0 if record["outputs_equal_inputs"] else 1


if __name__ == "__main__":
    sys.exit(main())
