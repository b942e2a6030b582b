"""Model registry and hot swap (stream/registry.py): `clickscore export --registry` writes
numbered versions, `clickscore models` lists them, a worker serving `onnx_models/NAME`
switches to a new version under load without dropping or double-scoring an event, and
refuses a corrupt version while the old one keeps serving.

    .venv/bin/python -m pytest tests/test_swap.py -q
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # bench/ is not an installed package

from bench.workerkit import (CLICKSCORE, WorkerProcess, build_model, offline_scores, read_topic,  # noqa: E402
                             values)
from conftest import free_port  # noqa: E402
from stream import registry  # noqa: E402
from stream.registry import ModelSource  # noqa: E402
from stream.scoring import ModelScorer  # noqa: E402

TOP_K = 5


@pytest.fixture(scope="module")
def second_model(model_dir, tmp_path_factory) -> Path:
    """Another GRU trained on other simulated data: another vocabulary, other scores."""
    return build_model(tmp_path_factory.mktemp("second"), seed=6, train_seed=4, name="testgru", version="1")


def corrupt_copy(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)
    data = (dst / "model.onnx").read_bytes()
    (dst / "model.onnx").write_bytes(data[: len(data) // 3])


def put_version(src: Path, reg: Path, version: int) -> Path:
    """Copy a model folder into the registry as a whole (staged, then renamed into place)."""
    staging = reg / f".staging-{version}"
    shutil.copytree(src, staging)
    staging.rename(reg / str(version))
    return reg / str(version)


def test_export_writes_numbered_versions_and_models_lists_them(model_dir, tmp_path):
    checkpoint = model_dir.parent / "ck"
    reg = tmp_path / "onnx_models" / "shop"
    for expected in ("1", "2"):
        done = subprocess.run([CLICKSCORE, "export", "--checkpoint", str(checkpoint), "--out", str(reg),
                               "--registry"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert f"exported {reg / expected}" in done.stdout
        assert ModelScorer(reg / expected, provider="cpu").info.version == expected
    # Without --registry an existing registry is still recognised: the next version, not a plain folder.
    done = subprocess.run([CLICKSCORE, "export", "--checkpoint", str(checkpoint), "--out", str(reg)],
                          capture_output=True, text=True)
    assert done.returncode == 0 and (reg / "3" / "model.onnx").is_file(), done.stderr
    assert ModelScorer(reg / "3", provider="cpu").info.name == "shop"
    corrupt_copy(reg / "3", reg / "4")
    listed = subprocess.run([CLICKSCORE, "models", str(reg)], capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    row = {line.split()[0]: line for line in lines if line.strip()[:1].isdigit()}
    assert set(row) == {"1", "2", "3", "4"}
    assert row["3"].split()[1] == "yes" and row["3"].endswith("<- served")
    assert row["4"].split()[1] == "no" and "not a loadable ONNX model" in row["4"]
    assert not any(row[v].endswith("served") for v in ("1", "2", "4"))
    # The plain folder still works, and says so.
    plain = subprocess.run([CLICKSCORE, "models", str(model_dir)], capture_output=True, text=True)
    assert plain.returncode == 0 and "single model folder" in plain.stdout
    missing = subprocess.run([CLICKSCORE, "models", str(tmp_path / "nothing")], capture_output=True, text=True)
    assert missing.returncode == 2 and "is not a folder" in missing.stderr


def test_source_serves_newest_valid_refuses_bad_ones_and_swaps_between_batches(model_dir, second_model, tmp_path):
    reg = tmp_path / "reg"
    reg.mkdir()
    put_version(model_dir, reg, 1)
    corrupt_copy(second_model, reg / "2")
    source = ModelSource.open(reg, provider="cpu", poll_s=0)
    assert source.current.version == "1" and source.current.name == "reg"   # 2 is corrupt: refused
    refused = registry.MODEL_SWAPS.labels(result="refused")._value.get()
    assert source.poll_once() is None                         # nothing new (2 remembered as refused)
    # A version with another window size: refused (stored sessions were kept for this one).
    other_window = tmp_path / "other"
    shutil.copytree(second_model, other_window)
    features = json.loads((other_window / "features.json").read_text())
    features["window"] = features["window"] + 1
    (other_window / "features.json").write_text(json.dumps(features))
    put_version(other_window, reg, 3)
    assert source.poll_once() is None
    assert registry.MODEL_SWAPS.labels(result="refused")._value.get() == refused + 1
    assert source.take().version == "1"
    # Another vocabulary is fine: session rows hold hashes of raw ids (state version 2).
    assert ModelScorer(second_model, provider="cpu").info.vocab_hash != source.current.scorer.info.vocab_hash
    put_version(second_model, reg, 4)
    ready = source.poll_once()
    assert ready is not None and ready.version == "4"
    assert source.current.version == "1"                      # the switch waits for the next batch
    assert source.take().version == "4" and source.current.version == "4"


def test_plain_folder_and_empty_registry(model_dir, tmp_path):
    source = ModelSource.open(model_dir, provider="cpu", poll_s=1)
    assert not source.registry and source.current.version == "3" and source.current.name == "testgru"
    reg = tmp_path / "reg"
    (reg / "1").mkdir(parents=True)
    with pytest.raises(registry.ModelError, match="no valid model version"):
        ModelSource.open(reg, provider="cpu")


def test_worker_swaps_models_under_load_scoring_every_event_exactly_once(broker, model_dir, second_model, tmp_path):
    """Events stream in while version 2 (corrupt) and then version 3 (another model) land in
    the registry: 2 is refused and counted, 3 takes over between batches. Every event is
    scored exactly once; in each partition, outputs carry version 1 and then 3 (never back);
    each output equals offline scoring with the model its model_version names."""
    run = uuid.uuid4().hex[:8]
    t = {name: f"{name}-{run}" for name in ("input", "scores", "next_items", "dlq", "triggers")}
    reg = tmp_path / "onnx_models" / "shop"
    reg.mkdir(parents=True)
    put_version(model_dir, reg, 1)
    sim = tmp_path / "sim.parquet"
    subprocess.run([CLICKSCORE, "simulate", "--sessions", "120", "--seed", "14", "--out", str(sim)],
                   check=True, capture_output=True)
    import polars as pl
    frame = pl.read_parquet(sim).sort("timestamp", maintain_order=True)
    log = []
    for i, row in enumerate(frame.iter_rows(named=True)):
        event = {k: row[k] for k in ("session_id", "event_type", "item_id", "category_id", "price", "timestamp")
                 if row[k] is not None}
        event["session_id"] = f"sw-{event['session_id']}"
        event["event_id"] = f"sw-{i}"
        log.append(event)
    metrics_port = free_port()
    worker = WorkerProcess(broker, reg, t, f"app-{run}", tmp_path / "worker.log", free_port(),
                           ["--top-k", str(TOP_K), "--batch-size", "32", "--model-poll-s", "0.5",
                            "--metrics-port", str(metrics_port), "--session-timeout-s", str(100 * 86400)])
    positions: dict[str, tuple[int, int]] = {}
    failures: list[BaseException] = []

    def stream_events() -> None:
        from kafka import KafkaProducer
        try:
            producer = KafkaProducer(bootstrap_servers=broker, linger_ms=5)
            futures = []
            start = time.monotonic()
            rate = len(log) / 20.0                       # spread over about 20 s
            for i, e in enumerate(log):
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                futures.append((e["event_id"], producer.send(t["input"], key=e["session_id"].encode(),
                                                             value=json.dumps(e).encode())))
            producer.flush()
            for event_id, future in futures:
                meta = future.get(timeout=30)
                positions[event_id] = (meta.partition, meta.offset)
            producer.close()
        except BaseException as exc:   # surfaced by the test thread
            failures.append(exc)

    with worker:
        deadline = time.monotonic() + 90
        while "Worker ready" not in worker.log() and time.monotonic() < deadline:
            assert worker.proc.poll() is None, worker.log()[-3000:]
            time.sleep(0.2)
        producer = threading.Thread(target=stream_events)
        producer.start()
        read_topic(broker, t["next_items"], lambda r: len(r) >= len(log) // 4, timeout=120, settle=0)
        # Version 2 lands whole (staged, renamed, as `clickscore export` writes) but corrupt:
        # copied in place, the poller could also see it half-written and refuse it twice.
        corrupt_copy(second_model, tmp_path / "corrupt-2")
        put_version(tmp_path / "corrupt-2", reg, 2)
        time.sleep(1.5)
        put_version(second_model, reg, 3)
        producer.join(timeout=180)
        assert not failures, failures
        items = read_topic(broker, t["next_items"], lambda r: len(r) >= len(log), timeout=180, settle=2.0)
        import urllib.request
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert worker.proc.poll() is None, worker.log()[-3000:]
    swaps = {line.split('"')[1]: float(line.split()[-1]) for line in text.splitlines()
             if line.startswith("clickscore_model_swaps_total")}
    assert swaps == {"refused": 1.0, "swapped": 1.0}, swaps
    assert "version 2 refused" in worker.log()

    item_values = values(items)
    # Exactly once: every event one next-items record, none twice.
    assert sorted(v["event_id"] for v in item_values) == sorted(e["event_id"] for e in log)
    versions = {v["event_id"]: v["model_version"] for v in item_values}
    assert set(versions.values()) == {"1", "3"}, set(versions.values())
    assert all(v["model_name"] == "shop" for v in item_values)
    by_partition: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for event_id, (partition, offset) in positions.items():
        by_partition[partition].append((offset, versions[event_id]))
    for partition, seq in by_partition.items():
        order = [version for _, version in sorted(seq)]
        assert order == sorted(order, key=int), f"partition {partition} went back to an old model"
    # Each output equals offline scoring with the model it names.
    sessions: dict[str, list[dict]] = defaultdict(list)
    for e in log:
        sessions[e["session_id"]].append(e)
    references = {"1": offline_scores(ModelScorer(reg / "1", provider="cpu"), sessions, TOP_K),
                  "3": offline_scores(ModelScorer(reg / "3", provider="cpu"), sessions, TOP_K)}
    differ = 0
    for v in item_values:
        _, names, scores, count = references[v["model_version"]][v["event_id"]]
        assert v["event_count"] == count
        assert np.max(np.abs(np.array(v["scores"]) - np.array(scores))) <= 1e-5, v["event_id"]
        other = references["3" if v["model_version"] == "1" else "1"][v["event_id"]][2]
        differ += np.max(np.abs(np.array(other) - np.array(scores))) > 1e-3
    assert differ > len(item_values) // 2, "the two models must score differently for this test to mean anything"
    print(f"\n{sum(x == '1' for x in versions.values())} events scored by version 1, "
          f"{sum(x == '3' for x in versions.values())} by version 3")
