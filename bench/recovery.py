"""Benchmark: how long a restarted worker takes to answer again, memory vs RocksDB store.

    .venv/bin/python -m bench.recovery                      # 100,000 stored sessions
    .venv/bin/python -m bench.recovery --sessions 20000 --repeats 1

On one embedded broker:
1. `--sessions` one-event sessions are produced and scored by a real `clickscore worker`
   (memory store), so the changelog `<app-id>-sessions-changelog` holds one value per
   session, written by the worker itself. That worker is stopped (SIGTERM).
2. The same app (same consumer group and changelog) is restarted with each store, and
   each time one probe event of an already stored session is waiting in the input:
   recovery_s = the probe's next-items record time (Kafka CreateTime) - the moment the
   process was started. It covers Python start-up, model load, the consumer-group join
   and the table restore; the probe's event_count must be 2 (state restored, not empty).
   - memory://, restarted: rebuilds every session from the changelog on every start.
   - rocksdb://, first start on an empty --data-dir ("cold"): restores the changelog into
     RocksDB once.
   - rocksdb://, restarted over that data dir ("warm"): reads only the changelog written
     since its last persisted offset.
The worker's resident memory (VmRSS) is read once the probe is answered.

Prints one JSON line and appends it to bench/results/recovery-<date>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from bench.record import append_result, machine
from bench.workerkit import WorkerProcess, produce, read_topic
from stream.broker import EmbeddedBroker, free_port

REPO = Path(__file__).resolve().parents[1]
BASE_MS = 1_767_571_200_000          # 2026-01-05T00:00:00Z; one millisecond between sessions
LONG_TIMEOUT = ["--session-timeout-s", str(100 * 86400)]   # nothing is evicted during the run


def session_events(n: int, items: list[str]) -> list[tuple[bytes, bytes]]:
    """One view per session, items from the model's own vocabulary."""
    out = []
    for i in range(n):
        event = {"session_id": f"r{i}", "event_type": "view", "item_id": items[i % len(items)],
                 "timestamp": BASE_MS + i, "event_id": f"r{i}-0"}
        out.append((event["session_id"].encode(), json.dumps(event, separators=(",", ":")).encode()))
    return out


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def dir_mib(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20, 1)


class OutputWatch:
    """Waits for one event id on the next-items topic. Positioned at the topic's end
    before the worker starts, so it never reads the earlier records."""

    def __init__(self, broker: str, topic: str):
        from kafka import KafkaConsumer, TopicPartition

        self.consumer = KafkaConsumer(bootstrap_servers=broker, group_id=None, enable_auto_commit=False,
                                      fetch_max_wait_ms=100)
        tps = [TopicPartition(topic, p) for p in sorted(self.consumer.partitions_for_topic(topic))]
        self.consumer.assign(tps)
        self.consumer.seek_to_end(*tps)
        for tp in tps:
            self.consumer.position(tp)   # resolve now, not after the worker has written

    def wait_for(self, event_id: str, timeout: float, worker: WorkerProcess) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if worker.proc.poll() is not None:
                raise RuntimeError(f"the worker exited:\n{worker.log()[-3000:]}")
            for batch in self.consumer.poll(timeout_ms=200).values():
                for record in batch:
                    value = json.loads(record.value)
                    if value["event_id"] == event_id:
                        return {**value, "_kafka_ms": record.timestamp}
        raise TimeoutError(f"no output for {event_id} within {timeout} s")

    def close(self) -> None:
        self.consumer.close()


