"""The one feature-encoding function: calendar, normalisation, windows, artefacts."""
import datetime as dt

import numpy as np
import pytest

from stream.events import ClickEvent
from stream.features import (CATEGORY_MISSING, CATEGORY_OOV, CATEGORY_OFFSET, HASH_MISSING, HASH_UNKNOWN,
                             ITEM_OFFSET, ITEM_OOV, WINDOW, ArtefactError, FeatureArtefacts, HashLookup,
                             append_event, calendar, empty_window, encode_windows, id_hash, id_hashes,
                             session_rows, window_from_bytes, window_to_bytes)

T0 = 1_700_000_000_000


def artefacts() -> FeatureArtefacts:
    return FeatureArtefacts.fit(
        item_ids=["a", "b", "b", "c", "b"], category_ids=["x", None, "y"],
        gaps_seconds=np.array([np.nan, 10.0, 100.0, 1000.0]), prices=np.array([1.0, 10.0, np.nan]))


def test_calendar_matches_python_datetime_over_years():
    rng = np.random.default_rng(0)
    ms = rng.integers(946_684_800_000, 4_000_000_000_000, size=2000)
    ms = np.concatenate([ms, [1735516800000, 1609459200000, 1704067200000]])  # year boundaries
    hour, weekday, month, week = calendar(ms)
    for m, h, d, mo, w in zip(ms, hour, weekday, month, week):
        t = dt.datetime.fromtimestamp(m / 1000, dt.timezone.utc)
        assert (h, d, mo, w) == (t.hour + 1, t.isoweekday(), t.month, t.isocalendar().week)


def test_vocabulary_has_explicit_padding_oov_and_missing():
    a = artefacts()
    assert a.items == ("b", "a", "c")                         # most frequent first
    assert a.item_index("b") == ITEM_OFFSET and a.item_index("zzz") == ITEM_OOV
    assert a.category_index(None) == CATEGORY_MISSING
    assert a.category_index("nope") == CATEGORY_OOV
    assert a.category_index("x") == CATEGORY_OFFSET
    assert a.item_id(a.item_index("c")) == "c" and a.item_id(ITEM_OOV) is None
    assert a.n_items == 5


def test_item_ids_of_names_a_top_k_array_as_item_id_names_each_index():
    a = artefacts()
    indices = np.array([[2, 3, 4], [0, 1, 5], [-1, 4, 99]])
    assert a.item_ids_of(indices) == [[a.item_id(i) for i in row] for row in indices]
    assert a.item_ids_of(indices)[0] == ["b", "a", "c"] and a.item_ids_of(indices)[1] == [None, None, None]
    assert a.item_ids_of(np.zeros((0, 20), dtype=np.int64)) == []


def test_artefacts_round_trip_and_detect_corruption(tmp_path):
    a = artefacts()
    path = a.save(tmp_path / "features.json")
    assert FeatureArtefacts.load(path) == a
    assert FeatureArtefacts.load(path).vocab_hash == a.vocab_hash
    text = path.read_text().replace('"b"', '"B"', 1)
    path.write_text(text)
    with pytest.raises(ArtefactError, match="vocab_hash"):
        FeatureArtefacts.load(path)
    with pytest.raises(ArtefactError, match="not found"):
        FeatureArtefacts.load(tmp_path / "missing.json")


def events(n: int, session="s") -> list[ClickEvent]:
    types = ["view", "view", "addtocart"]
    return [ClickEvent(session, types[i % 3], "abc"[i % 3], T0 + i * 7_000 + (i % 5) * 1000,
                       category_id=[None, "x", "y"][i % 3], price=None if i % 4 else 9.5)
            for i in range(n)]


def test_streaming_appends_equal_bulk_rows_and_encoding():
    a = artefacts()
    evs = events(130)
    window = empty_window()
    streamed = []
    for e in evs:
        window = append_event(window, e, a)
        streamed.append(window)
    assert len(streamed[-1]) == WINDOW
    bulk = session_rows(np.array([e.event_type_code for e in evs]),
                        id_hashes(e.item_id for e in evs),
                        id_hashes(e.category_id for e in evs),
                        np.array([e.timestamp for e in evs]),
                        np.array([np.nan if e.price is None else e.price for e in evs]))
    for t in (0, 1, 57, 99, 100, 129):
        expected = bulk[max(0, t + 1 - WINDOW): t + 1]
        assert np.array_equal(window_from_bytes(window_to_bytes(streamed[t])).tobytes(), expected.tobytes())
    enc_stream = encode_windows(streamed, a)
    enc_bulk = encode_windows([bulk[max(0, t + 1 - WINDOW): t + 1] for t in range(130)], a)
    for name in enc_stream:
        np.testing.assert_array_equal(enc_stream[name], enc_bulk[name])


