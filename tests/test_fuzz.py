"""The atheris harness (fuzz/fuzz_events.py): a one-minute fuzz run, and the replay of
every input a fuzz run (or a review) once found crashing, kept in fuzz/regressions/.

    .venv/bin/python -m pytest tests/test_fuzz.py -q
    FUZZ_TEST_SECONDS=10 .venv/bin/python -m pytest tests/test_fuzz.py -q    # a shorter run
"""
from __future__ import annotations

import importlib.util
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stream.events import ClickEvent, InvalidEvent

ROOT = Path(__file__).resolve().parents[1]
FUZZ = ROOT / "fuzz"
REGRESSIONS = sorted(p for p in (FUZZ / "regressions").iterdir() if "--" in p.name)


def load_harness():
    spec = importlib.util.spec_from_file_location("fuzz_events", FUZZ / "fuzz_events.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", REGRESSIONS, ids=[p.name for p in REGRESSIONS])
def test_regression_input_is_handled_with_its_reason(path):
    expected = path.name.split("--")[0]
    result = load_harness().check_one(path.read_bytes())     # raises on a contract breach
    if expected == "valid":
        assert isinstance(result, ClickEvent), result
    else:
        assert isinstance(result, InvalidEvent) and result.reason == expected, result


def test_seed_corpus_passes_the_harness():
    harness = load_harness()
    seeds = sorted((FUZZ / "corpus").iterdir())
    results = {p.name: harness.check_one(p.read_bytes()) for p in seeds}   # raises on a contract breach
    # The valid seeds must reach past decode, or the fuzzer never explores state and encoding.
    assert {n for n, r in results.items() if n.startswith("valid-") and isinstance(r, ClickEvent)} == \
        {n for n in results if n.startswith("valid-")}
    assert all(isinstance(r, InvalidEvent) for n, r in results.items() if n.startswith("attack-"))
    assert any(n.startswith("structured-") for n in results)


def test_structured_inputs_reach_every_stage():
    # Inputs with a leading NUL are built into events with hostile fields: a good share
    # must still be accepted (state and encoding are exercised), many rejected for many reasons.
    harness = load_harness()
    rng = random.Random(7)
    results = [harness.check_one(b"\x00" + rng.randbytes(200)) for _ in range(1500)]
    accepted = sum(isinstance(r, ClickEvent) for r in results)
    reasons = {r.reason for r in results if isinstance(r, InvalidEvent)}
    assert accepted > 50 and {"bad_number", "too_deep", "control_character", "wrong_type"} <= reasons


def test_fuzz_run_finds_no_crash(tmp_path):
    seconds = int(os.environ.get("FUZZ_TEST_SECONDS", "60"))
    work = tmp_path / "corpus"
    work.mkdir()
    command = [sys.executable, str(FUZZ / "fuzz_events.py"), str(work), str(FUZZ / "corpus"),
               f"-dict={FUZZ / 'events.dict'}", f"-max_total_time={seconds}", "-max_len=20000",
               "-timeout=10",            # an input that takes 10 s is a finding too (libFuzzer: timeout)
               f"-artifact_prefix={tmp_path}/", "-print_final_stats=1"]
    # Started through a shell that forks it (the `; exit` keeps the shell from exec-ing it):
    # Linux carries a process's peak resident size across execve, so a fuzzer exec-ed
    # straight from this pytest process (which may hold 2 GB after the training tests)
    # would start "using" pytest's peak and stop at once with a false out-of-memory.
    command = ["/bin/sh", "-c", '"$@"; exit $?', "sh", *command]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=seconds + 240)
    log = run.stdout + run.stderr
    crashes = sorted(tmp_path.glob("crash-*")) + sorted(tmp_path.glob("timeout-*")) + sorted(tmp_path.glob("oom-*"))
    if run.returncode != 0 or crashes:
        found = "\n".join(f"{p.name}: {p.read_bytes()[:2000]!r}" for p in crashes)
        pytest.fail(f"fuzzer exit {run.returncode}; crashing inputs (make each one a file in "
                    f"fuzz/regressions/):\n{found}\n--- log tail ---\n{log[-6000:]}")
    runs = re.search(r"stat::number_of_executed_units:\s*(\d+)", log)
    assert runs and int(runs.group(1)) > 100 * seconds, f"the fuzzer barely ran:\n{log[-3000:]}"
