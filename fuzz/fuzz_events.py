"""Coverage-guided fuzzing (atheris/libFuzzer) of the worker's input path:

    raw bytes --(events.decode)--> ClickEvent | InvalidEvent
    ClickEvent --(session_id.encode(): the message key)--> key
    key, ClickEvent --(session_state.advance)--> SessionState (a small evolving table)
    SessionState.window --(features.encode_windows)--> model inputs

The contract checked on every input: nothing but InvalidEvent escapes decode, and an
accepted event gives a key that encodes, a state that keeps its invariants and round
trips through bytes (the committed offset lags the input by COMMIT_LAG, so replay
margins grow and every uncommitted row must replay), and model inputs that are finite
and inside their embedding ranges. Anything else is a crash: libFuzzer writes the input to `crash-<sha1>` (see
-artifact_prefix) and the run stops. Turn each one into a regression case in
fuzz/regressions/ (tests/test_fuzz.py replays them).

A fuzz input that starts with a NUL byte is not sent as is: `structured_message` builds
a valid event from the rest and puts hostile values (any code point, lone surrogates,
300-digit integers, NaN, deep nesting, odd ISO strings) into a few of its fields, so
the deeper stages see far more than byte mutation of JSON would give them. Any other
input is the message value itself.

Run (the first folder collects new inputs, the others are read-only seeds):

    make fuzz FUZZ_SECONDS=300
    mkdir -p .fuzz-corpus && .venv/bin/python fuzz/fuzz_events.py .fuzz-corpus fuzz/corpus -dict=fuzz/events.dict -max_total_time=300

`check_one(data)` is the same check without atheris, for replaying single inputs.
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np

if __name__ == "__main__":
    # Instrument only our own modules (numpy's would slow start-up and dilute coverage):
    # they must be first imported inside this block.
    import atheris
    with atheris.instrument_imports(include=["stream"]):
        import stream.events, stream.features, stream.session_state  # noqa: E401,F401

from stream.events import ClickEvent, InvalidEvent, decode
from stream.features import (N_EVENT_TYPES, N_HOURS, N_MONTHS, N_WEEKDAYS, N_WEEKS, FeatureArtefacts,
                             encode_windows)
from stream.session_state import MAX_REPLAY_ROWS, SessionState, advance, replay_view

ROOT = Path(__file__).resolve().parents[1]
ARTEFACTS = FeatureArtefacts.load(ROOT / "onnx_models" / "default" / "features.json")
TIMEOUT_MS = 30 * 60 * 1000
MAX_SESSIONS = 256          # the evolving table is cleared past this, to keep runs fast
COMMIT_LAG = 120            # inputs applied but not yet committed: kept for re-delivery

_sessions: dict[bytes, SessionState] = {}
_offset = 0

# Exclusive upper bound of each categorical input (index 0 is padding).
BOUNDS = {"event_type": N_EVENT_TYPES, "item": ARTEFACTS.n_items, "category": ARTEFACTS.n_categories,
          "hour": N_HOURS, "weekday": N_WEEKDAYS, "month": N_MONTHS, "week": N_WEEKS}


def check_inputs(inputs: dict[str, np.ndarray], length: int) -> None:
    """Model inputs for one window: in range, padded with 0 after `length`, finite."""
    W = ARTEFACTS.window
    assert inputs["length"].tolist() == [length], (inputs["length"], length)
    for name, bound in BOUNDS.items():
        values = inputs[name]
        assert values.shape == (1, W) and values.dtype == np.int64, (name, values.shape, values.dtype)
        assert values.min() >= 0 and values.max() < bound, (name, values.min(), values.max(), bound)
        assert (values[0, :length] >= 1).all(), f"{name}: padding index inside the window"
        assert not values[0, length:].any(), f"{name}: non-zero padding"
    for name in ("dwell", "price"):
        values = inputs[name]
        assert values.shape == (1, W) and values.dtype == np.float32, (name, values.shape, values.dtype)
        assert np.isfinite(values).all(), f"{name}: non-finite input {values[~np.isfinite(values)][:3]}"


def check_state(state: SessionState, offset: int, committed: int) -> None:
    n, kept = len(state.window), len(state.rows)
    W = ARTEFACTS.window
    assert 1 <= n <= W and len(state.offsets) == kept and n <= kept <= W + MAX_REPLAY_ROWS, (n, kept)
    assert state.event_count >= kept and (state.event_count == n or n == W)
    assert state.last_offset == offset and (np.diff(state.offsets) > 0).all()
    assert SessionState.from_bytes(state.to_bytes()).to_bytes() == state.to_bytes()
    replay = replay_view(state, offset)
    assert replay is not None and replay.window.tobytes() == state.window.tobytes()
    for j in np.flatnonzero(state.offsets >= committed):     # may be re-delivered: must replay
        replay = replay_view(state, int(state.offsets[j]))
        assert replay is not None, (j, kept, state.event_count)
        assert len(replay.window) == min(W, replay.event_count)
        assert replay.window[-1:].tobytes() == state.rows[j:j + 1].tobytes()
    check_inputs(encode_windows([state.window], ARTEFACTS), n)


FIELDS = ("session_id", "event_type", "item_id", "timestamp", "category_id", "price", "user_id",
          "event_id", "extra")
BASE = {"session_id": "s1", "event_type": "view", "item_id": "1877", "category_id": "3", "price": 12.5,
        "timestamp": 1396860669277, "user_id": "u9", "event_id": "e-1"}


def structured_message(data: bytes) -> bytes:
    """A valid event with a few fields replaced by hostile values chosen by the fuzz bytes:
    byte-level mutation alone rarely keeps a message JSON while putting, say, a lone
    surrogate or a 300-digit number into a field that is read."""
    import atheris
    fdp = atheris.FuzzedDataProvider(data)
    fields: dict = dict(BASE)
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        name = FIELDS[fdp.ConsumeIntInRange(0, len(FIELDS) - 1)]
        kind = fdp.ConsumeIntInRange(0, 10)
        if kind == 0:
            fields.pop(name, None)
        elif kind == 1:
            fields[name] = fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 300))   # any code point, surrogates too
        elif kind == 2:
            fields[name] = fdp.ConsumeInt(fdp.ConsumeIntInRange(1, 140))        # up to ~340 digits
        elif kind == 3:
            fields[name] = fdp.ConsumeFloat()                                   # NaN, inf, -0.0, subnormals
        elif kind == 4:
            fields[name] = fdp.ConsumeBool()
        elif kind == 5:
            fields[name] = None
        elif kind == 6:
            value: object = fdp.ConsumeIntInRange(0, 9)
            for _ in range(fdp.ConsumeIntInRange(1, 1200)):
                value = [value] if fdp.ConsumeBool() else {"k": value}
            fields[name] = value
        elif kind == 7:
            fields[name] = "".join(str(d) for d in fdp.ConsumeIntListInRange(fdp.ConsumeIntInRange(1, 40), 0, 9))
        elif kind == 8:     # ISO-8601-like text with fuzzed parts
            fields[name] = "%04d-%02d-%02dT%02d:%02d:%02d%s" % (
                fdp.ConsumeIntInRange(0, 10000), fdp.ConsumeIntInRange(0, 13), fdp.ConsumeIntInRange(0, 32),
                fdp.ConsumeIntInRange(0, 25), fdp.ConsumeIntInRange(0, 61), fdp.ConsumeIntInRange(0, 61),
                fdp.ConsumeUnicodeNoSurrogates(8))
        elif kind == 9:
            fields[name] = fdp.ConsumeIntInRange(-2**63, 2**63)
        else:
            fields[name] = fdp.ConsumeFloatInRange(-1e40, 1e40)
    try:
        text = json.dumps(fields, ensure_ascii=fdp.ConsumeBool())
    except (RecursionError, ValueError):     # too deep for json.dumps itself
        return b"[" * 2000
    # ensure_ascii=False with a surrogate gives bytes that are not UTF-8, as a broken client would.
    return text.encode("utf-8", "surrogatepass")


def message_from_input(data: bytes) -> bytes:
    """Fuzz input -> message value: a leading NUL byte selects a structured message,
    anything else is the message itself (so corpus files are plain messages)."""
    return structured_message(data[1:]) if data[:1] == b"\x00" else data


def check_one(data: bytes) -> ClickEvent | InvalidEvent:
    """One fuzz input through the worker's input path; returns the event or the rejection."""
    # numpy's overflow/invalid warnings (a price cast to float32 as inf, ...) are bugs here.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise"):
            return check_message(message_from_input(data))


def check_message(data: bytes) -> ClickEvent | InvalidEvent:
    global _offset
    try:
        event = decode(data)
    except InvalidEvent as exc:
        assert exc.reason and exc.reason.isidentifier(), exc.reason
        return exc
    # The worker keys its table and checks the message key with this: it must encode.
    key = event.session_id.encode()
    assert key.decode() == event.session_id
    assert decode(event.to_json()) == event, "accepted event does not round-trip"
    _offset += 1
    if len(_sessions) >= MAX_SESSIONS:
        _sessions.clear()
    committed = _offset - COMMIT_LAG
    state = advance(_sessions.get(key), event, ARTEFACTS, 0, _offset, TIMEOUT_MS, lambda partition: committed)
    _sessions[key] = state
    check_state(state, _offset, committed)
    return event


def test_one_input(data: bytes) -> None:
    check_one(data)


def main(argv: list[str]) -> None:
    import atheris
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
