"""Per-session state: the value the worker keeps in its Faust table, as compact bytes.

    state = SessionState.from_bytes(value, artefacts) if value else None   # None: a new session
    state = advance(state, event, artefacts, partition, offset, timeout_ms, committed)   # pure
    value = state.to_bytes()                          # 26 + 41 * rows bytes

Layout, STATE_VERSION 2 (little-endian): a 26-byte header, the kept rows exactly as
`features.window_to_bytes` writes them (EVENT_ROW, 33 bytes each: item and category as
64-bit id hashes, so any model reads them), then each row's input offset (int64):

    version u1 | flags u1 (1 has_bought, 2 has_cart, 4 bought before the last event) |
    partition u2 | event_count u4 | last_event_ms i8 |           <- the v1 header, unchanged
    window u2 | first_transaction u4 | first_addtocart u4 | rows... | offsets...

`first_transaction` and `first_addtocart` are event numbers in the session (1-based, 0:
none yet); the flags are derived from them (a value whose flags disagree is corrupt).
`window` is W, the scoring window the rows were kept for. A 100-event session is 4,126
bytes (v1: 3,316). `partition` is the input partition the session lives on; the
eviction scan needs it to send a tombstone to the right changelog partition without a
current event.

Kept rows and the replay margin. The window scored is always the last W rows. Rows
before it are kept while their event can still be re-delivered: a row whose input
offset is at or past the partition's committed offset (the `committed(partition)`
callable passed to `advance`; the worker gives the consumer's committed offsets) may
be read again after a crash or rebalance, and `replay_view` must then rebuild its
window, which needs the W - 1 rows before it too. So a state keeps its last
max(W, u + W - 1) rows, u being its rows at or past the committed offset, at most
W + MAX_REPLAY_ROWS. An event older than that (a session with more than
MAX_REPLAY_ROWS uncommitted events on one partition) is still dead-lettered
`redelivered_unscorable` when it comes back. The default `committed` keeps nothing
extra (pure uses, training). The offsets make the state idempotent: an event
re-delivered (its offset already applied) does not enter the window a second time.

Migration. A v1 value (rows hold the model's vocabulary indices) is converted on read:
indices -> raw ids through the serving model's artefacts -> hashes (OOV -> HASH_UNKNOWN,
still OOV under any model), offsets kept; `migrated_from(value)` tells the caller to
count it (clickscore_state_migrations_total). The next write stores v2.

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
from functools import partial
from typing import Callable, Iterable, Iterator

import numpy as np

from stream.events import EVENT_TYPES, ClickEvent
from stream.features import (CATEGORY_MISSING, EVENT_ROW, HASH_MISSING, HASH_UNKNOWN, FeatureArtefacts,
                             empty_window, event_row, id_hash, window_from_bytes, window_to_bytes)

STATE_VERSION = 2
HEADER_V1 = struct.Struct("<BBHIq")   # version, flags, partition, event_count, last_event_ms
HEADER_V2 = struct.Struct("<HII")     # window, first_transaction, first_addtocart (after HEADER_V1)
HEADER_SIZE = HEADER_V1.size + HEADER_V2.size
OFFSET = np.dtype("<i8")
ROW_BYTES = EVENT_ROW.itemsize + OFFSET.itemsize
HAS_BOUGHT = 1
HAS_CART = 2
BOUGHT_BEFORE_LAST = 4     # has_bought was already true before the last applied event
MAX_REPLAY_ROWS = 400      # most rows kept before the window for re-deliveries (16.4 KB)

# v1 layout, read only for migration: 25-byte rows of vocabulary indices.
EVENT_ROW_V1 = np.dtype([("event_type", "u1"), ("item", "<i4"), ("category", "<i4"), ("timestamp", "<i8"),
                         ("price", "<f4"), ("gap", "<f4")])
ROW_BYTES_V1 = EVENT_ROW_V1.itemsize + OFFSET.itemsize

Committed = Callable[[int], "int | None"]


def keep_nothing_extra(partition: int) -> int:
    """The default `committed`: every applied row counts as committed (no replay margin)."""
    return np.iinfo(np.int64).max


class StateError(ValueError):
    """A table value this code cannot read (another version, or corrupt)."""


@dataclass(frozen=True)
class SessionState:
    rows: np.ndarray            # (n,) EVENT_ROW, oldest first: the window and the replay margin before it
    offsets: np.ndarray         # (n,) int64 input offset of each kept row
    event_count: int            # events seen in the session, beyond the kept rows included
    last_event_ms: int          # latest event time seen, UTC epoch ms
    first_transaction: int      # event number (1-based) of the session's first transaction, 0: none
    first_addtocart: int        # event number of its first addtocart, 0: none
    partition: int              # input partition the session lives on
    window_size: int            # W: the scoring window is the last W rows

    @classmethod
    def new(cls, partition: int, window_size: int) -> "SessionState":
        return cls(empty_window(), np.zeros(0, OFFSET), 0, 0, 0, 0, partition, window_size)

    @property
    def window(self) -> np.ndarray:
        """(<= W,) EVENT_ROW: what the model scores."""
        return self.rows[-self.window_size:]

    @property
    def has_bought(self) -> bool:
        return self.first_transaction > 0

    @property
    def has_cart(self) -> bool:
        return self.first_addtocart > 0

    @property
    def bought_before_last(self) -> bool:
        return 0 < self.first_transaction < self.event_count

    @property
    def last_offset(self) -> int:
        return int(self.offsets[-1]) if len(self.offsets) else -1

    def flags(self) -> int:
        return ((HAS_BOUGHT if self.has_bought else 0) | (HAS_CART if self.has_cart else 0)
                | (BOUGHT_BEFORE_LAST if self.bought_before_last else 0))

    def to_bytes(self) -> bytes:
        return (HEADER_V1.pack(STATE_VERSION, self.flags(), self.partition, self.event_count, self.last_event_ms)
                + HEADER_V2.pack(self.window_size, self.first_transaction, self.first_addtocart)
                + window_to_bytes(self.rows) + self.offsets.astype(OFFSET).tobytes())

    @classmethod
    def from_bytes(cls, data: bytes, artefacts: FeatureArtefacts | None = None) -> "SessionState":
        """A stored value -> state. A v1 value needs the serving model's `artefacts`
        (its rows hold that model's indices) and is migrated."""
        version, flags, partition, count, last_ms = read_header(data)
        if version == 1:
            if artefacts is None:
                raise StateError("a v1 session state needs the model's artefacts to be migrated")
            return _from_v1(data, artefacts)
        if len(data) < HEADER_SIZE:
            raise StateError(f"session state of {len(data)} bytes is shorter than its v2 header")
        window_size, first_tx, first_cart = HEADER_V2.unpack_from(data, HEADER_V1.size)
        body = memoryview(data)[HEADER_SIZE:]
        n, rest = divmod(len(body), ROW_BYTES)
        if rest:
            raise StateError(f"session state body of {len(body)} bytes is not a whole number of rows")
        if window_size < 1 or n > count or first_tx > count or first_cart > count:
            raise StateError(f"session state header is inconsistent (window {window_size}, {n} rows, "
                             f"{count} events, first transaction {first_tx}, first addtocart {first_cart})")
        split = n * EVENT_ROW.itemsize
        state = cls(window_from_bytes(bytes(body[:split])), np.frombuffer(body[split:], OFFSET).copy(),
                    count, last_ms, first_tx, first_cart, partition, window_size)
        if state.flags() != flags:
            raise StateError(f"session state flags {flags} disagree with its event numbers ({state.flags()})")
        return state


def read_header(data: bytes) -> tuple[int, int, int, int, int]:
    """(version, flags, partition, event_count, last_event_ms) without decoding the rows
    (the first 16 bytes, the same in v1 and v2)."""
    if len(data) < HEADER_V1.size:
        raise StateError(f"session state of {len(data)} bytes is shorter than its header")
    version, flags, partition, count, last_ms = HEADER_V1.unpack_from(data)
    if version not in (1, STATE_VERSION):
        raise StateError(f"session state version {version} (this code reads 1 and {STATE_VERSION})")
    return version, flags, partition, count, last_ms


def migrated_from(data: bytes) -> int | None:
    """The older version a stored value has (to count its migration), None when current."""
    return data[0] if data and data[0] != STATE_VERSION else None


def _from_v1(data: bytes, artefacts: FeatureArtefacts) -> SessionState:
    """v1 -> v2: indices -> raw ids (this model's vocabulary) -> hashes; offsets kept."""
    _, flags, partition, count, last_ms = HEADER_V1.unpack_from(data)
    body = memoryview(data)[HEADER_V1.size:]
    n, rest = divmod(len(body), ROW_BYTES_V1)
    if rest or n > count:
        raise StateError(f"v1 session state body of {len(body)} bytes does not fit {count} events")
    old = np.frombuffer(bytes(body[:n * EVENT_ROW_V1.itemsize]), EVENT_ROW_V1)
    rows = np.zeros(n, EVENT_ROW)
    for name in ("event_type", "timestamp", "price", "gap"):
        rows[name] = old[name]

    def item_hash(index: int) -> int:
        raw = artefacts.item_id(index)
        return HASH_UNKNOWN if raw is None else id_hash(raw)

    def category_hash(index: int) -> int:
        if index == CATEGORY_MISSING:
            return HASH_MISSING
        raw = artefacts.category_id(index)
        return HASH_UNKNOWN if raw is None else id_hash(raw)

    rows["item"] = [item_hash(i) for i in old["item"]]
    rows["category"] = [category_hash(c) for c in old["category"]]
    # Event numbers of the first transaction / addtocart, as far as v1 knew them: exact
    # for a session whose rows all survive; for a longer one a number before the rows
    # (only its last row can be replayed, and only the flags matter for it).
    first_row = count - n + 1                      # event number of rows[0]

    def first_of(kind: str, flag: bool) -> int:
        if not flag:
            return 0
        hits = np.flatnonzero(old["event_type"] == EVENT_TYPES[kind])
        return first_row + int(hits[0]) if len(hits) and count == n else max(1, first_row - 1)

    first_tx = first_of("transaction", bool(flags & HAS_BOUGHT))
    if flags & HAS_BOUGHT and not flags & BOUGHT_BEFORE_LAST:
        first_tx = count                            # the last event was the first transaction
    elif flags & BOUGHT_BEFORE_LAST and first_tx >= count:
        first_tx = max(1, count - 1)
    return SessionState(rows, np.frombuffer(bytes(body[n * EVENT_ROW_V1.itemsize:]), OFFSET).copy(), count,
                        last_ms, first_tx, first_of("addtocart", bool(flags & HAS_CART)), partition,
                        artefacts.window)


def is_idle(last_event_ms: int, now_ms: int, timeout_ms: int) -> bool:
    return now_ms - last_event_ms > timeout_ms


def kept_rows(offsets: np.ndarray, window_size: int, committed: int | None) -> int:
    """How many of the last rows to keep: the window, and for every row that may still be
    re-delivered (offset >= committed) the W - 1 rows its window needs, at most
    MAX_REPLAY_ROWS more."""
    start = 0 if committed is None or committed < 0 else committed
    # offsets ascend within a session; the method skips np.searchsorted's dispatch (a third of the cost)
    uncommitted = len(offsets) - int(offsets.searchsorted(start))
    return min(len(offsets), max(window_size, uncommitted + window_size - 1), window_size + MAX_REPLAY_ROWS)


def advance(state: SessionState | None, event: ClickEvent, artefacts: FeatureArtefacts,
            partition: int, offset: int, timeout_ms: int,
            committed: Committed = keep_nothing_extra) -> SessionState:
    """The session after `event` (read at input `offset`). Pure. A session idle beyond
    the timeout starts afresh. `committed(partition)` is the partition's committed offset
    (None: unknown, keep every row up to the cap)."""
    W = artefacts.window
    if state is None or (state.event_count and is_idle(state.last_event_ms, event.timestamp, timeout_ms)):
        state = SessionState.new(partition, W)
    # The new row is append_event's (its gap needs only the last row: event_row given the
    # previous timestamp); kept rows and it are copied once into fresh arrays, which cost
    # a third of two concatenations and a slice on these tiny structured arrays (hot path).
    n = len(state.rows)
    previous = int(state.rows["timestamp"][-1]) if n else None
    offsets = np.empty(n + 1, dtype=np.int64)
    offsets[:n] = state.offsets
    offsets[n] = offset
    keep = kept_rows(offsets, W, committed(partition))
    rows = np.empty(keep, dtype=state.rows.dtype)
    if keep > 1:
        rows[:-1] = state.rows[n + 1 - keep:]
    rows[-1:] = event_row(event, artefacts, previous)
    number = state.event_count + 1
    return replace(
        state,
        rows=rows,
        offsets=offsets[n + 1 - keep:],
        event_count=number,
        last_event_ms=max(state.last_event_ms, event.timestamp),
        first_transaction=state.first_transaction or (number if event.is_transaction else 0),
        first_addtocart=state.first_addtocart or (number if event.event_type == "addtocart" else 0),
        partition=partition,
        window_size=W,
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
    None when that is no longer known: the row is gone, or the W - 1 rows before it are."""
    hits = np.flatnonzero(state.offsets == offset)
    if not len(hits):
        return None
    j = int(hits[0])
    n = len(state.offsets)
    number = state.event_count - n + j + 1          # event number of row j
    W = state.window_size
    if j < W - 1 and number != j + 1:               # rows before it are gone: cannot rebuild
        return None
    return Replay(state.rows[max(0, j + 1 - W):j + 1], number,
                  0 < state.first_transaction < number, 0 < state.first_addtocart <= number)


def idle_now(keys: Iterable[bytes], current: Callable[[bytes], "bytes | None"], watermarks: dict[int, int],
             timeout_ms: int, partitions: set[int] | None = None) -> tuple[list[tuple[bytes, int]], int]:
    """idle_keys over `keys` (a slice of the table's keys, listed before), each value read
    now with `current(key)` (None: gone since, skipped). Lets the worker decide a large
    table a slice per event-loop turn (stream/app.py), with each session judged on its
    value at that moment. Returns (idle (key, partition) pairs, bytes of the values read)."""
    items = [(key, value) for key in keys if (value := current(key)) is not None]
    return list(idle_keys(items, watermarks, timeout_ms, partitions)), sum(len(value) for _, value in items)


def key_slices(store, size: int) -> Iterator[tuple[list[bytes], Callable[[bytes], "bytes | None"]]]:
    """A table's keys, at most `size` at a time, each slice with the function that reads a
    key's value now; listed lazily where the store allows it, so the eviction scan can give
    the event loop back between slices (stream/app.py).

    Faust's memory store keeps a dict: its keys are listed at once (~1 ms per 100,000) and
    sliced, since a dict cannot be iterated while the scan deletes from it; values are read
    with the store's get. Faust's RocksDB store decodes every key it lists through the
    serializer registry (149-173 ms per 100,000 in one event-loop turn, every scan) and,
    with no current event, looks for a key's value in every partition's database (~7 us a
    key: 870-891 ms of CPU per scan of 100,000 sessions, 171-177 ms this way; `python -m
    bench.eviction`). Here its partition databases are read directly and raw, a slice per
    partition at a time, each value from its key's own partition.

    No database handle is kept between slices: each slice takes the partition's database
    from the store again, seeks past the last key listed and lets go of the iterator
    before it is handed out. A rebalance revokes and re-opens databases (Faust drops its
    handle and opens the folder again); a handle kept here would hold RocksDB's lock on the
    folder and the re-open would fail. A partition revoked meanwhile ends its listing;
    keys deleted or created meanwhile are seen as they are when their slice is read
    (either way each is judged on its value then). Keys are raw bytes in both stores (the
    tables' key serializer is "raw")."""
    partitions = _rocksdict_partitions(store)
    if partitions is None:
        keys = list(store.keys())
        for start in range(0, len(keys), size):
            yield keys[start:start + size], store.get
        return
    for partition in partitions:
        after = None
        while True:
            chunk = _keys_after(store, partition, after, size)
            if not chunk:
                break
            yield chunk, partial(_value_in, store, partition)
            if len(chunk) < size:
                break
            after = chunk[-1]


def _keys_after(store, partition: int, after: bytes | None, size: int) -> list[bytes]:
    """Up to `size` keys of the partition's database after `after` (from the first: None),
    Faust's offset key left out; [] where the partition is no longer served."""
    db = store._dbs.get(partition)
    if db is None:
        return []
    chunk: list[bytes] = []
    for key in db.keys(from_key=after):      # from `after` itself, when it is still there
        if key == after or key == store.offset_key:
            continue
        chunk.append(key)
        if len(chunk) == size:
            break
    return chunk


def _value_in(store, partition: int, key: bytes) -> bytes | None:
    db = store._dbs.get(partition)
    return None if db is None else db.get(key)


def _rocksdict_partitions(store) -> list[int] | None:
    """The partitions whose databases the store serves now (Faust's `_dbs_for_actives`, as
    partition numbers), or None where the store is not Faust's rocksdict-backed RocksDB
    store with raw keys (the memory store, python-rocksdb, a future Faust whose internals
    moved)."""
    if not (getattr(store, "use_rocksdict", False) and getattr(store, "key_serializer", None) == "raw"
            and isinstance(getattr(store, "_dbs", None), dict) and hasattr(store, "_dbs_for_actives")
            and isinstance(getattr(store, "offset_key", None), bytes)):
        return None
    served = {id(db) for db in store._dbs_for_actives()}
    return sorted(partition for partition, db in store._dbs.items() if id(db) in served)


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
