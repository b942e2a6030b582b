"""Helpers for tests (tests/test_worker.py) and the benchmark (bench/stream.py) that run a real `clickscore worker` subprocess
against a real broker: build a model with the real train/export commands, produce
keyed events, read topics back, and score the same log offline."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from stream import lifecycle

BIN = Path(sys.executable).parent
CLICKSCORE = str(BIN / "clickscore")
NO_TORCH = Path(__file__).resolve().parents[1] / "tests" / "no_torch"   # sitecustomize that blocks torch


def build_model(root: Path, sessions: int = 1500, seed: int = 5, kind: str = "gru", train_seed: int = 3,
                name: str = "testgru", version: str = "3") -> Path:
    """A small model (GRU or `kind="dilated"`) made by the real pipeline: simulate -> prepare ->
    train -> export. Same `sessions`/`seed`, another `train_seed`: another model, same vocabulary."""
    root.mkdir(parents=True, exist_ok=True)
    steps = [
        ["simulate", "--sessions", str(sessions), "--seed", str(seed), "--buy-share", "0.1",
         "--out", str(root / "sim.parquet")],
        ["prepare", "--dataset", "canonical", "--input", str(root / "sim.parquet"), "--out", str(root / "prep")],
        ["train", "--data", str(root / "prep"), "--out", str(root / "ck"), "--model", kind, "--seed", str(train_seed),
         "--max-steps", "20", "--epochs", "1", "--batch-size", "32", "--embedding-dim", "16",
         "--hidden-dim", "24", "--threads", "1", "--max-valid-windows", "300"],
        ["export", "--checkpoint", str(root / "ck"), "--out", str(root / "model"), "--name", name,
         "--model-version", version],
    ]
    for argv in steps:
        done = subprocess.run([CLICKSCORE, *argv], capture_output=True, text=True)
        assert done.returncode == 0, f"clickscore {argv[0]} failed:\n{done.stdout}\n{done.stderr}"
    return root / "model"


def proc_stat(pid: int | str) -> list[str]:
    """The fields of /proc/PID/stat after the command name (Linux): [0] state, [1] parent
    pid, [11] user and [12] system CPU ticks."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def child_pids(pid: int) -> list[int]:
    """Processes whose parent is `pid` (the worker's inference process, for one)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(proc_stat(stat.parent.name)[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue      # gone meanwhile
    return found


class WorkerProcess:
    """`clickscore worker` as a real subprocess with fast consumer-group settings."""

    def __init__(self, broker: str, model: Path, topics: dict[str, str], app_id: str, log_path: Path,
                 web_port: int, extra: Sequence[str] = ()):
        self.argv = [CLICKSCORE, "worker", "--broker", broker, "--model", str(model), "--app-id", app_id,
                     "--input-topic", topics["input"], "--scores-topic", topics["scores"],
                     "--next-items-topic", topics["next_items"], "--dlq-topic", topics["dlq"],
                     "--triggers-topic", topics["triggers"], "--web-port", str(web_port),
                     "--data-dir", str(log_path.parent / f"data-{app_id}"),
                     "--session-timeout-ms", "6000", "--heartbeat-interval-ms", "1000",
                     "--rebalance-timeout-ms", "6000", *extra]
        if "--metrics-port" not in extra:
            self.argv += ["--metrics-port", "0"]
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> "WorkerProcess":
        log = open(self.log_path, "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # Run the worker as if torch were not installed: serving must not need it.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(NO_TORCH), env.get("PYTHONPATH")]))
        # Dies with the test or benchmark (parent-death SIGTERM), in its own process group.
        self.proc = lifecycle.spawn(self.argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (its own stop is bounded by lifecycle.STOP_DEADLINE_S), SIGKILL after `timeout`."""
        if self.proc is not None:
            lifecycle.stop_child(self.proc, grace_s=timeout)

    def __enter__(self) -> "WorkerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def produce(broker: str, topic: str, records: Iterable[tuple[bytes | None, bytes | None]],
            max_request_size: int = 4_000_000) -> list:
    """Send (key, value) pairs in order; returns their RecordMetadata (partition, offset, timestamp).
    (The embedded broker stalled on produce requests of several MB: keep them under ~1 MB
    with `max_request_size` when records are large.)"""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=broker, linger_ms=5, max_request_size=max_request_size)
    futures = [producer.send(topic, key=k, value=v) for k, v in records]
    producer.flush()
    metadata = [f.get(timeout=30) for f in futures]
    producer.close()
    return metadata


def read_topic(broker: str, topic: str, until, timeout: float = 120.0, settle: float = 1.0) -> list:
    """All records of `topic` from the start, read until `until(records)` is true (then
    `settle` seconds more, so extra records would show) or the timeout."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=broker, enable_auto_commit=False, group_id=None,
                             auto_offset_reset="earliest")
    deadline = time.monotonic() + 30
    partitions = None
    while not partitions and time.monotonic() < deadline:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            time.sleep(0.2)
    tps = [TopicPartition(topic, p) for p in sorted(partitions or [])]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    records: list = []
    deadline = time.monotonic() + timeout
    settle_until = None
    while time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=200).values():
            records.extend(batch)
        if settle_until is None and until(records):
            settle_until = time.monotonic() + settle
        if settle_until is not None and time.monotonic() >= settle_until:
            break
    consumer.close()
    return records


def values(records) -> list[dict]:
    return [json.loads(r.value) for r in records]


def offline_scores(scorer, sessions: dict[str, list[dict]], top_k: int) -> dict[str, tuple[float, list[str], list[float], int]]:
    """event_id -> (buy probability, top-k item ids, their scores, event count), scoring
    windows built by features.session_rows over each session's whole log (the training path)."""
    from stream.events import EVENT_TYPES
    from stream.features import id_hashes, session_rows

    art = scorer.artefacts
    W = art.window
    windows, ids, counts = [], [], []
    for events in sessions.values():
        rows = session_rows(
            np.array([EVENT_TYPES[e["event_type"]] for e in events]),
            id_hashes([e["item_id"] for e in events]),
            id_hashes([e.get("category_id") for e in events]),
            np.array([e["timestamp"] for e in events], dtype=np.int64),
            np.array([np.nan if e.get("price") is None else e["price"] for e in events], dtype=np.float64))
        for k, e in enumerate(events):
            windows.append(rows[max(0, k + 1 - W):k + 1])
            ids.append(e["event_id"])
            counts.append(k + 1)
    out = {}
    for start in range(0, len(windows), 256):
        batch = scorer.score(windows[start:start + 256], top_k=top_k)
        items = scorer.item_ids(batch.top_items)
        for i in range(len(items)):
            j = start + i
            out[ids[j]] = (float(batch.buy_probability[i]), items[i],
                           [float(s) for s in batch.top_scores[i]], counts[j])
    return out
