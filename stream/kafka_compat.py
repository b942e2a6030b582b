"""Kafka compression codecs: read all four Kafka defines, produce with the one chosen,
and stop loudly on a record batch the worker cannot decompress.

    from stream import kafka_compat
    kafka_compat.install(app, settings)        # stream/app.py build_app, once per worker
    kafka_compat.require_codecs("kafka-python", ["zstd"])   # before a kafka-python producer
    send_all = kafka_compat.batch_sender(lambda: app.producer)   # pipeline.deliver: a batch per topic-partition

Why this module exists:
- Producers in Java, Go and librdkafka commonly compress with lz4, snappy or zstd.
  aiokafka (the worker's and the sink's client) reads those only when `cramjam` is
  installed, kafka-python (replay, the test readers) only with `python-snappy`, `lz4`
  and `zstandard`; all are ordinary dependencies in pyproject.toml. Without them the
  worker's first compressed batch raised UnsupportedCodecError inside Faust's fetcher,
  Faust crashed, and not one event of the topic was scored. `require_codecs` turns a
  missing library into one line at start-up instead.
- A batch that still cannot be read (a codec id newer than this aiokafka, a payload
  that does not decompress) is raised by aiokafka deep in the fetcher, with no topic,
  partition or offset, and Faust's crash report does not name them either. Skipping
  the batch would silently drop events, so the worker stops: `guard_fetcher` wraps
  aiokafka's batch iterator to name codec, topic, partition and offset in the log and
  in `clickscore_unreadable_batches_total` (held METRICS_GRACE_S for a scrape to see it),
  then Faust stops and the process exits with status 65 (EX_DATAERR).
  A restarted worker resumes from the committed offset, so nothing is lost once the
  producer or this install is fixed.
"""
from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from stream.errors import ClickscoreError

log = logging.getLogger("clickscore.kafka")

# Kafka's codec ids (the low three bits of a record batch's attributes).
CODEC_NAMES = {0: "none", 1: "gzip", 2: "snappy", 3: "lz4", 4: "zstd"}
COMPRESSION_TYPES = tuple(CODEC_NAMES.values())
COMPRESSED = COMPRESSION_TYPES[1:]
# The package that gives each client the codec (gzip is in the standard library).
CODEC_PACKAGES = {
    "aiokafka": {"snappy": "cramjam", "lz4": "cramjam", "zstd": "cramjam"},
    "kafka-python": {"snappy": "python-snappy", "lz4": "lz4", "zstd": "zstandard"},
}
EXIT_UNREADABLE_BATCH = 65    # sysexits EX_DATAERR: the input cannot be read
# Held before stopping, so a scrape (every 5 s in deploy/prometheus.yml) sees the counter.
METRICS_GRACE_S = 6.0
STOP_GRACE_S = 30.0           # then exit even if Faust's shutdown hangs


def codec_name(codec_id: int) -> str:
    if codec_id < 0:
        return "unknown"
    return CODEC_NAMES.get(codec_id, f"unknown (id {codec_id})")


def producer_compression(compression_type: str) -> str | None:
    """The clients' spelling: None means uncompressed for aiokafka, Faust and kafka-python."""
    return None if compression_type == "none" else compression_type


def _has_codec(client: str) -> Callable[[str], bool]:
    if client == "aiokafka":
        from aiokafka import codec
    elif client == "kafka-python":
        from kafka import codec
    else:
        raise ValueError(f"unknown client {client!r}")
    return lambda name: getattr(codec, f"has_{name}")()


def missing_codecs(client: str, codecs: Iterable[str] = COMPRESSED) -> list[str]:
    """The codecs among `codecs` that `client` ('aiokafka' or 'kafka-python') cannot
    compress or decompress in this environment."""
    has = _has_codec(client)
    return [name for name in codecs if name != "none" and not has(name)]


def require_codecs(client: str, codecs: Iterable[str] = COMPRESSED) -> None:
    """Fail at once, naming the package to install, if `client` lacks one of `codecs`."""
    missing = missing_codecs(client, codecs)
    if missing:
        packages = sorted({CODEC_PACKAGES[client][name] for name in missing})
        raise ClickscoreError(
            f"{client} cannot read or write {', '.join(missing)} record batches here: install "
            f"{' '.join(packages)} (pip install {' '.join(packages)}; they are clickscore dependencies)")


