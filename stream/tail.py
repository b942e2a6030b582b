"""`clickscore tail TOPIC`: read any topic, ours or not, from the embedded broker or real Kafka.

    clickscore tail buyer-scores                      # from the beginning, exit at the end
    clickscore tail next-items --follow --from-end    # only what arrives from now on
    clickscore tail clicks-dlq --json | jq .value.reason
    clickscore tail buyer-scores --session s1 --from-time 2026-12-02T10:00:00Z --limit 20

One aligned line per record (time, partition:offset, session, model, then what the
record says: buy probability, top items, dead-letter reason with the original message,
trigger), or `--json`: one JSON object per record with partition, offset, timestamp,
key and the decoded value. Any bytes are shown: JSON is decoded, other UTF-8 is text,
the rest is escaped (human) or base64 (JSON).

It uses kafka-python's assign() consumer, not a consumer group: it commits nothing,
so reading never disturbs the worker, and it works on the embedded broker, where
kafka-python's group consumer gets no assignment.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterator, TextIO

from stream.errors import ClickscoreError
from stream.settings import Settings, settings_from_args

POLL_MS = 200
# A poll can come back empty before the first fetch answers; without --follow the end
# of a partition is only trusted once a fetch has reported its high watermark.
NO_ANSWER_S = 30.0
BOOTSTRAP_S = 10.0    # how long to look for a broker before saying there is none
SESSION_WIDTH = 20
TEXT_LIMIT = 160      # human output cuts long values here (--json never cuts)
TOP_ITEMS_SHOWN = 5


@dataclass(frozen=True)
class TailRecord:
    """One Kafka record as read: raw key and value bytes (None for a null key/tombstone)."""
    partition: int
    offset: int
    timestamp: int          # record timestamp, epoch ms (producer's CreateTime on our topics)
    key: bytes | None
    value: bytes | None


# --------------------------------------------------------------------------- decoding

def decode_text(raw: bytes | None) -> str | None:
    """UTF-8 text, or None when the bytes are not UTF-8 (or absent)."""
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def decode_value(raw: bytes | None) -> tuple[str, Any]:
    """(kind, value): ("null", None), ("json", parsed), ("text", str) or ("bytes", raw)."""
    if raw is None:
        return "null", None
    text = decode_text(raw)
    if text is None:
        return "bytes", raw
    try:
        return "json", json.loads(text)
    except ValueError:
        return "text", text


def printable(text: str, limit: int = TEXT_LIMIT) -> str:
    """One line a terminal shows as is: control characters escaped, long text cut."""
    out = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)
    return out if len(out) <= limit else out[:limit - 1] + "…"


def show_bytes(raw: bytes | None, limit: int = TEXT_LIMIT) -> str:
    """Text where it is UTF-8, else Python's bytes literal (escapes every odd byte)."""
    if raw is None:
        return "null"
    text = decode_text(raw)
    return printable(text if text is not None else repr(raw), limit)


# --------------------------------------------------------------------------- formatting

def iso_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def format_json(record: TailRecord) -> str:
    """One JSON line: key and value decoded; bytes that are not UTF-8 go to *_b64."""
    out: dict[str, Any] = {"partition": record.partition, "offset": record.offset,
                           "timestamp": record.timestamp}
    key = decode_text(record.key)
    out["key"] = key
    if key is None and record.key is not None:
        out["key_b64"] = base64.b64encode(record.key).decode()
    kind, value = decode_value(record.value)
    out["value"] = None if kind == "bytes" else value
    if kind == "bytes":
        out["value_b64"] = base64.b64encode(value).decode()
    return json.dumps(out, ensure_ascii=False)


def _model(value: dict) -> str:
    name, version = value.get("model_name"), value.get("model_version")
    return f"{name} v{version}" if name is not None else ""


