"""The click-event contract shared by training and serving.

A click event is JSON on the wire:

    {"session_id": "s1", "event_type": "view", "item_id": "214536502",
     "category_id": "1096", "price": 12.5, "timestamp": 1396860669277,
     "user_id": "u9", "event_id": "e-123"}

`timestamp` is UTC, epoch milliseconds on the wire; an ISO-8601 string is accepted
(a string without a zone is read as UTC). `category_id`, `price`, `user_id` and
`event_id` are optional. Every rejection carries a reason (`InvalidEvent.reason`,
a short machine-readable code, and `InvalidEvent.detail`, a sentence for people),
which is what the dead-letter topic and its metrics are keyed by.

`decode` raises nothing but InvalidEvent, whatever the bytes (the worker relies on
it; tests/test_properties.py and the atheris harness fuzz/fuzz_events.py check it).
Decisions on hostile input, each with its reason code:
- JSON nested beyond Python's recursion limit -> `too_deep` (json.loads would raise
  RecursionError); an integer literal of more than MAX_NUMBER_DIGITS digits ->
  `bad_number` (no known field can hold one, and int() of it costs time);
  a key given twice -> `duplicate_field` (parsers disagree on which copy wins, so the
  tracker that validated the event may have seen the other one).
- Ids (session, item, category, user, event) must be encodable UTF-8: a lone
  surrogate (the JSON escape "\ud800", which json.loads accepts) -> `bad_unicode`;
  a control character (U+0000-U+001F, U+007F-U+009F: NUL, newline, escape...) ->
  `control_character`, since ids become Kafka keys, log lines and webhook fields.
- NaN/Infinity literals and overflowing floats (1e999) are read as floats and then
  rejected by the field that holds them (`bad_price`, `bad_timestamp`); elsewhere they
  are ignored like any unknown field. A price above MAX_PRICE is `bad_price` (the
  window stores it as float32). A fractional millisecond timestamp is truncated; -0.0
  is 0 (`timestamp_out_of_range`); a price of -0.0 is 0.0.
- A byte-order mark, UTF-16, empty or whitespace-only input -> `undecodable` or
  `invalid_json`; a top level that is not an object -> `not_an_object`.

This module imports nothing heavier than the standard library: the worker and the
training pipeline both use it.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping

SCHEMA_VERSION = 1

# Codes are embedding indices: 0 is reserved for padding in the feature window.
EVENT_TYPES: dict[str, int] = {"view": 1, "addtocart": 2, "transaction": 3}
EVENT_TYPE_NAMES: dict[int, str] = {code: name for name, code in EVENT_TYPES.items()}
EVENT_TYPE_ALIASES: dict[str, str] = {
    "view": "view", "click": "view", "clicks": "view", "pv": "view", "page_view": "view",
    "addtocart": "addtocart", "cart": "addtocart", "carts": "addtocart",
    "add_to_cart": "addtocart", "add-to-cart": "addtocart",
    "transaction": "transaction", "buy": "transaction", "purchase": "transaction",
    "order": "transaction", "orders": "transaction",
}

# Sanity limits. Timestamps outside [2000-01-01, 2100-01-01) are almost always a
# unit error (seconds or microseconds sent as milliseconds), so reject them loudly.
MIN_TIMESTAMP_MS = 946_684_800_000
MAX_TIMESTAMP_MS = 4_102_444_800_000
MAX_ID_CHARS = 256
MAX_MESSAGE_BYTES = 16_384
# No id, timestamp or price needs more digits; longer integer literals are hostile.
MAX_NUMBER_DIGITS = MAX_ID_CHARS
_MAX_ID_INT = 10 ** MAX_ID_CHARS
# A real price in any currency is far below this; above float32's range it would be
# stored as inf in the session window.
MAX_PRICE = 1e12

_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")

REQUIRED_FIELDS = ("session_id", "event_type", "item_id", "timestamp")
OPTIONAL_FIELDS = ("category_id", "price", "user_id", "event_id")
KNOWN_FIELDS = frozenset(REQUIRED_FIELDS + OPTIONAL_FIELDS)


class InvalidEvent(ValueError):
    """An event that breaks the contract. `reason` is a stable code for metrics."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class ClickEvent:
    session_id: str
    event_type: str          # canonical name: view | addtocart | transaction
    item_id: str
    timestamp: int           # UTC epoch milliseconds
    category_id: str | None = None
    price: float | None = None
    user_id: str | None = None
    event_id: str | None = None

    @property
    def event_type_code(self) -> int:
        return EVENT_TYPES[self.event_type]

    @property
    def is_transaction(self) -> bool:
        return self.event_type == "transaction"

    def to_dict(self) -> dict[str, Any]:
        # Plain attribute reads: dataclasses.asdict deep-copies and costs ~9 us an event.
        fields = {"session_id": self.session_id, "event_type": self.event_type,
                  "item_id": self.item_id, "timestamp": self.timestamp}
        for name in OPTIONAL_FIELDS:
            value = getattr(self, name)
            if value is not None:
                fields[name] = value
        return fields

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()


