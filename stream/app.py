"""The streaming scorer: click events in, buyer scores and next items out (Faust).

    clickscore broker &                                   # or --broker at real Kafka
    clickscore worker --model onnx_models/default --web-port 6066 --metrics-port 9464

Data flow, one micro-batch at a time (`take_batches(queue, ..., batch_size, batch_wait_s, batch_linger_s)`,
read from the queue Faust's consumer fills, not through Faust's Stream: a batch
goes once nothing more is waiting and the linger has passed, at most batch_size events);
the batch logic is plain code in stream/pipeline.py, this module only wires it to Faust:

    raw bytes --(pipeline.prepare: events.decode, key check)--> ClickEvent | dead letter
    ClickEvent --(session_state.advance)--> session window (table `sessions`, changelog-backed)
    windows --(model_cache.score_cached: step graph from cached per-session state, window graph on a
    miss; pipeline.score_isolated without a step graph; inference thread)--> buy probability, top-k
    --(pipeline.finish)--> buyer-scores (until the session's first transaction), next-items
    (every valid event), triggers (with --rules, table `trigger-state`), dead letters
    outputs --(deliver: one producer batch per topic-partition, every delivery report checked,
    failures re-sent one by one)--> ack -> commit

Batches are pipelined (`begin` -> inference thread -> `complete`): batch N+1 is decoded
and its state advanced while batch N is scored and batch N-1's outputs are delivered;
one inference thread scores batches in the order begun and one task delivers and acks
them in that order, so a session's events keep their order end to end.
The inference thread owns the model-state cache (stream/model_cache.py) and takes the
model for each batch from a ModelSource (stream/registry.py): a registry's new version
takes over between two batches, and each batch's outputs name the model that scored it.

Decisions a reader needs:
- Input is consumed as raw bytes so this worker, not Faust's codec, decides what is
  valid; every failure goes to the dead-letter topic with its reason, and the worker
  never stops for bad input: each record is handled inside its own guard, an unforeseen
  exception dead-letters that record as `internal_error`, and a model that fails on some
  windows fails only those events (`scoring_failed`). See stream/pipeline.py. Messages must be keyed by session_id (that keeps a
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
- At-least-once: a batch is acked (so its offsets may be committed) only after every
  output of it has been delivered; an output that stays undeliverable after SEND_ATTEMPTS
  rounds stops the worker (exit 75) without acking, so a restart re-reads it. A crashed
  worker re-delivers; outputs carry the input's event_id to dedupe by. The
  state records each row's input offset, so a re-delivered event is not applied
  twice (its changelog write may have landed before the crash) and its scores are
  sent again from the window as of that event: equal to the first time.
"""
from __future__ import annotations

import argparse
import asyncio
import contextvars
import logging
import os
import ssl
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from stream import metrics, model_cache, offsets, pipeline
from stream.errors import ClickscoreError
from stream.fencing import Fence
from stream.registry import ModelSource, ModelTagged
from stream.scoring import ModelScorer
from stream.session_state import idle_now, key_slices
from stream.settings import Settings, settings_from_args

log = logging.getLogger("clickscore.worker")

EVICTION_SCAN_S = 5.0        # wall-clock seconds between idle-session scans
EVICTION_SLICE = 2000        # sessions a scan decides per event-loop turn (2.5-4.7 ms)
LOOP_LAG_PROBE_S = 0.1       # the loop-lag monitor's sleep
CONSUMER_LAG_EVERY_S = 5.0
POSITION_TIMEOUT_S = 2.0     # longest wait for a partition's fetch position in the stall watchdog
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


# -- the worker ------------------------------------------------------------------------

SEND_ATTEMPTS = 5             # rounds of re-sending outputs whose delivery failed
SEND_BACKOFF_S = 0.5          # wait after the first failed round, doubled after each
EXIT_DELIVERY_FAILED = 75     # EX_TEMPFAIL: outputs undeliverable; a restart re-reads uncommitted input
DRAIN_SPINS = 16              # take_batches: loop turns given to the consumer to deliver more...
DRAIN_NAP_S = 0.0005          # ...then this much sleep per check, until its batch_wait_s runs out
PIPELINE_DEPTH = 2            # batches decoded ahead of the one whose outputs are being sent


