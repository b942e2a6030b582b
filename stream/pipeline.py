"""The worker's batch logic as plain code: Kafka records in, output records and state writes
out. stream/app.py only wires it into Faust (consume, table writes, sends, acks); a unit
test drives it with a dict for a table and a plain function for a model.

    batch = prepare(records, read_state, artefacts, timeout_ms, max_message_bytes)
    # (record) -> ClickEvent | dead letter; (event, state) -> new state     [event loop]
    scores = score_isolated(scorer.score, batch.windows, top_k)
    # [window] -> buy probability, top-k items; a failing event is found and set apart   [executor]
    outputs = finish(batch, scores, topics, item_ids, model, triggers)
    # (event, score) -> buyer-scores, next-items, triggers, dead letters   [event loop]

Every record of a batch comes out accounted for: it is scored (a next-items record, and a
buyer-scores record while the session has not bought) or dead-lettered with a reason.
Nothing a client sends can raise out of these functions: each record is handled inside its
own guard, and an exception nobody foresaw dead-letters that record as `internal_error`
(with the exception's type), is counted, and is logged once per type. A model that raises
or returns non-finite numbers fails only the events that cause it (`scoring_failed`): the
batch is split in halves until the culprits are alone.

Why the state is advanced before scoring: the next batch must see this batch's state
(per-session order), and the state's per-row input offsets make re-applying a re-delivered
record harmless, so writing it before the outputs are delivered loses nothing.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import orjson

from stream import metrics
from stream.events import ClickEvent, InvalidEvent, decode
from stream.features import FeatureArtefacts
from stream.session_state import (Committed, SessionState, StateError, advance, is_idle, keep_nothing_extra,
                                  migrated_from, replay_view)

log = logging.getLogger("clickscore.worker")

DETAIL_CHARS = 300            # longest `detail` kept in a dead letter
DLQ_KEY_BYTES = 1024          # longer input keys are not reused as the dead letter's key
DLQ_ORIGINAL_BYTES = 65536    # longest original value copied into a dead letter

# Exception types already logged with their traceback (the rest are only counted).
_logged_types: set[str] = set()


@dataclass(frozen=True, slots=True)
class Record:
    """One input record as the pipeline needs it (Faust's Message has these fields)."""
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: float | None = None      # Kafka append time, epoch seconds

    @classmethod
    def of(cls, message: Any) -> "Record":
        return cls(message.topic, message.partition, message.offset, message.key, message.value,
                   message.timestamp)


@dataclass(frozen=True, slots=True)
class Topics:
    scores: str
    next_items: str
    dlq: str
    triggers: str


@dataclass(frozen=True, slots=True)
class ModelTag:
    name: str
    version: str


@dataclass(slots=True)
class Accepted:
    """A valid event on its way through the batch."""
    index: int                # position of its record in the batch
    event: ClickEvent
    key: bytes
    window: np.ndarray        # (n,) EVENT_ROW: the session right after this event
    event_count: int
    emit_buy: bool            # the session had not bought before this event
    has_cart: bool
    replayed: bool = False    # re-delivered: already in the state (and the trigger state)


@dataclass(frozen=True, slots=True)
class Rejected:
    index: int
    reason: str
    detail: str


def batch_ready(buffered: int, max_events: int, upstream_empty: bool, waited_s: float,
                within_s: float, linger_s: float = 0.0) -> bool:
    """Whether a micro-batch goes now (stream/app.py take_batches; `waited_s` counts from
    its first event): it is full; or events are in hand, nothing more was fetched and
    `linger_s` has passed (0: at once, so when the input is idle one event goes alone);
    or `within_s` has passed while fetched events kept coming in. Under load the buffer
    fills while the pipeline is busy, so batches grow without any wait."""
    if buffered >= max_events:
        return True
    if buffered == 0:
        return False
    return (upstream_empty and waited_s >= linger_s) or waited_s >= within_s


@dataclass
class Batch:
    records: Sequence[Record]
    accepted: list[Accepted] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    # session key -> (state bytes, index of the last record that changed it): the table
    # write must run in that record's context (its partition's changelog).
    state_writes: dict[bytes, tuple[bytes, int]] = field(default_factory=dict)
    watermarks: dict[int, int] = field(default_factory=dict)   # partition -> max event ms

    @property
    def windows(self) -> list[np.ndarray]:
        return [a.window for a in self.accepted]


@dataclass
class Scores:
    """Per accepted event: the model's answer, or why there is none."""
    buy_probability: np.ndarray     # (B,) float, NaN where failed
    top_items: np.ndarray           # (B, k) int64
    top_scores: np.ndarray          # (B, k) float32
    failed: dict[int, str] = field(default_factory=dict)   # position in batch -> detail

    @classmethod
    def all_failed(cls, n: int, top_k: int, detail: str) -> "Scores":
        return cls(np.full(n, np.nan), np.zeros((n, top_k), np.int64), np.zeros((n, top_k), np.float32),
                   {i: detail for i in range(n)})


@dataclass(frozen=True, slots=True)
class Output:
    topic: str
    key: bytes | None
    value: bytes
    index: int                      # the input record it answers


@dataclass
class Finished:
    outputs: list[Output]
    trigger_writes: dict[bytes, tuple[bytes, int]]   # like Batch.state_writes
    scored: int                                      # events with a next-items record
    dead_lettered: Counter                           # reason -> count
    buy_probabilities: list[float]


# -- guards ------------------------------------------------------------------------------

def _clip(text: str, limit: int = DETAIL_CHARS) -> str:
    # backslashreplace: a detail may quote client text with lone surrogates; the dead
    # letter must still encode.
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def internal_error(exc: BaseException, where: str) -> str:
    """The detail of an unforeseen exception; counted by type, logged with its traceback
    once per type (a flood of one bad input must not flood the log)."""
    kind = type(exc).__name__
    metrics.INTERNAL_ERRORS.labels(exception=kind).inc()
    if kind not in _logged_types:
        _logged_types.add(kind)
        log.error("unexpected %s while %s (dead-lettered as internal_error; later ones of this "
                  "type are only counted)", kind, where, exc_info=exc)
    return _clip(f"{kind} while {where}: {exc}")


# -- stage 1: decode and advance the session state (event loop) ----------------------------

def prepare(records: Sequence[Record], read_state: Callable[[bytes], bytes | None],
            artefacts: FeatureArtefacts, timeout_ms: int, max_message_bytes: int,
            on_unreadable_state: Callable[[bytes, Exception], None] | None = None,
            committed: Committed = keep_nothing_extra) -> Batch:
    """Records -> accepted events with their windows, rejected records with reasons, and
    the table writes that advance each session. `read_state(key)` returns the stored
    value or None. `committed(partition)` is the partition's committed input offset: rows
    at or past it are kept for re-deliveries (session_state's replay margin); the default
    keeps none."""
    batch = Batch(records)
    pending: dict[bytes, SessionState] = {}
    for index, record in enumerate(records):
        try:
            accepted = _accept(index, record, pending, read_state, artefacts, timeout_ms,
                               max_message_bytes, on_unreadable_state, batch, committed)
        except InvalidEvent as exc:
            batch.rejected.append(Rejected(index, exc.reason, _clip(exc.detail)))
            continue
        except Exception as exc:    # last line of defence: no record may stop the worker
            batch.rejected.append(Rejected(index, "internal_error",
                                           internal_error(exc, "decoding and applying an event")))
            continue
        batch.accepted.append(accepted)
    return batch


def _accept(index: int, record: Record, pending: dict[bytes, SessionState],
            read_state: Callable[[bytes], bytes | None], artefacts: FeatureArtefacts, timeout_ms: int,
            max_message_bytes: int, on_unreadable_state, batch: Batch,
            committed: Committed = keep_nothing_extra) -> Accepted:
    event = decode(record.value, max_message_bytes)
    key = event.session_id.encode("utf-8")
    if record.key != key:
        raise InvalidEvent("key_mismatch", f"message key {record.key!r:.60} is not the session_id "
                           f"{event.session_id!r:.60}: key events by session_id")
    state = pending.get(key)
    if state is None:
        value = read_state(key)
        if value is not None:
            try:
                state = SessionState.from_bytes(value, artefacts)
                old = migrated_from(value)
                if old is not None:     # an older layout, converted: the next write stores the current one
                    metrics.STATE_MIGRATIONS.labels(from_version=str(old)).inc()
            except StateError as exc:
                if on_unreadable_state is not None:
                    on_unreadable_state(key, exc)
                state = None
    if state is not None and record.offset <= state.last_offset:
        # Re-delivered after a crash or rebalance: already in the state. Its scores are
        # sent again as they were, without applying it a second time.
        replay = replay_view(state, record.offset)
        if replay is None:
            raise InvalidEvent("redelivered_unscorable", "re-delivered event whose window is no "
                               "longer kept (more uncommitted events in its session than the replay margin)")
        return Accepted(index, event, key, replay.window, replay.event_count,
                        emit_buy=not replay.had_bought, has_cart=replay.has_cart, replayed=True)
    if state is not None and state.event_count and is_idle(state.last_event_ms, event.timestamp,
                                                           timeout_ms):
        state = None   # the old session timed out: this event starts a new one
    had_bought = state.has_bought if state is not None else False
    new_state = advance(state, event, artefacts, record.partition, record.offset, timeout_ms, committed)
    value = new_state.to_bytes()
    # Only now, when nothing can fail any more, does the batch see the new state.
    pending[key] = new_state
    batch.state_writes[key] = (value, index)
    partition = record.partition
    batch.watermarks[partition] = max(batch.watermarks.get(partition, 0), event.timestamp)
    return Accepted(index, event, key, new_state.window, new_state.event_count,
                    emit_buy=not had_bought, has_cart=new_state.has_cart)


# -- stage 2: score, isolating model faults (executor thread) ------------------------------

def score_isolated(score: Callable[[list, int], Any], windows: Sequence[np.ndarray], top_k: int) -> Scores:
    """`score(windows, top_k)` (ModelScorer.score) over all windows; an exception is
    narrowed down by halving the batch until the windows that cause it stand alone, and a
    row with a non-finite buy probability or score fails alone (rows do not interact)."""
    n = len(windows)
    buy = np.full(n, np.nan, dtype=np.float64)
    items: np.ndarray | None = None
    scores: np.ndarray | None = None
    failed: dict[int, str] = {}

    def run(positions: list[int]) -> None:
        nonlocal items, scores
        try:
            result = score([windows[i] for i in positions], top_k)
            b = np.asarray(result.buy_probability, dtype=np.float64).reshape(len(positions))
            ti = np.asarray(result.top_items).reshape(len(positions), -1)
            ts = np.asarray(result.top_scores, dtype=np.float32).reshape(len(positions), -1)
        except Exception as exc:
            if len(positions) == 1:
                failed[positions[0]] = _clip(f"{type(exc).__name__}: {exc}")
                return
            middle = len(positions) // 2
            run(positions[:middle])
            run(positions[middle:])
            return
        if items is None:
            items = np.zeros((n, ti.shape[1]), dtype=np.int64)
            scores = np.zeros((n, ts.shape[1]), dtype=np.float32)
        k = min(items.shape[1], ti.shape[1])
        finite = np.isfinite(b) & np.isfinite(ts).all(axis=1) & (b >= 0) & (b <= 1)
        for j, i in enumerate(positions):
            if not finite[j]:
                failed[i] = "the model returned a non-finite or out-of-range score"
                continue
            buy[i] = b[j]
            items[i, :k] = ti[j, :k]
            scores[i, :k] = ts[j, :k]

    if n:
        run(list(range(n)))
    if items is None:
        items = np.zeros((n, top_k), dtype=np.int64)
        scores = np.zeros((n, top_k), dtype=np.float32)
    return Scores(buy, items, scores, failed)


# -- stage 3: output records (event loop) -------------------------------------------------

def _json(record: Mapping[str, Any]) -> bytes:
    # orjson: compact, and about 10x faster than json.dumps for these small records (byte-identical output).
    # (Every float reaching here is finite: score_isolated fails non-finite rows.)
    return orjson.dumps(record)


def event_id_of(event: ClickEvent, record: Record) -> str:
    """The input's event_id, or its Kafka position when the producer sent none."""
    return event.event_id or f"{record.topic}:{record.partition}:{record.offset}"


def dead_letter(record: Record, reason: str, detail: str, dlq_topic: str, index: int) -> Output:
    """The dead letter of one input record. Never raises and never grows past the limits
    a producer accepts: a huge key or value is cut (and the cut is recorded), so a hostile
    record cannot make its own dead letter undeliverable."""
    value = record.value if isinstance(record.value, (bytes, bytearray)) else (
        str(record.value).encode("utf-8", "backslashreplace") if record.value is not None else b"")
    key = record.key if isinstance(record.key, (bytes, bytearray)) else None
    body = {
        "reason": reason,
        "detail": _clip(detail),
        "original_b64": base64.b64encode(bytes(value[:DLQ_ORIGINAL_BYTES])).decode(),
        "original_bytes": len(value),
        "original_truncated": len(value) > DLQ_ORIGINAL_BYTES,
        "key_b64": base64.b64encode(bytes(key[:DLQ_KEY_BYTES])).decode() if key is not None else None,
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp": record.timestamp,
        "dead_lettered_at": round(time.time() * 1000),
    }
    if body["timestamp"] is not None and not math.isfinite(body["timestamp"]):
        body["timestamp"] = None
    out_key = bytes(key) if key is not None and len(key) <= DLQ_KEY_BYTES else None
    return Output(dlq_topic, out_key, json.dumps(body, separators=(",", ":")).encode(), index)


@dataclass(frozen=True, slots=True)
class TriggerContext:
    """What trigger evaluation needs: the rules, the trigger-state table and a sink for
    fired triggers' metrics."""
    rules: Any                                        # stream.triggers.RuleSet
    read_state: Callable[[bytes], bytes | None]
    on_fired: Callable[[str], None] | None = None     # rule name -> (metrics)


def finish(batch: Batch, scores: Scores, topics: Topics, item_ids: Callable[[np.ndarray], list[list[str]]],
           model: ModelTag, triggers: TriggerContext | None = None,
           processing_ms: float | None = None) -> Finished:
    """Accepted events and their scores -> output records, in input order, with a dead
    letter for every rejected record and every event whose scoring or output failed."""
    outputs_by_index: dict[int, list[Output]] = {}
    dead: Counter = Counter()
    for rejected in batch.rejected:
        outputs_by_index[rejected.index] = [dead_letter(batch.records[rejected.index], rejected.reason,
                                                        rejected.detail, topics.dlq, rejected.index)]
        dead[rejected.reason] += 1
    try:
        names = item_ids(scores.top_items)
        top_scores = scores.top_scores.tolist()   # Python floats, as float() of each, in one call
    except Exception as exc:   # a vocabulary that cannot name an index: fail those events alone
        detail = internal_error(exc, "naming the top items")
        names = None
    trigger_pending: dict[bytes, tuple[Any, int]] = {}
    scored = 0
    probabilities: list[float] = []
    for position, item in enumerate(batch.accepted):
        record = batch.records[item.index]
        if position in scores.failed:
            reason, why = "scoring_failed", scores.failed[position]
        elif names is None:
            reason, why = "internal_error", detail
        else:
            try:
                outs, probability = _outputs(item, record, position, scores, names[position],
                                             top_scores[position], topics,
                                             model, triggers, trigger_pending, processing_ms)
            except Exception as exc:
                reason, why = "internal_error", internal_error(exc, "building an event's outputs")
            else:
                outputs_by_index[item.index] = outs
                scored += 1
                if probability is not None:
                    probabilities.append(probability)
                continue
        outputs_by_index[item.index] = [dead_letter(record, reason, why, topics.dlq, item.index)]
        dead[reason] += 1
    outputs = [out for index in sorted(outputs_by_index) for out in outputs_by_index[index]]
    trigger_writes = {key: (state.to_bytes(), index) for key, (state, index) in trigger_pending.items()}
    return Finished(outputs, trigger_writes, scored, dead, probabilities)


def _outputs(item: Accepted, record: Record, position: int, scores: Scores, names: list[str],
             top_scores: list[float], topics: Topics, model: ModelTag, triggers: TriggerContext | None,
             trigger_pending: dict, processing_ms: float | None) -> tuple[list[Output], float | None]:
    event = item.event
    common = {
        "session_id": event.session_id,
        "event_id": event_id_of(event, record),
        "timestamp": event.timestamp,
        "event_type": event.event_type,
        "event_count": item.event_count,
        "model_name": model.name,
        "model_version": model.version,
        "processing_ms": processing_ms,
    }
    outs: list[Output] = []
    probability = None
    if item.emit_buy:
        if event.is_transaction:
            body = {**common, "outcome": "transaction", "buy_probability": None, "has_cart": item.has_cart}
        else:
            probability = float(scores.buy_probability[position])
            body = {**common, "outcome": None, "buy_probability": probability, "has_cart": item.has_cart}
        outs.append(Output(topics.scores, item.key, _json(body), item.index))
    body = {**common, "items": names, "scores": top_scores}
    next_items = Output(topics.next_items, item.key, _json(body), item.index)
    # Triggers last: evaluating them changes the session's trigger state, which must only
    # happen once every other output of the event exists.
    if probability is not None and triggers is not None and not item.replayed:
        outs.extend(_fire(item, record, probability, topics, triggers, trigger_pending))
    outs.append(next_items)
    return outs, probability


def _fire(item: Accepted, record: Record, probability: float, topics: Topics, triggers: TriggerContext,
          pending: dict) -> list[Output]:
    from stream.triggers import ScoreObservation, SessionTriggerState

    key = item.key
    if key in pending:
        state = pending[key][0]
    else:
        value = triggers.read_state(key)
        try:
            state = SessionTriggerState.from_bytes(value) if value is not None else None
        except ValueError as exc:
            log.warning("session %r: unreadable trigger state (%s); starting it afresh", key, exc)
            state = None
    observation = ScoreObservation(
        session_id=item.event.session_id, buy_probability=probability, timestamp=item.event.timestamp,
        has_cart=item.has_cart, event_count=item.event_count, event_id=event_id_of(item.event, record))
    state, fired = triggers.rules.evaluate(state, observation)
    outs = [Output(topics.triggers, key, trigger.to_json(), item.index) for trigger in fired]
    pending[key] = (state, item.index)
    if triggers.on_fired is not None:
        for trigger in fired:
            triggers.on_fired(trigger.rule)
    return outs


# -- stage 4: delivery (event loop) -------------------------------------------------------

class DeliveryFailed(RuntimeError):
    """Outputs still undelivered after every retry: the batch must not be committed."""


def _record_too_large(exc: BaseException | None) -> bool:
    """A send that fails because of the record itself, which no retry can cure."""
    from kafka.errors import MessageSizeTooLargeError as KafkaTooLarge
    try:
        from aiokafka.errors import MessageSizeTooLargeError as AioTooLarge
    except ImportError:   # pragma: no cover
        AioTooLarge = KafkaTooLarge
    while exc is not None:
        if isinstance(exc, (KafkaTooLarge, AioTooLarge)):
            return True
        exc = exc.__cause__
    return False


def group_by_partition(outputs: Sequence[Output],
                       partition_of: Callable[[str, bytes | None], int]) -> dict[tuple[str, int], list[int]]:
    """Positions of `outputs` per (topic, partition), each list in output order, so one
    producer batch per topic-partition keeps a session's outputs in order (a session's
    outputs share its key, hence a partition). `partition_of(topic, key)` is the
    producer's partitioner; it is asked once per distinct (topic, key) (it hashes the key)."""
    groups: dict[tuple[str, int], list[int]] = {}
    known: dict[tuple[str, bytes | None], int] = {}
    for position, out in enumerate(outputs):
        where = (out.topic, out.key)
        partition = known.get(where) if out.key is not None else None
        if partition is None:
            # (A key-less output may go anywhere: ask each time, as a plain send would.)
            partition = known[where] = partition_of(out.topic, out.key)
        groups.setdefault((out.topic, partition), []).append(position)
    return groups


async def deliver(send: Callable[[Output], Any], outputs: list[Output], records: Sequence[Record],
                  dlq_topic: str, attempts: int = 5, backoff_s: float = 0.5,
                  send_all: Callable[[list[Output]], Any] | None = None) -> None:
    """Send every output and wait for each delivery report. `await send(output)` queues
    one record and returns its delivery report (an awaitable: Faust's producer.send).
    `await send_all(outputs)`, when given, queues them all at once and returns one report
    per output, shared by the outputs of one producer batch (kafka_compat.batch_sender):
    the first round uses it, retries go output by output, so a failed batch is narrowed
    down to its outputs. Failed outputs are sent again, `attempts` rounds in all, backing
    off (doubling); an output the broker refuses as too large, sent alone, is replaced by a
    dead letter of its input (`output_undeliverable`). Raises DeliveryFailed when outputs
    stay undelivered: the caller must then not ack the batch, so its offsets are never
    committed."""
    pending = outputs
    last_error: BaseException | None = None
    for attempt in range(1, attempts + 1):
        reports: list = []
        shared: set[int] = set()     # ids of reports that answer for several outputs
        if send_all is not None and attempt == 1 and pending:
            try:
                reports = list(await send_all(pending))
            except Exception as exc:   # nothing of a failed group was queued: retried one by one
                failed = asyncio.get_running_loop().create_future()
                failed.set_exception(exc)
                reports = [failed] * len(pending)
            seen: set[int] = set()
            for report in reports:
                (shared if id(report) in seen else seen).add(id(report))
        else:
            for out in pending:
                try:
                    reports.append(await send(out))
                except Exception as exc:   # refused before it was queued (buffer timeout, closed)
                    failed = asyncio.get_running_loop().create_future()
                    failed.set_exception(exc)
                    reports.append(failed)
        # (gather awaits a report shared by several outputs once and gives each its result)
        results = await asyncio.gather(*reports, return_exceptions=True)
        retry: list[Output] = []
        for out, report, result in zip(pending, reports, results):
            if not isinstance(result, BaseException):
                continue
            last_error = result
            metrics.OUTPUT_SEND_FAILURES.labels(topic=out.topic).inc()
            # Too large in a batch: the batch may be too large, not this output; it goes alone next round.
            if _record_too_large(result) and out.topic != dlq_topic and id(report) not in shared:
                metrics.EVENTS_DEAD_LETTERED.labels(reason="output_undeliverable").inc()
                retry.append(dead_letter(records[out.index], "output_undeliverable",
                                         f"{out.topic} refused the output: {result!r}", dlq_topic, out.index))
            else:
                retry.append(out)
        if not retry:
            return
        if attempt < attempts:
            log.warning("%d of %d outputs not delivered (attempt %d of %d, last error %r); retrying in %.1f s",
                        len(retry), len(pending), attempt, attempts, last_error, backoff_s)
            await asyncio.sleep(backoff_s)
            backoff_s *= 2
        pending = retry
    raise DeliveryFailed(f"{len(pending)} outputs undelivered after {attempts} attempts "
                         f"(last error {last_error!r})")
