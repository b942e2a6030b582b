"""Table recovery reads the whole changelog: true end offsets for Faust's recovery.

Faust restores a table partition by reading its changelog up to the end offset the broker
reports (ListOffsets, `consumer.end_offsets`). The embedded broker reports a partition's
end as its *last batch's* start + 1 (../shared/docs/PLATFORM.md), so when the last write
to a changelog partition was a batch of several session values, recovery stopped after
the first of them: the sessions in the rest of that batch came back one or more events
old after a rebalance or restart, and their next events were scored on stale windows
(tests/test_worker.py's rebalance parity, the 2 -> 3 -> 2 scaling fault test).

The fix asks the log itself. For every partition whose reported end is above 0, a probe
consumer (no group) fetches from `end - 1`: the fetch returns that last batch whole, and
the true end is one past its last record (or the fetch's high watermark, whichever is
higher). On a broker that reports ends right (Kafka) the probe finds the same number.

    install(settings)     # once per worker process, before the app starts (stream/app.py)

Only PLAINTEXT connections are probed: with SASL/SSL the probe would need the worker's
credentials, and brokers run with security (Kafka) report their ends right.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Mapping

log = logging.getLogger("clickscore.worker")

PROBE_TIMEOUT_S = 5.0       # a probe that cannot finish keeps the reported ends (logged)
_installed = False


def true_end(reported: int, last_record_offset: int | None, fetch_highwater: int | None) -> int:
    """The end offset to recover up to: never below what the broker reported."""
    candidates = [reported]
    if last_record_offset is not None:
        candidates.append(last_record_offset + 1)
    if fetch_highwater is not None:
        candidates.append(fetch_highwater)
    return max(candidates)


async def probe_ends(bootstrap: str, reported: Mapping[Any, int],
                     timeout_s: float = PROBE_TIMEOUT_S) -> dict[Any, int]:
    """{tp: true end} for partitions given with their reported end (> 0). `tp` is any
    (topic, partition) pair; the result uses the same keys."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    wanted = {TopicPartition(tp[0], tp[1]): tp for tp, end in reported.items() if end > 0}
    ends = dict(reported)
    if not wanted:
        return ends
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                                fetch_max_wait_ms=10, request_timeout_ms=int(timeout_s * 1000) + 1000)
    last: dict[TopicPartition, int] = {}
    await consumer.start()
    try:
        consumer.assign(list(wanted))
        for tp in wanted:
            consumer.seek(tp, reported[wanted[tp]] - 1)
        deadline = time.monotonic() + timeout_s
        # One fetch that returns records per partition is enough: it starts at `end - 1`,
        # the first record of the last batch, and a fetch returns whole batches.
        while len(last) < len(wanted) and time.monotonic() < deadline:
            fetched = await consumer.getmany(timeout_ms=200)
            for tp, records in fetched.items():
                if records:
                    last[tp] = max(last.get(tp, -1), records[-1].offset)
        for tp, key in wanted.items():
            ends[key] = true_end(reported[key], last.get(tp), consumer.highwater(tp))
    finally:
        await consumer.stop()
    return ends


def install(settings: Any) -> None:
    """Make Faust's recovery read each changelog to its true end (PLAINTEXT brokers)."""
    global _installed
    if _installed or str(settings.security_protocol).upper() != "PLAINTEXT":
        return
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    original = AIOKafkaConsumerThread._highwaters
    bootstrap = settings.broker

    async def _highwaters(self, partitions):
        reported = await original(self, partitions)
        if self.consumer.in_transaction:
            return reported
        keyed = {(tp.topic, tp.partition): int(end) for tp, end in reported.items() if end is not None}
        try:
            ends = await asyncio.wait_for(probe_ends(bootstrap, keyed), PROBE_TIMEOUT_S + 5)
        except Exception as exc:   # the broker's own figure is still a usable lower bound
            log.warning("could not probe changelog end offsets (%s: %s); recovering to the reported ends",
                        type(exc).__name__, exc)
            return reported
        fixed = {tp: (ends.get((tp.topic, tp.partition), end) if end is not None else end)
                 for tp, end in reported.items()}
        moved = {f"{tp.topic}[{tp.partition}]": (reported[tp], fixed[tp]) for tp in reported
                 if fixed[tp] != reported[tp]}
        if moved:
            log.info("changelog ends the broker under-reported (reported -> true): %s", moved)
        return fixed

    AIOKafkaConsumerThread._highwaters = _highwaters
    _installed = True
