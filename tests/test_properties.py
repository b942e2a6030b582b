"""Property-based tests (hypothesis) of the event contract and the session state.

    .venv/bin/python -m pytest tests/test_properties.py -q

- decode: any bytes, any JSON-ish value and any mutation of a valid event give a
  ClickEvent or an InvalidEvent with a reason, never another exception;
- a valid ClickEvent round-trips through to_json/decode;
- any valid event sequence keeps the session-state invariants (window length, offsets,
  flags, idle restarts), round-trips through bytes, and `replay_view` at an offset
  equals the state as it was right after that offset, for sessions longer than the
  window too: every event at or past the committed offset (a commit that lags the
  input, as in the worker) must replay;
- encode_windows gives finite inputs and in-range indices for any such window.
Example counts are kept moderate: the file runs in well under a minute on a busy machine.
"""
from __future__ import annotations

import json

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream.events import (EVENT_TYPE_ALIASES, EVENT_TYPES, MAX_ID_CHARS, MAX_PRICE, MAX_TIMESTAMP_MS,
                           MIN_TIMESTAMP_MS, ClickEvent, InvalidEvent, decode, validate)
from stream.features import (N_EVENT_TYPES, N_HOURS, N_MONTHS, N_WEEKDAYS, N_WEEKS, FeatureArtefacts,
                             encode_windows, id_hash)
from stream.session_state import HEADER_SIZE, ROW_BYTES, SessionState, StateError, advance, replay_view



def examples(n: int) -> settings:
    # No deadline: the machine is shared, and speed is not what these tests check.
    return settings(max_examples=n, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TIMEOUT_MS = 30 * 60 * 1000
GOOD = {"session_id": "s1", "event_type": "view", "item_id": "42", "timestamp": 1396860669277}


def accepts_or_rejects(raw) -> ClickEvent | InvalidEvent:
    """decode's contract: an event, or InvalidEvent with a reason code; nothing else escapes."""
    try:
        return decode(raw)
    except InvalidEvent as exc:
        assert exc.reason.isidentifier() and exc.detail, exc
        return exc


# -- decode: anything in, ClickEvent or InvalidEvent out ------------------------------

json_scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
                | st.text(max_size=30) | st.sampled_from([10 ** 300, -(10 ** 400), 1e308, -0.0, 2 ** 63]))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)


@examples(300)
@given(st.binary(max_size=300))
def test_any_bytes_give_an_event_or_a_reason(raw):
    accepts_or_rejects(raw)


@examples(200)
@given(json_values)
def test_any_json_value_gives_an_event_or_a_reason(value):
    # json.dumps escapes lone surrogates ("\ud800"), exactly as a hostile client would send them.
    accepts_or_rejects(json.dumps(value).encode())
    try:
        validate(value)     # the Python-level entry point (replay, readers) holds the same contract
    except InvalidEvent:
        pass


FIELDS = ("session_id", "event_type", "item_id", "timestamp", "category_id", "price", "user_id", "event_id")


@examples(300)
@given(st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=3),
       st.lists(st.sampled_from(FIELDS), max_size=2),
       st.lists(st.tuples(st.integers(0, 200), st.binary(min_size=0, max_size=3)), max_size=3))
