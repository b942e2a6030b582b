"""The click-event contract: every rejection carries its reason."""
import json
import math

import pytest

from stream.events import (MAX_ID_CHARS, ClickEvent, InvalidEvent, decode, normalise_event_type,
                           parse_timestamp, validate)

GOOD = {"session_id": "s1", "event_type": "view", "item_id": "42", "timestamp": 1396860669277}


def reason_of(fields) -> str:
    with pytest.raises(InvalidEvent) as info:
        validate(fields)
    return info.value.reason


def test_minimal_event_round_trips_through_the_wire():
    event = decode(json.dumps(GOOD).encode())
    assert event == ClickEvent("s1", "view", "42", 1396860669277)
    assert decode(event.to_json()) == event


def test_full_event_keeps_every_field():
    fields = dict(GOOD, category_id=7, price=12.5, user_id="u", event_id="e1", event_type="buy")
    event = validate(fields)
    assert event.category_id == "7" and event.price == 12.5 and event.user_id == "u"
    assert event.event_type == "transaction" and event.is_transaction and event.event_id == "e1"


@pytest.mark.parametrize("alias,name", [
    ("click", "view"), ("cart", "addtocart"), ("add_to_cart", "addtocart"), ("buy", "transaction"),
    ("purchase", "transaction"), ("VIEW", "view"), (" addtocart ", "addtocart")])
def test_event_type_aliases(alias, name):
    assert normalise_event_type(alias) == name


def test_iso_timestamps_are_utc_milliseconds():
    assert parse_timestamp("2014-04-07T10:51:09.277Z") == 1396867869277
    assert parse_timestamp("2014-04-07T12:51:09.277+02:00") == 1396867869277
    assert parse_timestamp("2014-04-07 10:51:09.277") == 1396867869277    # no zone: UTC
    assert parse_timestamp("2019-10-01 00:00:00 UTC") == 1569888000000


@pytest.mark.parametrize("fields,reason", [
    ({k: v for k, v in GOOD.items() if k != "item_id"}, "missing_field"),
    ({k: v for k, v in GOOD.items() if k != "timestamp"}, "missing_field"),
    (dict(GOOD, session_id=""), "missing_field"),
    (dict(GOOD, session_id=["a"]), "wrong_type"),
    (dict(GOOD, item_id=True), "wrong_type"),
    (dict(GOOD, event_type="refund"), "unknown_event_type"),
    (dict(GOOD, event_type=3), "wrong_type"),
    (dict(GOOD, price=-1), "bad_price"),
    (dict(GOOD, price=math.inf), "bad_price"),
    (dict(GOOD, price="12"), "wrong_type"),
    (dict(GOOD, timestamp=1396860669), "timestamp_out_of_range"),        # seconds, not ms
    (dict(GOOD, timestamp=1396860669277000), "timestamp_out_of_range"),  # microseconds
    (dict(GOOD, timestamp="yesterday"), "bad_timestamp"),
    (dict(GOOD, timestamp=None), "missing_field"),
    (dict(GOOD, item_id="x" * (MAX_ID_CHARS + 1)), "oversized_field"),
    ([GOOD], "not_an_object"),
])
def test_rejections_name_their_reason(fields, reason):
    assert reason_of(fields) == reason


def test_wire_level_rejections():
    cases = {b"\xff\xfe{": "undecodable", b"{not json": "invalid_json", b"": "invalid_json",
             b"[1,2]": "not_an_object", b'{"price": NaN}': "missing_field"}
    for raw, reason in cases.items():
        with pytest.raises(InvalidEvent) as info:
            decode(raw)
        assert info.value.reason == reason, raw
    with pytest.raises(InvalidEvent) as info:
        decode(json.dumps(dict(GOOD, user_id="u" * 200)).encode(), max_bytes=100)
    assert info.value.reason == "oversized_message"
    with pytest.raises(InvalidEvent) as info:
        decode(json.dumps(dict(GOOD, price=float("nan"))).encode())
    assert info.value.reason == "bad_price"
