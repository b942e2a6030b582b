"""The fence's decision (stream/fencing.py), a pure function, and the Fence object on a
fake clock and a fake aiokafka coordinator. tests/test_faults.py runs it for real
(a worker SIGSTOPped past its session timeout sends nothing after SIGCONT)."""
from __future__ import annotations

import asyncio

from stream.fencing import Fence, GroupView, fence_reason, group_view

MEMBER = GroupView(generation=4, member_id="m-1", rejoin_needed=False)


def decide(now=100.0, last_tick=99.9, view=MEMBER, suspended_at=None, resumed_at=None):
    return fence_reason(now, last_tick, 6.0, view, suspended_at, resumed_at, confirm_s=3.0)


def test_a_healthy_member_is_not_fenced():
    assert decide() is None
    assert decide(view=None) is None   # consumer not created yet: nothing assigned either


def test_a_gap_longer_than_the_session_timeout_fences_before_the_ticker_runs():
    assert "suspended" in decide(now=100.0, last_tick=93.0)
    assert decide(now=100.0, last_tick=94.5) is None


def test_a_member_reset_by_the_coordinator_is_fenced():
    reset = GroupView(generation=-1, member_id="", rejoin_needed=True)
    assert "reset" in decide(view=reset)


def test_a_plain_rebalance_is_not_fenced():
    assert decide(view=GroupView(generation=4, member_id="m-1", rejoin_needed=True)) is None


def test_after_a_suspension_the_fence_holds_until_the_group_answers():
    rejoining = GroupView(generation=-1, member_id="", rejoin_needed=True)
    assert decide(view=rejoining, suspended_at=4, resumed_at=99.0) is not None
    assert decide(view=MEMBER, suspended_at=4, resumed_at=99.0) is not None          # no answer yet
    assert decide(view=MEMBER, suspended_at=4, resumed_at=96.0) is None              # heartbeats accepted
    rejoined = GroupView(generation=5, member_id="m-2", rejoin_needed=False)
    assert decide(view=rejoined, suspended_at=4, resumed_at=99.9) is None            # new generation


class FakeCoordinator:
    def __init__(self, generation: int, member_id: str, rejoin: bool):
        self.generation = generation
        self.member_id = member_id
        loop = asyncio.new_event_loop()
        self._rejoin_needed_fut = loop.create_future()
        if rejoin:
            self._rejoin_needed_fut.set_result(None)
        loop.close()


def test_group_view_reads_aiokafkas_coordinator():
    assert group_view(None) is None
    assert group_view(FakeCoordinator(3, "m", False)) == GroupView(3, "m", False)
    assert group_view(FakeCoordinator(-1, "", True)) == GroupView(-1, "", True)


def test_fence_on_a_fake_clock_suspension_then_rejoin():
    now = [0.0]
    coordinator = [FakeCoordinator(2, "m-1", False)]
    fence = Fence(6.0, lambda: coordinator[0], clock=lambda: now[0], confirm_s=3.0)
    now[0] = 0.1
    fence.tick()
    assert not fence.blocks_batch()
    now[0] = 20.0                      # frozen for 19.9 s: the batch notices before the ticker
    assert fence.blocks_batch()
    fence.tick()                       # the ticker wakes and remembers the generation
    assert fence.suspended_at_generation == 2
    coordinator[0] = FakeCoordinator(-1, "", True)   # heartbeat: unknown member id
    now[0] = 20.5
    fence.tick()
    assert fence.blocks_batch()
    coordinator[0] = FakeCoordinator(3, "m-2", False)  # rejoined, new generation
    now[0] = 21.0
    fence.tick()
    assert not fence.blocks_batch()
    assert fence.suspended_at_generation is None and fence.blocked_batches == 2