@dataclass
class InFlight:
    """A batch between its state update and the delivery of its outputs."""
    events: Sequence[Any]                 # Faust events, acked after delivery
    records: list                         # pipeline.Record per event
    batch: Any                            # pipeline.Batch
    scoring: "asyncio.Future"             # -> (pipeline.Scores, inference seconds, ModelTagged that scored it,
                                          #     perf_counter when inference started, when it ended)
    started: float                        # perf_counter when the batch was begun
    evictions: int = 0                    # WorkerState.evictions when it was begun
    committed_before: Sequence[Any] = ()  # re-delivered below the committed offset: only acked


async def take_batches(queue: Any, admit, should_stop, max_events: int, within_s: float,
                       linger_s: float = 0.0, consume_stage: Any = None, fill_stage: Any = None):
    """Micro-batches of unacked events read straight from the queue Faust's conductor
    fills for the agent (its iterator channel's queue), without Faust's Stream.

    Why not the Stream: its iterator spends one event-loop turn (`await sleep(0)`), an
    awaited processor, two stream sensors and a context-variable write on every event,
    and Faust's noack_take waits the whole `within` after every batch. Here a batch is
    whatever is already fetched, drained with get_nowait in one go: it goes as soon as
    pipeline.batch_ready says so (full; or nothing more fetched and `linger_s` passed; or
    `within_s` spent draining). Under load events pile up in the queue while the pipeline
    is busy, so batches grow by themselves; at a low rate each event goes alone, at once.
    The queue is bounded (stream_buffer_maxsize): Faust pauses fetching while it is full.

    `admit(event) -> bool` does per event what the Stream did (events fetched before a
    rebalance are left out, unacked; see `admitter`). `consume_stage`/`fill_stage` (histogram children)
    get, per event, the time from its Kafka append to its drain from the queue and from
    there to its batch's hand-over."""
    # Faust ends a channel (worker shutdown) by throwing StopAsyncIteration into its queue:
    # get()/get_nowait() raise it, and it ends the batches here, as it ends Faust's Stream.
    # (Left to propagate, Python turns it into a RuntimeError inside an async generator.)
    try:
        while not should_stop():
            if queue.empty():
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    continue                      # look at should_stop again
                pending = [event]
            else:
                pending = []
            batch: list = []
            arrived: list[float] = []
            first = 0.0
            spins = 0
            while True:
                while len(pending) + len(batch) < max_events and not queue.empty():
                    pending.append(queue.get_nowait())   # raises what was thrown into the channel
                if pending:
                    now = time.perf_counter()
                    wall = time.time()
                    for event in pending:
                        if not admit(event):
                            continue
                        if consume_stage is not None and event.message.timestamp:
                            consume_stage.observe(max(0.0, wall - event.message.timestamp))
                        batch.append(event)
                        arrived.append(now)
                    if batch and not first:
                        first = now
                    pending = []
                if not batch:
                    break                         # every event was stale: wait for the next
                if pipeline.batch_ready(len(batch), max_events, queue.empty(),
                                        time.perf_counter() - first, within_s, linger_s):
                    break
                # Let the consumer deliver more (it runs between our awaits), bounded by
                # within_s; yield at once the first times, then briefly sleep, so a stuck
                # upstream does not spin the loop.
                spins += 1
                await asyncio.sleep(0 if spins <= DRAIN_SPINS and not linger_s else DRAIN_NAP_S)
            if not batch:
                continue
            if fill_stage is not None:
                now = time.perf_counter()
                for seen in arrived:
                    fill_stage.observe(now - seen)
            yield batch
    except StopAsyncIteration:
        return


def admitter(app: Any):
    """What Faust's Stream does for each event it takes from the queue, for take_batches:
    an event fetched before a rebalance (flow control off, or an older consumer generation)
    is left out, and every other one is tracked as unacked (the consumer waits for those
    before giving partitions away).

    Unlike the Stream, a stale event is NOT acked: events wait in this queue while the
    pipeline is busy (up to stream_buffer_maxsize), so after a rebalance a whole backlog
    can be stale, and acking it lets Faust commit offsets that were never scored. (The
    first clean-clone run of this code acked them, and tests/test_faults.py's frozen-worker
    test failed: the survivor held every later record behind the hole and never scored the
    rest; unacked, it passed.) Left unacked, they are read again: after every rebalance
    Faust seeks the partitions it keeps or gets to their committed offsets."""
    consumer = app.consumer
    unacked_add = consumer.unacked.add
    acking_topics = app.topics.acking_topics
    flow_control = app.flow_control
    on_message_in = app.sensors.on_message_in

    def admit(event: Any) -> bool:
        message = event.message
        if not flow_control.is_active() or message.generation_id != app.consumer_generation_id:
            return False
        if message.topic in acking_topics and not message.tracked:
            message.tracked = True
            unacked_add(message)
            on_message_in(message.tp, message.offset, message)
        return True
    return admit


