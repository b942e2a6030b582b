"""Deliver marketing triggers from Kafka to a webhook, at least once.

    clickscore sink webhook --url https://crm.example.com/hooks/clickscore
    clickscore sink webhook --url http://127.0.0.1:8080/t --broker 127.0.0.1:19092 \\
        --metrics-port 9466 --max-attempts 5 --initial-backoff-s 0.5

Reads the triggers topic (`--triggers-topic`) in a consumer group with auto-commit
off and POSTs each trigger's JSON unchanged (headers `Idempotency-Key: <trigger_id>`
and `X-Clickscore-Attempt: N`, so the receiver can drop the duplicates that
at-least-once delivery implies). Connection errors, timeouts, 408, 429 and 5xx are
retried with exponential backoff and jitter; other statuses, and triggers that are
still failing after `--max-attempts`, go to the dead-letter topic (`--dlq-topic`) with
the error and the attempt count. An offset is committed only once every trigger
before it in its partition has been delivered or dead-lettered, so a crash, SIGKILL
or rebalance re-delivers and never drops; if the dead-letter write itself fails the
sink exits non-zero without committing. SIGTERM/SIGINT stop it cleanly: no new
fetches, retries are abandoned (their triggers stay uncommitted for the next run),
finished work is committed. SIGHUP does the same, and a stop that has not ended
10 s after the signal (the broker is gone) exits 124 (stream/lifecycle.py).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import signal
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from stream import lifecycle, metrics
from stream.errors import ClickscoreError
from stream.settings import Settings, settings_from_args

log = logging.getLogger("clickscore.sink")

RETRY_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))
USER_AGENT = "clickscore-sink/1"


@dataclass(frozen=True)
class SinkConfig:
    """The sink's own options; Kafka connection and topic come from Settings."""
    url: str
    group: str = "clickscore-sink"
    dlq_topic: str = "triggers-dlq"
    max_attempts: int = 5
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    timeout_s: float = 10.0
    concurrency: int = 8
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9466
    max_messages: int = 0        # stop after this many triggers are committed; 0: never
    idle_exit_s: float = 0.0     # stop after this long without a new trigger; 0: never

    def backoff_s(self, failed_attempts: int, retry_after_s: float | None = None) -> float:
        """Wait before the next attempt: initial * 2^(n-1), capped, +-20% jitter."""
        base = min(self.max_backoff_s, self.initial_backoff_s * 2 ** (failed_attempts - 1))
        if retry_after_s is not None:
            base = min(self.max_backoff_s, max(base, retry_after_s))
        return base * random.uniform(0.8, 1.2)

    def worst_case_s(self) -> float:
        """Longest one trigger can take: bounds the consumer's max poll interval."""
        waits = sum(min(self.max_backoff_s, self.initial_backoff_s * 2 ** n) * 1.2
                    for n in range(self.max_attempts - 1))
        return self.max_attempts * self.timeout_s + waits


@dataclass
class Outcome:
    delivered: bool
    attempts: int
    error: str = ""
    status: int | None = None


def committable(done: dict[TopicPartition, list[tuple[int, bool]]]) -> dict[TopicPartition, int]:
    """Next offset to commit per partition: past the longest run of finished messages.

    `done[tp]` lists (offset, finished) for a fetched batch in offset order; a message
    left unfinished (abandoned on shutdown) stops the run, so it is fetched again.
    """
    offsets: dict[TopicPartition, int] = {}
    for tp, entries in done.items():
        for offset, finished in sorted(entries):
            if not finished:
                break
            offsets[tp] = offset + 1
    return offsets


