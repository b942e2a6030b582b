"""How every clickscore process stops: SIGTERM, SIGINT or SIGHUP start an orderly stop,
and a watchdog ends the process anyway STOP_DEADLINE_S after the first signal.

    from stream import lifecycle
    stopping = lifecycle.install()               # threading.Event, set by the first signal
    child = lifecycle.spawn([binary, ...])        # dies with us, in its own process group
    while not stopping.wait(0.5): ...
    lifecycle.stop_child(child)                   # SIGTERM, then SIGKILL after the grace period
    return lifecycle.EXIT_OK

The bound, for every command (broker, worker, sink, replay, demo): from the first
stop signal to the process's exit is at most STOP_DEADLINE_S (10 s) plus the moment
the watchdog needs to SIGKILL what it started. Within the bound a command stops
taking new work, finishes or abandons what is in flight, commits what may be
committed and stops its children; past it, the watchdog SIGKILLs every child it
knows (their whole process groups) and calls os._exit(EXIT_FORCED), so neither a
broker that is gone (Faust's stop waits for it) nor a child that ignores SIGTERM
(Tansu does while clients are connected) keeps a process alive.

Children started with `spawn` also die when their parent dies in a way no handler
sees (SIGKILL, a crash): the kernel sends them the parent-death signal
(PR_SET_PDEATHSIG, Linux), SIGTERM for a clickscore child (which then runs its own
orderly, bounded stop) and SIGKILL for the broker binary. They run in their own
process group and session, so a terminal's Ctrl-C or hang-up reaches only the
parent, which stops them in order (the worker before the broker it talks to).

Exit statuses (documented in docs/streaming.md, "Stopping"):
    0    done, or stopped in order on SIGTERM/SIGINT/SIGHUP within the bound
    1    failed (e.g. sends not acknowledged, a child died, the worker's Faust run failed)
    2    usage or configuration error (bad argument, model file, port in use)
    70   the worker's scoring crashed (it exits so a supervisor restarts it; stream/app.py)
    124  forced: the orderly stop did not finish within STOP_DEADLINE_S
"""
from __future__ import annotations

import atexit
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from types import FrameType
from typing import Callable, Sequence

log = logging.getLogger("clickscore.lifecycle")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STOP_DEADLINE_S = 10.0     # first stop signal -> exit, whatever is still running
CHILD_GRACE_S = 5.0        # a child's SIGTERM -> SIGKILL, when the deadline leaves that long
FORCE_MARGIN_S = 1.0       # the part of the deadline kept for the last SIGKILLs

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CRASH = 70
EXIT_FORCED = 124

_PR_SET_PDEATHSIG = 1      # <linux/prctl.h>

_lock = threading.RLock()    # re-entrant: a signal handler may run while the main thread holds it
_children: list[subprocess.Popen] = []
_callbacks: list[Callable[[int], None]] = []
_stopping = threading.Event()
_stop_signal: int | None = None
_stop_started: float | None = None
_deadline_s = STOP_DEADLINE_S
_interruptible = False


class StopRequested(BaseException):
    """Raised in the main thread by a stop signal inside `interruptible()`: set-up code
    (loading a model, waiting for a broker) is abandoned, there is nothing to commit yet."""


# --------------------------------------------------------------------------- stopping

def stopping() -> threading.Event:
    """Set once a stop signal (or `request_stop`) has arrived."""
    return _stopping


def stop_signal() -> int | None:
    """The signal that started the stop, or None."""
    return _stop_signal


def remaining_s(default: float = STOP_DEADLINE_S) -> float:
    """Seconds left before the watchdog forces the exit (`default` while not stopping)."""
    if _stop_started is None:
        return default
    return max(0.0, _deadline_s - (time.monotonic() - _stop_started))