def ack_event(app: Any, event: Any) -> None:
    """Stream.ack without the per-stream sensor: the last reference marks the offset
    safe to commit (Message.ack -> Consumer.ack)."""
    if event.ack():
        message = event.message
        app.sensors.on_message_out(message.tp, message.offset, message)


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
    positionless: dict[int, int] = field(default_factory=dict)  # partition -> checks without a position
    evictions: int = 0                                          # times the group evicted us (fence)


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


def build_app(settings: Settings, scorer: ModelScorer, partitions: int, rules=None,
              source: ModelSource | None = None):
    """The Faust app: topics, the sessions table (and the trigger-state table when
    `rules`, a stream.triggers.RuleSet, is given), the scoring agent and two monitors.
    `source` (stream/registry.py) hands the inference thread the model for each batch
    (a registry's newest version after a hot swap); without it, `scorer` serves."""
    import faust
    from faust.types import TP

    _set_fetch_max_wait(settings.fetch_max_wait_ms)
    data_dir = settings.faust_data_dir()
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
        # The embedded broker reports a partition's end as its last batch's start + 1, so
        # a RocksDB store restored past that "end" fails Faust's consistency check
        # (ConsistencyError: persisted offset higher than highwater) on every restart.
        # The changelog stays the source of truth; the check only guards against local
        # files left from a deleted and recreated topic (docs/operations.md).
        recovery_consistency_check=False,
        stream_buffer_maxsize=max(4096, 4 * settings.batch_size),
        worker_redirect_stdouts=False,
        # Outputs and changelog writes wait up to this long to share a produce request:
        # fewer requests per event for the event loop (docs/operations.md, "2026-12-04").
        producer_linger=settings.producer_linger_ms / 1000,
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
    offsets.install(settings.input_topic)   # commit only offsets every record before which was scored
    gap_memory = offsets.GapMemory()
    order_guard = offsets.OrderGuard()

    def committed_or_unknown(partition: int):
        return offsets.committed_in(app.consumer, TP(settings.input_topic, partition))

    def committed_offset(partition: int) -> int | None:
        # The replay margin: unknown counts as nothing committed (every row is kept).
        committed = committed_or_unknown(partition)
        return None if committed is offsets.UNKNOWN else committed

    def absent_in_log(partition: int, start: int, end: int) -> bool:
        return offsets.ABSENT.covers(settings.input_topic, partition, start, end)

    @app.on_partitions_revoked.connect
    async def forget_revoked(sender, revoked, **kwargs) -> None:
        mine = [tp for tp in revoked if tp.topic == settings.input_topic]
        offsets.forget_committed(app.consumer, mine)
        order_guard.forget(tp.partition for tp in mine)
    info = scorer.info
    timeout_ms = int(settings.session_timeout_s * 1000)
    topics = pipeline.Topics(settings.scores_topic, settings.next_items_topic, settings.dlq_topic,
                             settings.triggers_topic)
    if source is None:
        source = ModelSource(Path(info.path), ModelTagged(scorer, info.name, info.version), "auto", 0.0, False)
    # Per-session model state for step scoring, owned by the inference thread (stream/model_cache.py).
    state_cache = model_cache.ModelStateCache(settings.model_cache_bytes) if settings.model_cache_bytes else None
    # --inference-process: the model calls and that cache live in a child process instead
    # (stream/inference.py); this thread only hands batches over, in the same order.
    remote = None
    if settings.inference_process:
        from stream.inference import InferenceProcess
        # state_cache stays here for the batches the child cannot score (scored in this thread).
        remote = InferenceProcess(source.provider, settings.inference_threads, settings.model_cache_bytes,
                                  fallback_cache=state_cache)
    consumed = metrics.EVENTS_CONSUMED.labels(topic=settings.input_topic)
    stage = {name: metrics.STAGE_SECONDS.labels(stage=name) for name in metrics.STAGES}
    scored = {t: metrics.EVENTS_SCORED.labels(topic=t)
              for t in (settings.scores_topic, settings.next_items_topic)}
    triggers = pipeline.TriggerContext(
        rules, lambda key: trigger_states.data.get(key),
        lambda rule: metrics.TRIGGERS_FIRED.labels(rule=rule).inc()) if rules else None

    def unreadable_state(key: bytes, exc: Exception) -> None:
        log.warning("session %r: unreadable state (%s); starting it afresh", key[:60], exc)

    async def send(out: pipeline.Output):
        # The delivery report (an awaitable) is checked by pipeline.deliver.
        return await app.producer.send(out.topic, out.key, out.value, partition=None, timestamp=None,
                                       headers=None)

    # One producer batch per topic-partition for each micro-batch's outputs (--batch-sends).
    send_all = None
    if settings.batch_sends:
        from stream import kafka_compat
        send_all = kafka_compat.batch_sender(lambda: app.producer)

    def begin(events: Sequence[Any]) -> "InFlight":
        """Stage 1, on the event loop: decode, key check, advance and write session state,
        then hand the windows to the inference thread. Returns at once."""
        started = time.perf_counter()
        # Records past a hole (Faust dropped fetched records before us) wait for the hole
        # to be re-read: scored out of order, they would skip an event of their session.
        records = [pipeline.Record.of(ev.message) for ev in events]
        order = offsets.split_in_order(records, committed_or_unknown, order_guard, time.monotonic(),
                                       absent_in_log)
        for partition, start, end in order.gaps:    # e.g. transaction markers: nothing to score there
            offsets.ack_absent(app.consumer, TP(settings.input_topic, partition), start, end)
        for partition, offset in order.seek.items():
            log.warning("partition %d: records before offset %d... never reached the agent (or its committed "
                        "offset is not known yet); holding later ones and seeking back to %d",
                        partition, offset, offset)
            asyncio.ensure_future(app.consumer.seek(TP(settings.input_topic, partition), offset))
        # Below the committed offset: scored and delivered before the commit; acked with this batch.
        done_before = [events[i] for i in order.committed]
        if done_before:
            metrics.REDELIVERED_COMMITTED.inc(len(done_before))
        if len(order.keep) < len(records):
            events = [events[i] for i in order.keep]
            records = [records[i] for i in order.keep]
        consumed.inc(len(events))
        worker.processed += len(events)
        try:
            for record in records:
                worker.last_offsets[record.partition] = record.offset
            # (record) -> event | dead letter; (event, state) -> state
            # committed_offset: rows not yet committed stay in the state (replay margin) so a
            # re-delivered event is scored again as it was the first time.
            batch = pipeline.prepare(records, sessions.data.get, scorer.artefacts, timeout_ms,
                                     settings.max_message_bytes, unreadable_state, committed_offset)
            for key, (value, index) in batch.state_writes.items():
                _write_in_event_context(events[index], sessions.__setitem__, key, value)
            for partition, watermark in batch.watermarks.items():
                worker.watermarks[partition] = max(worker.watermarks.get(partition, 0), watermark)
        except Exception as exc:
            # A fault outside the per-record guards: dead-letter the batch rather than
            # exit, since a restart would read the same records and fail again.
            batch = whole_batch_failed(records, exc, "preparing a batch")
        # [window] -> scores, off the event loop. One inference thread scores batches in
        # the order they were begun, so a session's events are scored in order.
        scoring = asyncio.get_running_loop().run_in_executor(executor, timed_score, batch)
        stage["prepare"].observe(time.perf_counter() - started)
        return InFlight(events, records, batch, scoring, started, worker.evictions, done_before)

    def whole_batch_failed(records: list, exc: Exception, where: str) -> pipeline.Batch:
        detail = pipeline.internal_error(exc, where)
        return pipeline.Batch(records, rejected=[pipeline.Rejected(i, "internal_error", detail)
                                                 for i in range(len(records))])

    def timed_score(batch: pipeline.Batch) -> tuple[pipeline.Scores, float, ModelTagged, float, float]:
        # Inference thread. A checked new model version takes over here, between batches.
        served = source.take()
        if remote is not None and batch.accepted:
            scores, t0, t1 = remote.score(served, batch.accepted, settings.top_k)
            return scores, t1 - t0, served, t0, t1
        t0 = time.perf_counter()
        scores = model_cache.score_batch(served.scorer, state_cache, batch.accepted, settings.top_k)
        t1 = time.perf_counter()
        return scores, t1 - t0, served, t0, t1

    async def hold_while_fenced() -> bool:
        """After a freeze past the session timeout our partitions may be another
        worker's: send and write nothing until the consumer group has answered (see
        stream/fencing.py). Returns True when the batch must be dropped unsent and
        unacked: the group evicted us meanwhile (a new generation, or our member id was
        reset), so Faust re-seeks the partitions we still own to their committed offsets
        and the others are their new owner's. False when the group kept us: the batch is
        still ours and is scored as usual."""
        if not fence.blocks_batch():
            return False
        at_freeze = fence.suspended_at_generation     # set by the fence's ticker thread
        while fence.reason() is not None:
            await asyncio.sleep(0.05)
        view = fence._view()
        evicted = at_freeze is None or view is None or view.generation != at_freeze
        if evicted:
            worker.evictions += 1   # every batch begun before now is dropped too
        return evicted

    async def complete(flight: "InFlight") -> bool:
        """Stage 3, on the event loop: outputs of a scored batch, delivered and checked.
        False when the batch was dropped by the fence (not delivered: do not ack)."""
        try:
            scores, seconds, served, scoring_began, scoring_ended = await flight.scoring
        except Exception as exc:   # outside score_isolated's guard (which catches the model's own)
            scores, seconds = pipeline.Scores.all_failed(
                len(flight.batch.accepted), settings.top_k, pipeline.internal_error(exc, "scoring a batch")), 0.0
            served = source.current
            scoring_began = scoring_ended = time.perf_counter()
        finishing = time.perf_counter()
        stage["inference_queue"].observe(max(0.0, scoring_began - flight.started))
        stage["inference"].observe(seconds)
        stage["delivery_queue"].observe(max(0.0, finishing - scoring_ended))
        model = pipeline.ModelTag(served.name, served.version)   # the model that scored this batch
        if flight.batch.accepted:
            metrics.INFERENCE_SECONDS.observe(seconds)
            metrics.BATCH_SIZE.observe(len(flight.batch.accepted))
        records, events = flight.records, flight.events
        # (event, score) -> output records and dead letters
        try:
            done = pipeline.finish(flight.batch, scores, topics, served.scorer.item_ids, model, triggers,
                                   processing_ms=round((time.perf_counter() - flight.started) * 1000, 3))
            for key, (value, index) in done.trigger_writes.items():
                _write_in_event_context(events[index], trigger_states.__setitem__, key, value)
        except Exception as exc:   # outside the per-record guards: as in begin()
            failed = whole_batch_failed(records, exc, "building a batch's outputs")
            done = pipeline.finish(failed, pipeline.score_isolated(served.scorer.score, [], settings.top_k),
                                   topics, served.scorer.item_ids, model)
        for reason, count in done.dead_lettered.items():
            metrics.EVENTS_DEAD_LETTERED.labels(reason=reason).inc(count)
        for probability in done.buy_probabilities:
            metrics.BUY_PROBABILITY.observe(probability)
        if await hold_while_fenced() or flight.evictions != worker.evictions:
            log.warning("dropped a batch of %d events unsent after an eviction (re-read from committed offsets)",
                        len(records))
            return False
        sending = time.perf_counter()
        stage["finish"].observe(sending - finishing)
        await pipeline.deliver(send, done.outputs, records, settings.dlq_topic, SEND_ATTEMPTS, SEND_BACKOFF_S,
                               send_all)
        stage["deliver"].observe(time.perf_counter() - sending)
        for out in done.outputs:
            if out.topic in scored:
                scored[out.topic].inc()
        now = time.time()
        for record in records:
            if record.timestamp:
                metrics.END_TO_END_SECONDS.observe(max(0.0, now - record.timestamp))
        return True

    async def evict_idle_sessions() -> None:
        """Tombstone the sessions idle past the timeout at their partition's watermark.

        EVICTION_SLICE sessions per event-loop turn, each slice read and decided under the
        batch lock (no batch is between reading and writing state meanwhile), batches
        running between slices, so a large table does not stall the loop: deciding a whole
        table at once held it ~0.4-0.7 us per live session (40-65 ms at 100,000, every
        EVICTION_SCAN_S), and listing its items, new tuples that set off the garbage
        collector, another 16-26 ms; a slice takes 2.5-4.7 ms (`python -m bench.eviction`).
        The keys are listed a slice at a time too (session_state.key_slices: the memory
        store's at once, ~1 ms per 100,000; the RocksDB store's lazily and raw, values read
        from the key's own partition, since Faust's own listing decodes every key, 149-173
        ms per 100,000 in one turn, and its get searches every partition).
        Each value is read when its slice is decided, and ownership is read again for every
        slice (a rebalance may come in between)."""
        worker.last_scan = time.monotonic()
        listed = evicted = state_bytes = 0
        for keys, current in key_slices(sessions.data, EVICTION_SLICE):
            listed += len(keys)
            async with batch_lock:
                owned = {tp.partition for tp in app.consumer.assignment() if tp.topic == settings.input_topic}
                idle, nbytes = idle_now(keys, current, worker.watermarks, timeout_ms, owned)
                state_bytes += nbytes
                for key, partition in idle:
                    # No current event here: send the tombstone to the session's own partition.
                    for table in (sessions, trigger_states):
                        if table is not None and key in table.data:
                            del table.data[key]
                            table.send_changelog(partition, key, None, value_serializer="raw")
                    evicted += 1
            await asyncio.sleep(0)
        metrics.ACTIVE_SESSIONS.set(listed - evicted)
        metrics.SESSION_STATE_BYTES.set(state_bytes)
        if evicted:
            log.info("evicted %d idle sessions (%d remain)", evicted, listed - evicted)

    batch_lock = asyncio.Lock()
    # Batches begun but not yet delivered. Bounded, so a slow broker or model holds back
    # consumption instead of growing memory; PIPELINE_DEPTH >= 2 lets batch N+1 be
    # decoded while batch N is scored and batch N-1's outputs are sent.
    in_flight: asyncio.Queue = asyncio.Queue(maxsize=PIPELINE_DEPTH)

    def fail(exc: BaseException) -> None:
        if isinstance(exc, pipeline.DeliveryFailed):
            # Not the data's fault (every record is dead-lettered or scored by then): the
            # broker refuses our outputs. Exit without acking, so a restarted worker
            # re-reads the batch from the committed offsets.
            log.error("stopping the worker (exit status %d): %s", EXIT_DELIVERY_FAILED, exc)
            status = EXIT_DELIVERY_FAILED
        else:
            # Reached only by a bug in the wiring itself (faults in the batch logic
            # dead-letter the batch). A crashed Faust agent leaves the worker up but
            # consuming nothing: exit, so a supervisor restarts it from committed offsets.
            log.error("scoring a batch failed; stopping the worker (exit status 70)", exc_info=exc)
            status = 70
        logging.shutdown()
        os._exit(status)

    async def deliver_in_order() -> None:
        """Stage 3 for every batch, in the order begun; acks a batch once it is delivered."""
        while True:
            flight = await in_flight.get()
            try:
                delivered = await complete(flight)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                fail(exc)
            if delivered:
                for event in (*flight.events, *flight.committed_before):
                    ack_event(app, event)
            in_flight.task_done()

    @app.agent(clicks, name="score_clicks")
    async def score_clicks(stream):
        # Unacked batches (take_batches): Faust must not commit a record's offset until every
        # output of the batch it came in has been delivered, so batches are acked after delivery.
        # aiter() makes the iterator channel the conductor delivers to (and subscribes the
        # topic), as iterating the stream would; its queue is read directly, the Stream never.
        queue = aiter(stream.channel).queue
        sender = asyncio.ensure_future(deliver_in_order())
        try:
            async for events in take_batches(queue, admitter(app), lambda: stream.should_stop,
                                             settings.batch_size, settings.batch_wait_s, settings.batch_linger_s,
                                             stage["consume"], stage["batch_fill"]):
                if await hold_while_fenced():
                    continue   # evicted meanwhile: unacked, re-read from the committed offsets
                try:
                    async with batch_lock:
                        flight = begin(events)
                except Exception as exc:
                    fail(exc)
                await in_flight.put(flight)
        finally:
            sender.cancel()

    @app.timer(EVICTION_SCAN_S)
    async def eviction_scan() -> None:
        # A timer, not a check between batches: the watermark that makes the last
        # sessions idle may arrive in the last batch of a quiet stream. Each slice takes
        # the lock, so a scan never runs while a batch is between reading and writing state.
        await evict_idle_sessions()

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
        try:
            for action in await offsets.heal_head_gaps(app.consumer, settings.input_topic, gap_memory):
                log.warning("%s", action)
        except Exception:   # the watchdog must never die; the next tick tries again
            log.exception("checking for unscored input failed")
        stalled = []
        for tp in app.consumer.assignment():
            if tp.topic != settings.input_topic:
                continue
            done = worker.last_offsets.get(tp.partition, -1) + 1
            try:
                end = app.consumer.highwater(tp)
                # Bounded: aiokafka's position() waits while a partition has no valid
                # position, which hung this monitor for good in the very stall it is
                # meant to end (tests/test_faults.py, scaling).
                position = await asyncio.wait_for(app.consumer.position(tp), POSITION_TIMEOUT_S)
            except asyncio.TimeoutError:
                # Assigned but without a position: twice in a row with nothing processed
                # meanwhile counts as stalled.
                misses = worker.positionless.get(tp.partition, 0) + 1
                worker.positionless[tp.partition] = misses
                if misses >= 2 and worker.processed == worker.processed_at_check:
                    stalled.append(tp)
                continue
            except Exception:   # not fetched yet
                continue
            worker.positionless.pop(tp.partition, None)
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
                worker.positionless.pop(tp.partition, None)
                try:
                    worker.positions_after_seek[tp.partition] = await asyncio.wait_for(
                        app.consumer.position(tp), POSITION_TIMEOUT_S)
                except Exception:
                    pass

    app.clickscore = worker   # for tests and the demo: watermarks, loop lag
    from stream import kafka_compat   # all codecs read, --compression-type, stop on unreadable batches
    kafka_compat.install(app, settings)
    from stream import changelog_ends   # recovery reads each changelog to its true end
    changelog_ends.install(settings)
    return app


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
    create missing topics, then run the Faust worker until SIGTERM, SIGINT or SIGHUP.

    Stopping (stream/lifecycle.py): during set-up a signal abandons it (exit 0); once
    Faust runs, its own stop stops consuming, flushes the producer and commits the
    acked offsets (exit 0); whatever is still stopping STOP_DEADLINE_S after the signal
    (a broker that is gone) is cut short with exit 124: the uncommitted rest is
    re-delivered to the next worker, as after a crash."""
    from stream import lifecycle

    if getattr(args, "processes", 1) > 1:
        from stream.processes import supervise
        return supervise(settings_from_args(args), args.argv)
    lifecycle.install()
    try:
        with lifecycle.interruptible():
            return _run_worker(args)
    except lifecycle.StopRequested:
        log.info("stopped during set-up")
        return lifecycle.EXIT_OK


def _run_worker(args: argparse.Namespace) -> int:
    from stream import lifecycle

    settings = settings_from_args(args)
    if settings.store.startswith("rocksdb"):
        try:
            import rocksdict  # noqa: F401
        except ImportError:
            raise ClickscoreError("--store rocksdb:// needs the rocksdict package "
                                  "(installed with clickscore: pip install rocksdict); or use memory://") from None
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    # A plain export folder, or a registry (onnx_models/NAME): its newest valid version.
    source = ModelSource.open(settings.model, settings.execution_provider, settings.model_poll_s,
                              settings.inference_threads)
    scorer = source.current.scorer
    log.info("model %s v%s (%s) from %s, execution provider %s", source.current.name, source.current.version,
             scorer.info.kind, scorer.info.path, scorer.info.provider)
    metrics.set_model_info(source.current.name, source.current.version, scorer.info.provider)
    if settings.metrics_port:
        metrics.start_metrics_server(settings.metrics_host, settings.metrics_port)
    rules = None
    if settings.rules:
        from stream.triggers import load_rules
        rules = load_rules(settings.rules)   # a bad file exits 2 with file:line
        log.info("trigger rules %s from %s -> %s", ", ".join(rules.names), settings.rules,
                 settings.triggers_topic)
    partitions = ensure_topics(settings)
    app = build_app(settings, scorer, partitions, rules, source)
    source.start_polling()   # a registry: load and check new versions in the background

    import faust

    log.info("worker %s: %s -> %s, %s (dead letters: %s), %d partitions, store %s, web port %d",
             settings.app_id, settings.input_topic, settings.scores_topic, settings.next_items_topic,
             settings.dlq_topic, partitions, settings.store, settings.web_port)
    worker = faust.Worker(app, loglevel=settings.log_level, quiet=True, redirect_stdouts=False)
    # Faust's loop takes the signals over once it starts (our set-up handler until then).
    lifecycle.bound_faust_worker(worker)   # SIGHUP, and the hard deadline on Faust's stop
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