class WebhookSink:
    def __init__(self, settings: Settings, config: SinkConfig):
        self.settings = settings
        self.config = config
        self.stopping = asyncio.Event()
        self.committed_messages = 0

    # -- delivery -------------------------------------------------------------------
    async def post(self, http: aiohttp.ClientSession, body: bytes, trigger_id: str) -> Outcome:
        """POST with retries; returns once delivered, permanently failed, or stopping."""
        config = self.config
        attempt = 0
        while True:
            attempt += 1
            retry_after: float | None = None
            headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
                       "Idempotency-Key": trigger_id, "X-Clickscore-Attempt": str(attempt)}
            try:
                async with http.post(config.url, data=body, headers=headers,
                                     allow_redirects=False) as response:
                    await response.read()
                    if 200 <= response.status < 300:
                        return Outcome(True, attempt, status=response.status)
                    error = f"HTTP {response.status} {response.reason or ''}".strip()
                    status: int | None = response.status
                    retriable = response.status in RETRY_STATUSES
                    retry_after = _retry_after_s(response.headers.get("Retry-After"))
            except asyncio.TimeoutError:
                error, status, retriable = f"timeout after {config.timeout_s:g} s", None, True
            except aiohttp.ClientError as exc:
                error, status, retriable = f"{type(exc).__name__}: {exc}", None, True
            if not retriable or attempt >= config.max_attempts:
                return Outcome(False, attempt, error, status)
            log.info("trigger %s: attempt %d failed (%s), retrying", trigger_id, attempt, error)
            metrics.SINK_RETRIES.inc()
            try:
                await asyncio.wait_for(self.stopping.wait(), config.backoff_s(attempt, retry_after))
            except asyncio.TimeoutError:
                continue
            raise asyncio.CancelledError("stopping")   # leave it uncommitted for the next run

    async def handle(self, http: aiohttp.ClientSession, producer: AIOKafkaProducer,
                     message: Any) -> None:
        started = time.monotonic()
        trigger_id = f"{message.topic}-{message.partition}-{message.offset}"
        try:
            decoded = json.loads(message.value)
            if not isinstance(decoded, dict):
                raise ValueError("not a JSON object")
            trigger_id = str(decoded.get("trigger_id") or trigger_id)
        except (TypeError, ValueError) as exc:
            outcome = Outcome(False, 0, f"invalid trigger JSON: {exc}")
        else:
            outcome = await self.post(http, message.value, trigger_id)
        if outcome.delivered:
            metrics.SINK_DELIVERIES.labels(outcome="delivered").inc()
        else:
            log.warning("trigger %s: dead-lettered after %d attempt(s): %s",
                        trigger_id, outcome.attempts, outcome.error)
            await self.dead_letter(producer, message, trigger_id, outcome)
            metrics.SINK_DELIVERIES.labels(outcome="dead_lettered").inc()
        metrics.SINK_DELIVERY_SECONDS.observe(time.monotonic() - started)

    async def dead_letter(self, producer: AIOKafkaProducer, message: Any, trigger_id: str,
                          outcome: Outcome) -> None:
        try:
            trigger: Any = json.loads(message.value)
        except (TypeError, ValueError):
            trigger = (message.value or b"").decode("utf-8", "replace")
        record = {"error": outcome.error, "attempts": outcome.attempts, "status": outcome.status,
                  "url": self.config.url, "trigger_id": trigger_id, "trigger": trigger,
                  "source": {"topic": message.topic, "partition": message.partition,
                             "offset": message.offset},
                  "failed_at": int(time.time() * 1000)}
        # Raises on failure: the batch is then not committed and the sink exits non-zero.
        await producer.send_and_wait(
            self.config.dlq_topic, json.dumps(record, separators=(",", ":")).encode(),
            key=message.key,
            headers=[("error", outcome.error.encode()), ("attempts", str(outcome.attempts).encode())])

    # -- main loop --------------------------------------------------------------------
    async def run(self) -> int:
        settings, config = self.settings, self.config
        security = settings.kafka_security()
        consumer = AIOKafkaConsumer(
            settings.triggers_topic, bootstrap_servers=settings.broker, group_id=config.group,
            client_id="clickscore-sink", enable_auto_commit=False, auto_offset_reset="earliest",
            max_poll_records=config.concurrency * 4,
            session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=settings.heartbeat_interval_ms,
            rebalance_timeout_ms=settings.rebalance_timeout_ms,
            # A batch may spend a whole retry schedule in flight before the next poll.
            max_poll_interval_ms=int(max(300.0, 2 * config.worst_case_s()) * 1000),
            **security)
        producer = AIOKafkaProducer(bootstrap_servers=settings.broker, client_id="clickscore-sink-dlq",
                                    acks="all", **security)
        timeout = aiohttp.ClientTimeout(total=config.timeout_s)
        try:
            await producer.start()
            await consumer.start()
        except KafkaError as exc:
            await _stop(producer, consumer)
            raise ClickscoreError(f"cannot reach Kafka at {settings.broker}: {exc}") from None
        log.info("sink: %s -> %s (group %s, dead letters to %s)",
                 settings.triggers_topic, config.url, config.group, config.dlq_topic)
        last_message = time.monotonic()
        try:
            async with aiohttp.ClientSession(timeout=timeout) as http:
                while not self.stopping.is_set():
                    if config.max_messages and self.committed_messages >= config.max_messages:
                        break
                    if config.idle_exit_s and time.monotonic() - last_message > config.idle_exit_s:
                        log.info("sink: idle for %.1f s, exiting", config.idle_exit_s)
                        break
                    batches = await consumer.getmany(timeout_ms=200)
                    if not consumer.assignment():
                        last_message = time.monotonic()   # still joining the group
                    if not batches:
                        continue
                    last_message = time.monotonic()
                    await self.process(consumer, producer, http, batches)
        finally:
            await _stop(consumer, producer)
        log.info("sink: stopped after %d trigger(s)", self.committed_messages)
        return 0

    async def process(self, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer,
                      http: aiohttp.ClientSession, batches: dict[TopicPartition, list[Any]]) -> None:
        messages = [m for batch in batches.values() for m in batch]
        if self.config.max_messages:
            # Never take on more than --max-messages: the rest stays for the next run.
            messages = sorted(messages, key=lambda m: (m.partition, m.offset))
            messages = messages[:max(0, self.config.max_messages - self.committed_messages)]
        limit = asyncio.Semaphore(self.config.concurrency)

        async def one(message: Any) -> None:
            async with limit:
                await self.handle(http, producer, message)

        tasks = {asyncio.ensure_future(one(m)): m for m in messages}
        stop_wait = asyncio.ensure_future(self.stopping.wait())
        try:
            pending = set(tasks)
            while pending and not stop_wait.done():
                done, pending = await asyncio.wait(pending | {stop_wait},
                                                   return_when=asyncio.FIRST_COMPLETED)
                pending.discard(stop_wait)
                for task in done:
                    if task is not stop_wait and not task.cancelled() and task.exception():
                        # Dead-letter write failed: commit nothing of this batch and exit.
                        for other in pending:
                            other.cancel()
                        await asyncio.gather(*pending, return_exceptions=True)
                        raise ClickscoreError(
                            f"cannot write to dead-letter topic {self.config.dlq_topic}: "
                            f"{task.exception()}; nothing of this batch was committed")
            if pending:   # stopping: give in-flight requests a moment, abandon the rest
                await asyncio.wait(pending, timeout=min(2.0, self.config.timeout_s))
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        finally:
            stop_wait.cancel()
        done: dict[TopicPartition, list[tuple[int, bool]]] = {}
        for task, message in tasks.items():
            finished = task.done() and not task.cancelled() and task.exception() is None
            done.setdefault(TopicPartition(message.topic, message.partition), []).append(
                (message.offset, finished))
        offsets = committable(done)
        fetched = {tp: min(o for o, _ in entries) for tp, entries in done.items()}
        if offsets:
            try:
                await consumer.commit(offsets)
            except CommitFailedError as exc:
                # Partitions moved to another member mid-batch: it re-delivers them.
                log.warning("sink: commit failed after a rebalance (%s); expect duplicates", exc)
            else:
                self.committed_messages += sum(offsets[tp] - fetched[tp] for tp in offsets)
        # Whatever was fetched but not finished (abandoned, or trimmed by --max-messages)
        # must be fetched again.
        for tp, batch in batches.items():
            resume = offsets.get(tp, fetched.get(tp, batch[0].offset))
            if resume != batch[-1].offset + 1:
                consumer.seek(tp, resume)