def child_grace_s() -> float:
    """How long a child may take after SIGTERM: CHILD_GRACE_S, cut so that it fits
    before this process's own deadline (minus the margin for the last SIGKILLs)."""
    return max(0.1, min(CHILD_GRACE_S, remaining_s(STOP_DEADLINE_S) - FORCE_MARGIN_S))


def on_stop(callback: Callable[[int], None]) -> None:
    """Call `callback(signum)` when the stop starts (from the signal handler's thread)."""
    with _lock:
        _callbacks.append(callback)
    if _stopping.is_set() and _stop_signal is not None:
        callback(_stop_signal)


def request_stop(signum: int = signal.SIGTERM) -> None:
    """Start the orderly stop: set `stopping()`, run the callbacks, arm the watchdog.
    A second request changes nothing (the watchdog already bounds the stop)."""
    global _stop_signal, _stop_started
    with _lock:
        again = _stopping.is_set()
        if not again:
            _stop_signal = signum
            _stop_started = time.monotonic()
            _stopping.set()
            callbacks = list(_callbacks)
    name = _signal_name(signum)
    if again:
        log.info("%s received while stopping; exit forced in %.1f s at the latest", name, remaining_s())
        return
    log.info("%s received: stopping (forced exit after %.0f s)", name, _deadline_s)
    threading.Thread(target=_watchdog, name="clickscore-stop-watchdog", daemon=True).start()
    for callback in callbacks:
        try:
            callback(signum)
        except Exception:   # noqa: BLE001 - one failing hook must not keep the others from running
            log.exception("stop callback %r failed", callback)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _on_signal(signum: int, frame: FrameType | None) -> None:
    request_stop(signum)
    if _interruptible:
        raise StopRequested(signum)


class interruptible:
    """`with interruptible():` a stop signal raises StopRequested in the block (set-up
    phases that wait on something without looking at `stopping()`)."""

    def __enter__(self) -> None:
        global _interruptible
        _interruptible = True
        if _stopping.is_set():
            raise StopRequested(_stop_signal)

    def __exit__(self, *exc) -> None:
        global _interruptible
        _interruptible = False


def install(deadline_s: float = STOP_DEADLINE_S,
            callback: Callable[[int], None] | None = None) -> threading.Event:
    """Handle SIGTERM, SIGINT and SIGHUP in this (main) thread with `request_stop`;
    returns the `stopping()` event. SIGINT no longer raises KeyboardInterrupt: code that
    waits must look at the event (or pass a callback that wakes it)."""
    global _deadline_s
    _deadline_s = deadline_s
    if callback is not None:
        on_stop(callback)
    if threading.current_thread() is not threading.main_thread():
        return _stopping     # only the main thread may handle signals (a library caller's job)
    for signum in STOP_SIGNALS:
        signal.signal(signum, _on_signal)
    return _stopping


def install_in_loop(loop, deadline_s: float = STOP_DEADLINE_S) -> threading.Event:
    """The same for an asyncio loop (its own signal handling wakes the loop at once)."""
    global _deadline_s
    _deadline_s = deadline_s
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, request_stop, signum)
    return _stopping


def bound_faust_worker(worker) -> None:
    """Give a faust.Worker (mode.Worker) SIGHUP and the hard deadline. Faust handles
    SIGINT/SIGTERM itself (its `_on_sigterm` schedules `worker.stop()`, and
    execute_from_commandline returns once the services have stopped: consumer stopped,
    producer flushed, acked offsets committed) but without any bound, so a worker
    whose broker is gone waits for it for ever. Its handlers are installed on the
    loop at first start; ours replace them there, then call Faust's."""
    original = worker.install_signal_handlers

    def install_signal_handlers() -> None:
        original()

        def on_signal(signum: int) -> None:
            request_stop(signum)
            worker._on_sigterm()   # Faust's own orderly stop (flags it "stopped by signal")
        for signum in STOP_SIGNALS:
            worker.loop.add_signal_handler(signum, on_signal, signum)
    worker.install_signal_handlers = install_signal_handlers


