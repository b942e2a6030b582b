"""`clickscore sink webhook` against the real embedded broker and a real HTTP server:
retries, dead letters, committed offsets, no loss across a SIGTERM mid-retry."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from typing import Any
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from conftest import BIN, REPO, free_port, fresh_topic
from stream.sink import SinkConfig, committable
from stream.triggers import Trigger

T0 = 1_767_571_200_000


class Webhook:
    """A real HTTP server whose answers depend on the trigger: `fail_first[session]`
    failures before success, `always_fail` sessions answer 500 for ever."""

    def __init__(self, fail_first: dict[str, int] | None = None, always_fail: set[str] = frozenset()):
        self.fail_first = dict(fail_first or {})
        self.always_fail = set(always_fail)
        self.attempts: Counter[str] = Counter()
        self.delivered: Counter[str] = Counter()
        self.headers: dict[str, dict[str, str]] = {}
        self.lock = threading.Lock()
        webhook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with webhook.lock:
                    trigger_id = body["trigger_id"]
                    webhook.attempts[trigger_id] += 1
                    webhook.headers[trigger_id] = dict(self.headers)
                    session = body["session_id"]
                    failing = (session in webhook.always_fail
                               or webhook.attempts[trigger_id] <= webhook.fail_first.get(session, 0))
                    if not failing:
                        webhook.delivered[trigger_id] += 1
                self.send_response(500 if failing else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def make_trigger(session: str, i: int) -> Trigger:
    return Trigger(session_id=session, rule="high_intent", kind="high_intent",
                   buy_probability=0.7, timestamp=T0 + i, fired_at=T0 + i, event_id=f"e{i}",
                   evidence={"thresholds": {"fire_above": 0.6, "rearm_below": 0.4}})


def produce(broker: str, topic: str, triggers: list[Trigger]) -> None:
    async def main():
        producer = AIOKafkaProducer(bootstrap_servers=broker)
        await producer.start()
        try:
            for trigger in triggers:
                await producer.send(topic, trigger.to_json(), key=trigger.session_id.encode())
            await producer.flush()
        finally:
            await producer.stop()
    asyncio.run(main())


def read_all(broker: str, topic: str, quiet_s: float = 1.5) -> list[Any]:
    """Every record of a topic, read without a group (assign + seek to beginning).

    Reads until nothing new arrives for `quiet_s`: Tansu's ListOffsets(latest) is
    not reliable (it answers the last *batch's* base offset + 1), so end offsets
    come from the records themselves.
    """
    async def main():
        consumer = AIOKafkaConsumer(bootstrap_servers=broker, enable_auto_commit=False)
        await consumer.start()
        try:
            await consumer.topics()   # refresh metadata: the topic may be new to this client
            tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
            if not tps:
                return []
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            records = []
            while batches := await consumer.getmany(timeout_ms=int(quiet_s * 1000)):
                records += [m for batch in batches.values() for m in batch]
            return records
        finally:
            await consumer.stop()
    return asyncio.run(main())


def committed_and_end(broker: str, topic: str, group: str
                      ) -> tuple[dict[int, int | None], dict[int, int]]:
    """(offset committed by `group`, offset after the last record) per non-empty partition."""
    end: dict[int, int] = {}
    for record in read_all(broker, topic):
        end[record.partition] = max(end.get(record.partition, 0), record.offset + 1)

    async def main():
        consumer = AIOKafkaConsumer(bootstrap_servers=broker, group_id=group,
                                    enable_auto_commit=False)
        await consumer.start()
        try:
            return {p: await consumer.committed(TopicPartition(topic, p)) for p in end}
        finally:
            await consumer.stop()
    return asyncio.run(main()), end


def start_sink(broker: str, url: str, topic: str, dlq: str, group: str, metrics_port: int,
               *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLICKSCORE_")}
    return subprocess.Popen(
        [str(BIN / "clickscore"), "sink", "webhook", "--url", url, "--broker", broker,
         "--triggers-topic", topic, "--dlq-topic", dlq, "--group", group,
         "--metrics-port", str(metrics_port), "--timeout-s", "5",
         "--session-timeout-ms", "6000", "--heartbeat-interval-ms", "1000",
         "--rebalance-timeout-ms", "6000", *extra],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_until(condition, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"sink exited early ({proc.returncode}):\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out; sink output:\n{proc.communicate()[0]}")
        time.sleep(0.1)


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("clickscore_sink_"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_sink_retries_dead_letters_and_commits(broker):
    topic, dlq, group = fresh_topic("triggers"), fresh_topic("triggers-dlq"), fresh_topic("sink")
    flaky = [f"flaky-{i}" for i in range(5)]
    healthy = [f"ok-{i}" for i in range(24)]
    triggers = [make_trigger(s, i) for i, s in enumerate(healthy + flaky + ["doomed"])]
    webhook = Webhook(fail_first={s: 2 for s in flaky}, always_fail={"doomed"})
    produce(broker, topic, triggers)
    metrics_port = free_port()
    sink = start_sink(broker, webhook.url, topic, dlq, group, metrics_port,
                      "--max-attempts", "3", "--initial-backoff-s", "0.05",
                      "--max-backoff-s", "0.2", "--idle-exit-s", "4")
    try:
        doomed_id = triggers[-1].trigger_id
        wait_until(lambda: len(webhook.delivered) == len(triggers) - 1
                   and webhook.attempts[doomed_id] == 3, 60, sink)
        wait_until(lambda: scrape(metrics_port).get(
            'clickscore_sink_deliveries_total{outcome="dead_lettered"}') == 1, 10, sink)
        samples = scrape(metrics_port)
        output, _ = sink.communicate(timeout=60)   # --idle-exit-s ends it
    finally:
        if sink.poll() is None:
            sink.kill()
        webhook.close()
    assert sink.returncode == 0, output

    # Every trigger but the doomed one delivered exactly once; duplicates only come
    # from retries, and the flaky ones needed exactly 3 attempts.
    for trigger in triggers[:-1]:
        assert webhook.delivered[trigger.trigger_id] == 1, trigger.trigger_id
    for trigger in triggers[len(healthy):-1]:
        assert webhook.attempts[trigger.trigger_id] == 3
    for trigger in triggers[:len(healthy)]:
        assert webhook.attempts[trigger.trigger_id] == 1
    assert webhook.delivered[doomed_id] == 0 and webhook.attempts[doomed_id] == 3
    sent = webhook.headers[triggers[0].trigger_id]
    assert sent["Idempotency-Key"] == triggers[0].trigger_id
    assert sent["Content-Type"] == "application/json"

    # The doomed trigger is on the dead-letter topic with its error and attempt count.
    (dead,) = [json.loads(r.value) for r in read_all(broker, dlq)]
    assert dead["trigger_id"] == doomed_id and dead["attempts"] == 3
    assert "500" in dead["error"] and dead["status"] == 500
    assert dead["trigger"] == json.loads(triggers[-1].to_json())
    assert dead["source"]["topic"] == topic

    # Offsets of every partition committed up to the end.
    committed, end = committed_and_end(broker, topic, group)
    assert sum(end.values()) == len(triggers) and len(end) > 1
    assert committed == end

    assert samples['clickscore_sink_deliveries_total{outcome="delivered"}'] == len(triggers) - 1
    assert samples["clickscore_sink_retries_total"] == 2 * len(flaky) + 2
    assert samples["clickscore_sink_delivery_seconds_count"] == len(triggers)


def test_sigterm_mid_retry_loses_nothing(broker):
    topic, dlq, group = fresh_topic("triggers"), fresh_topic("triggers-dlq"), fresh_topic("sink")
    triggers = [make_trigger(f"s-{i}", i) for i in range(6)] + [make_trigger("stuck", 99)]
    stuck_id = triggers[-1].trigger_id
    webhook = Webhook(always_fail={"stuck"})
    produce(broker, topic, triggers)
    args = ("--max-attempts", "1000", "--initial-backoff-s", "0.05", "--max-backoff-s", "0.2")
    sink = start_sink(broker, webhook.url, topic, dlq, group, free_port(), *args)
    try:
        wait_until(lambda: len(webhook.delivered) == 6 and webhook.attempts[stuck_id] >= 3,
                   60, sink)
        sink.send_signal(signal.SIGTERM)
        output, _ = sink.communicate(timeout=20)
    finally:
        if sink.poll() is None:
            sink.kill()
    assert sink.returncode == 0, output
    assert "SIGTERM received" in output
    committed, end = committed_and_end(broker, topic, group)
    assert committed != end    # the stuck trigger was not committed...
    assert read_all(broker, dlq) == []   # ...nor dead-lettered

    # The endpoint recovers; the next run delivers the stuck trigger, and finishes.
    webhook.always_fail.clear()
    sink = start_sink(broker, webhook.url, topic, dlq, group, free_port(), *args,
                      "--idle-exit-s", "3")
    try:
        output, _ = sink.communicate(timeout=60)
    finally:
        if sink.poll() is None:
            sink.kill()
        webhook.close()
    assert sink.returncode == 0, output
    assert webhook.delivered[stuck_id] == 1
    assert all(webhook.delivered[t.trigger_id] >= 1 for t in triggers)
    assert committed_and_end(broker, topic, group)[0] == end


def test_committable_stops_at_first_unfinished():
    tp0, tp1, tp2 = (TopicPartition("t", p) for p in range(3))
    done = {tp0: [(5, True), (6, True), (7, False), (8, True)],
            tp1: [(3, False), (4, True)],
            tp2: [(11, True), (10, True)]}
    assert committable(done) == {tp0: 7, tp2: 12}


def test_backoff_doubles_and_is_capped():
    config = SinkConfig(url="http://x", initial_backoff_s=1.0, max_backoff_s=5.0)
    for attempt, base in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (9, 5.0)]:
        assert 0.8 * base <= config.backoff_s(attempt) <= 1.2 * base
    assert 0.8 * 5.0 <= config.backoff_s(1, retry_after_s=60) <= 1.2 * 5.0
