"""Progress of long commands: a bar on a terminal, plain lines (or nothing) in a log.

The real commands run as subprocesses, once with pipes (as in CI, cron or `| tee`):
no carriage returns or escape sequences may reach the captured output; and once on
a pseudo-terminal, where the bar must show."""
from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # bench/ is not an installed package

from bench.workerkit import CLICKSCORE, read_topic  # noqa: E402

CONTROL = re.compile(r"[\r\x1b\x08]")
REDRAW = re.compile(r"\r(?!\n)")      # a carriage return that redraws the line (a terminal's \r\n is no redraw)
TRAIN = ["--model", "gru", "--epochs", "2", "--batch-size", "32", "--embedding-dim", "8",
         "--hidden-dim", "8", "--threads", "1", "--max-valid-windows", "200", "--patience", "0"]


def run_piped(*argv: str) -> subprocess.CompletedProcess:
    done = subprocess.run([CLICKSCORE, *argv], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not CONTROL.search(done.stdout + done.stderr), (done.stdout + done.stderr)[-2000:]
    return done


def run_on_terminal(*argv: str, timeout: float = 600) -> str:
    """stdout and stderr on a pseudo-terminal; returns all it printed."""
    leader, follower = pty.openpty()
    # A new pty is 0 x 0 characters, and tqdm draws nothing in 0 columns: give it 24 x 120.
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen([CLICKSCORE, *argv], stdin=follower, stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = os.read(leader, 65536)
        except OSError:          # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=30)
    os.close(leader)
    assert proc.returncode == 0, b"".join(chunks)[-3000:]
    return b"".join(chunks).decode(errors="replace")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("progress")
    run_piped("simulate", "--sessions", "300", "--seed", "4", "--buy-share", "0.2", "--out", str(root / "sim.parquet"))
    done = run_piped("prepare", "--dataset", "canonical", "--input", str(root / "sim.parquet"),
                     "--out", str(root / "prep"))
    assert "split" in done.stdout     # the stats table still prints
    return root


def test_train_and_evaluate_log_plain_lines_when_not_on_a_terminal(prepared):
    done = run_piped("train", "--data", str(prepared / "prep"), "--out", str(prepared / "ck"), *TRAIN)
    # One plain line per epoch with its validation figures, nothing redrawn.
    epochs = [line for line in done.stderr.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1", "epoch 2"]
    assert all("valid AUC" in line and "R@20" in line for line in epochs)
    done = run_piped("evaluate", "--model", str(prepared / "ck"), "--data", str(prepared / "prep"),
                     "--json", "--bootstrap", "0", "--baselines", "false")
    assert "auc" in json.loads(done.stdout) and not done.stderr      # quiet: no --verbose


def test_replay_is_quiet_in_a_log(broker, prepared):
    topic = f"progress-{uuid.uuid4().hex[:8]}"
    done = run_piped("replay", "--input", str(prepared / "prep"), "--topic", topic, "--broker", broker)
    sent = int(re.search(r"replayed ([\d,]+) of", done.stdout).group(1).replace(",", ""))
    assert len(read_topic(broker, topic, lambda r: len(r) >= sent, timeout=60, settle=0)) == sent


def test_a_terminal_gets_progress_bars(prepared):
    out = run_on_terminal("prepare", "--dataset", "canonical", "--input", str(prepared / "sim.parquet"),
                          "--out", str(prepared / "prep-tty"))
    assert "prepare canonical: reading" in out and REDRAW.search(out)
    out = run_on_terminal("train", "--data", str(prepared / "prep"), "--out", str(prepared / "ck-tty"), *TRAIN)
    assert re.search(r"epoch 1/2: +\d+%", out) and REDRAW.search(out)
    assert "epoch 2: train buy" in out