def normalise_event_type(value: Any) -> str:
    """Map a dataset's or client's event-type spelling to the canonical name."""
    if not isinstance(value, str):
        raise InvalidEvent("wrong_type", f"event_type must be a string, got {type(value).__name__}")
    name = EVENT_TYPE_ALIASES.get(value.strip().lower())
    if name is None:
        raise InvalidEvent(
            "unknown_event_type",
            f"event_type {value[:40]!r} is not one of {sorted(EVENT_TYPE_ALIASES)}",
        )
    return name


def parse_timestamp(value: Any) -> int:
    """Epoch milliseconds (int, or integral float) or an ISO-8601 string -> epoch ms."""
    if isinstance(value, bool):
        raise InvalidEvent("wrong_type", "timestamp must be epoch milliseconds or ISO-8601, got a boolean")
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidEvent("bad_timestamp", f"timestamp {value} is not finite")
        ms = int(value)     # a fractional millisecond is dropped
    elif isinstance(value, str):
        text = value.strip()
        if len(text) > 64:
            raise InvalidEvent("oversized_field", "timestamp string longer than 64 characters")
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace(" UTC", "+00:00"))
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=timezone.utc)
            ms = int(round(moment.timestamp() * 1000))
        except (ValueError, OverflowError):   # OverflowError: a zone offset past year 1 or 9999
            raise InvalidEvent("bad_timestamp", f"timestamp {text!r:.80} is not epoch ms or ISO-8601") from None
    else:
        raise InvalidEvent("wrong_type", f"timestamp must be epoch ms or ISO-8601, got {type(value).__name__}")
    if not MIN_TIMESTAMP_MS <= ms < MAX_TIMESTAMP_MS:
        # str() of an int past 4,300 digits raises: name a huge one by its size.
        shown = f"{ms} ms" if abs(ms) < _MAX_ID_INT else f"of {ms.bit_length()} bits"
        raise InvalidEvent(
            "timestamp_out_of_range",
            f"timestamp {shown} is outside 2000-01-01..2100-01-01 (seconds sent as milliseconds?)",
        )
    return ms


def _identifier(fields: Mapping[str, Any], name: str, required: bool) -> str | None:
    value = fields.get(name)
    if value is None:
        if required:
            raise InvalidEvent("missing_field", f"{name} is required")
        return None
    # Ids are strings on our side; integer ids from upstream systems are accepted as-is.
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidEvent("wrong_type", f"{name} must be a string or integer, got {type(value).__name__}")
    if isinstance(value, int) and not -_MAX_ID_INT < value < _MAX_ID_INT:
        # Checked before str(): str() of a huge int is slow and fails past 4,300 digits.
        raise InvalidEvent("oversized_field", f"{name} is longer than {MAX_ID_CHARS} characters")
    text = str(value)
    if not text:
        raise InvalidEvent("missing_field", f"{name} is empty")
    if len(text) > MAX_ID_CHARS:
        raise InvalidEvent("oversized_field", f"{name} is longer than {MAX_ID_CHARS} characters")
    # Ids become Kafka keys (session_id.encode()) and output fields: they must encode.
    if not text.isascii() and _SURROGATE.search(text):
        raise InvalidEvent("bad_unicode", f"{name} {text!r:.80} holds a lone surrogate, not encodable as UTF-8")
    if _CONTROL.search(text):
        raise InvalidEvent("control_character", f"{name} {text!r:.80} holds a control character")
    return text