def test_mutated_valid_events_give_an_event_or_a_reason(replaced, removed, splices):
    fields = dict(GOOD, category_id="7", price=12.5, user_id="u", event_id="e")
    fields.update(replaced)
    for name in removed:
        fields.pop(name, None)
    raw = bytearray(json.dumps(fields).encode())
    for at, chunk in splices:     # byte-level damage: overwrite/insert a few bytes
        at = min(at, len(raw))
        raw[at:at + len(chunk) // 2] = chunk
    result = accepts_or_rejects(bytes(raw))
    if isinstance(result, ClickEvent):
        assert result.session_id.encode().decode() == result.session_id


def test_known_attacks_have_precise_reasons():
    body = json.dumps(GOOD)[1:-1]
    cases = {
        b'{"session_id":"s\\ud800","event_type":"view","item_id":"1","timestamp":1396860669277}': "bad_unicode",
        b'{"session_id":"s\\u0000","event_type":"view","item_id":"1","timestamp":1396860669277}':
            "control_character",
        b"[" * 16_000: "too_deep",
        b'{"a":' * 3_000: "too_deep",
        ("{%s,\"price\":1%s}" % (body, "0" * 400)).encode(): "bad_number",
        ("{%s,\"price\":1e999}" % body).encode(): "bad_price",
        ("{%s,\"price\":NaN}" % body).encode(): "bad_price",
        ("{%s,\"price\":1e13}" % body).encode(): "bad_price",
        ("{%s,\"price\":true}" % body).encode(): "wrong_type",
        ("{%s,\"session_id\":\"again\"}" % body).encode(): "duplicate_field",
        b"\xef\xbb\xbf" + json.dumps(GOOD).encode(): "invalid_json",
        json.dumps(GOOD).encode("utf-16"): "undecodable",
        b" \n\t ": "invalid_json",
        b"7": "not_an_object",
        json.dumps(dict(GOOD, timestamp=-0.0)).encode(): "timestamp_out_of_range",
        json.dumps(dict(GOOD, timestamp="0001-01-01T00:00:00+23:59")).encode(): "timestamp_out_of_range",
        json.dumps(dict(GOOD, item_id="x" * 15_000)).encode(): "oversized_field",
    }
    for raw, reason in cases.items():
        result = accepts_or_rejects(raw)
        assert isinstance(result, InvalidEvent) and result.reason == reason, (raw[:60], result)
    # Python-level callers (replay, readers) can pass ints json.loads never would.
    for name, value, reason in [("timestamp", 10 ** 5000, "timestamp_out_of_range"),
                                ("price", -(10 ** 5000), "bad_price"), ("session_id", -(10 ** 5000), "oversized_field")]:
        try:
            validate(dict(GOOD, **{name: value}))
            raise AssertionError(f"{name}={value.bit_length()} bits accepted")
        except InvalidEvent as exc:
            assert exc.reason == reason, exc
    for value, reason in [(10 ** 5000, "oversized_field"), (2 ** 70, None)]:
        try:
            event = validate(dict(GOOD, item_id=value))
            assert reason is None and event.item_id == str(value)
        except InvalidEvent as exc:
            assert exc.reason == reason
    try:
        validate(dict(GOOD, price=10 ** 400))
        raise AssertionError("a price beyond float range was accepted")
    except InvalidEvent as exc:
        assert exc.reason == "bad_price"


def test_accepted_oddities_are_normalised():
    # A fractional millisecond is dropped; a price of -0.0 is 0.0; NaN in an unknown field is ignored.
    event = decode(('{"session_id":"s","event_type":"view","item_id":"1","timestamp":1396860669277.9,'
                    '"price":-0.0,"extra":NaN}').encode())
    assert event.timestamp == 1396860669277
    assert event.price == 0.0 and str(event.price) == "0.0"


# -- valid events round-trip ---------------------------------------------------------

ids = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=24) | \
    st.integers(-(10 ** 30), 10 ** 30).map(str)
valid_events = st.builds(
    ClickEvent,
    session_id=ids, event_type=st.sampled_from(sorted(EVENT_TYPES)), item_id=ids,
    timestamp=st.integers(MIN_TIMESTAMP_MS, MAX_TIMESTAMP_MS - 1),
    category_id=st.none() | ids,
    price=st.none() | st.floats(0, MAX_PRICE).map(lambda p: p + 0.0),
    user_id=st.none() | ids, event_id=st.none() | ids)


@examples(300)
@given(valid_events)
def test_valid_events_round_trip_through_the_wire(event):
    assert decode(event.to_json()) == event
    assert validate(event.to_dict()) == event
    assert len(event.to_json()) < 16_384 and len(event.session_id) <= MAX_ID_CHARS


@examples(100)
@given(valid_events, st.sampled_from(sorted(EVENT_TYPE_ALIASES)))
def test_event_type_aliases_decode_to_their_canonical_name(event, alias):
    fields = dict(event.to_dict(), event_type=alias.upper())
    assert decode(json.dumps(fields).encode()).event_type == EVENT_TYPE_ALIASES[alias]


# -- session state: any valid event sequence -----------------------------------------

def small_artefacts(window: int) -> FeatureArtefacts:
    return FeatureArtefacts(items=("1", "2", "3"), categories=("c1", "c2"), dwell_mean=3.3, dwell_std=0.96,
                            price_mean=3.5, price_std=0.96, window=window)


