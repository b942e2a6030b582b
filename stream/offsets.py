"""Commit only what was scored: guards around Faust 0.15.3's offset bookkeeping.

    offsets.install(settings.input_topic)               # once, before the app starts
    healed = await offsets.heal_head_gaps(app.consumer, settings.input_topic, memory)   # on a timer

Why. The fault tests (tests/test_faults.py) lost events that never reached the agent:
Faust sometimes drops records it has fetched (around a rebalance or recovery), and two
pieces of its bookkeeping then commit past them, so no restart ever reads them again:
- `Consumer._add_gap` treats any jump in the offsets it reads as a gap in the log
  (compaction, transaction markers) and counts the skipped offsets as acked;
- `Consumer._new_offset` lets the first run of acked offsets start one past the
  committed offset (`min(acked) - committed > 1` where `>= 1` was meant) and does not
  check at all before the first commit, so records dropped at the very start of a
  partition were committed past by the first commit.
For the input topic this module turns both off: an offset is committed only when every
offset before it, from the committed one on, was acked by our agent (after its outputs
were delivered). A hole then holds the commit back instead of being skipped, and
`heal_head_gaps` (called by the worker's watchdog) seeks the partition back to its
committed offset so the missing records are fetched and scored again; the rest of what
follows is scored a second time (duplicates, never changed scores: the session state
is idempotent). A hole that is still there after SEEK_ATTEMPTS such re-reads is a real gap in
the log (a transaction marker, a compacted record): it is then accepted, as Faust
would have done.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("clickscore.offsets")

_guarded_topics: set[str] = set()


def install(input_topic: str) -> None:
    """Guard `input_topic`'s commits (idempotent; other topics keep Faust's behaviour)."""
    from faust.transport.consumer import Consumer

    _guarded_topics.add(input_topic)
    if getattr(Consumer, "_clickscore_guarded", False):
        return
    add_gap, new_offset = Consumer._add_gap, Consumer._new_offset

    async def _add_gap(self, tp, offset_from: int, offset_to: int) -> None:
        if tp.topic in _guarded_topics:
            return    # a jump is not proof of a gap in the log: heal_head_gaps decides
        await add_gap(self, tp, offset_from, offset_to)

    def _new_offset(self, tp):
        if tp.topic in _guarded_topics:
            acked = self._acked[tp]
            # Before the first commit the partition was read from its start: offset 0 on
            # a fresh topic (where retention removed a head, heal_head_gaps accepts it).
            if acked and min(acked) > start_offset(self._committed_offset[tp]):
                return None   # offsets from `committed` on were never acked: hold the commit
        return new_offset(self, tp)

    perform_seek = Consumer.perform_seek

    async def _perform_seek(self) -> None:
        await perform_seek(self)
        # From here Faust holds the committed offset of every assigned partition.
        known = self.__dict__.setdefault("_clickscore_known", set())
        known.update(self.assignment())

    Consumer._add_gap, Consumer._new_offset = _add_gap, _new_offset
    Consumer.perform_seek = _perform_seek
    Consumer._clickscore_guarded = True

    from aiokafka.consumer.fetcher import PartitionRecords

    from stream.kafka_compat import wraps_with
    if not wraps_with(PartitionRecords._unpack_records, "_clickscore_absent"):
        PartitionRecords._unpack_records = _record_absent(PartitionRecords._unpack_records)


def ack_absent(consumer: Any, tp: Any, start: int, end: int) -> None:
    """Count offsets the log has no record for as acked, so Faust's commit moves past them
    (what its own `_add_gap` did for every jump, verified ones only here)."""
    committed = start_offset(consumer._committed_offset.get(tp))
    index = consumer._acked_index[tp]
    missing = [o for o in range(max(start, committed), end) if o not in index]
    consumer._acked[tp].extend(missing)
    index.update(missing)


# -- offsets the log itself skips (transaction markers, aborted or compacted records) ----------

class AbsentOffsets:
    """Offset ranges [a, b) of the guarded input partitions that aiokafka's fetcher moved
    past without a record to hand over: the log has nothing deliverable there (a
    transaction's commit marker after every transaction of a transactional producer, an
    aborted batch under read_committed, a compacted record). Filled by the fetcher's
    thread (`install` wraps aiokafka's PartitionRecords), read by the agent's in-order
    guard and the commit watchdog on the event loop: a hole these ranges cover is a real
    gap, accepted at once, where a hole they do not cover means records were dropped after
    the fetch (Faust) and must be fetched again. Without it every marker held its
    partition for SEEK_ATTEMPTS x SEEK_PATIENCE_S."""

    KEEP = 4096    # ranges kept per partition (oldest out): far more than a fetch can leave pending

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ranges: dict[tuple[str, int], list[tuple[int, int]]] = {}

    def add(self, topic: str, partition: int, start: int, end: int) -> None:
        if end <= start:
            return
        with self._lock:
            ranges = self._ranges.setdefault((topic, partition), [])
            ranges.append((start, end))
            if len(ranges) > self.KEEP:
                del ranges[: len(ranges) - self.KEEP]

    def covers(self, topic: str, partition: int, start: int, end: int) -> bool:
        """Whether every offset in [start, end) lies in a recorded range."""
        if end <= start:
            return True
        with self._lock:
            ranges = sorted(self._ranges.get((topic, partition), ()))
        at = start
        for a, b in ranges:          # by start: once one starts past `at`, `at` is uncovered
            if a > at:
                break
            if b > at:
                at = b
                if at >= end:
                    return True
        return at >= end

    def clear(self) -> None:
        with self._lock:
            self._ranges.clear()


ABSENT = AbsentOffsets()


def _record_absent(unpack):
    """Wrap aiokafka's PartitionRecords._unpack_records: note [expected, offset) before each
    record handed over past the next expected offset, and the tail the fetcher moved past
    after the last one, for the guarded topics."""
    def wrapped(self):
        tp = self._tp
        if tp.topic not in _guarded_topics:
            yield from unpack(self)
            return
        expected = self.next_fetch_offset            # the fetch offset, before any batch is read
        for record in unpack(self):
            if record.offset > expected:
                ABSENT.add(tp.topic, tp.partition, expected, record.offset)
            expected = record.offset + 1
            yield record
        ABSENT.add(tp.topic, tp.partition, expected, self.next_fetch_offset)
    wrapped.__wrapped__ = unpack
    wrapped._clickscore_absent = True
    return wrapped


def start_offset(committed: int | None) -> int:
    """The first offset the agent must ack: the committed one, or the partition's start
    (0) when nothing was committed yet (Faust keeps None, or -1 from the broker)."""
    return committed if committed is not None and committed > 0 else 0


@dataclass
class GapMemory:
    """Per partition: the committed offset a hole was first seen at, the one we sought
    back to, and how many times."""
    seen: dict[int, int] = field(default_factory=dict)
    sought: dict[int, int] = field(default_factory=dict)
    attempts: dict[int, int] = field(default_factory=dict)   # seeks to that committed offset so far


def head_gap(consumer: Any, tp: Any) -> tuple[int, int] | None:
    """(committed, first acked) when acked offsets exist past a hole after the committed
    offset, else None."""
    acked = consumer._acked.get(tp) if hasattr(consumer._acked, "get") else consumer._acked[tp]
    committed = start_offset(consumer._committed_offset.get(tp))
    if not acked:
        return None
    first = min(acked)
    return (committed, first) if first > committed else None


async def heal_head_gaps(consumer: Any, input_topic: str, memory: GapMemory) -> list[str]:
    """Seek partitions whose commit is held back by a hole (seen on two calls in a row)
    back to the committed offset; accept a hole that survived SEEK_ATTEMPTS re-reads (one
    was not always enough, see SEEK_ATTEMPTS). Returns what was done, for the log."""
    done = []
    for tp in list(consumer.assignment()):
        if tp.topic != input_topic:
            continue
        gap = head_gap(consumer, tp)
        if gap is None:
            memory.seen.pop(tp.partition, None)
            continue
        committed, first = gap
        if ABSENT.covers(tp.topic, tp.partition, committed, first):
            ack_absent(consumer, tp, committed, first)     # the log has nothing there (markers)
            memory.seen.pop(tp.partition, None)
            continue
        if memory.seen.get(tp.partition) != committed:
            memory.seen[tp.partition] = committed    # first sighting: give it one more interval
            continue
        tries = memory.attempts.get(tp.partition, 0) if memory.sought.get(tp.partition) == committed else 0
        if tries >= SEEK_ATTEMPTS:
            # Re-read SEEK_ATTEMPTS times and still missing: the log has no records there.
            acked = consumer._acked[tp]
            missing = [o for o in range(committed, first) if o not in consumer._acked_index[tp]]
            acked.extend(missing)
            consumer._acked_index[tp].update(missing)
            memory.sought.pop(tp.partition, None)
            memory.attempts.pop(tp.partition, None)
            done.append(f"partition {tp.partition}: offsets {committed}..{first - 1} absent after "
                        f"{SEEK_ATTEMPTS} re-reads, accepted as a gap in the log")
        else:
            await consumer.seek(tp, committed)
            memory.sought[tp.partition] = committed
            memory.attempts[tp.partition] = tries + 1
            done.append(f"partition {tp.partition}: offsets {committed}..{first - 1} never reached the "
                        "agent; sought back to the committed offset to score them")
        memory.seen.pop(tp.partition, None)
    return done


# -- in-order guard (the agent's side) -------------------------------------------------------

SEEK_PATIENCE_S = 5.0   # how long records past a hole are held back after seeking to it
# Seeks to a hole before it is accepted as a real gap in the log. One was not enough: in
# the scaling test (2026-12-02) a fetch from before the seek landed after it, Faust's read
# offset jumped past the hole and the re-read records were dropped as already read; after
# one patience 981..1308 was "accepted as a gap" and those events later came back as
# re-deliveries the state could not replay. A second seek, with no stale fetch in flight,
# fetches them. A real gap (a transaction marker) costs ATTEMPTS x PATIENCE once.
SEEK_ATTEMPTS = 3

# `committed_of(partition)` answers UNKNOWN while Faust has not filled in the partition's
# committed offset yet: after an assignment its fetcher can hand records to the agent
# before `perform_seek` has stored the offsets it sought to (seen in the worker logs of
# tests/test_worker.py and test_faults.py). Treating that as "nothing committed" sought
# the partition back to offset 0 and re-read all of it.
UNKNOWN = object()


def committed_in(consumer: Any, tp: Any) -> Any:
    """The committed offset Faust holds for `tp` (None: nothing or 0 committed), or UNKNOWN
    between the partition's assignment and the end of Faust's seek to the committed
    offsets (`install` marks it known there; `forget_committed` on revocation). Not the
    presence of a key in Faust's table: its defaultdict gains a None on any read."""
    if tp not in consumer.__dict__.get("_clickscore_known", ()):
        return UNKNOWN
    return consumer._committed_offset.get(tp)


def forget_committed(consumer: Any, tps) -> None:
    """Revoked partitions: their committed offsets are unknown until the next seek."""
    consumer.__dict__.get("_clickscore_known", set()).difference_update(tps)


@dataclass
class OrderGuard:
    """Per partition: the next offset the agent must score, and a pending seek back to a
    hole as (offset, deadline). A record past a hole must not be scored before the ones
    missing (a session's state would skip an event and every later score would differ)."""
    next_offset: dict[int, int] = field(default_factory=dict)
    sought: dict[int, tuple[int, float]] = field(default_factory=dict)
    attempts: dict[int, int] = field(default_factory=dict)    # seeks to the pending hole so far

    def forget(self, partitions) -> None:
        """A revoked partition: what this worker scored on it says nothing about where
        its next owner (or this worker, given it back) must start."""
        for partition in partitions:
            self.next_offset.pop(partition, None)
            self.sought.pop(partition, None)
            self.attempts.pop(partition, None)


@dataclass
class InOrder:
    """split_in_order's answer: indices of the records to score now, of those already
    committed (re-delivered below the committed offset: every output of theirs was
    delivered before the commit, so they are acked without scoring), and the partitions
    to seek back to {partition: offset}. The rest are held: left unacked, fetched again."""
    keep: list[int] = field(default_factory=list)
    committed: list[int] = field(default_factory=list)
    seek: dict[int, int] = field(default_factory=dict)
    gaps: list[tuple[int, int, int]] = field(default_factory=list)   # (partition, start, end) skipped by the log


def split_in_order(records: list, committed_of, guard: OrderGuard, now: float,
                   absent: Callable[[int, int, int], bool] | None = None) -> InOrder:
    """Which records to score now, which are already done, where to seek.

    A record whose offset is past the next expected one (the larger of what this worker
    scored last + 1 and the committed offset) means records before it never reached the
    agent: it and the rest of its partition in this batch are held back (left unacked)
    and the partition is sought back to the hole. Records below the committed offset were
    scored and delivered before the commit: acked, not scored again. Records from the
    committed offset up to the expected one are scored (re-deliveries are replayed from
    the state). A hole still there SEEK_PATIENCE_S after each of SEEK_ATTEMPTS seeks is a
    real gap in the log and is accepted. While the committed offset is UNKNOWN (just assigned) and this
    worker has scored nothing on the partition, its records are held and fetched again
    from the first of them; after SEEK_PATIENCE_S they are scored from there.
    `absent(partition, start, end)` (AbsentOffsets.covers) says whether the log itself has
    no record in [start, end): such a hole (a transaction marker) is passed at once and
    reported in `gaps` (for ack_absent)."""
    out = InOrder()
    held: set[int] = set()
    for index, record in enumerate(records):
        partition = record.partition
        if partition in held:
            continue
        committed = committed_of(partition)
        if committed is UNKNOWN:
            if partition not in guard.next_offset:
                pending = guard.sought.get(partition)
                if pending is None:
                    guard.sought[partition] = (record.offset, now + SEEK_PATIENCE_S)
                    out.seek[partition] = record.offset
                    held.add(partition)
                    continue
                if now < pending[1]:
                    held.add(partition)
                    continue
                log.warning("partition %d: committed offset still unknown after %.0f s; scoring from offset %d",
                            partition, SEEK_PATIENCE_S, record.offset)
                guard.next_offset[partition] = record.offset
            committed = None
        elif committed is not None and committed > 0 and record.offset < committed:
            out.committed.append(index)
            continue
        expected = max(guard.next_offset.get(partition, 0), start_offset(committed))
        if record.offset > expected and absent is not None and absent(partition, expected, record.offset):
            out.gaps.append((partition, expected, record.offset))
            expected = record.offset
        if record.offset > expected:
            pending = guard.sought.get(partition)
            if pending is None or pending[0] != expected:
                guard.sought[partition] = (expected, now + SEEK_PATIENCE_S)
                guard.attempts[partition] = 1
                out.seek[partition] = expected
                held.add(partition)
                continue
            if now < pending[1]:
                held.add(partition)     # still waiting for the re-read
                continue
            if guard.attempts.get(partition, 1) < SEEK_ATTEMPTS:
                guard.sought[partition] = (expected, now + SEEK_PATIENCE_S)   # seek again
                guard.attempts[partition] = guard.attempts.get(partition, 1) + 1
                out.seek[partition] = expected
                held.add(partition)
                continue
            log.warning("partition %d: offsets %d..%d absent after %d re-reads, accepted as a gap in the log",
                        partition, expected, record.offset - 1, SEEK_ATTEMPTS)
        if record.offset >= expected:
            guard.sought.pop(partition, None)
            guard.attempts.pop(partition, None)
        out.keep.append(index)
        guard.next_offset[partition] = max(guard.next_offset.get(partition, 0), record.offset + 1)
    return out
