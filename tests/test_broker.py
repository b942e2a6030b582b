"""`clickscore broker` and EmbeddedBroker: start, answer Kafka requests, stop cleanly."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port
from stream.broker import EmbeddedBroker, port_answers
from stream.errors import ClickscoreError

CLICKSCORE = str(Path(sys.executable).parent / "clickscore")


def test_embedded_broker_serves_kafka_and_stops_its_child():
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    broker = EmbeddedBroker()
    with broker as bootstrap:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        admin.create_topics([NewTopic("t-embedded", 3, 1)])
        assert "t-embedded" in admin.list_topics()
        admin.close()
        child = broker.process
        with pytest.raises(ClickscoreError, match="already in use"):
            EmbeddedBroker(broker.port).start()
    assert child.poll() is not None
    assert not port_answers("127.0.0.1", broker.port)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_broker_command_prints_its_address_and_stops_on_signals(sig):
    port = free_port()
    proc = subprocess.Popen([CLICKSCORE, "broker", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == f"127.0.0.1:{port}"
        assert port_answers("127.0.0.1", port)
        proc.send_signal(sig)
        assert proc.wait(timeout=15) == 0
        deadline = time.monotonic() + 5
        while port_answers("127.0.0.1", port) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not port_answers("127.0.0.1", port), "the broker child outlived the command"
    finally:
        if proc.poll() is None:
            proc.kill()
