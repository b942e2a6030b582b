"""Feature encoding: the one function that turns a session's last <=100 events into
model input, called by training (to build examples), evaluation and the streaming
worker alike, so streaming scores equal offline scores by construction.

Data flow:
    ClickEvent --(append_event)--> session window (structured array of EventRow; item
                                   and category as 64-bit hashes of their raw ids)
               --(encode_windows: hash -> the model's vocabulary index)--> model inputs, each (B, W)
               --(encode_last_events)--> the last event's inputs, each (B,) (step graph)

Seed feature set (exactly):
    event_type, item, category, hour, weekday, month, week   -> embedding indices (int64)
    dwell  = log1p(seconds since the previous event of the session), normalised
    price  = log1p(price), normalised
Index 0 is padding for every categorical input. The current event's own dwell is
unknown when it arrives, so position t carries the gap *before* event t (the time
spent on event t-1); nothing at position t depends on anything after t, which is
what lets training score every prefix of a session in one causal pass.

The vocabularies and statistics are artefacts fitted at training time
(`FeatureArtefacts.fit`) and shipped beside the model (`features.json`); serving
only loads them. This module needs only numpy.

Why rows hold id hashes, not vocabulary indices: a stored session (the worker's table,
its changelog) must mean the same under any model, so a model with another vocabulary
(a hot swap) reads it right. `id_hash` is BLAKE2b (RFC 7693, Python's hashlib, no extra
dependency) with an 8-byte digest of the id's UTF-8 bytes (lone surrogates passed
through), read little-endian: stable across processes and versions, unlike Python's
`hash()`, and reproducible in any language. About 0.8 us an id; each event hashes two.
Two values are reserved: HASH_MISSING (an event without a category) and HASH_UNKNOWN (an
id no longer known: a v1 state's OOV row). Each FeatureArtefacts sorts its vocabulary's
hashes once, so encoding maps a (B, W) block of hashes with one np.searchsorted, and it
refuses (ArtefactError) a vocabulary in which two ids share a hash.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from stream.errors import ClickscoreError
from stream.events import EVENT_TYPES, SCHEMA_VERSION, ClickEvent

WINDOW = 100

PAD = 0
ITEM_OOV = 1            # items: 0 pad, 1 out-of-vocabulary, 2.. known items
ITEM_OFFSET = 2
CATEGORY_MISSING = 1    # categories: 0 pad, 1 event has no category, 2 OOV, 3.. known
CATEGORY_OOV = 2
CATEGORY_OFFSET = 3

N_EVENT_TYPES = len(EVENT_TYPES) + 1   # + padding
N_HOURS = 24 + 1
N_WEEKDAYS = 7 + 1
N_MONTHS = 12 + 1
N_WEEKS = 53 + 1

DWELL_CAP_SECONDS = 24 * 3600.0   # gaps beyond a day carry no more information

HASH_MISSING = 0      # category hash of an event without a category
HASH_UNKNOWN = 1      # an id no longer known (a migrated v1 OOV row): reads as OOV

# One row per event in a session window. Kept compact (33 bytes) because every
# table update ships the whole window to the changelog topic.
EVENT_ROW = np.dtype([
    ("event_type", "u1"),
    ("item", "<u8"),        # id_hash(item_id): model-independent
    ("category", "<u8"),    # id_hash(category_id), HASH_MISSING when the event has none
    ("timestamp", "<i8"),   # UTC epoch ms
    ("price", "<f4"),       # NaN when the event has no price
    ("gap", "<f4"),         # seconds since the previous event of the session, NaN for the first
])

INPUT_NAMES = ("event_type", "item", "category", "hour", "weekday", "month", "week",
               "dwell", "price", "length")


class ArtefactError(ClickscoreError):
    """A features.json that is missing, corrupt or does not fit this code."""


@dataclass(frozen=True)
class FeatureArtefacts:
    """Item/category vocabularies and normalisation statistics fitted on training data."""

    items: tuple[str, ...]
    categories: tuple[str, ...]
    dwell_mean: float
    dwell_std: float
    price_mean: float
    price_std: float
    window: int = WINDOW
    schema_version: int = SCHEMA_VERSION
    _item_index: dict[str, int] = field(init=False, repr=False, compare=False)
    _category_index: dict[str, int] = field(init=False, repr=False, compare=False)
    _item_lookup: "HashLookup" = field(init=False, repr=False, compare=False)
    _category_lookup: "HashLookup" = field(init=False, repr=False, compare=False)
    _item_names: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_item_index", {k: i + ITEM_OFFSET for i, k in enumerate(self.items)})
        object.__setattr__(self, "_category_index",
                           {k: i + CATEGORY_OFFSET for i, k in enumerate(self.categories)})
        object.__setattr__(self, "_item_lookup", HashLookup.build(self.items, ITEM_OFFSET, ITEM_OOV, "item"))
        object.__setattr__(self, "_category_lookup",
                           HashLookup.build(self.categories, CATEGORY_OFFSET, CATEGORY_OOV, "category"))
        # index -> item id (None for padding, OOV and one slot past the end), for item_ids_of.
        names = np.empty(len(self.items) + ITEM_OFFSET + 1, dtype=object)
        names[ITEM_OFFSET:ITEM_OFFSET + len(self.items)] = self.items
        object.__setattr__(self, "_item_names", names)

    def item_indices_of_hashes(self, hashes: np.ndarray) -> np.ndarray:
        """Row item hashes (any shape) -> this model's item indices (ITEM_OOV when unknown)."""
        return self._item_lookup(hashes)

    def category_indices_of_hashes(self, hashes: np.ndarray) -> np.ndarray:
        """Row category hashes -> indices: CATEGORY_MISSING for HASH_MISSING, else known or OOV."""
        hashes = np.asarray(hashes, dtype=np.uint64)
        return np.where(hashes == HASH_MISSING, CATEGORY_MISSING, self._category_lookup(hashes))

    @property
    def item_hashes(self) -> np.ndarray:
        """(n_known_items,) uint64: id_hash of each vocabulary item, in index order."""
        return self._item_lookup.by_position

    def category_id(self, index: int) -> str | None:
        """Inverse of category_index for known categories; None for padding/missing/OOV."""
        k = int(index) - CATEGORY_OFFSET
        return self.categories[k] if 0 <= k < len(self.categories) else None

    @property
    def n_items(self) -> int:
        """Size of the item embedding / next-item output (padding and OOV included)."""
        return len(self.items) + ITEM_OFFSET

    @property
    def n_categories(self) -> int:
        return len(self.categories) + CATEGORY_OFFSET

    def item_index(self, item_id: str) -> int:
        return self._item_index.get(item_id, ITEM_OOV)

    def category_index(self, category_id: str | None) -> int:
        if category_id is None:
            return CATEGORY_MISSING
        return self._category_index.get(category_id, CATEGORY_OOV)

    def item_indices(self, item_ids: Iterable[str]) -> np.ndarray:
        get = self._item_index.get
        return np.fromiter((get(i, ITEM_OOV) for i in item_ids), dtype=np.int32)

    def category_indices(self, category_ids: Iterable[str | None]) -> np.ndarray:
        get = self._category_index.get
        return np.fromiter(
            (CATEGORY_MISSING if c is None else get(c, CATEGORY_OOV) for c in category_ids),
            dtype=np.int32)

    def item_id(self, index: int) -> str | None:
        """Inverse of item_index for known items; None for padding/OOV."""
        return self.item_ids_of(np.array([[index]]))[0][0]

    def item_ids_of(self, indices: np.ndarray) -> list[list[str | None]]:
        """item_id over a (B, k) array of indices, as lists: one numpy gather instead of a
        Python call per index (the worker names every event's top-k with it)."""
        indices = np.asarray(indices, dtype=np.int64)
        past_end = len(self._item_names) - 1
        return self._item_names[np.where((indices >= 0) & (indices < past_end), indices, past_end)].tolist()

    @property
    def vocab_hash(self) -> str:
        """Fingerprint of everything that changes what an index means."""
        h = hashlib.sha256()
        h.update(f"schema={self.schema_version};window={self.window};".encode())
        h.update("\x1f".join(self.items).encode())
        h.update(b"\x1e")
        h.update("\x1f".join(self.categories).encode())
        return h.hexdigest()[:16]

    # -- persistence ----------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "window": self.window,
            "vocab_hash": self.vocab_hash,
            "stats": {"dwell_mean": self.dwell_mean, "dwell_std": self.dwell_std,
                      "price_mean": self.price_mean, "price_std": self.price_std},
            "items": list(self.items),
            "categories": list(self.categories),
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict()))
        return path

    @classmethod
    def from_dict(cls, data: Mapping) -> "FeatureArtefacts":
        try:
            stats = data["stats"]
            artefacts = cls(
                items=tuple(str(i) for i in data["items"]),
                categories=tuple(str(c) for c in data["categories"]),
                dwell_mean=float(stats["dwell_mean"]), dwell_std=float(stats["dwell_std"]),
                price_mean=float(stats["price_mean"]), price_std=float(stats["price_std"]),
                window=int(data["window"]), schema_version=int(data["schema_version"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtefactError(f"features artefact is incomplete or malformed: {exc!r}") from None
        if "vocab_hash" in data and data["vocab_hash"] != artefacts.vocab_hash:
            raise ArtefactError(
                f"features artefact is corrupt: stored vocab_hash {data['vocab_hash']} "
                f"!= recomputed {artefacts.vocab_hash}")
        return artefacts

    @classmethod
    def load(cls, path: str | Path) -> "FeatureArtefacts":
        path = Path(path)
        if not path.is_file():
            raise ArtefactError(f"{path} not found: a model folder must hold the features.json "
                                "written at training time")
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise ArtefactError(f"{path} is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def fit(cls, item_ids: Sequence[str], category_ids: Sequence[str | None],
            gaps_seconds: np.ndarray, prices: np.ndarray, min_item_count: int = 1,
            window: int = WINDOW) -> "FeatureArtefacts":
        """Build vocabularies (most frequent first) and statistics from training events.

        Items seen fewer than `min_item_count` times map to OOV, as unseen ones do.
        """
        items, counts = np.unique(np.asarray(item_ids, dtype=object).astype(str), return_counts=True)
        order = np.lexsort((items, -counts))   # frequency desc, id asc: deterministic
        items = tuple(items[order][counts[order] >= min_item_count].tolist())
        cats = sorted({str(c) for c in category_ids if c is not None})
        dwell = _log_gap(np.asarray(gaps_seconds, dtype=np.float64))
        dwell = dwell[np.isfinite(dwell)]
        price = np.log1p(np.asarray(prices, dtype=np.float64))
        price = price[np.isfinite(price)]
        return cls(
            items=items, categories=tuple(cats),
            dwell_mean=float(dwell.mean()) if dwell.size else 0.0,
            dwell_std=float(dwell.std()) if dwell.size > 1 and dwell.std() > 0 else 1.0,
            price_mean=float(price.mean()) if price.size else 0.0,
            price_std=float(price.std()) if price.size > 1 and price.std() > 0 else 1.0,
            window=window,
        )


def id_hash(raw_id: str | None) -> int:
    """The row form of a raw item or category id (see the module docstring)."""
    if raw_id is None:
        return HASH_MISSING
    return int.from_bytes(hashlib.blake2b(raw_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                          "little")


def id_hashes(raw_ids: Iterable[str | None]) -> np.ndarray:
    """Bulk id_hash (training's path): each distinct id is hashed once. (N,) uint64."""
    ids = list(raw_ids)
    distinct: dict[str | None, int] = {}
    for raw in ids:
        if raw not in distinct:
            distinct[raw] = id_hash(raw)
    return np.fromiter((distinct[raw] for raw in ids), dtype=np.uint64, count=len(ids))


@dataclass(frozen=True)
class HashLookup:
    """A vocabulary's id hashes, sorted once, for vectorised hash -> index mapping."""
    sorted_hashes: np.ndarray     # (V,) uint64 ascending
    indices: np.ndarray           # (V,) int64: the model index of each sorted hash
    by_position: np.ndarray       # (V,) uint64: hash of vocabulary entry k (index k + offset)
    unknown: int                  # index of a hash not in the vocabulary

    @classmethod
    def build(cls, ids: Sequence[str], offset: int, unknown: int, what: str) -> "HashLookup":
        hashes = id_hashes(ids)
        order = np.argsort(hashes, kind="stable")
        ordered = hashes[order]
        clash = np.flatnonzero(ordered[1:] == ordered[:-1])
        if len(clash):
            a, b = ids[order[clash[0]]], ids[order[clash[0] + 1]]
            raise ArtefactError(f"{what} ids {a!r} and {b!r} share the 64-bit id hash {int(ordered[clash[0]])}: "
                                "stored sessions could not tell them apart; rename one of them and retrain")
        reserved = np.isin(hashes, np.array([HASH_MISSING, HASH_UNKNOWN], dtype=np.uint64))
        if reserved.any():
            raise ArtefactError(f"{what} id {ids[int(np.flatnonzero(reserved)[0])]!r} hashes to a reserved "
                                "value (missing/unknown): rename it and retrain")
        return cls(ordered, order.astype(np.int64) + offset, hashes, unknown)

    def __call__(self, hashes: np.ndarray) -> np.ndarray:
        hashes = np.asarray(hashes, dtype=np.uint64)
        if not len(self.sorted_hashes):
            return np.full(hashes.shape, self.unknown, dtype=np.int64)
        at = np.minimum(np.searchsorted(self.sorted_hashes, hashes), len(self.sorted_hashes) - 1)
        return np.where(self.sorted_hashes[at] == hashes, self.indices[at], self.unknown)


def _log_gap(gap_seconds: np.ndarray) -> np.ndarray:
    # Out-of-order events give negative gaps: treat as simultaneous.
    return np.log1p(np.clip(gap_seconds, 0.0, DWELL_CAP_SECONDS))


# -- session windows ------------------------------------------------------------------

def empty_window() -> np.ndarray:
    return np.zeros(0, dtype=EVENT_ROW)


def event_row(event: ClickEvent, artefacts: FeatureArtefacts, previous_timestamp: int | None) -> np.ndarray:
    """One EVENT_ROW for an event, given the timestamp of the session's previous event."""
    row = np.zeros(1, dtype=EVENT_ROW)
    row["event_type"] = EVENT_TYPES[event.event_type]
    row["item"] = id_hash(event.item_id)            # model-independent: mapped at encoding
    row["category"] = id_hash(event.category_id)
    row["timestamp"] = event.timestamp
    row["price"] = np.nan if event.price is None else event.price
    row["gap"] = np.nan if previous_timestamp is None else (event.timestamp - previous_timestamp) / 1000.0
    return row


def append_event(window: np.ndarray, event: ClickEvent, artefacts: FeatureArtefacts) -> np.ndarray:
    """Session window after `event`: its last `artefacts.window` rows. Pure."""
    previous = int(window["timestamp"][-1]) if len(window) else None
    rows = np.concatenate([window, event_row(event, artefacts, previous)])
    return rows[-artefacts.window:]


def session_rows(event_types: np.ndarray, items: np.ndarray, categories: np.ndarray,
                 timestamps: np.ndarray, prices: np.ndarray) -> np.ndarray:
    """All rows of one session at once (training's bulk path; equals repeated append_event).
    `items` and `categories` are id hashes (`id_hashes(raw ids)`), as append_event stores."""
    n = len(timestamps)
    rows = np.zeros(n, dtype=EVENT_ROW)
    rows["event_type"] = event_types
    rows["item"] = items
    rows["category"] = categories
    rows["timestamp"] = timestamps
    rows["price"] = prices
    gap = np.full(n, np.nan, dtype=np.float64)
    if n > 1:
        gap[1:] = np.diff(np.asarray(timestamps, dtype=np.int64)) / 1000.0
    rows["gap"] = gap
    return rows


def window_to_bytes(window: np.ndarray) -> bytes:
    return window.tobytes()


def window_from_bytes(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=EVENT_ROW).copy()


# -- encoding ------------------------------------------------------------------------

def calendar(timestamps_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """UTC hour (1..24), ISO weekday (1=Mon..7), month (1..12), ISO week (1..53); 0 stays padding."""
    ms = np.asarray(timestamps_ms, dtype=np.int64)
    days = ms // 86_400_000
    hour = (ms // 3_600_000) % 24 + 1
    weekday = (days + 3) % 7          # 1970-01-01 was a Thursday -> 0 = Monday
    day = days.astype("datetime64[D]")
    month = day.astype("datetime64[M]").astype(np.int64) % 12 + 1
    # ISO week: the week's Thursday decides its year.
    thursday = day - weekday.astype("timedelta64[D]") + np.timedelta64(3, "D")
    jan1 = thursday.astype("datetime64[Y]").astype("datetime64[D]")
    week = (thursday - jan1).astype(np.int64) // 7 + 1
    return hour, weekday + 1, month, week


def encode_windows(windows: Sequence[np.ndarray], artefacts: FeatureArtefacts) -> dict[str, np.ndarray]:
    """Session windows -> model inputs. Events sit left-aligned at positions
    0..length-1 (padding after), so a causal model reads its answer at length-1.

    Returns int64 arrays (B, W) for the categorical inputs, float32 (B, W) for dwell
    and price, and int64 (B,) `length`. A window longer than W keeps its last W rows.
    """
    W = artefacts.window
    B = len(windows)
    lengths = np.fromiter((min(len(w), W) for w in windows), dtype=np.int64, count=B)
    flat = np.zeros((B, W), dtype=EVENT_ROW)     # (B, W) padded rows
    for b, rows in enumerate(windows):
        n = lengths[b]
        if n:
            flat[b, :n] = rows[-n:]
    valid = np.arange(W)[None, :] < lengths[:, None]   # (B, W)
    inputs = _encode_rows(flat, valid, artefacts)
    inputs["length"] = lengths
    return inputs


def encode_last_events(windows: Sequence[np.ndarray], artefacts: FeatureArtefacts) -> dict[str, np.ndarray]:
    """Session windows -> the inputs of each window's last event only, as a step graph
    takes them: each (B,), equal to encode_windows(windows)[name][b, length_b - 1] (the
    same encoding code runs on a (B, 1) slice; no position-dependent feature exists).
    An empty window gives padding. No `length`."""
    B = len(windows)
    flat = np.zeros((B, 1), dtype=EVENT_ROW)      # (B, 1) each window's last row
    valid = np.zeros((B, 1), dtype=bool)
    for b, rows in enumerate(windows):
        if len(rows):
            flat[b, 0] = rows[-1]
            valid[b, 0] = True
    return {name: column[:, 0] for name, column in _encode_rows(flat, valid, artefacts).items()}   # (B, 1) -> (B,)


def _encode_rows(flat: np.ndarray, valid: np.ndarray, artefacts: FeatureArtefacts) -> dict[str, np.ndarray]:
    """(B, T) EVENT_ROW and a (B, T) mask of real rows -> the 9 feature inputs, each (B, T)."""
    hour, weekday, month, week = calendar(flat["timestamp"])
    dwell = (_log_gap(flat["gap"].astype(np.float64)) - artefacts.dwell_mean) / artefacts.dwell_std
    price = (np.log1p(flat["price"].astype(np.float64)) - artefacts.price_mean) / artefacts.price_std
    # Unknown dwell (first event) and missing price read as the training mean: 0.
    dwell = np.where(valid & np.isfinite(dwell), dwell, 0.0)
    price = np.where(valid & np.isfinite(price), price, 0.0)

    def cat(a):
        return np.where(valid, a, PAD).astype(np.int64)

    return {
        "event_type": cat(flat["event_type"]),
        # Rows hold id hashes; this model's vocabulary gives the indices (OOV when unknown).
        "item": cat(artefacts.item_indices_of_hashes(flat["item"])),
        "category": cat(artefacts.category_indices_of_hashes(flat["category"])),
        "hour": cat(hour),
        "weekday": cat(weekday),
        "month": cat(month),
        "week": cat(week),
        "dwell": dwell.astype(np.float32),
        "price": price.astype(np.float32),
    }


def encode_window(window: np.ndarray, artefacts: FeatureArtefacts) -> dict[str, np.ndarray]:
    """Single-window convenience: inputs with a batch dimension of 1."""
    return encode_windows([window], artefacts)
