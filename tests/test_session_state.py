"""Session state: the compact table value and its pure updates (no broker)."""
from __future__ import annotations


from stream.events import ClickEvent
from stream.features import EVENT_ROW, WINDOW, FeatureArtefacts, append_event, empty_window
from stream.session_state import (HEADER, SessionState, StateError, advance, idle_keys, read_header,
                                  replay_view)

ARTEFACTS = FeatureArtefacts(items=("a", "b", "c"), categories=("x",), dwell_mean=0.0, dwell_std=1.0,
                             price_mean=0.0, price_std=1.0)
T0 = 1_767_571_253_772
HOUR = 3_600_000


def click(i: int, kind: str = "view", ts: int | None = None, session: str = "s1") -> ClickEvent:
    return ClickEvent(session, kind, "abc"[i % 3], T0 + i * 1000 if ts is None else ts, event_id=f"e{i}")


def run(events, timeout_ms=HOUR, state=None, partition=2):
    for offset, event in enumerate(events):
        state = advance(state, event, ARTEFACTS, partition, offset, timeout_ms)
    return state


def test_round_trip_is_compact_and_exact():
    state = run([click(0), click(1, "addtocart"), click(2, "transaction")])
    data = state.to_bytes()
    assert len(data) == HEADER.size + 3 * (EVENT_ROW.itemsize + 8)
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


def test_replay_view_of_a_long_session_knows_only_its_last_event():
    events = [click(i) for i in range(WINDOW + 5)]
    state = run(events)
    assert replay_view(state, WINDOW + 4).window.tobytes() == state.window.tobytes()
    assert replay_view(state, WINDOW + 3) is None


def test_unreadable_values_raise_state_error():
    import pytest

    data = run([click(0)]).to_bytes()
    with pytest.raises(StateError):
        SessionState.from_bytes(data[:5])
    with pytest.raises(StateError):
        SessionState.from_bytes(data + b"x")
    with pytest.raises(StateError):
        SessionState.from_bytes(b"\x09" + data[1:])