async def _stop(*clients: Any) -> None:
    for client in clients:
        try:
            await client.stop()
        # aiokafka's consumer.stop() re-raises its cancelled fetch task's CancelledError
        # when the broker is gone: that is a finished stop, not a cancelled sink.
        except (Exception, asyncio.CancelledError) as exc:   # noqa: BLE001 - shutting down, report and go on
            log.debug("stopping %s: %s", type(client).__name__, exc)


def _retry_after_s(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None   # an HTTP date: fall back to our own schedule


def config_from_args(args: argparse.Namespace, settings: Settings) -> SinkConfig:
    config = SinkConfig(
        url=args.url, group=args.group, dlq_topic=args.dlq_topic, max_attempts=args.max_attempts,
        initial_backoff_s=args.initial_backoff_s, max_backoff_s=args.max_backoff_s,
        timeout_s=args.timeout_s, concurrency=args.concurrency, metrics_host=settings.metrics_host,
        metrics_port=args.sink_metrics_port, max_messages=args.max_messages,
        idle_exit_s=args.idle_exit_s)
    if not config.url.startswith(("http://", "https://")):
        raise ClickscoreError(f"--url must be an http:// or https:// URL, got {config.url!r}")
    if config.timeout_s <= 0:
        raise ClickscoreError("--timeout-s must be greater than 0")
    if config.max_attempts < 1 or config.concurrency < 1:
        raise ClickscoreError("--max-attempts and --concurrency must be at least 1")
    if config.initial_backoff_s < 0 or config.max_backoff_s < 0:
        raise ClickscoreError("--initial-backoff-s and --max-backoff-s must be >= 0")
    return config


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    config = config_from_args(args, settings)
    from stream.kafka_compat import require_codecs
    require_codecs("aiokafka")   # triggers may come compressed with any codec: fail now, not mid-stream
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.metrics_port >= 0:
        metrics.start_metrics_server(config.metrics_host, config.metrics_port,
                                     registry=metrics.SINK_REGISTRY)
    sink = WebhookSink(settings, config)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        # SIGTERM/SIGINT/SIGHUP: stop fetching, abandon retries, commit what is done;
        # the lifecycle watchdog ends the process if that takes past its deadline
        # (a broker that is gone), exit 124 (stream/lifecycle.py).
        lifecycle.install_in_loop(loop)
        lifecycle.on_stop(lambda signum: _stop_on_signal(sink, signum))
        return await sink.run()

    return asyncio.run(main())


def _stop_on_signal(sink: WebhookSink, signum: int) -> None:
    log.info("sink: %s received, stopping", signal.Signals(signum).name)
    sink.stopping.set()
