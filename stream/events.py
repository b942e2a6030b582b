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

This module imports nothing heavier than the standard library: the worker and the
training pipeline both use it.
"""
from __future__ import annotations

import json
import math
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
        ms = int(value)
    elif isinstance(value, str):
        text = value.strip()
        if len(text) > 64:
            raise InvalidEvent("oversized_field", "timestamp string longer than 64 characters")
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace(" UTC", "+00:00"))
        except ValueError:
            raise InvalidEvent("bad_timestamp", f"timestamp {text!r} is not epoch ms or ISO-8601") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        ms = int(round(moment.timestamp() * 1000))
    else:
        raise InvalidEvent("wrong_type", f"timestamp must be epoch ms or ISO-8601, got {type(value).__name__}")
    if not MIN_TIMESTAMP_MS <= ms < MAX_TIMESTAMP_MS:
        raise InvalidEvent(
            "timestamp_out_of_range",
            f"timestamp {ms} ms is outside 2000-01-01..2100-01-01 (seconds sent as milliseconds?)",
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
    text = str(value)
    if not text:
        raise InvalidEvent("missing_field", f"{name} is empty")
    if len(text) > MAX_ID_CHARS:
        raise InvalidEvent("oversized_field", f"{name} is longer than {MAX_ID_CHARS} characters")
    return text


def _price(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidEvent("wrong_type", f"price must be a number, got {type(value).__name__}")
    price = float(value)
    if not math.isfinite(price):
        raise InvalidEvent("bad_price", f"price {value} is not finite")
    if price < 0:
        raise InvalidEvent("bad_price", f"price {value} is negative")
    return price


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


def decode(raw: bytes | str, max_bytes: int = MAX_MESSAGE_BYTES) -> ClickEvent:
    """Wire bytes -> ClickEvent, or InvalidEvent naming what is wrong."""
    if raw is None:
        raise InvalidEvent("empty_message", "message has no value")
    size = len(raw)
    if size > max_bytes:
        raise InvalidEvent("oversized_message", f"message is {size} bytes, the limit is {max_bytes}")
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidEvent("undecodable", f"message is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        fields = json.loads(raw)
    except ValueError as exc:
        raise InvalidEvent("invalid_json", f"message is not JSON ({exc})") from None
    return validate(fields)
