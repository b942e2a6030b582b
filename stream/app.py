"""The streaming scorer: click events in, buyer scores and next items out (Faust).

    clickscore broker &                                   # or --broker at real Kafka
    clickscore worker --model onnx_models/default --web-port 6066 --metrics-port 9464

Data flow, one micro-batch at a time (`stream.take_events(batch_size, within=batch_wait_s)`):

    raw bytes --(events.decode)--> ClickEvent | InvalidEvent -> clicks-dlq
    ClickEvent --(session_state.advance)--> session window (table `sessions`, changelog-backed)
    windows --(ModelScorer.score, executor thread)--> buy probability, top-k items
    -> buyer-scores (until the session's first transaction), next-items (every valid event)
    buy probability --(triggers.RuleSet.evaluate, table `trigger-state`)--> triggers (with --rules)

Decisions a reader needs:
- Input is consumed as raw bytes so this worker, not Faust's codec, decides what is
  valid; every failure goes to the dead-letter topic with its reason, and the worker
  never stops for bad input. Messages must be keyed by session_id (that keeps a
  session on one partition, in order, next to its state); a message whose key is
  not its session_id is dead-lettered as `key_mismatch`.
- Table writes go to the changelog partition of the *current event*. A batch holds
  events of many partitions, so each session's write runs in its own event's
  context (`_write_in_event_context`), not the batch's last event's.
- A session's first `transaction` ends buy scoring: it is sent on buyer-scores once,
  as `{"outcome": "transaction", "buy_probability": null}`, and is never part of a
  window whose buy probability is emitted. Next items are emitted for every valid
  event, purchases included (the window then holds the transaction).
- Inference runs in a one-thread executor (onnxruntime releases the GIL), so the
  event loop keeps fetching, committing and heart-beating; `loop_lag_monitor`
  measures how late the loop runs (clickscore_event_loop_lag_seconds).
- Idle sessions are evicted on the event-time watermark of their partition (see
  stream/session_state.py), by a timer scan every EVICTION_SCAN_S (never in the middle of a batch).
- At-least-once: offsets are committed after the batch's sends are flushed, so a
  crashed worker re-delivers; outputs carry the input's event_id to dedupe by. The
  state records each row's input offset, so a re-delivered event is not applied
  twice (its changelog write may have landed before the crash) and its scores are
  sent again from the window as of that event: equal to the first time.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import contextvars
import json
import logging
import os
import ssl
import tempfile
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from stream import metrics
from stream.errors import ClickscoreError
from stream.events import ClickEvent, InvalidEvent, decode
from stream.fencing import Fence
from stream.scoring import ModelScorer
from stream.session_state import SessionState, StateError, advance, idle_keys, is_idle, replay_view
from stream.settings import Settings, settings_from_args

log = logging.getLogger("clickscore.worker")

EVICTION_SCAN_S = 5.0        # wall-clock seconds between idle-session scans
LOOP_LAG_PROBE_S = 0.1       # the loop-lag monitor's sleep
CONSUMER_LAG_EVERY_S = 5.0
SESSIONS_TABLE = "sessions"
TRIGGERS_TABLE = "trigger-state"


# -- topics --------------------------------------------------------------------------

def ensure_topics(settings: Settings) -> int:
    """Create missing input/output topics with settings.partitions; return the input
    topic's partition count (the changelog must have the same)."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=settings.broker.split(","),
                             client_id=f"{settings.app_id}-admin", **settings.kafka_security())
    try:
        names = [settings.input_topic, settings.scores_topic, settings.next_items_topic,
                 settings.dlq_topic, settings.triggers_topic]
        existing = set(admin.list_topics())
        missing = [NewTopic(n, settings.partitions, 1) for n in dict.fromkeys(names) if n not in existing]
        if missing:
            try:
                admin.create_topics(missing)
            except TopicAlreadyExistsError:   # another worker raced us to it
                pass
            log.info("created topics %s with %d partitions", [t.name for t in missing], settings.partitions)
        for _ in range(50):   # metadata may lag creation for a moment
            described = admin.describe_topics([settings.input_topic])
            partitions = len(described[0].get("partitions") or []) if described else 0
            if partitions:
                return partitions
            time.sleep(0.1)
        raise RuntimeError(f"topic {settings.input_topic} has no partitions after creation")
    finally:
        admin.close()


# -- output records -------------------------------------------------------------------