def _probability(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else str(value)


def _event(value: dict) -> str:
    """Which event of the session the record answers: '  event 3 view'."""
    if value.get("event_count") is None:
        return ""
    return f"  event {value['event_count']} {value.get('event_type') or ''}".rstrip()


def describe(value: dict) -> tuple[str, str, str] | None:
    """(session, model, what) for the records our worker and sink write (docs/CONTRACTS.md),
    recognised by their fields so renamed topics read the same; None for anything else."""
    session = str(value.get("session_id", ""))
    if "reason" in value and "original_b64" in value:                      # dead letter
        try:
            original = base64.b64decode(value["original_b64"] or "", validate=True)
            shown = show_bytes(original)
            if value.get("original_truncated"):   # the worker copies only the first bytes of a huge message
                total = value.get("original_bytes")
                shown += f" (first {len(original):,} of {total:,} bytes)" if isinstance(total, int) else " (cut)"
        except (binascii.Error, TypeError, ValueError):
            shown = f"(original_b64 not base64: {printable(str(value['original_b64']), 40)})"
        where = f"  from {value['topic']}:{value.get('partition')}:{value.get('offset')}" if "topic" in value else ""
        detail = printable(str(value.get("detail", "")), 80)
        return session, "", f"DEAD {value['reason']}  {detail}{where}  original: {shown}"
    if "trigger_id" in value and "rule" in value:                          # trigger
        return session, "", (f"TRIGGER {value['rule']}  buy {_probability(value.get('buy_probability'))}"
                             f"  {printable(json.dumps(value.get('evidence', {})), 80)}")
    if "items" in value and isinstance(value["items"], list):              # next items
        items = [str(i) for i in value["items"]]
        more = f" (+{len(items) - TOP_ITEMS_SHOWN})" if len(items) > TOP_ITEMS_SHOWN else ""
        return session, _model(value), f"next {' '.join(items[:TOP_ITEMS_SHOWN])}{more}{_event(value)}"
    if "buy_probability" in value and "outcome" in value:                  # buyer score
        if value["outcome"]:
            what = f"{value['outcome']} (buy scoring of this session ends)"
        else:
            what = f"buy {_probability(value['buy_probability'])}"
        return session, _model(value), what + _event(value)
    if {"session_id", "event_type", "item_id"} <= set(value):              # click event
        extra = "".join(f" {k} {value[k]}" for k in ("category_id", "price") if value.get(k) is not None)
        return session, "", f"{value['event_type']} item {value['item_id']}{extra}"
    return None


def format_human(record: TailRecord) -> str:
    """time  partition:offset  session  model  what (widths fixed so a stream stays aligned)."""
    head = f"{iso_ms(record.timestamp)}  {record.partition}:{record.offset:<8}"
    kind, value = decode_value(record.value)
    described = describe(value) if kind == "json" and isinstance(value, dict) else None
    if described is not None:
        session, model, what = (printable(part, limit) for part, limit in zip(described, (40, 40, 400)))
        session = session or show_bytes(record.key, 40)   # dead letters: the key is all there is
        return f"{head} {session:<{SESSION_WIDTH}}  {model:<12}  {what}".rstrip()
    key = show_bytes(record.key, 40)
    shown = "(tombstone)" if record.value is None else show_bytes(record.value)
    return f"{head} {key:<{SESSION_WIDTH}}  {shown}"


# --------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class TailOptions:
    topic: str
    start: str = "beginning"          # beginning | end | offset
    offset: int = 0
    from_time_ms: int | None = None   # keep records whose record timestamp >= this
    follow: bool = False
    partitions: tuple[int, ...] = ()  # empty: all
    session: str | None = None
    limit: int = 0                    # 0: no limit


def _consumer(settings: Settings):
    from kafka import KafkaConsumer
    from kafka.errors import KafkaError

    extra = {}
    if "bootstrap_timeout_ms" in KafkaConsumer.DEFAULT_CONFIG:   # kafka-python 3; 2.x has no such option
        extra["bootstrap_timeout_ms"] = int(BOOTSTRAP_S * 1000)
    try:
        consumer = KafkaConsumer(bootstrap_servers=settings.broker.split(","), group_id=None,
                                 enable_auto_commit=False, auto_offset_reset="earliest",
                                 # The embedded broker holds every fetch for the whole wait.
                                 fetch_max_wait_ms=100, **extra, **settings.kafka_security())
        topics = consumer.topics()
    except KafkaError as exc:
        raise ClickscoreError(f"no Kafka broker answers at {settings.broker} ({exc}): start one "
                              "(`clickscore broker`) or point --broker / CLICKSCORE_BROKER at yours") from None
    return consumer, topics


def _matches_session(record: TailRecord, session: str) -> bool:
    if decode_text(record.key) == session:
        return True
    kind, value = decode_value(record.value)
    return kind == "json" and isinstance(value, dict) and value.get("session_id") == session


def read(settings: Settings, options: TailOptions) -> Iterator[TailRecord]:
    """Records of the topic in partition order within each poll, filtered as asked.

    Without --follow it stops at the end each partition had when reading began. That end
    is the high watermark of the first fetch, not ListOffsets: the embedded broker
    answers ListOffsets with the last batch's start + 1, which would cut the last batch.
    """
    from kafka import TopicPartition

    consumer, topics = _consumer(settings)
    try:
        if options.topic not in topics:
            known = ", ".join(sorted(t for t in topics if not t.startswith("__"))) or "none"
            raise ClickscoreError(f"topic {options.topic!r} does not exist on {settings.broker} "
                                  f"(topics there: {known})")
        partitions = sorted(consumer.partitions_for_topic(options.topic) or ())
        if options.partitions:
            missing = sorted(set(options.partitions) - set(partitions))
            if missing:
                raise ClickscoreError(f"topic {options.topic!r} has partitions {partitions}; "
                                      f"no partition {', '.join(map(str, missing))}")
            partitions = [p for p in partitions if p in options.partitions]
        tps = [TopicPartition(options.topic, p) for p in partitions]
        consumer.assign(tps)
        if options.start == "end":
            consumer.seek_to_end(*tps)
        elif options.start == "offset":
            for tp in tps:
                consumer.seek(tp, options.offset)   # below the log start: auto_offset_reset
        else:
            consumer.seek_to_beginning(*tps)
        yield from _poll(consumer, tps, options)
    finally:
        consumer.close()


def _poll(consumer, tps: list, options: TailOptions) -> Iterator[TailRecord]:
    # end: first fetch's high watermark per partition. From the end, records below it
    # are the old tail the broker's understated ListOffsets let through: skip them.
    end: dict = {}
    last_answer = time.monotonic()
    while True:
        batches = consumer.poll(timeout_ms=POLL_MS)
        for tp in tps:
            if tp not in end and consumer.highwater(tp) is not None:
                end[tp] = consumer.highwater(tp)
                last_answer = time.monotonic()
        for tp, batch in sorted(batches.items(), key=lambda item: item[0].partition):
            last_answer = time.monotonic()
            for r in batch:
                if tp in end and options.start == "end" and r.offset < end[tp]:
                    continue
                if not options.follow and tp in end and r.offset >= end[tp]:
                    continue     # arrived after we began: the next `tail` shows it
                yield TailRecord(r.partition, r.offset, r.timestamp, r.key, r.value)
        if options.follow:
            continue
        if len(end) == len(tps) and all(consumer.position(tp) >= end[tp] for tp in tps):
            return
        if time.monotonic() - last_answer > NO_ANSWER_S:
            raise ClickscoreError(f"no fetch answer for {options.topic!r} in {NO_ANSWER_S:.0f} s")


def tail(settings: Settings, options: TailOptions, out: TextIO, as_json: bool = False) -> int:
    """Write the selected records to `out`; returns how many were written."""
    written = 0
    for record in read(settings, options):
        if options.from_time_ms is not None and record.timestamp < options.from_time_ms:
            continue
        if options.session is not None and not _matches_session(record, options.session):
            continue
        out.write((format_json(record) if as_json else format_human(record)) + "\n")
        if options.follow:
            out.flush()
        written += 1
        if options.limit and written >= options.limit:
            break
    out.flush()
    return written


def parse_partitions(text: str) -> tuple[int, ...]:
    """'0,2' -> (0, 2); empty -> all partitions."""
    try:
        values = tuple(sorted({int(p) for p in text.split(",") if p.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected partition numbers like 0 or 0,2, got {text!r}") from None
    if any(p < 0 for p in values):
        raise argparse.ArgumentTypeError(f"partition numbers are >= 0, got {text!r}")
    return values


def options_from_args(args: argparse.Namespace) -> TailOptions:
    start = "end" if args.from_end else "offset" if args.offset is not None else "beginning"
    return TailOptions(topic=args.topic, start=start, offset=args.offset or 0, from_time_ms=args.from_time,
                       follow=args.follow, partitions=args.partition or (), session=args.session or None,
                       limit=args.limit)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    options = options_from_args(args)
    try:
        tail(settings, options, sys.stdout, as_json=args.json)
    except BrokenPipeError:
        # `clickscore tail ... | head`: the reader left, which is no error. Point stdout
        # at /dev/null so the interpreter's final flush does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