step = st.tuples(
    st.sampled_from(["a", "b", "c"]),                                   # session
    st.sampled_from(["view"] * 6 + ["addtocart", "transaction"]),       # event type
    st.sampled_from(["1", "2", "3", "404"]),                            # item (404: out of vocabulary)
    st.sampled_from([None, "c1", "c2", "c9"]),
    st.none() | st.floats(0, MAX_PRICE),
    # gap to the previous event of the stream: mostly seconds, sometimes out of order,
    # sometimes past the idle timeout (a new session under the same id)
    st.sampled_from([0, 1_000, 30_000, 600_000, -5_000, -3_600_000, TIMEOUT_MS + 1, 5 * TIMEOUT_MS]),
)

# Mostly one session and rare idle restarts, so sessions outgrow a window of 100.
long_step = st.tuples(
    st.sampled_from(["a"] * 8 + ["b"]),
    st.sampled_from(["view"] * 12 + ["addtocart", "transaction"]),
    st.sampled_from(["1", "2", "3", "404"]),
    st.sampled_from([None, "c1", "c2", "c9"]),
    st.none() | st.floats(0, MAX_PRICE),
    st.sampled_from([0, 1_000, 30_000, 600_000, -5_000] * 20 + [TIMEOUT_MS + 1]),
)


def replay_sequence(steps, window: int, commit_lag: int):
    """Feed the steps through advance, the partition's committed offset lagging the input
    by `commit_lag`; check invariants after each; return what is needed to compare replay
    views: per offset the snapshot state, the final states, and per session the committed
    offset its last write saw."""
    artefacts = small_artefacts(window)
    states: dict[str, SessionState] = {}
    model: dict[str, list[tuple[ClickEvent, int]]] = {}     # events of the current session
    snapshots: dict[int, tuple[str, SessionState]] = {}
    committed_at: dict[str, int] = {}
    clock = 1_396_860_669_277
    for offset, (sid, etype, item, category, price, gap) in enumerate(steps, start=10):
        committed = offset - commit_lag
        committed_at[sid] = committed
        clock = min(max(clock + gap, MIN_TIMESTAMP_MS), MAX_TIMESTAMP_MS - 1)
        event = ClickEvent(sid, etype, item, clock, category, price)
        before = states.get(sid)
        if before is None or (before.event_count and clock - before.last_event_ms > TIMEOUT_MS):
            model[sid] = []          # idle timeout (or first event): a fresh session
        model[sid].append((event, offset))
        state = advance(before, event, artefacts, 3, offset, TIMEOUT_MS, lambda partition: committed)
        states[sid] = state
        snapshots[offset] = (sid, state)

        session = model[sid]
        n = min(len(session), window)
        kept = len(state.rows)
        assert state.event_count == len(session) and len(state.window) == n and kept == len(state.offsets)
        assert n <= kept <= len(session)
        assert state.offsets.tolist() == [o for _, o in session][-kept:]
        # every row that may still be re-delivered is kept, with the W - 1 rows its window needs
        uncommitted = sum(o >= committed for _, o in session)
        assert kept >= min(len(session), uncommitted + window - 1)
        assert state.window["event_type"].tolist() == [EVENT_TYPES[e.event_type] for e, _ in session][-n:]
        assert state.window["timestamp"].tolist() == [e.timestamp for e, _ in session][-n:]
        assert state.window["item"].tolist() == [id_hash(e.item_id) for e, _ in session][-n:]
        assert state.window["category"].tolist() == [id_hash(e.category_id) for e, _ in session][-n:]
        assert state.last_event_ms == max(e.timestamp for e, _ in session)
        assert state.has_bought == any(e.is_transaction for e, _ in session)
        assert state.has_cart == any(e.event_type == "addtocart" for e, _ in session)
        assert state.bought_before_last == any(e.is_transaction for e, _ in session[:-1])
        assert state.partition == 3 and state.last_offset == offset
        data = state.to_bytes()
        assert len(data) == HEADER_SIZE + ROW_BYTES * kept == 26 + 41 * kept
        again = SessionState.from_bytes(data)
        assert again.to_bytes() == data
        assert (again.event_count, again.last_event_ms, again.has_bought, again.has_cart,
                again.bought_before_last) == (state.event_count, state.last_event_ms, state.has_bought,
                                              state.has_cart, state.bought_before_last)
    return artefacts, states, model, snapshots, committed_at