def restart(broker: str, model: Path, topics: dict, app_id: str, store: str, data_dir: Path,
            probe: int, log: Path, timeout: float) -> dict:
    """Start the worker over the stored sessions with one probe event waiting; time its answer."""
    event = {"session_id": f"r{probe}", "event_type": "view", "item_id": "probe", "event_id": f"probe-{probe}",
             "timestamp": BASE_MS + 10_000_000 + probe}
    produce(broker, topics["input"], [(event["session_id"].encode(), json.dumps(event).encode())])
    watch = OutputWatch(broker, topics["next_items"])
    worker = WorkerProcess(broker, model, topics, app_id, log, free_port(),
                           ["--store", store, "--data-dir", str(data_dir), *LONG_TIMEOUT])
    try:
        started_ms = time.time() * 1000
        worker.start()
        answer = watch.wait_for(event["event_id"], timeout, worker)
        rss = rss_mib(worker.proc.pid)
    finally:
        worker.stop()
        watch.close()
    if answer["event_count"] != 2:
        raise AssertionError(f"{store}: probe session r{probe} had {answer['event_count'] - 1} stored events, "
                             "expected 1 (state not restored)")
    return {"store": store, "recovery_s": round((answer["_kafka_ms"] - started_ms) / 1000, 2), "rss_mib": rss}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.recovery", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=100_000, help="stored sessions")
    parser.add_argument("--repeats", type=int, default=2, help="restarts measured per store")
    parser.add_argument("--model", default=str(REPO / "onnx_models" / "default"), help="model folder")
    parser.add_argument("--timeout", type=float, default=900.0, help="longest wait for one restart, seconds")
    args = parser.parse_args(argv)
    import rocksdict  # noqa: F401  (fail here, not after minutes of set-up)
    # The embedded broker reports a partition's end as its last batch's start + 1, so a
    # RocksDB worker stopped cleanly holds a changelog offset "beyond the end" and Faust's
    # recovery consistency check refuses to start (ConsistencyError). Faust reads this
    # switch from the environment; the workers started below inherit it.
    os.environ.setdefault("RECOVERY_CONSISTENCY_CHECK", "false")

    model = Path(args.model)
    items = json.loads((model / "features.json").read_text())["items"]
    work = Path(tempfile.mkdtemp(prefix="clickscore-recovery-"))
    runs: list[dict] = []
    try:
        with EmbeddedBroker() as broker:
            run = uuid.uuid4().hex[:8]
            topics = {name: f"rec-{name}-{run}" for name in ("input", "scores", "next_items", "dlq", "triggers")}
            app_id = f"rec-{run}"
            events = session_events(args.sessions, items)
            produce(broker, topics["input"], events)
            started = time.monotonic()
            with WorkerProcess(broker, model, topics, app_id, work / "populate.log", free_port(),
                               ["--data-dir", str(work / "populate"), *LONG_TIMEOUT]) as worker:
                read_topic(broker, topics["next_items"], lambda r: len(r) >= len(events),
                           timeout=args.timeout * 4, settle=0)
                if worker.proc.poll() is not None:
                    raise RuntimeError(worker.log()[-3000:])
            populate_s = time.monotonic() - started
            print(f"{len(events)} sessions stored in {populate_s:.0f} s", file=sys.stderr)

            probe = 0
            rocks_dir = work / "rocksdb"
            runs.append({**restart(broker, model, topics, app_id, "rocksdb://", rocks_dir, probe,
                                   work / "rocks-cold.log", args.timeout), "phase": "cold"})
            for _ in range(args.repeats):
                for store, data_dir in (("memory://", work / "memory"), ("rocksdb://", rocks_dir)):
                    probe += 1
                    runs.append({**restart(broker, model, topics, app_id, store, data_dir, probe,
                                           work / f"restart-{probe}.log", args.timeout), "phase": "restart"})
                    print(json.dumps(runs[-1]), file=sys.stderr)
            rocks_size = dir_mib(rocks_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def restarts(store: str) -> list[float]:
        return [r["recovery_s"] for r in runs if r["store"] == store and r["phase"] == "restart"]

    result = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sessions": args.sessions,
        "memory_restart_s": restarts("memory://"),
        "rocksdb_restart_s": restarts("rocksdb://"),
        "rocksdb_cold_start_s": [r["recovery_s"] for r in runs if r["phase"] == "cold"],
        "memory_rss_mib": [r["rss_mib"] for r in runs if r["store"] == "memory://"],
        "rocksdb_rss_mib": [r["rss_mib"] for r in runs if r["store"] == "rocksdb://"],
        "rocksdb_data_dir_mib": rocks_size,
        "populate_s": round(populate_s, 1),
        "faust_recovery_consistency_check": os.environ["RECOVERY_CONSISTENCY_CHECK"],
        "model": str(model), "machine": machine(),
    }
    append_result("recovery", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
