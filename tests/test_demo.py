"""`clickscore demo --duration 30` end to end: broker, worker, replay, summary, clean exit.

    .venv/bin/python -m pytest tests/test_demo.py

Uses onnx_models/default when it exists; otherwise trains and exports a tiny model on
a simulated log first (about 15 s; needs the train extras, torch).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import REPO

DEFAULT_MODEL = REPO / "onnx_models" / "default"


def clickscore(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stream.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    if (DEFAULT_MODEL / "model.onnx").is_file():
        return DEFAULT_MODEL
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("demo-model")
    steps = [
        ("simulate", "--sessions", "2000", "--seed", "0", "--out", str(root / "sim.parquet")),
        ("prepare", "--dataset", "canonical", "--input", str(root / "sim.parquet"), "--out", str(root / "prep")),
        ("train", "--data", str(root / "prep"), "--out", str(root / "ck"), "--model", "gru", "--seed", "3",
         "--max-steps", "60", "--epochs", "1", "--batch-size", "32", "--embedding-dim", "16",
         "--hidden-dim", "24", "--threads", "1", "--max-valid-windows", "300", "--min-item-count", "2"),
        ("export", "--checkpoint", str(root / "ck"), "--out", str(root / "onnx")),
    ]
    for step in steps:
        result = clickscore(*step)
        assert result.returncode == 0, f"{step[0]}: {result.stderr[-2000:]}"
    return root / "onnx"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it holds no port and no CPU.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_demo_runs_end_to_end_and_cleans_up(model):
    result = clickscore("demo", "--duration", "30", "--model", str(model), "--rate", "150",
                        "--sessions", "1000", "--json", "--view", "plain")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert "clickscore demo summary" in result.stdout and "buy AUC" in result.stdout
    assert summary["ok"] and summary["scores"] > 0 and summary["next_item_lists"] > 0
    assert summary["events_sent"] >= 1000
    assert isinstance(summary["buy_auc"], float) and 0.0 <= summary["buy_auc"] <= 1.0
    assert summary["auc_buying_sessions"] > 0
    assert isinstance(summary["recall_at_20"], float) and summary["recall_lists_judged"] > 0
    assert summary["latency_p50_ms"] is not None and summary["latency_p99_ms"] >= summary["latency_p50_ms"]
    # Everything it started is gone, and its ports are free again.
    for pid in (summary["worker_pid"], summary["broker_pid"]):
        assert not pid_alive(pid), f"pid {pid} still running"
    broker_port = int(summary["broker"].rsplit(":", 1)[1])
    for port in (broker_port, summary["web_port"], summary["metrics_port"]):
        assert port_free(port), f"port {port} still bound"


def test_demo_without_a_model_exits_2_saying_so(tmp_path):
    result = clickscore("demo", "--duration", "5", "--model", str(tmp_path / "none"), timeout=60)
    assert result.returncode == 2 and "no exported model" in result.stderr
