"""Commit guards (stream/offsets.py): a hole in the acked offsets holds the commit back,
the watchdog seeks back once, and a hole that survives a re-read is accepted."""
from __future__ import annotations

import asyncio
from collections import defaultdict

from faust.types import TP

from stream import offsets


class ConsumerState:
    """The four pieces of Faust 0.15.3's consumer bookkeeping that stream/offsets.py
    reads and writes, with Faust's own container types."""

    def __init__(self, tps, committed):
        self._acked = defaultdict(list)
        self._acked_index = defaultdict(set)
        self._committed_offset = defaultdict(lambda: None, committed)
        self._tps = tps
        self.seeks = []

    def assignment(self):
        return set(self._tps)

    async def seek(self, tp, offset):
        self.seeks.append((tp.partition, offset))

    def ack(self, tp, *offsets_):
        for o in offsets_:
            self._acked[tp].append(o)
            self._acked_index[tp].add(o)


def test_a_hole_after_the_committed_offset_is_sought_again_then_accepted():
    tp, other = TP("clicks", 0), TP("clicks", 1)
    consumer = ConsumerState([tp, other, TP("elsewhere", 0)], {tp: 10, other: 5})
    consumer.ack(tp, 12, 13, 14)          # 10 and 11 never reached the agent
    consumer.ack(other, 5, 6)             # no hole
    memory = offsets.GapMemory()
    run = lambda: asyncio.run(offsets.heal_head_gaps(consumer, "clicks", memory))  # noqa: E731
    assert offsets.head_gap(consumer, tp) == (10, 12) and offsets.head_gap(consumer, other) is None
    assert run() == [] and consumer.seeks == []           # first sighting: wait one interval
    for attempt in range(1, offsets.SEEK_ATTEMPTS + 1):
        actions = run()
        assert consumer.seeks == [(0, 10)] * attempt and "sought back" in actions[0]
        assert run() == []                                # re-read under way: seen afresh
    actions = run()                                       # still missing after every re-read
    assert "accepted as a gap" in actions[0] and memory.attempts == {}
    assert sorted(consumer._acked[tp]) == [10, 11, 12, 13, 14] and len(consumer.seeks) == offsets.SEEK_ATTEMPTS


def test_a_hole_filled_by_the_re_read_is_forgotten():
    tp = TP("clicks", 0)
    consumer = ConsumerState([tp], {tp: 3})
    consumer.ack(tp, 5)
    memory = offsets.GapMemory()
    asyncio.run(offsets.heal_head_gaps(consumer, "clicks", memory))
    asyncio.run(offsets.heal_head_gaps(consumer, "clicks", memory))
    assert consumer.seeks == [(0, 3)]
    consumer.ack(tp, 3, 4)                                # the re-read scored them
    assert offsets.head_gap(consumer, tp) is None
    assert asyncio.run(offsets.heal_head_gaps(consumer, "clicks", memory)) == []
    assert memory.seen == {}


def test_installed_guards_hold_the_commit_at_a_hole_for_the_input_topic_only():
    from faust.transport.consumer import Consumer

    offsets.install("clicks")
    tp, elsewhere = TP("clicks", 0), TP("elsewhere", 0)
    state = ConsumerState([tp, elsewhere], {tp: 10, elsewhere: 10})
    state._gap = defaultdict(lambda: None)
    state.ack(tp, 11, 12)
    assert Consumer._new_offset(state, tp) is None        # Faust alone would commit 13
    state.ack(tp, 10)
    assert Consumer._new_offset(state, tp) == 13
    asyncio.run(Consumer._add_gap(state, tp, 20, 25))     # a jump is not taken as a gap
    assert 20 not in state._acked[tp]


def test_before_the_first_commit_the_partition_start_counts_as_committed():
    from faust.transport.consumer import Consumer

    offsets.install("clicks")
    tp = TP("clicks", 2)
    state = ConsumerState([tp], {})
    state._gap = defaultdict(lambda: None)
    state.ack(tp, 3, 4)                                   # 0..2 dropped before the agent saw them
    assert Consumer._new_offset(state, tp) is None        # Faust alone would commit 5
    assert offsets.head_gap(state, tp) == (0, 3)
    memory = offsets.GapMemory()
    asyncio.run(offsets.heal_head_gaps(state, "clicks", memory))
    asyncio.run(offsets.heal_head_gaps(state, "clicks", memory))
    assert state.seeks == [(2, 0)]
    assert offsets.start_offset(-1) == offsets.start_offset(None) == 0 and offsets.start_offset(7) == 7


def _recs(*pairs):
    from stream.pipeline import Record
    return [Record("clicks", p, o, b"k", b"v") for p, o in pairs]


def _split(pairs, committed, guard, now):
    out = offsets.split_in_order(_recs(*pairs), committed.get, guard, now)
    return out.keep, out.seek