def check_replay_views(states, model, snapshots, committed_at, window: int) -> None:
    for offset, (sid, then) in snapshots.items():
        now = states[sid]
        view = replay_view(now, offset)
        in_session = offset in [o for _, o in model[sid]]
        if not in_session:            # an older session under the same id, or another session
            assert view is None
            continue
        if offset not in now.offsets.tolist():
            assert view is None
            continue
        if offset >= committed_at[sid] or offset == now.last_offset or now.event_count == len(now.offsets):
            assert view is not None, (offset, committed_at[sid])   # may be re-delivered: must replay
        if view is None:
            continue
        assert view.window.tobytes() == then.window.tobytes()
        assert view.event_count == then.event_count
        assert view.had_bought == then.bought_before_last
        assert view.has_cart == then.has_cart


def check_inputs(windows, artefacts: FeatureArtefacts) -> None:
    inputs = encode_windows(windows, artefacts)
    B, W = len(windows), artefacts.window
    lengths = np.array([min(len(w), W) for w in windows])
    assert inputs["length"].tolist() == lengths.tolist()
    inside = np.arange(W)[None, :] < lengths[:, None]     # (B, W)
    bounds = {"event_type": N_EVENT_TYPES, "item": artefacts.n_items, "category": artefacts.n_categories,
              "hour": N_HOURS, "weekday": N_WEEKDAYS, "month": N_MONTHS, "week": N_WEEKS}
    for name, bound in bounds.items():
        values = inputs[name]
        assert values.shape == (B, W) and values.dtype == np.int64
        assert (values[inside] >= 1).all() and (values[inside] < bound).all(), name
        assert not values[~inside].any(), name          # padding is 0
    for name in ("dwell", "price"):
        values = inputs[name]
        assert values.shape == (B, W) and values.dtype == np.float32
        assert np.isfinite(values).all() and not values[~inside].any(), name


@examples(80)
@given(st.lists(step, min_size=1, max_size=40), st.sampled_from([-1, 0, 1, 7, 30, 10 ** 6]))
def test_session_state_invariants_small_window(steps, lag):
    # A window of 5 makes truncation, restarts and replay limits frequent.
    artefacts, states, model, snapshots, committed_at = replay_sequence(steps, window=5, commit_lag=lag)
    check_replay_views(states, model, snapshots, committed_at, window=5)
    check_inputs([s.window for s in states.values()], artefacts)


@examples(60)
@given(st.lists(long_step, min_size=10, max_size=60), st.sampled_from([-1, 0, 3, 9, 10 ** 6]))
def test_session_state_invariants_small_window_long_sessions(steps, lag):
    # Sessions many times the window of 5, commits lagging by up to twice the window:
    # replay margins and their W - 1 leading rows are exercised on every example.
    artefacts, states, model, snapshots, committed_at = replay_sequence(steps, window=5, commit_lag=lag)
    check_replay_views(states, model, snapshots, committed_at, window=5)
    check_inputs([s.window for s in states.values()], artefacts)


@examples(15)
@given(st.lists(long_step, min_size=150, max_size=300), st.sampled_from([-1, 0, 40, 150, 10 ** 6]))
def test_session_state_invariants_full_window(steps, lag):
    # Sessions of up to 300 events: longer than the window; a lag of 150 keeps replay
    # margins of over 100 rows.
    artefacts, states, model, snapshots, committed_at = replay_sequence(steps, window=100, commit_lag=lag)
    check_replay_views(states, model, snapshots, committed_at, window=100)
    check_inputs([s.window for s in states.values()], artefacts)


@examples(40)
@given(st.lists(valid_events, min_size=1, max_size=30))
def test_encoded_inputs_are_finite_and_in_range_for_any_valid_events(events):
    # Arbitrary valid events (any timestamps in range, any price up to MAX_PRICE), one session.
    artefacts = small_artefacts(100)
    state = None
    for offset, event in enumerate(events):
        state = advance(state, event, artefacts, 0, offset, TIMEOUT_MS)
    check_inputs([state.window, state.window[:1]], artefacts)


table_values = st.binary(max_size=400) | st.builds(
    lambda version, flags, body: bytes([version, flags]) + body,
    st.sampled_from([2, 2, 2, 1, 3]), st.integers(0, 7), st.binary(min_size=24, max_size=24 + 41 * 4))


@examples(200)
@given(table_values)
def test_any_table_value_reads_as_a_state_or_a_state_error(data):
    # The worker catches StateError for a corrupt changelog value and starts the session
    # afresh; anything else would escape its batch.
    try:
        state = SessionState.from_bytes(data)
    except StateError:
        return
    assert len(state.rows) == len(state.offsets) and len(state.window) <= state.window_size
    # Byte-identical: a v2 value whose flags disagree with its event numbers is corrupt.
    assert state.to_bytes() == data
