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


def test_a_hole_after_the_committed_offset_is_sought_once_then_accepted():
    tp, other = TP("clicks", 0), TP("clicks", 1)
    consumer = ConsumerState([tp, other, TP("elsewhere", 0)], {tp: 10, other: 5})
    consumer.ack(tp, 12, 13, 14)          # 10 and 11 never reached the agent
    consumer.ack(other, 5, 6)             # no hole
    memory = offsets.GapMemory()
    run = lambda: asyncio.run(offsets.heal_head_gaps(consumer, "clicks", memory))  # noqa: E731
    assert offsets.head_gap(consumer, tp) == (10, 12) and offsets.head_gap(consumer, other) is None
    assert run() == [] and consumer.seeks == []           # first sighting: wait one interval
    actions = run()
    assert consumer.seeks == [(0, 10)] and "sought back" in actions[0]
    assert run() == []                                    # re-read under way: seen afresh
    actions = run()                                       # still missing after the re-read
    assert "accepted as a gap" in actions[0]
    assert sorted(consumer._acked[tp]) == [10, 11, 12, 13, 14] and consumer.seeks == [(0, 10)]


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


def test_records_past_a_hole_wait_for_it_and_a_lasting_hole_is_accepted():
    from stream.pipeline import Record

    def recs(*pairs):
        return [Record("clicks", p, o, b"k", b"v") for p, o in pairs]

    guard = offsets.OrderGuard()
    committed = {0: 10, 1: None}
    keep, seek = offsets.split_in_order(recs((0, 10), (1, 0), (0, 11), (1, 1)), committed.get, guard, 0.0)
    assert keep == [0, 1, 2, 3] and seek == {}
    # 12 and 13 of partition 0 never arrived: 14 and what follows wait, the partition is sought back.
    keep, seek = offsets.split_in_order(recs((0, 14), (1, 2), (0, 15)), committed.get, guard, 1.0)
    assert keep == [1] and seek == {0: 12}
    keep, seek = offsets.split_in_order(recs((0, 14)), committed.get, guard, 2.0)    # pre-seek leftovers
    assert keep == [] and seek == {}
    keep, seek = offsets.split_in_order(recs((0, 12), (0, 13), (0, 14)), committed.get, guard, 3.0)
    assert keep == [0, 1, 2] and guard.sought == {}
    # A re-delivery below the expected offset is scored (replayed from the state).
    keep, _ = offsets.split_in_order(recs((0, 11)), committed.get, guard, 4.0)
    assert keep == [0]
    # A hole that is still there after the patience is a real gap (a transaction marker).
    keep, seek = offsets.split_in_order(recs((0, 20)), committed.get, guard, 5.0)
    assert keep == [] and seek == {0: 15}
    keep, seek = offsets.split_in_order(recs((0, 20)), committed.get, guard, 5.0 + offsets.SEEK_PATIENCE_S + 1)
    assert keep == [0] and guard.next_offset[0] == 21