def test_records_past_a_hole_wait_for_it_and_a_lasting_hole_is_accepted():
    guard = offsets.OrderGuard()
    committed = {0: 10, 1: None}
    keep, seek = _split([(0, 10), (1, 0), (0, 11), (1, 1)], committed, guard, 0.0)
    assert keep == [0, 1, 2, 3] and seek == {}
    # 12 and 13 of partition 0 never arrived: 14 and what follows wait, the partition is sought back.
    keep, seek = _split([(0, 14), (1, 2), (0, 15)], committed, guard, 1.0)
    assert keep == [1] and seek == {0: 12}
    keep, seek = _split([(0, 14)], committed, guard, 2.0)    # pre-seek leftovers
    assert keep == [] and seek == {}
    keep, seek = _split([(0, 12), (0, 13), (0, 14)], committed, guard, 3.0)
    assert keep == [0, 1, 2] and guard.sought == {}
    # A re-delivery from the committed offset on is scored (replayed from the state).
    keep, _ = _split([(0, 11)], committed, guard, 4.0)
    assert keep == [0]
    # A hole still there after each seek's patience is sought again (a fetch from before
    # the seek can make Faust drop the re-read records), then accepted as a real gap.
    keep, seek = _split([(0, 20)], committed, guard, 5.0)
    assert keep == [] and seek == {0: 15}
    now = 5.0
    for _ in range(offsets.SEEK_ATTEMPTS - 1):
        now += offsets.SEEK_PATIENCE_S + 1
        keep, seek = _split([(0, 20)], committed, guard, now)
        assert keep == [] and seek == {0: 15}
    keep, seek = _split([(0, 20)], committed, guard, now + offsets.SEEK_PATIENCE_S + 1)
    assert keep == [0] and seek == {} and guard.next_offset[0] == 21 and guard.attempts == {}


def test_a_hole_filled_by_a_later_seek_is_scored_in_order():
    guard = offsets.OrderGuard()
    committed = {0: 10}
    _split([(0, 10), (0, 11)], committed, guard, 0.0)
    keep, seek = _split([(0, 15)], committed, guard, 1.0)
    assert seek == {0: 12}
    keep, seek = _split([(0, 16)], committed, guard, 1.0 + offsets.SEEK_PATIENCE_S + 1)
    assert keep == [] and seek == {0: 12}          # the first re-read never came: seek again
    keep, seek = _split([(0, 12), (0, 13), (0, 14), (0, 15)], committed, guard, 8.0)
    assert keep == [0, 1, 2, 3] and seek == {} and guard.attempts == {} and guard.next_offset[0] == 16


def test_records_below_the_committed_offset_are_acked_not_scored():
    # Their outputs were delivered before the commit; a replay of them could only repeat
    # them, or dead-letter them when their rows have left the state.
    guard = offsets.OrderGuard()
    out = offsets.split_in_order(_recs((0, 3), (0, 4), (0, 5), (1, 0)), {0: 5, 1: None}.get, guard, 0.0)
    assert out.committed == [0, 1] and out.keep == [2, 3] and out.seek == {}


def test_an_unknown_committed_offset_holds_records_and_never_seeks_to_the_start():
    # Just assigned: Faust's fetcher hands over records before it has stored the committed
    # offsets. Seeking to 0 then re-read the whole partition (seen in the worker logs).
    guard = offsets.OrderGuard()
    committed = {0: offsets.UNKNOWN}
    keep, seek = _split([(0, 553), (0, 554)], committed, guard, 0.0)
    assert keep == [] and seek == {0: 553}
    keep, seek = _split([(0, 553)], committed, guard, 1.0)       # still unknown: held, no new seek
    assert keep == [] and seek == {}
    committed[0] = 553                                          # known now: scored from there
    keep, seek = _split([(0, 553), (0, 554)], committed, guard, 2.0)
    assert keep == [0, 1] and seek == {} and guard.sought == {}
    # Known and below what was fetched: sought back to the committed offset, not to 0.
    guard2 = offsets.OrderGuard()
    keep, seek = _split([(0, 600)], {0: offsets.UNKNOWN}, guard2, 0.0)
    assert seek == {0: 600}
    keep, seek = _split([(0, 600)], {0: 553}, guard2, 1.0)
    assert keep == [] and seek == {0: 553}
    # Unknown for longer than the patience: scored from the first record seen.
    guard3 = offsets.OrderGuard()
    _split([(0, 40)], {0: offsets.UNKNOWN}, guard3, 0.0)
    keep, seek = _split([(0, 40), (0, 41)], {0: offsets.UNKNOWN}, guard3, offsets.SEEK_PATIENCE_S + 1)
    assert keep == [0, 1] and guard3.next_offset[0] == 42


def test_a_revoked_partition_is_forgotten():
    # What this worker scored before losing a partition says nothing about where it
    # resumes: another worker may have scored and committed past it, or not as far.
    guard = offsets.OrderGuard()
    _split([(0, 0), (0, 1), (1, 0)], {0: None, 1: None}, guard, 0.0)
    _split([(0, 9)], {0: None}, guard, 1.0)
    assert guard.next_offset == {0: 2, 1: 1} and 0 in guard.sought
    guard.forget([0])
    assert guard.next_offset == {1: 1} and guard.sought == {}