def test_encoding_is_left_aligned_causal_and_normalised():
    a = artefacts()
    # items b, a, unknown; categories missing, y, unknown
    rows = session_rows(np.array([1, 2, 3]), id_hashes(["b", "a", "zz"]), id_hashes([None, "y", "nope"]),
                        np.array([T0, T0 + 10_000, T0 + 110_000]), np.array([np.nan, 10.0, 1.0]))
    x = encode_windows([rows, rows[:1]], a)
    assert x["length"].tolist() == [3, 1]
    assert x["event_type"][0, :4].tolist() == [1, 2, 3, 0]
    assert x["item"][1, :2].tolist() == [2, 0]
    assert x["item"][0, :3].tolist() == [ITEM_OFFSET, ITEM_OFFSET + 1, ITEM_OOV]
    assert x["category"][0, :3].tolist() == [CATEGORY_MISSING, CATEGORY_OFFSET + 1, CATEGORY_OOV]
    # position 0 has no previous event: unknown dwell reads as the mean (0); position 1 saw 10 s
    assert x["dwell"][0, 0] == 0.0
    assert x["dwell"][0, 1] == pytest.approx((np.log1p(10.0) - a.dwell_mean) / a.dwell_std, rel=1e-6)
    assert x["price"][0, 0] == 0.0     # missing price
    assert x["price"][0, 2] == pytest.approx((np.log1p(1.0) - a.price_mean) / a.price_std, rel=1e-6)
    # a prefix encodes exactly like the first positions of the longer window: causality
    for name in ("event_type", "item", "category", "hour", "dwell", "price"):
        assert x[name][1, 0] == x[name][0, 0]
    assert x["hour"][0, 3:].sum() == 0 and x["dwell"][0, 3:].sum() == 0
    assert x["dwell"].dtype == np.float32 and x["item"].dtype == np.int64


def test_out_of_order_events_do_not_give_negative_dwell():
    a = artefacts()
    rows = session_rows(np.array([1, 1]), id_hashes(["a", "a"]), id_hashes([None, None]),
                        np.array([T0, T0 - 5_000]), np.array([np.nan, np.nan]))
    x = encode_windows([rows], a)
    assert x["dwell"][0, 1] == pytest.approx((0.0 - a.dwell_mean) / a.dwell_std)


# -- rows hold model-independent id hashes --------------------------------------------------

def test_id_hash_is_stable_blake2b_and_reserves_missing():
    import hashlib
    # Pinned values: a stored session must read the same in every process and release.
    assert id_hash("214536502") == int.from_bytes(hashlib.blake2b(b"214536502", digest_size=8).digest(), "little")
    assert id_hash("214536502") == 0xcc556eaa872d7d4c
    assert id_hash(None) == HASH_MISSING
    assert id_hash("s\ud800") != id_hash("s")         # a lone surrogate hashes, it does not raise
    assert id_hashes(["a", None, "a"]).tolist() == [id_hash("a"), HASH_MISSING, id_hash("a")]


def test_hash_lookup_maps_known_ids_and_leaves_the_rest_oov():
    a = artefacts()
    rows = np.array([id_hash(i) for i in ("b", "a", "c", "zzz")] + [HASH_UNKNOWN], dtype=np.uint64)
    assert a.item_indices_of_hashes(rows).tolist() == [a.item_index(i) for i in ("b", "a", "c", "zzz")] + [ITEM_OOV]
    cats = np.array([HASH_MISSING, id_hash("x"), id_hash("y"), id_hash("q"), HASH_UNKNOWN], dtype=np.uint64)
    assert a.category_indices_of_hashes(cats).tolist() == [
        CATEGORY_MISSING, a.category_index("x"), a.category_index("y"), CATEGORY_OOV, CATEGORY_OOV]
    assert a.item_hashes.tolist() == [id_hash(i) for i in a.items]
    # the same rows read under another vocabulary: each id finds its own index there
    other = FeatureArtefacts(items=("c", "zzz", "b"), categories=("y",), dwell_mean=0.0, dwell_std=1.0,
                             price_mean=0.0, price_std=1.0)
    assert other.item_indices_of_hashes(rows[:4]).tolist() == [4, ITEM_OOV, 2, 3]
    empty = FeatureArtefacts(items=(), categories=(), dwell_mean=0.0, dwell_std=1.0, price_mean=0.0, price_std=1.0)
    assert empty.item_indices_of_hashes(rows).tolist() == [ITEM_OOV] * 5


def test_a_vocabulary_with_a_hash_collision_is_refused(monkeypatch):
    import stream.features as features
    real = features.id_hash
    # Force "b" and "c" to collide (a real 64-bit collision is not findable in a test).
    monkeypatch.setattr(features, "id_hash", lambda raw: real("b") if raw == "c" else real(raw))
    with pytest.raises(ArtefactError, match="share the 64-bit id hash"):
        HashLookup.build(("a", "b", "c"), ITEM_OFFSET, ITEM_OOV, "item")
    monkeypatch.setattr(features, "id_hash", lambda raw: HASH_UNKNOWN if raw == "a" else real(raw))
    with pytest.raises(ArtefactError, match="reserved"):
        FeatureArtefacts(items=("a",), categories=(), dwell_mean=0.0, dwell_std=1.0, price_mean=0.0, price_std=1.0)
