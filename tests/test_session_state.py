"""Session state: the compact table value and its pure updates (no broker).

    .venv/bin/python -m pytest tests/test_session_state.py -q
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.eviction import faust_table_store
from stream.events import ClickEvent
from stream.features import EVENT_ROW, WINDOW, FeatureArtefacts, append_event, empty_window, encode_windows
from stream.session_state import (HEADER_SIZE, MAX_REPLAY_ROWS, STATE_VERSION, SessionState, StateError, advance,
                                  idle_keys, idle_now, kept_rows, key_slices, migrated_from, read_header,
                                  replay_view)

V1_FIXTURE = Path(__file__).parent / "fixtures" / "state_v1" / "sessions.json"

ARTEFACTS = FeatureArtefacts(items=("a", "b", "c"), categories=("x",), dwell_mean=0.0, dwell_std=1.0,
                             price_mean=0.0, price_std=1.0)
T0 = 1_767_571_253_772
HOUR = 3_600_000


def click(i: int, kind: str = "view", ts: int | None = None, session: str = "s1") -> ClickEvent:
    return ClickEvent(session, kind, "abc"[i % 3], T0 + i * 1000 if ts is None else ts, event_id=f"e{i}")


def run(events, timeout_ms=HOUR, state=None, partition=2, committed=None):
    for offset, event in enumerate(events):
        if committed is None:
            state = advance(state, event, ARTEFACTS, partition, offset, timeout_ms)
        else:
            state = advance(state, event, ARTEFACTS, partition, offset, timeout_ms, committed)
    return state


def test_round_trip_is_compact_and_exact():
    state = run([click(0), click(1, "addtocart"), click(2, "transaction")])
    data = state.to_bytes()
    assert len(data) == HEADER_SIZE + 3 * (EVENT_ROW.itemsize + 8) == 26 + 3 * 41
    assert data[0] == STATE_VERSION == 2
    back = SessionState.from_bytes(data)
    assert back.window.tobytes() == state.window.tobytes()
    assert back.offsets.tolist() == [0, 1, 2]
    assert (back.event_count, back.has_cart, back.has_bought, back.partition) == (3, True, True, 2)
    assert back.bought_before_last is False
    assert read_header(data)[2:] == (2, 3, T0 + 2000)


def test_window_equals_repeated_append_and_keeps_the_last_W_rows():
    events = [click(i) for i in range(WINDOW + 30)]
    state = run(events)
    expected = empty_window()
    for e in events:
        expected = append_event(expected, e, ARTEFACTS)
    assert state.window.tobytes() == expected.tobytes()
    assert len(state.window) == WINDOW and state.event_count == WINDOW + 30
    assert state.offsets.tolist() == list(range(30, WINDOW + 30))


def test_an_event_after_the_idle_timeout_starts_a_new_session():
    state = run([click(0), click(1, "transaction")])
    later = advance(state, click(2, ts=T0 + 2000 + HOUR + 1), ARTEFACTS, 2, 7, HOUR)
    assert later.event_count == 1 and not later.has_bought and len(later.window) == 1
    same = advance(state, click(2, ts=T0 + 1000 + HOUR), ARTEFACTS, 2, 7, HOUR)
    assert same.event_count == 3 and same.has_bought


def test_idle_keys_use_each_partitions_watermark_and_only_owned_partitions():
    old = run([click(0, ts=T0)], partition=0).to_bytes()
    fresh = run([click(0, ts=T0 + 2 * HOUR)], partition=0).to_bytes()
    other = run([click(0, ts=T0)], partition=1).to_bytes()
    items = [(b"old", old), (b"fresh", fresh), (b"other", other)]
    watermarks = {0: T0 + 2 * HOUR + 1, 1: T0 + HOUR}   # partition 1 has not moved on
    assert list(idle_keys(items, watermarks, HOUR)) == [(b"old", 0)]
    assert list(idle_keys(items, {0: T0 + 3 * HOUR, 1: T0 + 3 * HOUR}, HOUR, partitions={1})) == [(b"other", 1)]


def test_a_sliced_scan_judges_each_session_on_its_value_when_its_slice_is_decided():
    # The worker lists the table's keys, then decides a slice per event-loop turn; batches
    # run in between. A session that got a new event since must not be tombstoned, one
    # deleted since is skipped, and slices decide what one whole scan would.
    old = run([click(0, ts=T0)], partition=0)
    moved_on = run([click(0, ts=T0, session="s2")], partition=0)
    table = {b"old": old.to_bytes(), b"moved-on": moved_on.to_bytes(), b"gone": old.to_bytes()}
    keys = list(table)
    watermarks = {0: T0 + 2 * HOUR}
    whole = idle_now(keys, table.get, watermarks, HOUR)
    assert whole == ([(b"old", 0), (b"moved-on", 0), (b"gone", 0)], sum(len(v) for v in table.values()))
    assert [hit for key in keys for hit in idle_now([key], table.get, watermarks, HOUR)[0]] == whole[0]
    table[b"moved-on"] = advance(moved_on, click(1, ts=T0 + 2 * HOUR, session="s2"), ARTEFACTS, 0, 9, HOUR).to_bytes()
    del table[b"gone"]                                   # evicted or revoked meanwhile
    assert idle_now(keys, table.get, watermarks, HOUR)[0] == [(b"old", 0)]
    assert idle_now(keys, table.get, watermarks, HOUR, partitions={1})[0] == []


def test_replay_view_rebuilds_the_session_as_of_a_redelivered_event():
    events = [click(0), click(1, "addtocart"), click(2, "transaction"), click(3)]
    state = run(events)
    for k in range(4):
        view = replay_view(state, k)
        as_of = run(events[:k + 1])
        assert view.window.tobytes() == as_of.window.tobytes()
        assert view.event_count == k + 1
        assert view.has_cart == as_of.has_cart
        assert view.had_bought == (k == 3)
    assert replay_view(state, 99) is None


def test_replay_view_of_a_long_session_without_margin_knows_only_its_last_event():
    events = [click(i) for i in range(WINDOW + 5)]
    state = run(events)              # the default `committed`: everything applied is committed
    assert len(state.rows) == WINDOW
    assert replay_view(state, WINDOW + 4).window.tobytes() == state.window.tobytes()
    assert replay_view(state, WINDOW + 3) is None


def test_the_replay_margin_keeps_every_uncommitted_event_of_a_long_session_replayable():
    kinds = ["view"] * 150
    kinds[120], kinds[130] = "addtocart", "transaction"
    events = [click(i, kinds[i]) for i in range(150)]
    committed = 110                  # offsets 110.. may be re-delivered
    state = run(events, committed=lambda partition: committed)
    assert len(state.rows) == (150 - committed) + WINDOW - 1 and state.offsets[0] == committed - WINDOW + 1
    assert state.window.tobytes() == run(events).window.tobytes()      # scoring sees the last W rows
    for k in range(committed, 150):
        view, as_of = replay_view(state, k), run(events[:k + 1])
        assert view.window.tobytes() == as_of.window.tobytes() and len(view.window) == WINDOW
        assert (view.event_count, view.has_cart, view.had_bought) == (k + 1, k >= 120, k > 130)
    assert replay_view(state, committed - 1) is None          # committed: never re-delivered
    back = SessionState.from_bytes(state.to_bytes())
    assert back.to_bytes() == state.to_bytes() and back.first_transaction == 131 and back.first_addtocart == 121


def test_the_replay_margin_is_capped_and_unknown_commits_keep_up_to_the_cap():
    events = [click(i) for i in range(WINDOW + MAX_REPLAY_ROWS + 50)]
    state = run(events, committed=lambda partition: None)      # nothing committed yet
    assert len(state.rows) == WINDOW + MAX_REPLAY_ROWS
    assert replay_view(state, len(events) - MAX_REPLAY_ROWS - 1) is not None
    assert replay_view(state, len(events) - MAX_REPLAY_ROWS - 2) is None
    assert kept_rows(np.arange(10), 5, 8) == 6 and kept_rows(np.arange(10), 5, 3) == 10   # 2 uncommitted + 4 before
    assert kept_rows(np.arange(10), 5, 20) == 5 and kept_rows(np.arange(3), 5, -1) == 3


def test_unreadable_values_raise_state_error():
    data = run([click(0)]).to_bytes()
    with pytest.raises(StateError):
        SessionState.from_bytes(data[:5])
    with pytest.raises(StateError):
        SessionState.from_bytes(data + b"x")
    with pytest.raises(StateError):
        SessionState.from_bytes(b"\x09" + data[1:])
    with pytest.raises(StateError, match="flags"):
        SessionState.from_bytes(data[:1] + b"\x02" + data[2:])      # has_cart without an addtocart
    with pytest.raises(StateError, match="artefacts"):
        SessionState.from_bytes(b"\x01" + data[1:16])                # v1 needs the model to migrate


# -- v1 -> v2 migration, from bytes written by the v1 code -------------------------------------

def v1_fixture():
    data = json.loads(V1_FIXTURE.read_text())
    artefacts = FeatureArtefacts.from_dict(data["features"])
    sessions = {}
    for name, session in data["sessions"].items():
        events = [(ClickEvent(**{k: v for k, v in e.items() if k != "offset"}), e["offset"])
                  for e in session["events"]]
        sessions[name] = (bytes.fromhex(session["v1_hex"]), events)
    return artefacts, data["timeout_ms"], data["partition"], sessions


@pytest.mark.parametrize("name", ["short", "long", "bought"])
def test_a_v1_value_is_migrated_to_the_state_v2_would_have_built(name):
    artefacts, timeout_ms, partition, sessions = v1_fixture()
    v1, events = sessions[name]
    assert v1[0] == 1 and migrated_from(v1) == 1
    migrated = SessionState.from_bytes(v1, artefacts)
    direct = None
    for event, offset in events:
        direct = advance(direct, event, artefacts, partition, offset, timeout_ms)
    assert migrated_from(migrated.to_bytes()) is None
    assert read_header(migrated.to_bytes()) == read_header(direct.to_bytes())   # flags, counts, times
    assert migrated.offsets.tolist() == direct.offsets.tolist()
    # the model reads the migrated window exactly as the v2 one (OOV rows stay OOV)
    for column, value in encode_windows([migrated.window], artefacts).items():
        np.testing.assert_array_equal(value, encode_windows([direct.window], artefacts)[column], err_msg=column)
    assert replay_view(migrated, events[-1][1]).window.tobytes() == migrated.window.tobytes()
    # the session goes on from the migrated state exactly as from the v2 one
    nxt = ClickEvent(name, "transaction", "i2", events[-1][0].timestamp + 5000, "c2", 3.5)
    after_m = advance(migrated, nxt, artefacts, partition, events[-1][1] + 1, timeout_ms)
    after_d = advance(direct, nxt, artefacts, partition, events[-1][1] + 1, timeout_ms)
    assert (after_m.has_bought, after_m.bought_before_last, after_m.has_cart, after_m.event_count) == (
        after_d.has_bought, after_d.bought_before_last, after_d.has_cart, after_d.event_count)
    for column, value in encode_windows([after_m.window], artefacts).items():
        np.testing.assert_array_equal(value, encode_windows([after_d.window], artefacts)[column], err_msg=column)
    if name == "short":            # every row survives in v1: every event replays exactly
        for k, (_, offset) in enumerate(events):
            assert replay_view(migrated, offset).event_count == k + 1


# -- through the worker's batch logic (stream/pipeline.py, no broker) ---------------------------

def test_prepare_replays_old_uncommitted_events_of_a_long_session_and_counts_a_migration():
    from stream import metrics, pipeline
    from stream.scoring import ModelScorer

    scorer = ModelScorer(Path(__file__).resolve().parents[1] / "onnx_models" / "default", provider="cpu", threads=1)
    art = scorer.artefacts
    items = art.items

    def record(i: int) -> pipeline.Record:
        body = {"session_id": "r", "event_type": "transaction" if i == 60 else "view", "item_id": items[i % 9],
                "timestamp": T0 + 1000 * i, "event_id": f"r-{i}"}
        return pipeline.Record("clicks", 0, i, b"r", json.dumps(body).encode(), 1.0)

    recs = [record(i) for i in range(180)]
    store: dict[bytes, bytes] = {}
    committed = 120                    # the crash comes before offsets 120.. were committed
    windows = {}
    for start in range(0, 180, 30):    # batches of 30, each writing the state
        batch = pipeline.prepare(recs[start:start + 30], store.get, art, HOUR, 16384,
                                 committed=lambda partition: committed)
        for key, (value, _) in batch.state_writes.items():
            store[key] = value
        windows.update({a.event.event_id: (a.window.tobytes(), a.event_count, a.emit_buy) for a in batch.accepted})
    again = pipeline.prepare(recs[committed:], store.get, art, HOUR, 16384, committed=lambda partition: committed)
    assert not again.rejected and not again.state_writes and all(a.replayed for a in again.accepted)
    for a in again.accepted:           # re-delivered: the very window, count and flags of the first time
        assert (a.window.tobytes(), a.event_count, a.emit_buy) == windows[a.event.event_id]
    # without the margin (everything counted as committed) the same re-delivery is unscorable
    bare: dict[bytes, bytes] = {}
    for start in range(0, 180, 30):
        batch = pipeline.prepare(recs[start:start + 30], bare.get, art, HOUR, 16384)
        bare.update({key: value for key, (value, _) in batch.state_writes.items()})
    lost = pipeline.prepare(recs[committed:], bare.get, art, HOUR, 16384)
    assert {r.reason for r in lost.rejected} == {"redelivered_unscorable"} and len(lost.accepted) == 1

    # a v1 value is migrated on read and counted; the next write stores v2
    data = json.loads(V1_FIXTURE.read_text())
    v1 = bytes.fromhex(data["sessions"]["short"]["v1_hex"])
    counter = metrics.STATE_MIGRATIONS.labels(from_version="1")
    before = counter._value.get()
    fixture_art = FeatureArtefacts.from_dict(data["features"])
    body = {"session_id": "short", "event_type": "view", "item_id": "i1", "timestamp": 1396860669277 + 60_000}
    batch = pipeline.prepare([pipeline.Record("clicks", 1, 5000, b"short", json.dumps(body).encode(), 1.0)],
                             {b"short": v1}.get, fixture_art, HOUR, 16384)
    assert not batch.rejected and batch.accepted[0].event_count == 8
    assert batch.state_writes[b"short"][0][0] == STATE_VERSION and counter._value.get() == before + 1


def _advance_by_concatenation(state, event, partition, offset, committed):
    """advance() as first written (two concatenations and a slice): the reference its
    preallocating form must equal, row for row and offset for offset."""
    if state is None:
        state = SessionState.new(partition, WINDOW)
    rows = np.concatenate([state.rows, append_event(state.rows[-1:], event, ARTEFACTS)[-1:]])
    offsets = np.append(state.offsets, np.int64(offset))
    keep = kept_rows(offsets, WINDOW, committed)
    return rows[len(rows) - keep:], offsets[len(offsets) - keep:]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["view", "addtocart", "transaction"]), st.integers(0, 5_000),
                          st.one_of(st.none(), st.floats(0, 1e4, allow_nan=False))), min_size=1, max_size=260),
       st.one_of(st.none(), st.integers(-1, 300)))
def test_advance_equals_the_concatenating_reference(steps, committed):
    state, ts = None, T0
    for offset, (kind, gap_ms, price) in enumerate(steps):
        ts += gap_ms
        event = ClickEvent("s1", kind, f"i{offset % 7}", ts, category_id="x", price=price)
        want_rows, want_offsets = _advance_by_concatenation(state, event, 2, offset, committed)
        state = advance(state, event, ARTEFACTS, 2, offset, 10 * HOUR, lambda _p: committed)
        assert state.rows.tobytes() == want_rows.tobytes()
        assert np.array_equal(state.offsets, want_offsets)


@pytest.mark.parametrize("store_url", ["memory://", "rocksdb://"])
def test_key_slices_list_every_key_once_in_bounded_slices_while_the_table_changes(store_url, tmp_path):
    store, actives = faust_table_store(store_url, tmp_path)
    keys = {f"session-{i}".encode() for i in range(1001)}
    for i, key in enumerate(sorted(keys)):
        if store_url == "rocksdb://":
            store._db_for_partition(i % 4)[key] = b"v"
        else:
            store.data[key] = b"v"
    if store_url == "rocksdb://":
        assert store.use_rocksdict   # the lazy path, not the fallback
        for tp in actives:
            store.set_persisted_offset(tp, 42)   # Faust's offset key sits in every database
    listed, deleted = [], set()
    for n, (chunk, current) in enumerate(key_slices(store, 100)):
        assert 0 < len(chunk) <= 100 and all(isinstance(key, bytes) for key in chunk)
        assert all(current(key) == b"v" for key in chunk if key not in deleted)   # values read where listed
        listed.extend(chunk)
        # what a scan does between slices: delete what it decided, batches add sessions
        for key in chunk[:10]:
            del store[key]
            deleted.add(key)
        store_new = f"new-{n}".encode()
        if store_url == "rocksdb://":
            store._db_for_partition(n % 4)[store_new] = b"v"
        else:
            store.data[store_new] = b"v"
    # every key once, no offset key; a session created meanwhile may be listed (RocksDB: in a
    # partition not reached yet, or after the last key listed) or left to the next scan
    assert len(listed) == len(set(listed)) and keys <= set(listed)
    assert all(key.startswith(b"new-") for key in set(listed) - keys)
    # the memory store's keys are listed at once; RocksDB's lazily (so some new ones show)
    assert bool(set(listed) - keys) == (store_url == "rocksdb://")
    assert len(deleted) > 0 and all(store.get(key) is None for key in deleted)
    # a key listed then deleted reads None and idle_now skips it
    assert idle_now(sorted(deleted), store.get, {}, HOUR) == ([], 0)


def test_key_slices_fall_back_to_listing_the_keys_when_the_store_is_not_raw_rocksdict():
    class Plain(dict):
        use_rocksdict, key_serializer = True, "json"   # not raw: the store's own listing decodes
    store = Plain({f"k{i}".encode(): b"v" for i in range(5)})
    assert [len(chunk) for chunk, _ in key_slices(store, 2)] == [2, 2, 1]
    assert sum((chunk for chunk, _ in key_slices(store, 2)), []) == list(store)
    assert all(current == store.get for _, current in key_slices(store, 2))
    assert list(key_slices({}, 2)) == []


def test_key_slices_hold_no_rocksdb_database_between_slices(tmp_path):
    # A rebalance between two slices: Faust drops every partition's database and opens the
    # folders again (an open handle anywhere would keep RocksDB's lock: "lock hold by
    # current process"). The listing then goes on in the re-opened databases, without
    # repeating a key; a partition not re-opened (revoked for good) ends its listing.
    import gc
    store, _ = faust_table_store("rocksdb://", tmp_path)
    keys = {f"session-{i:04d}".encode() for i in range(1000)}
    for i, key in enumerate(sorted(keys)):
        store._db_for_partition(i % 4)[key] = b"v"
    slices = key_slices(store, 100)
    first, current = next(slices)
    for partition in range(4):
        store._dbs.pop(partition)
    gc.collect()
    for partition in range(3):            # partition 3 is not ours any more
        store._db_for_partition(partition)
    assert current(first[0]) == b"v"      # a slice's values are read where its partition is now
    listed = first + sum((chunk for chunk, _ in slices), [])
    assert len(listed) == len(set(listed))
    on_3 = {key for i, key in enumerate(sorted(keys)) if i % 4 == 3}
    assert set(listed) == keys - on_3