# -- reading: a batch that cannot be decompressed ----------------------------------------

@dataclass(frozen=True)
class UnreadableBatch:
    """A record batch the consumer could not decompress, and where it is."""
    topic: str
    partition: int
    offset: int          # the batch's base offset: the first event not consumed
    codec_id: int
    detail: str          # the client's own error

    @property
    def codec(self) -> str:
        return codec_name(self.codec_id)

    def message(self) -> str:
        return (f"cannot read the record batch at topic {self.topic} partition {self.partition} "
                f"offset {self.offset}: compression codec {self.codec} ({self.detail}). "
                f"Stopping so that no event is skipped: have the producer use one of "
                f"{', '.join(COMPRESSION_TYPES)}, or install the codec's library, then restart "
                f"(the worker resumes from the last committed offset)")


def _unsupported_codec_error() -> type[Exception]:
    from aiokafka.errors import UnsupportedCodecError
    return UnsupportedCodecError


class _LastBatch:
    """A MemoryRecords that remembers the batch it handed out last."""

    def __init__(self, records: Any) -> None:
        self._records = records
        self.last: Any = None

    def has_next(self) -> bool:
        return self._records.has_next()

    def next_batch(self) -> Any:
        self.last = self._records.next_batch()
        return self.last

    def __getattr__(self, name: str) -> Any:
        return getattr(self._records, name)


_on_unreadable: Callable[[UnreadableBatch], None] | None = None


def wraps_with(function: Any, marker: str) -> bool:
    """Whether `marker` is set on `function` or on any layer below it (`__wrapped__`):
    aiokafka's PartitionRecords._unpack_records carries several wrappers (this module's
    codec guard, stream/offsets.py's absent-offset recorder), each installed once."""
    while function is not None:
        if getattr(function, marker, False):
            return True
        function = getattr(function, "__wrapped__", None)
    return False


def guard_fetcher(on_unreadable: Callable[[UnreadableBatch], None]) -> None:
    """Wrap aiokafka's PartitionRecords so a batch it cannot decompress raises
    UnsupportedCodecError naming codec, topic, partition and offset, after calling
    `on_unreadable` with them. Idempotent (the latest handler wins); keeps the wrappers
    others put there."""
    from aiokafka.consumer.fetcher import PartitionRecords
    from aiokafka.errors import KafkaError

    global _on_unreadable
    _on_unreadable = on_unreadable
    if wraps_with(PartitionRecords._unpack_records, "_clickscore_codec_guard"):
        return
    unsupported = _unsupported_codec_error()
    original = PartitionRecords._unpack_records

    def _unpack_records(self):
        tracker = _LastBatch(self._records)
        self._records = tracker     # read by `original` when the generator first runs
        try:
            yield from original(self)
        except Exception as exc:
            batch = tracker.last
            if batch is None:     # failed before any batch: not a codec problem
                raise
            codec_id = getattr(batch, "compression_type", -1)   # -1: a legacy (v0/v1) message set
            # Unsupported codec: always ours. Anything else counts only on a compressed
            # batch (a failed decompression); CRC and protocol errors keep aiokafka's handling.
            if not isinstance(exc, unsupported) and (codec_id <= 0 or isinstance(exc, KafkaError)):
                raise
            offset = getattr(batch, "base_offset", self.next_fetch_offset)
            unreadable = UnreadableBatch(self._tp.topic, self._tp.partition, offset,
                                         codec_id, f"{type(exc).__name__}: {exc}")
            if _on_unreadable is not None:
                _on_unreadable(unreadable)
            raise unsupported(unreadable.message()) from exc

    _unpack_records.__wrapped__ = original
    _unpack_records._clickscore_codec_guard = True
    PartitionRecords._unpack_records = _unpack_records


_stopping = threading.Event()


