"""Replay a click log into a Kafka topic, in event-time order, at a chosen speed.

    clickscore replay --input data/yoochoose --topic clicks --speed 60
    clickscore replay --input sim.jsonl --speed max --restamp
    clickscore replay --dataset yoochoose --input ../shared/datasets/yoochoose-100k/yoochoose-clicks-100k_test.txt --rate 2000

Inputs: anything `clickscore prepare` reads (`--dataset NAME`, through
training.readers), a prepared folder (DIR/events.parquet), a canonical .parquet/.csv
(`clickscore simulate` output), or JSON lines of click events (the wire format of
stream.events). Events go out sorted by event time (a stable sort, so ties keep file
order), keyed by session id, so each session's events stay in order within its
partition. Input lines or rows that break the event contract are counted and
reported with their line (or row) numbers, never sent.

Pacing follows one monotonic schedule: event i is due at `start + offset_i`, where
offset_i is the sum of the event-time gaps divided by --speed (each gap capped at
--max-gap-s of wall time), and, with --rate R, never less than the previous event's
due time + 1/R. Sleeping until each due time keeps errors from accumulating: a late
wake-up is caught up by the next events, so the rate over any stretch of a few
seconds holds.

--restamp: the event timestamp becomes the wall-clock time at which the event is
due (start time + offset_i), so the gaps between events are the gaps *as replayed*:
equal to the original ones at --speed 1, divided by the speed otherwise, capped by
--max-gap-s. With --speed max there is no schedule and the timestamp is the actual
send time. Without --restamp, events keep their original timestamps.

`replay(...)` returns the summary as a dict (for the demo and tests); `run(args)` is
the CLI. Exit status: 0 when every selected event was acknowledged, 1 when some send
failed after the producer's retries (each failure is reported with its event), 2 for a
bad argument or input.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from stream.errors import ClickscoreError
from stream.events import ClickEvent, InvalidEvent, decode, parse_timestamp, validate
from stream.settings import Settings, settings_from_args
from stream.settings import number as number_argument

# How many malformed lines and failed sends the summary lists in full.
EXAMPLES = 5
AUTO = "auto"
# Formats replay knows itself, besides the datasets of training.readers.
PREPARED = "prepared"
JSONL = "jsonl"


# --------------------------------------------------------------------------- arguments

def parse_speed(text: str) -> float | None:
    """'max' -> None (no pacing); a number > 0 -> that speed-up factor."""
    if text.strip().lower() == "max":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'max' or a number > 0 (1 = real time, 60 = sixty times faster), got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(
            f"must be 'max' or a finite number > 0 (1 = real time), got {text!r}")
    return value


parse_rate = number_argument(float, strict=True, what="events per second")
parse_gap = number_argument(float, what="seconds")
parse_count = number_argument(int, what="a whole number")


def parse_time(text: str) -> int:
    """Event time as epoch milliseconds or ISO-8601 (no zone = UTC) -> epoch ms."""
    text = text.strip()
    try:
        value: Any = int(text) if text.lstrip("-").isdigit() else text
        return parse_timestamp(value)
    except InvalidEvent as exc:
        raise argparse.ArgumentTypeError(
            f"expected epoch milliseconds or ISO-8601 like 2014-04-07T10:00:00Z ({exc.detail})") from None


# --------------------------------------------------------------------------- loading

@dataclass
class LoadedLog:
    """Valid events in input order, each with its position, plus what was rejected."""
    dataset: str
    events: list[tuple[int, ClickEvent]]      # (line or row number, event)
    malformed: int = 0
    malformed_examples: list[dict] = field(default_factory=list)
    position_kind: str = "line"                # "line" (text files) or "row" (tables)

    def reject(self, position: int, error: InvalidEvent) -> None:
        self.malformed += 1
        if len(self.malformed_examples) < EXAMPLES:
            self.malformed_examples.append(
                {self.position_kind: position, "reason": error.reason, "detail": error.detail})


def detect_format(path: Path) -> str:
    """The --dataset to use for `path` when none is given."""
    if path.is_dir():
        if (path / "events.parquet").is_file():
            return PREPARED
        from training.readers.common import guess_dataset
        guess = guess_dataset(path)
        if guess:
            return guess
        raise ClickscoreError(
            f"--input {path} is a folder without events.parquet and no known dataset files; "
            "pass --dataset NAME")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "canonical"
    if suffix in (".jsonl", ".json", ".ndjson"):
        first = _first_object(path)
        # OTTO's JSON lines hold a whole session per line, not one click event.
        if isinstance(first, dict) and "events" in first and "session" in first:
            return "otto"
        return JSONL
    if suffix == ".csv":
        from training.readers.common import first_line
        header = {name.strip().strip('"') for name in first_line(path).split(",")}
        if {"session_id", "event_type", "item_id", "timestamp"} <= header:
            return "canonical"
    from training.readers.common import guess_dataset
    guess = guess_dataset(path)
    if guess:
        return guess
    raise ClickscoreError(
        f"cannot tell the format of {path}: pass --dataset (one of the prepare datasets, "
        f"'{PREPARED}' for a prepared folder or '{JSONL}' for JSON lines of click events)")


def _first_object(path: Path) -> Any:
    with open(path, "r", encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.strip():
                try:
                    return json.loads(line)
                except ValueError:
                    return None
    return None


def load(input_path: str | Path, dataset: str = AUTO, session_gap_minutes: float = 30.0) -> LoadedLog:
    """Read and validate a click log; raises ClickscoreError for an unusable input."""
    path = Path(input_path).expanduser()
    if not path.exists():
        raise ClickscoreError(f"--input {path} does not exist")
    if dataset == AUTO:
        dataset = detect_format(path)
    if dataset == JSONL:
        return _load_json_lines(path)
    if dataset == PREPARED:
        events_file = path / "events.parquet" if path.is_dir() else path
        if not events_file.is_file():
            raise ClickscoreError(f"--dataset prepared: {events_file} not found (run `clickscore prepare`)")
        return _load_table(path, PREPARED, _read_parquet(events_file), header_lines=None)
    if dataset == "canonical" and path.is_file() and path.suffix.lower() in (".parquet", ".csv"):
        # Read canonical files ourselves so rows keep their file positions for the report.
        if path.suffix.lower() == ".parquet":
            return _load_table(path, dataset, _read_parquet(path), header_lines=None)
        import polars as pl
        try:
            frame = pl.read_csv(path, infer_schema=False)   # all strings: validation decides
        except Exception as exc:   # polars raises several error types for a broken CSV
            raise ClickscoreError(f"cannot read {path} as CSV: {exc}") from None
        return _load_table(path, dataset, frame, header_lines=1)
    if dataset == "canonical" and path.is_file() and path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        return _load_json_lines(path)
    try:
        from training.readers import read
    except ImportError as exc:
        raise ClickscoreError(f"--dataset {dataset} needs training.readers, which is not installed ({exc})") from None
    frame, _published_split = read(dataset, path, session_gap_minutes)
    return _load_table(path, dataset, frame, header_lines=None)


def _read_parquet(path: Path):
    import polars as pl
    try:
        return pl.read_parquet(path)
    except Exception as exc:   # polars/arrow raise several error types for a broken file
        raise ClickscoreError(f"cannot read {path} as Parquet: {exc}") from None


def _load_json_lines(path: Path) -> LoadedLog:
    log = LoadedLog(dataset=JSONL, events=[], position_kind="line")
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                log.events.append((number, decode(raw.rstrip(b"\r\n"))))
            except InvalidEvent as exc:
                log.reject(number, exc)
    return log


def _load_table(path: Path, dataset: str, frame, header_lines: int | None) -> LoadedLog:
    """Validate every row of a frame; positions are file lines for CSV, else 1-based rows."""
    kind = "line" if header_lines is not None else "row"
    first = 1 + (header_lines or 0)
    log = LoadedLog(dataset=dataset, events=[], position_kind=kind)
    columns = [name for name in frame.columns
               if name in ("session_id", "event_type", "item_id", "timestamp",
                           "category_id", "price", "user_id", "event_id")]
    missing = {"session_id", "event_type", "item_id", "timestamp"} - set(columns)
    if missing:
        raise ClickscoreError(
            f"{path} lacks the columns {sorted(missing)} of a canonical click log; "
            "pass --dataset for a public dataset's own layout")
    numeric = {"timestamp": _to_int, "price": _to_float} if header_lines is not None else {}
    for number, row in enumerate(frame.select(columns).iter_rows(named=True), start=first):
        try:
            for name, convert in numeric.items():
                row[name] = convert(name, row.get(name))
            if isinstance(row.get("price"), float) and row["price"] != row["price"]:
                row["price"] = None      # NaN is how some writers spell a missing price
            log.events.append((number, validate(row)))
        except InvalidEvent as exc:
            log.reject(number, exc)
    return log


def _to_int(name: str, value: Any) -> Any:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        return value     # an ISO-8601 string; validate() parses or rejects it


def _to_float(name: str, value: Any) -> Any:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except ValueError:
        raise InvalidEvent("wrong_type", f"{name} {value[:40]!r} is not a number") from None


def select(events: list[tuple[int, ClickEvent]], start_ms: int | None = None, end_ms: int | None = None,
           skip: int = 0, limit: int | None = None) -> list[ClickEvent]:
    """Event-time order (stable), then [start_ms, end_ms), then drop `skip`, keep `limit`."""
    ordered = sorted((event for _, event in events), key=lambda event: event.timestamp)
    if start_ms is not None or end_ms is not None:
        low = start_ms if start_ms is not None else -1
        high = end_ms if end_ms is not None else float("inf")
        ordered = [event for event in ordered if low <= event.timestamp < high]
    ordered = ordered[skip:]
    return ordered if limit is None else ordered[:limit]


# --------------------------------------------------------------------------- pacing

def schedule(events: Iterable[ClickEvent], speed: float | None, rate: float | None,
             max_gap_s: float | None) -> Iterator[float]:
    """Seconds after the start at which each event is due (all 0 with no speed and no rate)."""
    interval = 1.0 / rate if rate else 0.0
    speed_offset = 0.0     # where the speed schedule alone puts the event
    due = None
    previous_ms = None
    for event in events:
        if speed is not None and previous_ms is not None:
            gap = max(0, event.timestamp - previous_ms) / 1000.0 / speed
            if max_gap_s is not None:
                gap = min(gap, max_gap_s)
            speed_offset += gap
        previous_ms = event.timestamp
        # The rate cap only ever delays: a capped stretch is not caught up by a burst.
        due = speed_offset if due is None else max(speed_offset, due + interval)
        yield due


# --------------------------------------------------------------------------- producing

def ensure_topic(settings: Settings, topic: str, partitions: int, replication_factor: int = 1) -> bool:
    """Create `topic` if it does not exist; True when this call created it."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError
    try:
        admin = KafkaAdminClient(bootstrap_servers=settings.broker, client_id="clickscore-replay",
                                 **settings.kafka_security())
    except KafkaError as exc:
        raise ClickscoreError(f"cannot reach the broker at --broker {settings.broker}: {exc}") from None
    try:
        if topic in admin.list_topics():
            return False
        admin.create_topics([NewTopic(topic, partitions, replication_factor)])
        return True
    except TopicAlreadyExistsError:
        return False     # created by someone else meanwhile
    finally:
        admin.close()