def _watchdog() -> None:
    time.sleep(max(0.0, remaining_s()))
    force_exit(f"still stopping {_deadline_s:.0f} s after {_signal_name(_stop_signal or 0)}")


def force_exit(reason: str, status: int = EXIT_FORCED) -> None:
    """SIGKILL every child (whole process groups) and leave now, without cleanup."""
    try:
        sys.stderr.write(f"clickscore: {reason}: killing {len(_children)} child process(es) "
                         f"and exiting with status {status}\n")
        sys.stderr.flush()
    except Exception:   # noqa: BLE001 - stderr may be closed; exiting matters more
        pass
    kill_children()
    logging.shutdown()
    os._exit(status)


# --------------------------------------------------------------------------- children

def _die_with_parent(death_signal: int, parent: int) -> Callable[[], None]:
    # Looked up here, in the parent: dlopen between fork and exec could deadlock on a
    # loader lock another thread of the parent held at the fork.
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec() -> None:
        # Runs in the child between fork and exec. PR_SET_PDEATHSIG fires when the
        # *thread* that forked exits, so spawn from the main thread of long-lived code.
        prctl(_PR_SET_PDEATHSIG, death_signal, 0, 0, 0)
        if os.getppid() != parent:   # the parent died before prctl: nobody would tell us
            os._exit(EXIT_FAILURE)
    return preexec


def spawn(argv: Sequence[str], *, death_signal: int = signal.SIGTERM,
          **popen_kwargs) -> subprocess.Popen:
    """subprocess.Popen that cannot outlive this process: its own session and process
    group (stopped whole by `stop_child`, and kept from the terminal's Ctrl-C and
    hang-up, which are the parent's to handle), the parent-death signal `death_signal`
    on Linux, and a registration that the watchdog and exit handlers use."""
    if sys.platform.startswith("linux"):
        popen_kwargs.setdefault("preexec_fn", _die_with_parent(death_signal, os.getpid()))
    popen_kwargs.setdefault("start_new_session", True)
    process = subprocess.Popen(list(argv), **popen_kwargs)
    with _lock:
        _children.append(process)
    return process


def signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)   # spawn made the child its group's leader
    except (ProcessLookupError, PermissionError):
        try:
            process.send_signal(signum)
        except ProcessLookupError:
            pass


def stop_child(process: subprocess.Popen | None, grace_s: float | None = None) -> int | None:
    """SIGTERM the child's process group, wait up to `grace_s` (default `child_grace_s()`),
    then SIGKILL the group; returns the child's exit status."""
    if process is None:
        return None
    return stop_children([process], grace_s)[0]


def stop_children(processes: Sequence[subprocess.Popen], grace_s: float | None = None) -> list[int]:
    """`stop_child` for several at once: SIGTERM every group first, then wait for them
    together against one deadline (not one grace per child), then SIGKILL what is left."""
    grace = child_grace_s() if grace_s is None else grace_s
    for process in processes:
        if process.poll() is None:
            signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("pid %d still running %.1f s after SIGTERM: SIGKILL", process.pid, grace)
            signal_group(process, signal.SIGKILL)
            process.wait()
    with _lock:
        for process in processes:
            if process in _children:
                _children.remove(process)
    return [process.returncode for process in processes]


def kill_children() -> None:
    """SIGKILL every registered child's process group (no waiting beyond reaping)."""
    with _lock:
        children = list(_children)
    for process in children:
        if process.poll() is None:
            signal_group(process, signal.SIGKILL)
    for process in children:
        try:
            process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass


def children() -> list[subprocess.Popen]:
    with _lock:
        return [p for p in _children if p.poll() is None]


@atexit.register
def _stop_children_at_exit() -> None:
    # An exception path that skipped a `finally` must still leave no child behind.
    for process in children():
        stop_child(process, grace_s=min(1.0, child_grace_s()))
