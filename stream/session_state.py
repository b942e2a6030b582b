"""Per-session state: the value the worker keeps in its Faust table, as compact bytes.

    state = SessionState.from_bytes(value) if value else None      # None: a new session
    state = advance(state, event, artefacts, partition, offset, timeout_ms)   # pure
    value = state.to_bytes()                                        # 16 + 33 * rows bytes

Layout (little-endian): a 16-byte header, the window rows exactly as
`features.window_to_bytes` writes them (at most WINDOW rows of EVENT_ROW, 25 bytes
each), then each row's input offset (int64):

    version u1 | flags u1 (1 has_bought, 2 has_cart, 4 bought before the last event) |
    partition u2 | event_count u4 | last_event_ms i8 | rows... | offsets...

Every table write ships the whole value to the changelog, so it stays small: a
100-event session is 3,316 bytes. `partition` is the input partition the session
lives on; the eviction scan needs it to send a tombstone to the right changelog
partition without a current event. The offsets make the state idempotent: an event
re-delivered after a crash (its offset already applied) does not enter the window a
second time, and `replay_view` rebuilds the session as of that event so its scores
can be sent again, equal to the first time.

Idle sessions. A session idle for longer than the timeout (event time) is over:
`advance` starts a fresh session for an event that comes after such a gap (so the
scores never depend on whether an eviction has run yet), and `idle_keys` picks the
sessions to delete from the table once the partition's event-time watermark has
moved past their last event by more than the timeout. Event time, not wall-clock
time, so replaying a day-old log evicts exactly what a live run would have.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from typing import Iterable, Iterator

import numpy as np

from stream.events import EVENT_TYPES, ClickEvent
from stream.features import (EVENT_ROW, FeatureArtefacts, append_event, empty_window,
                             window_from_bytes, window_to_bytes)

STATE_VERSION = 1
HEADER = struct.Struct("<BBHIq")   # version, flags, partition, event_count, last_event_ms
OFFSET = np.dtype("<i8")
ROW_BYTES = EVENT_ROW.itemsize + OFFSET.itemsize
HAS_BOUGHT = 1
HAS_CART = 2
BOUGHT_BEFORE_LAST = 4     # has_bought was already true before the last applied event


class StateError(ValueError):
    """A table value this code cannot read (another version, or corrupt)."""


@dataclass(frozen=True)
class SessionState:
    window: np.ndarray          # (n <= W,) EVENT_ROW, oldest first
    offsets: np.ndarray         # (n,) int64 input offset of each window row
    event_count: int            # events seen in the session, beyond the window included
    last_event_ms: int          # latest event time seen, UTC epoch ms
    has_bought: bool            # a transaction has been seen: no more buy scoring
    has_cart: bool              # an addtocart has been seen
    partition: int              # input partition the session lives on
    bought_before_last: bool = False

    @classmethod
    def new(cls, partition: int) -> "SessionState":
        return cls(empty_window(), np.zeros(0, OFFSET), 0, 0, False, False, partition)

    @property
    def last_offset(self) -> int:
        return int(self.offsets[-1]) if len(self.offsets) else -1

    def to_bytes(self) -> bytes:
        flags = ((HAS_BOUGHT if self.has_bought else 0) | (HAS_CART if self.has_cart else 0)
                 | (BOUGHT_BEFORE_LAST if self.bought_before_last else 0))
        return (HEADER.pack(STATE_VERSION, flags, self.partition, self.event_count, self.last_event_ms)
                + window_to_bytes(self.window) + self.offsets.astype(OFFSET).tobytes())

    @classmethod
    def from_bytes(cls, data: bytes) -> "SessionState":
        version, flags, partition, count, last_ms = read_header(data)
        body = memoryview(data)[HEADER.size:]
        n, rest = divmod(len(body), ROW_BYTES)
        if rest:
            raise StateError(f"session state body of {len(body)} bytes is not a whole number of rows")
        split = n * EVENT_ROW.itemsize
        return cls(window_from_bytes(bytes(body[:split])), np.frombuffer(body[split:], OFFSET).copy(),
                   count, last_ms, bool(flags & HAS_BOUGHT), bool(flags & HAS_CART), partition,
                   bool(flags & BOUGHT_BEFORE_LAST))


def read_header(data: bytes) -> tuple[int, int, int, int, int]:
    """(version, flags, partition, event_count, last_event_ms) without decoding the window."""
    if len(data) < HEADER.size:
        raise StateError(f"session state of {len(data)} bytes is shorter than its header")
    version, flags, partition, count, last_ms = HEADER.unpack_from(data)
    if version != STATE_VERSION:
        raise StateError(f"session state version {version} (this code reads {STATE_VERSION})")
    return version, flags, partition, count, last_ms


def is_idle(last_event_ms: int, now_ms: int, timeout_ms: int) -> bool:
    return now_ms - last_event_ms > timeout_ms


def advance(state: SessionState | None, event: ClickEvent, artefacts: FeatureArtefacts,
            partition: int, offset: int, timeout_ms: int) -> SessionState:
    """The session after `event` (read at input `offset`). Pure. A session idle beyond
    the timeout starts afresh."""
    if state is None or (state.event_count and is_idle(state.last_event_ms, event.timestamp, timeout_ms)):
        state = SessionState.new(partition)
    window = append_event(state.window, event, artefacts)
    return replace(
        state,
        window=window,
        offsets=np.append(state.offsets, np.int64(offset))[-len(window):],
        event_count=state.event_count + 1,
        last_event_ms=max(state.last_event_ms, event.timestamp),
        has_bought=state.has_bought or event.is_transaction,
        has_cart=state.has_cart or event.event_type == "addtocart",
        partition=partition,
        bought_before_last=state.has_bought,
    )


@dataclass(frozen=True)
class Replay:
    """What the session looked like right after an event it has already applied."""
    window: np.ndarray
    event_count: int
    had_bought: bool          # before that event
    has_cart: bool            # after that event


def replay_view(state: SessionState, offset: int) -> Replay | None:
    """For an input re-delivered after a crash or rebalance (its offset is already in
    the state): the session as of that event, so its scores can be sent again exactly.
    None when that is no longer known: an older event of a session longer than the window."""
    hits = np.flatnonzero(state.offsets == offset)
    if not len(hits):
        return None
    j = int(hits[0])
    n = len(state.offsets)
    if j == n - 1:
        return Replay(state.window, state.event_count, state.bought_before_last, state.has_cart)
    if state.event_count != n:      # rows before the window are gone: cannot rebuild
        return None
    types = state.window["event_type"]
    return Replay(state.window[:j + 1], j + 1, bool((types[:j] == EVENT_TYPES["transaction"]).any()),
                  bool((types[:j + 1] == EVENT_TYPES["addtocart"]).any()))


def idle_keys(items: Iterable[tuple[bytes, bytes]], watermarks: dict[int, int], timeout_ms: int,
              partitions: set[int] | None = None) -> Iterator[tuple[bytes, int]]:
    """(key, partition) of every session idle beyond the timeout at its partition's watermark.

    `partitions` limits the scan to the partitions this worker owns now: a key left
    from a revoked partition must not be tombstoned by a worker that no longer owns it.
    """
    for key, value in items:
        _, _, partition, _, last_ms = read_header(value)
        if partitions is not None and partition not in partitions:
            continue
        watermark = watermarks.get(partition)
        if watermark is not None and is_idle(last_ms, watermark, timeout_ms):
            yield key, partition