def stop_worker(unreadable: UnreadableBatch) -> None:
    """The worker's handler: count, log, and make the process exit non-zero once Faust
    (which crashes on the error raised next) has stopped."""
    from stream import metrics

    metrics.UNREADABLE_BATCHES.labels(topic=unreadable.topic, partition=str(unreadable.partition),
                                      codec=unreadable.codec).inc()
    log.critical("%s", unreadable.message())
    if _stopping.is_set():
        return
    _stopping.set()
    # Faust ends a crashed worker with status 1 like any other crash; 65 tells a supervisor
    # that restarting alone will not help. The timer covers a shutdown that hangs.
    atexit.register(_exit_unreadable)
    timer = threading.Timer(METRICS_GRACE_S + STOP_GRACE_S, _exit_unreadable)
    timer.daemon = True
    timer.start()
    # This runs in the consumer's thread: holding it only holds fetching, while the
    # metrics server (its own thread) keeps serving the counter.
    time.sleep(METRICS_GRACE_S)


def _exit_unreadable() -> None:
    logging.shutdown()
    os._exit(EXIT_UNREADABLE_BATCH)


# -- batched sends --------------------------------------------------------------------------

def batch_sender(get_producer: Callable[[], Any]) -> Callable[[list], Any]:
    """`send_all(outputs)` for pipeline.deliver: a micro-batch's outputs (pipeline.Output)
    queued as one aiokafka record batch per topic-partition (`create_batch`/`send_batch`,
    public aiokafka API) instead of one `producer.send` per output; returns one delivery
    report per output, shared by the outputs of a batch.

    Why: per output, Faust's and aiokafka's send path (partitioner, accumulator, one future
    and one gather callback each) held ~9% of the saturated worker's event loop, plus loop
    overhead for the futures (docs/operations.md, "Where the latency goes"). Partitions come
    from Faust's own `producer.key_partition` (the same partitioner a plain send uses), so
    outputs land where they did. The aiokafka producer is reached through Faust 0.15.3's
    private `_ensure_producer()`; without it (another Faust) send_all raises and deliver
    sends output by output. `get_producer` is called at the first send, not before: reading
    `app.producer` while the app is being configured fixes its settings (compression)."""
    import asyncio

    from stream.pipeline import group_by_partition

    async def send_all(outputs: list) -> list:
        producer = get_producer()
        # The started aiokafka producer (Faust starts it with the app).
        aio = producer._ensure_producer()
        for topic in {out.topic for out in outputs}:
            await aio.partitions_for(topic)   # metadata for key_partition; at once when known
        groups = group_by_partition(outputs, lambda topic, key: producer.key_partition(topic, key).partition)
        reports: list = [None] * len(outputs)

        async def send_group(topic: str, partition: int, positions: list[int]) -> None:
            start = 0
            try:
                while start < len(positions):
                    # A builder refuses a record past the producer's batch size (an empty one
                    # takes any): the rest go in the next batch, queued after this one.
                    builder = aio.create_batch()
                    end = start
                    while end < len(positions):
                        out = outputs[positions[end]]
                        if builder.append(timestamp=None, key=out.key, value=out.value, headers=[]) is None:
                            break
                        end += 1
                    if end == start:
                        raise RuntimeError(f"an empty producer batch refused an output of {len(out.value)} bytes")
                    report = await aio.send_batch(builder, topic, partition=partition)
                    for position in positions[start:end]:
                        reports[position] = report
                    start = end
            except Exception as exc:   # these outputs were not queued: deliver sends them again, one by one
                failed = asyncio.get_running_loop().create_future()
                failed.set_exception(exc)
                for position in positions[start:]:
                    reports[position] = failed

        await asyncio.gather(*(send_group(topic, partition, positions)
                               for (topic, partition), positions in groups.items()))
        return reports
    return send_all


# -- the worker's one call ------------------------------------------------------------------

def install(app: Any, settings: Any) -> None:
    """Called from build_app: check the codecs, set the output compression, guard the fetcher."""
    require_codecs("aiokafka", COMPRESSED)
    app.conf.producer_compression_type = producer_compression(settings.compression_type)
    guard_fetcher(stop_worker)
