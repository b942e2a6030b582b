"""Clean shutdown (issue 14): every long-running command stops on SIGTERM, SIGINT and
SIGHUP within the bound of stream/lifecycle.py, with or without a reachable broker,
leaves no process it started behind, and loses nothing it had committed.

    .venv/bin/python -m pytest tests/test_shutdown.py

Real processes throughout: `clickscore broker|worker|sink|replay|demo` as subprocesses
on the real embedded broker. Descendants are read from /proc *before* the signal, so
a child that outlived its parent (re-parented to init) is still checked. The measured
time from signal to exit of each run is printed at the end of the module.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # bench/ is not an installed package
from bench.workerkit import WorkerProcess, produce, read_topic  # noqa: E402
from conftest import BIN, free_port, fresh_topic  # noqa: E402
from stream import lifecycle  # noqa: E402
from stream.broker import EmbeddedBroker  # noqa: E402
from test_sink import Webhook, committed_and_end, make_trigger, start_sink  # noqa: E402
from test_sink import produce as produce_triggers  # noqa: E402

CLICKSCORE = str(BIN / "clickscore")
MODEL = REPO / "onnx_models" / "default"
SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]
# The documented bound plus what the watchdog's last SIGKILLs and the interpreter's
# exit take on a loaded 2-core CI machine.
BOUND_S = lifecycle.STOP_DEADLINE_S + 3.0
T0 = 1_767_571_200_000

TIMINGS: list[tuple[str, str, str, float, int | None]] = []   # command, signal, broker, s, status


@pytest.fixture(scope="module", autouse=True)
def report_timings(request):
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not TIMINGS:
        return
    with capture.global_and_fixture_disabled():   # shown in the normal pytest output
        reporter.write_line("")
        reporter.write_line(f"signal -> exit, seconds (bound {lifecycle.STOP_DEADLINE_S:.0f} s):")
        for command, sig, broker, seconds, status in TIMINGS:
            reporter.write_line(f"  {command:<7} {sig:<8} broker {broker:<5} {seconds:6.2f} s  exit {status}")


@pytest.fixture(scope="module")
def model() -> Path:
    if not (MODEL / "model.onnx").is_file():
        pytest.fail(f"{MODEL} is missing: the repository ships the default model")
    return MODEL


# --------------------------------------------------------------------------- processes

def _parents() -> dict[int, int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return parents


def descendants(pid: int) -> set[int]:
    parents = _parents()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"   # a zombie holds nothing
    except OSError:
        return False


def wait_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while (left := {p for p in pids if alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def signal_and_measure(proc: subprocess.Popen, sig: int, command: str, broker: str,
                       expect_children: int = 0) -> tuple[float, set[int]]:
    """Send `sig`, wait for the exit; returns (seconds, descendants recorded before)."""
    children = descendants(proc.pid)
    assert len(children) >= expect_children, f"{command} should have started {expect_children} processes"
    started = time.monotonic()
    proc.send_signal(sig)
    try:
        proc.wait(timeout=BOUND_S)
    except subprocess.TimeoutExpired:
        pass
    seconds = time.monotonic() - started
    status = proc.poll()
    TIMINGS.append((command, signal.Signals(sig).name, broker, seconds, status))
    if status is None:
        for pid in children | {proc.pid}:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        pytest.fail(f"{command} still running {BOUND_S:.0f} s after {signal.Signals(sig).name}")
    # Children stopped in order are gone before their parent exits; one killed by the
    # parent-death signal or the watchdog needs a moment to be reaped by init.
    left = wait_gone(children, 2.0)
    assert not left, f"{command} left {sorted(left)} running after it exited"
    return seconds, children


class Lines(threading.Thread):
    """Collects a child's stdout lines so a test can wait for one."""

    def __init__(self, stream):
        super().__init__(daemon=True)
        self.stream, self.lines, self.lock = stream, [], threading.Lock()
        self.start()

    def run(self):
        for line in self.stream:
            with self.lock:
                self.lines.append(line)

    def wait_for(self, text: str, proc: subprocess.Popen, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if any(text in line for line in self.lines):
                    return
            if proc.poll() is not None:
                break
            time.sleep(0.1)
        pytest.fail(f"no {text!r} within {timeout} s; output:\n{self.text()[-3000:]}")

    def text(self) -> str:
        self.join(timeout=5)
        with self.lock:
            return "".join(self.lines)


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CLICKSCORE_")}


# --------------------------------------------------------------------------- lifecycle itself

def run_script(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


IGNORES_SIGTERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(600)"


def test_stop_child_escalates_to_sigkill_when_sigterm_is_ignored():
    child = lifecycle.spawn([sys.executable, "-c", IGNORES_SIGTERM], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "up\n"   # its SIGTERM handler is in place
    started = time.monotonic()
    status = lifecycle.stop_child(child, grace_s=0.5)
    assert status == -signal.SIGKILL
    assert time.monotonic() - started < 5.0
    assert child not in lifecycle.children()


def test_children_die_with_a_parent_that_is_sigkilled():
    parent = run_script(f"""
        import signal, sys
        from stream import lifecycle
        a = lifecycle.spawn(["sleep", "600"], death_signal=signal.SIGKILL)
        b = lifecycle.spawn([sys.executable, "-c", {IGNORES_SIGTERM!r}], death_signal=signal.SIGKILL)
        print(a.pid, b.pid, flush=True)
        signal.pause()
    """)
    pids = {int(p) for p in parent.stdout.readline().split()}
    assert len(pids) == 2 and all(alive(p) for p in pids)
    parent.kill()
    parent.wait(timeout=10)
    assert not wait_gone(pids, 5.0), "a child outlived its SIGKILLed parent"


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_watchdog_forces_the_exit_of_a_stop_that_hangs(sig):
    # A process whose orderly stop never finishes (the signal only sets an event that
    # nothing reads), with a child that ignores SIGTERM: both gone after the deadline.
    proc = run_script(f"""
        import sys, time
        from stream import lifecycle
        lifecycle.install(deadline_s=1.0)
        child = lifecycle.spawn([sys.executable, "-c", {IGNORES_SIGTERM!r}])
        print(child.pid, flush=True)
        while True:
            time.sleep(0.1)
    """)
    child = int(proc.stdout.readline())
    started = time.monotonic()
    proc.send_signal(sig)
    status = proc.wait(timeout=10)
    assert status == lifecycle.EXIT_FORCED
    assert 0.9 <= time.monotonic() - started < 8.0
    assert not wait_gone({child}, 2.0)
    assert "exiting with status 124" in proc.stderr.read()


# --------------------------------------------------------------------------- broker

@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_broker_stops_with_a_client_connected(sig):
    # Tansu ignores SIGTERM while a client is connected: the command escalates to SIGKILL.
    from kafka import KafkaConsumer
    proc = subprocess.Popen([CLICKSCORE, "broker", "--port", str(free_port())], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=clean_env())
    bootstrap = proc.stdout.readline().strip()
    client = KafkaConsumer(bootstrap_servers=bootstrap)
    client.topics()                      # connected, and stays connected through the stop
    try:
        _, children = signal_and_measure(proc, sig, "broker", "own", expect_children=1)
    finally:
        client.close()
    assert proc.returncode == lifecycle.EXIT_OK


# --------------------------------------------------------------------------- worker

def worker_topics() -> dict[str, str]:
    run = uuid.uuid4().hex[:8]
    return {name: f"sd-{name}-{run}" for name in ("input", "scores", "next_items", "dlq", "triggers")}


def click_records(n: int, prefix: str) -> list[tuple[bytes, bytes]]:
    out = []
    for i in range(n):
        session = f"{prefix}-s{i % 7}"
        event = {"session_id": session, "event_type": "view", "item_id": str(100 + i % 13),
                 "timestamp": T0 + i * 1000, "event_id": f"{prefix}-{i}"}
        out.append((session.encode(), json.dumps(event).encode()))
    return out


@pytest.mark.parametrize("broker_state", ["up", "down"])
@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_worker_stops_and_keeps_what_it_committed(broker, model, tmp_path, sig, broker_state):
    own = EmbeddedBroker() if broker_state == "down" else None
    bootstrap = own.start() if own else broker
    topics, app_id = worker_topics(), f"sd-{uuid.uuid4().hex[:8]}"
    worker = WorkerProcess(bootstrap, model, topics, app_id, tmp_path / "worker.log", free_port(),
                           ["--partitions", "2"])
    try:
        records = click_records(40, app_id)
        produce(bootstrap, topics["input"], records)
        worker.start()
        scored = read_topic(bootstrap, topics["next_items"], lambda r: len(r) >= len(records),
                            timeout=120, settle=0)
        assert len(scored) >= len(records), worker.log()[-3000:]
        if own:
            own.stop()   # the broker goes away under a running worker
        seconds, _ = signal_and_measure(worker.proc, sig, "worker", broker_state)
    finally:
        worker.stop(timeout=1)
        if own:
            own.stop()
    status = worker.proc.returncode
    if broker_state == "up":
        assert status == lifecycle.EXIT_OK, worker.log()[-3000:]
        # Every event scored before the signal has its offset committed: nothing is
        # scored twice by the next worker of the group, nothing skipped.
        committed, end = committed_and_end(broker, topics["input"], app_id)
        assert committed == end and sum(end.values()) == len(records)
    else:
        # Nothing can be committed without a broker: an orderly stop that gives up, or
        # the watchdog's forced exit; the next worker re-delivers from the last commit.
        assert status in (lifecycle.EXIT_OK, lifecycle.EXIT_FORCED), worker.log()[-3000:]


# --------------------------------------------------------------------------- sink

@pytest.mark.parametrize("broker_state", ["up", "down"])
@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_sink_stops_and_keeps_what_it_committed(broker, sig, broker_state):
    own = EmbeddedBroker() if broker_state == "down" else None
    bootstrap = own.start() if own else broker
    topic, dlq, group = fresh_topic("triggers"), fresh_topic("triggers-dlq"), fresh_topic("sink")
    triggers = [make_trigger(f"s-{i}", i) for i in range(5)]
    webhook = Webhook()
    produce_triggers(bootstrap, topic, triggers)
    sink = start_sink(bootstrap, webhook.url, topic, dlq, group, free_port())
    try:
        deadline = time.monotonic() + 60
        while len(webhook.delivered) < len(triggers) and time.monotonic() < deadline and sink.poll() is None:
            time.sleep(0.1)
        assert len(webhook.delivered) == len(triggers), "the sink delivered nothing"
        if own:
            own.stop()
        else:
            time.sleep(1.0)   # the batch's commit follows its last delivery
        signal_and_measure(sink, sig, "sink", broker_state)
    finally:
        if sink.poll() is None:
            sink.kill()
        webhook.close()
        if own:
            own.stop()
    output = sink.stdout.read()
    if broker_state == "up":
        assert sink.returncode == lifecycle.EXIT_OK, output
        assert f"{signal.Signals(sig).name} received" in output
        committed, end = committed_and_end(broker, topic, group)
        assert committed == end, output
    else:
        assert sink.returncode in (lifecycle.EXIT_OK, lifecycle.EXIT_FORCED), output


# --------------------------------------------------------------------------- replay

@pytest.fixture(scope="module")
def click_log(tmp_path_factory) -> tuple[Path, list[str]]:
    path = tmp_path_factory.mktemp("replay") / "clicks.jsonl"
    records = click_records(3000, "rp")
    path.write_bytes(b"".join(value + b"\n" for _, value in records))
    return path, [json.loads(value)["event_id"] for _, value in records]


@pytest.mark.parametrize("broker_state", ["up", "down"])
@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_replay_stops_and_reports_what_was_acknowledged(broker, click_log, sig, broker_state):
    path, event_ids = click_log
    own = EmbeddedBroker() if broker_state == "down" else None
    bootstrap = own.start() if own else broker
    topic = fresh_topic("replay")
    proc = subprocess.Popen([CLICKSCORE, "replay", "--input", str(path), "--topic", topic, "--broker", bootstrap,
                             "--rate", "300", "--progress", "false", "--json", "--delivery-timeout-ms", "20000"],
                            cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2.5)   # about 750 of the 3,000 events sent
        assert proc.poll() is None, proc.stderr.read()
        if own:
            own.stop()
            time.sleep(0.5)
        signal_and_measure(proc, sig, "replay", broker_state)
    finally:
        if proc.poll() is None:
            proc.kill()
        if own:
            own.stop()
    out, err = proc.communicate()
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["stopped_early"] is True
    assert 0 < summary["sent"] + summary["failed"] < len(event_ids)
    if broker_state == "up":
        assert proc.returncode == lifecycle.EXIT_OK, err
        assert summary["failed"] == 0
        # Every acknowledged event is in the topic: the first `sent` of the log, in order.
        stored = read_topic(broker, topic, lambda r: len(r) >= summary["sent"], timeout=30, settle=0.5)
        ids = sorted((json.loads(r.value)["event_id"] for r in stored), key=event_ids.index)
        assert ids == event_ids[:summary["sent"]]
    else:
        # Sends the dead broker never acknowledged are reported as failed (exit 1).
        assert proc.returncode in (lifecycle.EXIT_FAILURE, lifecycle.EXIT_FORCED), err
        if proc.returncode == lifecycle.EXIT_FAILURE:
            assert summary["failed"] > 0


# --------------------------------------------------------------------------- demo

@pytest.mark.parametrize("sig", SIGNALS + [signal.SIGKILL], ids=lambda s: s.name)
def test_demo_stops_its_broker_and_worker(model, click_log, sig):
    path, _ = click_log
    proc = subprocess.Popen([CLICKSCORE, "demo", "--input", str(path), "--model", str(model),
                             "--duration", "300", "--rate", "50", "--view", "plain", "--json",
                             "--partitions", "2"],
                            cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = Lines(proc.stdout)
    try:
        lines.wait_for("events/s in", proc, timeout=150)   # warmed up, replay running
        time.sleep(3.0)                                      # about 150 events sent
        if sig == signal.SIGKILL:
            # No handler runs: the children must die of the parent-death signal.
            children = descendants(proc.pid)
            assert len(children) >= 2
            started = time.monotonic()
            proc.kill()
            proc.wait(timeout=10)
            left = wait_gone(children, BOUND_S)
            TIMINGS.append(("demo", "SIGKILL", "own", time.monotonic() - started, proc.returncode))
            assert not left, f"orphans of a SIGKILLed demo: {sorted(left)}"
            return
        signal_and_measure(proc, sig, "demo", "own", expect_children=2)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = lines.text()
    assert proc.returncode == lifecycle.EXIT_OK, output[-3000:]
    assert "clickscore demo summary" in output
    summary = json.loads(output.strip().splitlines()[-1])
    assert summary["interrupted"] is True and summary["events_sent"] > 0