def make_producer(settings: Settings, linger_ms: int = 5, batch_bytes: int = 65536,
                  retries: int = 5, delivery_timeout_ms: int = 30000):
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    from stream.kafka_compat import producer_compression, require_codecs
    require_codecs("kafka-python", [settings.compression_type])
    try:
        return KafkaProducer(
            bootstrap_servers=settings.broker,
            client_id="clickscore-replay",
            acks="all",
            # Tansu (the embedded broker) rejects idempotent producers; on real Kafka the
            # replay is at-least-once anyway (a resumed replay may repeat events).
            enable_idempotence=False,
            # Retries with up to 5 batches in flight could reorder a session's events.
            max_in_flight_requests_per_connection=1,
            linger_ms=linger_ms,
            batch_size=batch_bytes,
            retries=retries,
            # Kafka requires delivery.timeout.ms >= linger.ms + request.timeout.ms.
            delivery_timeout_ms=linger_ms + max(delivery_timeout_ms - linger_ms, 1000),
            request_timeout_ms=max(delivery_timeout_ms - linger_ms, 1000),
            # A dead broker must surface as failed sends, not as a replay stuck in send().
            max_block_ms=delivery_timeout_ms,
            compression_type=producer_compression(settings.compression_type),
            **settings.kafka_security(),
        )
    except KafkaError as exc:
        raise ClickscoreError(f"cannot reach the broker at --broker {settings.broker}: {exc}") from None