class _Consumer:
    def __init__(self):
        self._committed_offset = {}


def test_committed_offsets_are_unknown_from_assignment_until_the_seek():
    consumer, tp = _Consumer(), ("clicks", 0)
    consumer._committed_offset[tp] = None          # Faust's defaultdict fills this in on any read
    assert offsets.committed_in(consumer, tp) is offsets.UNKNOWN
    consumer._clickscore_known = {tp}               # what install()'s perform_seek wrapper records
    consumer._committed_offset[tp] = 553
    assert offsets.committed_in(consumer, tp) == 553
    offsets.forget_committed(consumer, [tp])
    assert offsets.committed_in(consumer, tp) is offsets.UNKNOWN


# -- offsets the log itself skips (transaction markers) ----------------------------------------

from hypothesis import given, strategies as st  # noqa: E402

_ranges = st.lists(st.tuples(st.integers(0, 60), st.integers(0, 12)).map(lambda t: (t[0], t[0] + t[1])),
                   max_size=12)


@given(_ranges, st.integers(0, 80), st.integers(0, 20))
def test_absent_offsets_cover_exactly_the_union_of_their_ranges(ranges, start, length):
    absent = offsets.AbsentOffsets()
    for a, b in ranges:
        absent.add("clicks", 0, a, b)
    union = {o for a, b in ranges for o in range(a, b)}
    end = start + length
    assert absent.covers("clicks", 0, start, end) == all(o in union for o in range(start, end))
    assert absent.covers("clicks", 1, start, end) == (length == 0)   # another partition knows nothing


def test_absent_offsets_keep_only_the_latest_ranges():
    absent = offsets.AbsentOffsets()
    for o in range(absent.KEEP + 10):
        absent.add("clicks", 0, 2 * o, 2 * o + 1)
    assert not absent.covers("clicks", 0, 0, 1)                       # the oldest went out
    last = 2 * (absent.KEEP + 9)
    assert absent.covers("clicks", 0, last, last + 1)


def test_a_hole_the_log_skips_is_passed_at_once_and_reported_for_acking():
    # A transactional producer's commit marker at offset 12: no record will ever come.
    guard = offsets.OrderGuard()
    committed = {0: 10}
    marker = lambda partition, start, end: partition == 0 and (start, end) == (12, 13)  # noqa: E731
    out = offsets.split_in_order(_recs((0, 10), (0, 11), (0, 13), (0, 14)), committed.get, guard, 0.0, marker)
    assert out.keep == [0, 1, 2, 3] and out.seek == {} and out.gaps == [(0, 12, 13)]
    # A hole the fetcher did hand over records for (dropped after the fetch) still waits.
    out = offsets.split_in_order(_recs((0, 17)), committed.get, guard, 1.0, marker)
    assert out.keep == [] and out.seek == {0: 15} and out.gaps == []


def test_acking_absent_offsets_lets_the_commit_pass_them():
    tp = TP("clicks", 0)
    consumer = ConsumerState([tp], {tp: 10})
    consumer.ack(tp, 10, 11, 13)
    offsets.ack_absent(consumer, tp, 8, 13)                 # below the commit: ignored; 12: acked
    assert sorted(consumer._acked[tp]) == [10, 11, 12, 13] and 12 in consumer._acked_index[tp]
    assert offsets.head_gap(consumer, tp) is None


def test_the_watchdog_accepts_a_head_hole_the_log_skips_without_seeking():
    tp = TP("clicks", 0)
    consumer = ConsumerState([tp], {tp: 10})
    consumer.ack(tp, 11, 12)
    offsets.ABSENT.add("clicks", 0, 10, 11)
    try:
        asyncio.run(offsets.heal_head_gaps(consumer, "clicks", offsets.GapMemory()))
    finally:
        offsets.ABSENT.clear()
    assert consumer.seeks == [] and sorted(consumer._acked[tp]) == [10, 11, 12]


def test_the_absent_recorder_and_the_codec_guard_both_stay_on_the_fetcher(monkeypatch):
    # Both wrap aiokafka's PartitionRecords._unpack_records; the codec guard once replaced
    # the recorder (it unwrapped to the original), so no marker was ever known in the worker.
    from aiokafka.consumer.fetcher import PartitionRecords

    from stream.kafka_compat import guard_fetcher, wraps_with

    monkeypatch.setattr(PartitionRecords, "_unpack_records", PartitionRecords._unpack_records)
    for _ in range(2):                      # build_app's order, twice (idempotent)
        offsets.install("clicks")
        guard_fetcher(lambda unreadable: None)
    layers, fn = [], PartitionRecords._unpack_records
    while fn is not None:
        layers.append(fn)
        fn = getattr(fn, "__wrapped__", None)
    assert sum(getattr(f, "_clickscore_absent", False) for f in layers) == 1
    assert sum(getattr(f, "_clickscore_codec_guard", False) for f in layers) == 1
    assert wraps_with(PartitionRecords._unpack_records, "_clickscore_absent")
