"""Fencing: a worker that may have lost its partitions writes nothing until it knows.

    fence = Fence.for_app(app, session_timeout_s=settings.session_timeout_ms / 1000)
    ...
    if fence.blocks_batch():       # in the batch loop, before any send or table write
        return                     # send nothing, write nothing, ack nothing

Why: a worker frozen (SIGSTOP, a long GC or VM pause, a swapped-out host) past its
consumer-group session timeout has been evicted by the group coordinator, and its
partitions now belong to another worker. When it wakes it still holds fetched
records and a batch half done, and nothing in Faust 0.15.3 / aiokafka 0.14 stops it
from scoring them: until its next heartbeat (or commit) is answered with
UNKNOWN_MEMBER_ID / ILLEGAL_GENERATION it sends outputs for sessions another worker
now owns and writes their changelog (zombie writes). On real Kafka the only complete
cure is exactly-once (a transactional producer fenced by the coordinator's epoch);
on Tansu, where aiokafka's transactional producer does not work, this is the next
best thing: stop at the first sign.

Signs, all read without a request to the broker (the consumer's own state):
- the process was suspended: the ticker thread's last tick is older than the session
  timeout (checked from the batch itself, so it holds even before the ticker has run
  after the wake-up), and the wake-up is remembered until the group answers: a new
  generation (we rejoined) or, after `confirm_s`, the same generation with our
  member id intact and no rejoin pending (heartbeats were accepted: not evicted);
- the group coordinator reset our member id (aiokafka's `reset_generation` after a
  heartbeat or commit answered UNKNOWN_MEMBER_ID / ILLEGAL_GENERATION).
A plain rebalance (REBALANCE_IN_PROGRESS) does not fence: the member may still commit
until the join completes, and Faust revokes and re-seeks on its own.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger("clickscore.fencing")

TICK_S = 0.1


@dataclass(frozen=True)
class GroupView:
    """What the consumer knows of its group membership, at one moment."""
    generation: int          # -1 when reset
    member_id: str           # "" when reset (UNKNOWN_MEMBER_ID)
    rejoin_needed: bool


def group_view(coordinator: Any) -> GroupView | None:
    """Read aiokafka's GroupCoordinator (pinned aiokafka 0.14); None before it exists."""
    if coordinator is None:
        return None
    fut = getattr(coordinator, "_rejoin_needed_fut", None)
    return GroupView(generation=int(getattr(coordinator, "generation", -1)),
                     member_id=str(getattr(coordinator, "member_id", "") or ""),
                     rejoin_needed=bool(fut is not None and fut.done()))


def fence_reason(now: float, last_tick: float, session_timeout_s: float, view: GroupView | None,
                 suspended_at_generation: int | None, resumed_at: float | None, confirm_s: float) -> str | None:
    """Why this worker must not send or write now, or None. Pure: the whole decision."""
    if now - last_tick > session_timeout_s:
        return f"process suspended {now - last_tick:.1f} s (> session timeout {session_timeout_s:g} s)"
    if view is not None and not view.member_id and view.rejoin_needed:
        # aiokafka's reset_generation(): the coordinator no longer knows us. (Before the
        # first join there is no assignment, hence no batch to block.)
        return "group coordinator reset this member (unknown member id / illegal generation)"
    if suspended_at_generation is not None:
        if view is None or not view.member_id or view.rejoin_needed:
            return "suspended past the session timeout: waiting to rejoin the group"
        if view.generation != suspended_at_generation:
            return None   # rejoined: Faust seeks the partitions we still own to their commits
        if resumed_at is not None and now - resumed_at >= confirm_s:
            return None   # same generation, member intact, no rejoin: the group kept us
        return "suspended past the session timeout: waiting for the group's answer"
    return None


class Fence:
    """The fence for one worker: a daemon ticker thread plus the group view."""

    def __init__(self, session_timeout_s: float, coordinator: Callable[[], Any],
                 clock: Callable[[], float] = time.monotonic, confirm_s: float | None = None):
        self.session_timeout_s = session_timeout_s
        self.coordinator = coordinator
        self.clock = clock
        self.confirm_s = confirm_s if confirm_s is not None else min(3.0, session_timeout_s / 2)
        self.last_tick = clock()
        self.suspended_at_generation: int | None = None
        self.resumed_at: float | None = None
        self.blocked_batches = 0
        self._last_reason: str | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @classmethod
    def for_app(cls, app: Any, session_timeout_s: float) -> "Fence":
        """A started fence reading the Faust app's aiokafka consumer (Faust 0.15.3)."""
        def coordinator():
            try:
                return app.consumer._thread._ensure_consumer()._coordinator
            except Exception:   # consumer not created yet, or stopping
                return None
        return cls(session_timeout_s, coordinator).start()

    def start(self) -> "Fence":
        self._thread = threading.Thread(target=self._tick_forever, name="fence-ticker", daemon=True)
        self._thread.start()
        return self

    def _tick_forever(self) -> None:
        while True:
            time.sleep(TICK_S)
            self.tick()

    def _view(self) -> GroupView | None:
        try:
            return group_view(self.coordinator())
        except Exception:
            return None

    def tick(self) -> None:
        """Notice a suspension: a gap between ticks longer than the session timeout."""
        now = self.clock()
        with self._lock:
            gap = now - self.last_tick
            if gap > self.session_timeout_s:
                view = self._view()
                self.suspended_at_generation = view.generation if view is not None else -1
                self.resumed_at = now
                log.warning("process was suspended for %.1f s (> session timeout %.1f s): sending and "
                            "writing nothing until the consumer group answers", gap, self.session_timeout_s)
            self.last_tick = now

    def reason(self) -> str | None:
        now = self.clock()
        with self._lock:
            reason = fence_reason(now, self.last_tick, self.session_timeout_s, self._view(),
                                  self.suspended_at_generation, self.resumed_at, self.confirm_s)
            if reason is None and self.suspended_at_generation is not None \
                    and now - self.last_tick <= self.session_timeout_s:
                log.info("fence lifted: the consumer group answered after the suspension")
                self.suspended_at_generation = None
                self.resumed_at = None
        return reason

    def blocks_batch(self) -> bool:
        """True when the current batch must be dropped unsent (and left unacked)."""
        reason = self.reason()
        if reason is not None:
            self.blocked_batches += 1
            if reason != self._last_reason:
                log.warning("fenced: %s; dropping this batch unsent (its new owner scores it)", reason)
        self._last_reason = reason
        return reason is not None
