"""`clickscore worker --processes N`: N worker processes on one machine, one consumer group.

One worker process is bound by the Python it runs per event under its GIL, not by the
machine (docs/operations.md, "The worker's I/O alone"): its event loop and inference
thread together hold the GIL ~240-290 us per event. A second process has a GIL of its
own. Kafka's group protocol already spreads the input partitions over the processes and
Faust moves each partition's table state with it (changelog), exactly as between
machines, so nothing new is coordinated here: this module starts the same command line
N times with distinct web ports, metrics ports and data directories, forwards the stop,
and leaves as soon as one process fails, with its status, so that whatever restarts the
worker (systemd, Kubernetes, docker compose) restarts the set. Restarting one child
here would hide a crash loop from that supervisor.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Sequence

from stream import lifecycle
from stream.errors import ClickscoreError
from stream.settings import Settings

log = logging.getLogger("clickscore.processes")

# The children stop within their own STOP_DEADLINE_S; the parent waits that long and a
# little more before its watchdog SIGKILLs whatever is left.
DEADLINE_S = lifecycle.STOP_DEADLINE_S + lifecycle.CHILD_GRACE_S


def child_argv(argv: Sequence[str], index: int, settings: Settings) -> list[str]:
    """Process `index`'s command line: the parent's own (`worker ...`) with flags appended
    that override it (argparse keeps an option's last value). Ports and data directories
    must differ per process: two Faust web servers cannot share a port, and two RocksDB
    stores cannot share a folder (RocksDB locks it)."""
    return [sys.executable, "-m", "stream.cli", *argv,
            "--processes", "1",
            "--web-port", str(settings.web_port + index),
            "--metrics-port", str(settings.metrics_port + index if settings.metrics_port else 0),
            "--data-dir", str(Path(settings.faust_data_dir()) / f"process-{index}")]


def check_model(settings: Settings) -> None:
    """Load the model (or the registry's newest valid version) once here and let it go, so
    that a bad model fails with one message and exit 2, as one worker does, instead of N
    copies from N processes. On the CPU: the parent must not hold a GPU context for its
    lifetime; each process loads the model again with its own execution provider."""
    from stream.registry import ModelSource

    ModelSource.open(settings.model, "cpu", 0.0, 1)


def check_processes(processes: int, partitions: int, topic: str) -> None:
    if processes > partitions:
        raise ClickscoreError(
            f"--processes {processes} is more than the {partitions} partitions of {topic}: the other "
            f"processes would get no partition and sit idle. Use --processes {partitions} or fewer "
            f"(a new input topic gets --partitions partitions).")


def supervise(settings: Settings, argv: Sequence[str], poll_s: float = 0.2) -> int:
    """Run `settings.processes` worker processes until a stop signal (exit: the worst of
    their statuses) or until one of them exits by itself (exit: its status, 1 if it was 0,
    after stopping the others)."""
    from stream.app import ensure_topics

    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    lifecycle.install(deadline_s=DEADLINE_S)
    try:
        with lifecycle.interruptible():
            check_model(settings)
            # Once, here: N processes would otherwise race to create the topics.
            partitions = ensure_topics(settings)
    except lifecycle.StopRequested:
        log.info("stopped during set-up")
        return lifecycle.EXIT_OK
    check_processes(settings.processes, partitions, settings.input_topic)
    children = []
    for index in range(settings.processes):
        argv_i = child_argv(argv, index, settings)
        Path(argv_i[-1]).mkdir(parents=True, exist_ok=True)   # Faust creates only the last level
        children.append(lifecycle.spawn(argv_i))
        log.info("worker process %d: pid %d, web port %s, metrics port %s, data dir %s", index,
                 children[-1].pid, *argv_i[-5::2])
    failed: tuple[int, int] | None = None
    stopping = lifecycle.stopping()
    while not stopping.is_set() and failed is None:
        for index, process in enumerate(children):
            if process.poll() is not None:
                failed = (index, process.returncode)
                break
        else:
            stopping.wait(poll_s)
    if failed is not None and not stopping.is_set():
        index, status = failed
        log.error("worker process %d (pid %d) exited with status %d: stopping the other %d",
                  index, children[index].pid, exit_status(status), len(children) - 1)
    lifecycle.stop_children(children, max(0.1, lifecycle.remaining_s(DEADLINE_S) - lifecycle.FORCE_MARGIN_S))
    if failed is not None and not stopping.is_set():
        return exit_status(failed[1]) or lifecycle.EXIT_FAILURE
    return max((exit_status(process.returncode) for process in children), default=0)


def exit_status(returncode: int) -> int:
    """A Popen return code as a shell reports it: killed by signal S -> 128 + S."""
    return 128 - returncode if returncode < 0 else returncode