def dead_letter_record(exc: InvalidEvent, message: Any) -> bytes:
    value = message.value
    if isinstance(value, str):
        value = value.encode()
    return json.dumps({
        "reason": exc.reason,
        "detail": exc.detail,
        "original_b64": base64.b64encode(value or b"").decode(),
        "topic": message.topic,
        "partition": message.partition,
        "offset": message.offset,
        "timestamp": message.timestamp,
        "dead_lettered_at": round(time.time() * 1000),
    }, separators=(",", ":")).encode()


def event_id_of(event: ClickEvent, message: Any) -> str:
    """The input's event_id, or its Kafka position when the producer sent none."""
    return event.event_id or f"{message.topic}:{message.partition}:{message.offset}"


@dataclass
class Scored:
    """One valid event on its way through a batch."""
    event: ClickEvent
    message: Any
    window: Any              # (n,) EVENT_ROW: the session right after this event
    event_count: int
    emit_buy: bool           # the session had not bought before this event
    has_cart: bool
    source_event: Any = None  # the Faust event (its partition decides table writes)
    replayed: bool = False    # re-delivered: already applied to the state (and triggers)


# -- the worker ------------------------------------------------------------------------

def _write_in_event_context(event: Any, write, *args) -> None:
    """Run `write` as if `event` were the stream's current event, so Faust's table
    (and the RocksDB store) choose that event's partition, not the batch's last one."""
    from faust.streams import _current_event   # Faust's own context variable (pinned 0.15.3)

    def run():
        _current_event.set(weakref.ref(event))
        write(*args)
    contextvars.copy_context().run(run)


@dataclass
class WorkerState:
    watermarks: dict[int, int] = field(default_factory=dict)    # partition -> max event ms
    last_offsets: dict[int, int] = field(default_factory=dict)  # partition -> last offset seen
    last_scan: float = 0.0
    loop_lag_max_s: float = 0.0
    processed: int = 0                                          # events handled, all partitions
    processed_at_check: int = -1
    positions_at_check: dict[int, int] = field(default_factory=dict)
    positions_after_seek: dict[int, int] = field(default_factory=dict)


def _set_fetch_max_wait(fetch_max_wait_ms: int) -> None:
    """Faust 0.15.3 creates its aiokafka consumer with fetch_max_wait_ms=1500 and no
    setting to change it; set ours on the consumer before it starts (it is read when
    the fetcher is built, at start)."""
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    original = getattr(AIOKafkaConsumerThread._create_worker_consumer, "__wrapped__",
                       AIOKafkaConsumerThread._create_worker_consumer)

    def create(self, transport):
        consumer = original(self, transport)
        consumer._fetch_max_wait_ms = fetch_max_wait_ms
        return consumer
    create.__wrapped__ = original
    AIOKafkaConsumerThread._create_worker_consumer = create