def _price(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidEvent("wrong_type", f"price must be a number, got {type(value).__name__}")
    try:
        price = float(value)
    except OverflowError:    # an int beyond float range
        raise InvalidEvent("bad_price", f"price is an integer of {value.bit_length()} bits, beyond float range") from None
    if not math.isfinite(price):
        raise InvalidEvent("bad_price", f"price {value} is not finite")
    if price < 0:
        raise InvalidEvent("bad_price", f"price {value} is negative")
    if price > MAX_PRICE:
        raise InvalidEvent("bad_price", f"price {price:.3e} is above {MAX_PRICE:.0e}")
    return price + 0.0      # -0.0 -> 0.0


def validate(fields: Any) -> ClickEvent:
    """Check a decoded JSON object against the contract; raise InvalidEvent with the reason."""
    if not isinstance(fields, Mapping):
        raise InvalidEvent("not_an_object", f"an event must be a JSON object, got {type(fields).__name__}")
    for name in REQUIRED_FIELDS:
        if fields.get(name) is None:
            raise InvalidEvent("missing_field", f"{name} is required")
    return ClickEvent(
        session_id=_identifier(fields, "session_id", True),
        event_type=normalise_event_type(fields["event_type"]),
        item_id=_identifier(fields, "item_id", True),
        timestamp=parse_timestamp(fields["timestamp"]),
        category_id=_identifier(fields, "category_id", False),
        price=_price(fields.get("price")),
        user_id=_identifier(fields, "user_id", False),
        event_id=_identifier(fields, "event_id", False),
    )


def _parse_int(digits: str) -> int:
    if len(digits) > MAX_NUMBER_DIGITS + 1:    # + 1: a minus sign
        raise InvalidEvent("bad_number", f"integer of {len(digits)} digits (the limit is {MAX_NUMBER_DIGITS})")
    return int(digits)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    fields = dict(pairs)
    if len(fields) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise InvalidEvent("duplicate_field", f"key {twice!r:.60} appears more than once")
    return fields


# Built once: json.loads(raw, **hooks) would build a decoder per message.
_JSON = json.JSONDecoder(parse_int=_parse_int, object_pairs_hook=_unique_keys)


def decode(raw: bytes | str, max_bytes: int = MAX_MESSAGE_BYTES) -> ClickEvent:
    """Wire bytes -> ClickEvent, or InvalidEvent naming what is wrong. Never raises
    anything else, whatever `raw` holds."""
    if raw is None:
        raise InvalidEvent("empty_message", "message has no value")
    if isinstance(raw, (bytearray, memoryview)):
        raw = bytes(raw)
    if not isinstance(raw, (bytes, str)):
        raise InvalidEvent("undecodable", f"message value is {type(raw).__name__}, not bytes")
    size = len(raw)
    if size > max_bytes:
        raise InvalidEvent("oversized_message", f"message is {size} bytes, the limit is {max_bytes}")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidEvent("undecodable", f"message is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if raw.startswith("\ufeff"):
        raise InvalidEvent("invalid_json", "message starts with a byte-order mark; send UTF-8 without one")
    try:
        fields = _JSON.decode(raw)
    except InvalidEvent:
        raise
    except RecursionError:
        raise InvalidEvent("too_deep", "message nests arrays/objects deeper than the parser allows") from None
    except ValueError as exc:
        raise InvalidEvent("invalid_json", f"message is not JSON ({exc})") from None
    return validate(fields)