class _Deliveries:
    """Acknowledgements and failures, counted from the producer's I/O thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acked = 0
        self.failed = 0
        self.examples: list[dict] = []

    def ok(self, _metadata: Any) -> None:
        with self.lock:
            self.acked += 1

    def failure(self, event: ClickEvent, error: BaseException) -> None:
        with self.lock:
            self.failed += 1
            if len(self.examples) < EXAMPLES:
                self.examples.append({"event": event.to_dict(), "error": f"{type(error).__name__}: {error}"})


_WIRE_FIELDS = tuple(f.name for f in fields(ClickEvent))


def wire_json(event: ClickEvent) -> bytes:
    """ClickEvent.to_json() without dataclasses.asdict, whose deep copy cost ~9 us an event
    (half of the replay's time per event); same bytes, checked by the tests."""
    return json.dumps({name: value for name in _WIRE_FIELDS
                       if (value := getattr(event, name)) is not None},
                      separators=(",", ":")).encode()


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def replay(input_path: str | Path, topic: str = "clicks", *, settings: Settings | None = None,
           dataset: str = AUTO, session_gap_minutes: float = 30.0,
           speed: float | None = None, rate: float | None = None, max_gap_s: float | None = None,
           restamp: bool = False, start_ms: int | None = None, end_ms: int | None = None,
           skip: int = 0, limit: int | None = None, partitions: int | None = None,
           replication_factor: int = 1, create_topic: bool = True,
           linger_ms: int = 5, batch_bytes: int = 65536, retries: int = 5,
           delivery_timeout_ms: int = 30000, flush_timeout_s: float = 60.0,
           progress: bool = True, record_send_times: bool = False,
           stop: threading.Event | None = None,
           on_sent: Callable[[ClickEvent], None] | None = None) -> dict[str, Any]:
    """Replay a log into `topic`; returns the summary (see `format_summary`).

    speed None = as fast as the broker takes it; rate None = no cap. `stop` ends the
    replay early (the summary says how many were sent; resume with skip=sent).
    record_send_times adds `send_times`, the monotonic clock at each send, for
    measuring the rate from the producer's side.
    """
    settings = settings or Settings()
    log = load(input_path, dataset, session_gap_minutes)
    selected = select(log.events, start_ms, end_ms, skip, limit)
    matching = len(selected)
    if create_topic:
        ensure_topic(settings, topic, partitions or settings.partitions, replication_factor)
    producer = make_producer(settings, linger_ms, batch_bytes, retries, delivery_timeout_ms)
    deliveries = _Deliveries()
    send_times: list[float] = []
    sessions: set[str] = set()
    bar = None
    if progress:
        from tqdm import tqdm
        # disable=None: a bar (rate, ETA) on a terminal, nothing in a log; the summary says the rest.
        bar = tqdm(total=matching, unit="ev", unit_scale=True, desc=f"replay -> {topic}",
                   file=sys.stderr, dynamic_ncols=True, mininterval=0.5, disable=None)
    from kafka.errors import KafkaError

    sent_calls = 0
    first_send = last_send = None
    stopped = False
    start = time.monotonic()
    wall_start_ms = time.time() * 1000.0
    paced = speed is not None or rate is not None
    try:
        for event, due in zip(selected, schedule(selected, speed, rate, max_gap_s)):
            if stop is not None and stop.is_set():
                stopped = True
                break
            wait = due - (time.monotonic() - start)
            if wait > 0:
                if stop is not None:
                    if stop.wait(wait):   # a stop ends a long gap at once
                        stopped = True
                        break
                else:
                    time.sleep(wait)
            if restamp:
                stamp = wall_start_ms + due * 1000.0 if paced else time.time() * 1000.0
                event = _restamped(event, int(round(stamp)))
            now = time.monotonic()
            if first_send is None:
                first_send = now
            last_send = now
            if record_send_times:
                send_times.append(now)
            try:
                future = producer.send(topic, key=event.session_id.encode(), value=wire_json(event))
            except KafkaError as exc:   # buffer full past max_block_ms, message too large, ...
                deliveries.failure(event, exc)
            else:
                future.add_callback(deliveries.ok)
                future.add_errback(lambda exc, event=event: deliveries.failure(event, exc))
            sent_calls += 1
            sessions.add(event.session_id)
            if on_sent is not None:
                on_sent(event)
            if bar is not None:
                bar.update(1)
    except KeyboardInterrupt:
        stopped = True
    finally:
        # Stopping on a signal: what is still unacknowledged when the stop deadline
        # nears is reported as failed, not waited for (stream/lifecycle.py).
        from stream import lifecycle
        flush_timeout_s = min(flush_timeout_s, max(0.1, lifecycle.remaining_s(flush_timeout_s) - 4.0))
        try:
            producer.flush(timeout=flush_timeout_s)
        except KafkaError:
            pass    # counted below as not acknowledged
        try:
            producer.close(timeout=min(5.0, max(0.1, lifecycle.remaining_s(5.0) - 3.0)))
        except KafkaError:
            pass    # close flushes again and raises when the broker is gone: already counted
        if bar is not None:
            bar.close()
    with deliveries.lock:
        unanswered = sent_calls - deliveries.acked - deliveries.failed
        summary: dict[str, Any] = {
            "topic": topic,
            "input": str(input_path),
            "dataset": log.dataset,
            "read": len(log.events) + log.malformed,
            "malformed": log.malformed,
            "malformed_examples": list(log.malformed_examples),
            "selected": matching,
            "skipped": skip,
            "sent": deliveries.acked,
            "failed": deliveries.failed + unanswered,
            "failures": list(deliveries.examples),
            "sessions": len(sessions),
            "first_event": _iso(selected[0].timestamp) if selected else None,
            "last_event": _iso(selected[sent_calls - 1].timestamp) if sent_calls else None,
            "elapsed_s": round(time.monotonic() - start, 3),
            "rate_eps": None,
            "speed": "max" if speed is None else speed,
            "rate_cap_eps": rate,
            "max_gap_s": max_gap_s,
            "restamped": restamp,
            "stopped_early": stopped,
        }
    if unanswered and len(summary["failures"]) < EXAMPLES:
        summary["failures"].append({"event": None, "error": f"{unanswered} sends not acknowledged "
                                                            f"within the flush timeout of {flush_timeout_s:.1f} s"})
    if sent_calls > 1 and last_send > first_send:
        # n events span n-1 intervals from the first send to the last.
        summary["rate_eps"] = round((sent_calls - 1) / (last_send - first_send), 1)
    if record_send_times:
        summary["send_times"] = send_times
    return summary


def _restamped(event: ClickEvent, timestamp_ms: int) -> ClickEvent:
    from dataclasses import replace
    return replace(event, timestamp=timestamp_ms)


def format_summary(summary: dict[str, Any]) -> str:
    kind = "line"
    lines = [
        f"replayed {summary['sent']:,} of {summary['selected']:,} selected events "
        f"({summary['sessions']:,} sessions) into {summary['topic']} in {summary['elapsed_s']:.1f} s"
        + (f", {summary['rate_eps']:,.0f} events/s" if summary["rate_eps"] else ""),
        f"  input {summary['input']} ({summary['dataset']}): {summary['read']:,} events read, "
        f"{summary['malformed']:,} malformed (not sent), {summary['skipped']:,} skipped by --skip",
        f"  speed {summary['speed']}, rate cap {summary['rate_cap_eps'] or 'none'}, "
        f"restamped {'yes' if summary['restamped'] else 'no'}; event time {summary['first_event']} .. "
        f"{summary['last_event']}",
    ]
    for example in summary["malformed_examples"]:
        kind = "line" if "line" in example else "row"
        lines.append(f"  malformed {kind} {example[kind]}: {example['reason']}: {example['detail']}")
    if summary["malformed"] > len(summary["malformed_examples"]):
        lines.append(f"  ... and {summary['malformed'] - len(summary['malformed_examples'])} more malformed")
    if summary["failed"]:
        lines.append(f"  FAILED: {summary['failed']:,} events were not delivered after retries")
        for failure in summary["failures"]:
            lines.append(f"  failed send: {failure['error']}; event {json.dumps(failure['event'])}")
    if summary["stopped_early"]:
        done = summary["skipped"] + summary["sent"]
        lines.append(f"  stopped early: resume with --skip {done} (same --input, --from, --to)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """`clickscore replay`. SIGTERM, SIGINT or SIGHUP stop it after the current send:
    it flushes what it sent (within the stop deadline), prints the summary with the
    count acknowledged and the --skip to resume with, and exits 0 (1 if a send failed)."""
    from stream import lifecycle
    settings = settings_from_args(args)
    stop = lifecycle.install()
    summary = replay(
        args.input, args.topic, settings=settings, dataset=args.dataset,
        session_gap_minutes=args.session_gap_minutes, speed=args.speed, rate=args.rate,
        max_gap_s=args.max_gap_s, restamp=args.restamp, start_ms=args.from_ms, end_ms=args.to_ms,
        skip=args.skip, limit=args.limit, partitions=args.partitions,
        replication_factor=args.replication_factor, linger_ms=args.linger_ms,
        batch_bytes=args.producer_batch_bytes, retries=args.retries,
        delivery_timeout_ms=args.delivery_timeout_ms, progress=args.progress, stop=stop)
    if args.json:
        print(json.dumps(summary))
    else:
        print(format_summary(summary))
    if summary["failed"]:
        print(f"clickscore replay: error: {summary['failed']} events failed to send "
              f"(see above); the topic is incomplete", file=sys.stderr)
        return 1
    return 0