def build_app(settings: Settings, scorer: ModelScorer, partitions: int, rules=None):
    """The Faust app: topics, the sessions table (and the trigger-state table when
    `rules`, a stream.triggers.RuleSet, is given), the scoring agent and two monitors."""
    import faust

    _set_fetch_max_wait(settings.fetch_max_wait_ms)
    data_dir = settings.data_dir or str(Path(tempfile.gettempdir()) / f"clickscore-{settings.app_id}")
    app = faust.App(
        settings.app_id,
        broker=[f"kafka://{b.strip()}" for b in settings.broker.split(",")],
        broker_credentials=broker_credentials(settings),
        store=settings.store,
        datadir=data_dir,
        autodiscover=False,
        web_port=settings.web_port,
        web_host="127.0.0.1",
        web_bind="127.0.0.1",
        topic_partitions=partitions,
        topic_replication_factor=1,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.session_timeout_ms / 1000,
        broker_heartbeat_interval=settings.heartbeat_interval_ms / 1000,
        broker_rebalance_timeout=settings.rebalance_timeout_ms / 1000,
        broker_commit_interval=1.0,
        stream_buffer_maxsize=max(4096, 4 * settings.batch_size),
        worker_redirect_stdouts=False,
        # The memory store persists no offset, so the check can only compare the offset
        # recovery last read with the changelog's highwater, and Tansu reports a
        # highwater below the true end (last batch start + 1): a worker given back a
        # partition it held crashed with ConsistencyError (tests/test_faults.py).
        recovery_consistency_check=not settings.store.startswith("memory"),
    )
    # Raw bytes both ways. (Passing a faust.Schema to app.topic left keys JSON-decoded
    # once a table existed, and the agent crashed silently: give the topic its codecs.)
    raw = dict(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    clicks = app.topic(settings.input_topic, allow_empty=True, **raw)
    sessions = app.Table(SESSIONS_TABLE, partitions=partitions, key_type=bytes, value_type=bytes,
                         schema=faust.Schema(**raw))
    # Trigger-rule state per session, kept apart from the window so a worker without
    # --rules carries none of it.
    trigger_states = app.Table(TRIGGERS_TABLE, partitions=partitions, key_type=bytes, value_type=bytes,
                               schema=faust.Schema(**raw)) if rules else None
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
    worker = WorkerState()
    fence = Fence.for_app(app, settings.session_timeout_ms / 1000)   # stream/fencing.py
    info = scorer.info
    timeout_ms = int(settings.session_timeout_s * 1000)
    consumed = metrics.EVENTS_CONSUMED.labels(topic=settings.input_topic)
    scored = {t: metrics.EVENTS_SCORED.labels(topic=t)
              for t in (settings.scores_topic, settings.next_items_topic)}

    async def send(topic: str, key: bytes | None, value: bytes) -> None:
        # Fire and forget: the commit flushes the producer before it commits offsets.
        if fence.reason() is not None:   # frozen mid-batch: these outputs are another's now
            return
        await app.producer.send(topic, key, value, partition=None, timestamp=None, headers=None)

    def read_state(key: bytes) -> SessionState | None:
        value = sessions.data.get(key)
        if value is None:
            return None
        try:
            return SessionState.from_bytes(value)
        except StateError as exc:
            log.warning("session %r: unreadable state (%s); starting it afresh", key, exc)
            return None

    async def process(events: Sequence[Any]) -> None:
        if fence.blocks_batch():   # may have lost our partitions: send and write nothing
            return
        started = time.perf_counter()
        consumed.inc(len(events))
        worker.processed += len(events)
        pending: dict[bytes, tuple[SessionState, Any]] = {}   # key -> (state, its last event)
        batch: list[Scored] = []
        for ev in events:
            message = ev.message
            worker.last_offsets[message.partition] = message.offset
            try:
                event = decode(message.value, settings.max_message_bytes)
                key = event.session_id.encode()
                if message.key != key:
                    raise InvalidEvent("key_mismatch", f"message key {message.key!r:.60} is not the "
                                       f"session_id {event.session_id!r:.60}: key events by session_id")
            except InvalidEvent as exc:
                metrics.EVENTS_DEAD_LETTERED.labels(reason=exc.reason).inc()
                await send(settings.dlq_topic, message.key, dead_letter_record(exc, message))
                continue
            state = pending[key][0] if key in pending else read_state(key)
            if state is not None and message.offset <= state.last_offset:
                # Re-delivered after a crash or rebalance: already in the state. Send its
                # scores again as they were, without applying it a second time.
                replay = replay_view(state, message.offset)
                if replay is None:   # rare: needs a crash inside a session longer than the window
                    exc = InvalidEvent("redelivered_unscorable", "re-delivered event of a session "
                                       "longer than the window: its window is no longer known")
                    metrics.EVENTS_DEAD_LETTERED.labels(reason=exc.reason).inc()
                    await send(settings.dlq_topic, message.key, dead_letter_record(exc, message))
                    continue
                batch.append(Scored(event, message, replay.window, replay.event_count,
                                    emit_buy=not replay.had_bought, has_cart=replay.has_cart,
                                    source_event=ev, replayed=True))
                continue
            if state is not None and state.event_count and is_idle(state.last_event_ms, event.timestamp,
                                                                   timeout_ms):
                state = None   # the old session timed out: this event starts a new one
            had_bought = state.has_bought if state is not None else False
            new_state = advance(state, event, scorer.artefacts, message.partition, message.offset,
                                timeout_ms)
            pending[key] = (new_state, ev)
            watermark = worker.watermarks.get(message.partition, 0)
            worker.watermarks[message.partition] = max(watermark, event.timestamp)
            batch.append(Scored(event, message, new_state.window, new_state.event_count,
                                emit_buy=not had_bought, has_cart=new_state.has_cart, source_event=ev))

        if batch:
            windows = [item.window for item in batch]
            t0 = time.perf_counter()
            result = await asyncio.get_running_loop().run_in_executor(
                executor, scorer.score, windows, settings.top_k)
            metrics.INFERENCE_SECONDS.observe(time.perf_counter() - t0)
            metrics.BATCH_SIZE.observe(len(batch))
            if fence.blocks_batch():   # suspended while scoring: the batch may be another's now
                return

            for key, (state, ev) in pending.items():
                _write_in_event_context(ev, sessions.__setitem__, key, state.to_bytes())
            trigger_pending: dict[bytes, tuple[Any, Any]] = {}   # key -> (trigger state, event)

            item_ids = scorer.item_ids(result.top_items)
            processing_ms = round((time.perf_counter() - started) * 1000, 3)
            now = time.time()
            for i, item in enumerate(batch):
                event, message = item.event, item.message
                common = {
                    "session_id": event.session_id,
                    "event_id": event_id_of(event, message),
                    "timestamp": event.timestamp,
                    "event_type": event.event_type,
                    "event_count": item.event_count,
                    "model_name": info.name,
                    "model_version": info.version,
                    "processing_ms": processing_ms,
                }
                key = message.key
                if item.emit_buy:
                    if event.is_transaction:
                        record = {**common, "outcome": "transaction", "buy_probability": None,
                                  "has_cart": item.has_cart}
                    else:
                        probability = float(result.buy_probability[i])
                        record = {**common, "outcome": None, "buy_probability": probability,
                                  "has_cart": item.has_cart}
                        metrics.BUY_PROBABILITY.observe(probability)
                        if rules and not item.replayed:
                            await fire_triggers(key, item, probability, trigger_pending)
                    await send(settings.scores_topic, key, _json(record))
                    scored[settings.scores_topic].inc()
                record = {**common, "items": item_ids[i],
                          "scores": [float(s) for s in result.top_scores[i]]}
                await send(settings.next_items_topic, key, _json(record))
                scored[settings.next_items_topic].inc()
                metrics.END_TO_END_SECONDS.observe(max(0.0, now - message.timestamp))
            for key, (trigger_state, ev) in trigger_pending.items():
                _write_in_event_context(ev, trigger_states.__setitem__, key, trigger_state.to_bytes())


    async def fire_triggers(key: bytes, item: "Scored", probability: float, pending: dict) -> None:
        from stream.triggers import ScoreObservation, SessionTriggerState

        if key in pending:
            state = pending[key][0]
        else:
            value = trigger_states.data.get(key)
            try:
                state = SessionTriggerState.from_bytes(value) if value is not None else None
            except ValueError as exc:
                log.warning("session %r: unreadable trigger state (%s); starting it afresh", key, exc)
                state = None
        observation = ScoreObservation(
            session_id=item.event.session_id, buy_probability=probability, timestamp=item.event.timestamp,
            has_cart=item.has_cart, event_count=item.event_count, event_id=event_id_of(item.event, item.message))
        state, fired = rules.evaluate(state, observation)
        pending[key] = (state, item.source_event)
        for trigger in fired:
            await send(settings.triggers_topic, key, trigger.to_json())
            metrics.TRIGGERS_FIRED.labels(rule=trigger.rule).inc()

    def evict_idle_sessions() -> None:
        worker.last_scan = time.monotonic()
        owned = {tp.partition for tp in app.consumer.assignment() if tp.topic == settings.input_topic}
        items = list(sessions.data.items())
        evicted = 0
        for key, partition in list(idle_keys(items, worker.watermarks, timeout_ms, owned)):
            # No current event here: send the tombstone to the session's own partition.
            for table in (sessions, trigger_states):
                if table is not None and key in table.data:
                    del table.data[key]
                    table.send_changelog(partition, key, None, value_serializer="raw")
            evicted += 1
        metrics.ACTIVE_SESSIONS.set(len(items) - evicted)
        metrics.SESSION_STATE_BYTES.set(sum(len(v) for _, v in items))
        if evicted:
            log.info("evicted %d idle sessions (%d remain)", evicted, len(items) - evicted)

    batch_lock = asyncio.Lock()

    @app.agent(clicks, name="score_clicks")
    async def score_clicks(stream):
        async for events in stream.take_events(settings.batch_size, within=settings.batch_wait_s):
            try:
                async with batch_lock:
                    await process(events)
            except Exception:
                # A crashed Faust agent leaves the worker up but consuming nothing. Exit
                # instead, so a supervisor restarts it from the committed offsets.
                log.exception("scoring a batch failed; stopping the worker (exit status 70)")
                logging.shutdown()
                os._exit(70)

    @app.timer(EVICTION_SCAN_S)
    async def eviction_scan() -> None:
        # A timer, not a check between batches: the watermark that makes the last
        # sessions idle may arrive in the last batch of a quiet stream. The lock keeps
        # a scan from running while a batch is between reading and writing state.
        async with batch_lock:
            evict_idle_sessions()

    @app.task
    async def loop_lag_monitor() -> None:
        """How late the loop wakes from a short sleep: the time it was busy elsewhere."""
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(LOOP_LAG_PROBE_S)
            lag = max(0.0, loop.time() - t0 - LOOP_LAG_PROBE_S)
            metrics.EVENT_LOOP_LAG_SECONDS.observe(lag)
            worker.loop_lag_max_s = max(worker.loop_lag_max_s, lag)

    @app.timer(CONSUMER_LAG_EVERY_S)
    async def consumer_lag_monitor() -> None:
        stalled = []
        for tp in app.consumer.assignment():
            if tp.topic != settings.input_topic:
                continue
            done = worker.last_offsets.get(tp.partition, -1) + 1
            try:
                end = app.consumer.highwater(tp)
                position = await app.consumer.position(tp)
            except Exception:   # not fetched yet
                continue
            if end is not None:
                metrics.CONSUMER_LAG.labels(topic=tp.topic, partition=str(tp.partition)).set(max(0, end - done))
            # Fetched past what reached the agent, not moving, nothing processed since
            # the last check, and not where our own last seek put it.
            if (position is not None and position > done and worker.processed == worker.processed_at_check
                    and worker.positions_at_check.get(tp.partition) == position
                    and worker.positions_after_seek.get(tp.partition) != position):
                stalled.append(tp)
            if position is not None:
                worker.positions_at_check[tp.partition] = position
        worker.processed_at_check = worker.processed
        if stalled:
            # Faust can drop records fetched while recovery is finishing (they never
            # reach the agent, yet the fetch position has moved past them). Seeking to
            # the committed offsets fetches them again; re-delivery is harmless here
            # because the session state is idempotent.
            log.warning("fetched but unprocessed input on %s for %.0f s: seeking to committed offsets",
                        sorted(tp.partition for tp in stalled), CONSUMER_LAG_EVERY_S)
            await app.consumer.perform_seek()
            for tp in stalled:
                worker.positions_after_seek[tp.partition] = await app.consumer.position(tp)

    app.clickscore = worker   # for tests and the demo: watermarks, loop lag
    return app


def _json(record: dict) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode()


def broker_credentials(settings: Settings):
    import faust

    context = None
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=settings.ssl_cafile or None)
    if settings.security_protocol.startswith("SASL"):
        return faust.SASLCredentials(username=settings.sasl_username, password=settings.sasl_password,
                                     mechanism=settings.sasl_mechanism or "PLAIN", ssl_context=context)
    if context is not None:
        return faust.SSLCredentials(context)
    return None


def run(args: argparse.Namespace) -> int:
    """`clickscore worker`: load and check the model first (a bad model exits 2 at once),
    create missing topics, then run the Faust worker until SIGINT/SIGTERM."""
    settings = settings_from_args(args)
    if settings.store.startswith("rocksdb"):
        try:
            import rocksdict  # noqa: F401
        except ImportError:
            raise ClickscoreError("--store rocksdb:// needs the rocksdict package "
                                  "(pip install 'clickscore[rocksdb]'); or use memory://") from None
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    scorer = ModelScorer(settings.model, provider=settings.execution_provider)
    log.info("model %s v%s (%s) from %s, execution provider %s", scorer.info.name, scorer.info.version,
             scorer.info.kind, scorer.info.path, scorer.info.provider)
    metrics.set_model_info(scorer.info.name, scorer.info.version, scorer.info.provider)
    if settings.metrics_port:
        metrics.start_metrics_server(settings.metrics_host, settings.metrics_port)
    rules = None
    if settings.rules:
        from stream.triggers import load_rules
        rules = load_rules(settings.rules)   # a bad file exits 2 with file:line
        log.info("trigger rules %s from %s -> %s", ", ".join(rules.names), settings.rules,
                 settings.triggers_topic)
    partitions = ensure_topics(settings)
    app = build_app(settings, scorer, partitions, rules)

    import faust

    log.info("worker %s: %s -> %s, %s (dead letters: %s), %d partitions, store %s, web port %d",
             settings.app_id, settings.input_topic, settings.scores_topic, settings.next_items_topic,
             settings.dlq_topic, partitions, settings.store, settings.web_port)
    worker = faust.Worker(app, loglevel=settings.log_level, quiet=True, redirect_stdouts=False)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
