"""Prepared folder -> training examples (windows, targets, loss masks).

    artefacts = fit_artefacts(read_events("data/sim"), min_item_count=1)
    train = build_examples(read_events("data/sim"), "train", artefacts)
    batch = train.batch(np.arange(64))          # dict of numpy arrays, trimmed to the longest window

Every window goes through stream.features.session_rows + encode_windows, the same
code the streaming worker runs, so training sees exactly what serving sees.

Prefix augmentation: a session of n <= W events is one window; a causal model scores
all its prefixes in one pass. Loss masks (docs/CONTRACTS.md, Labels):
- buy: positions before the session's first transaction (label = the session buys);
- next item: positions t with an event t+1 whose item is in the vocabulary
  (target = item index of event t+1; OOV targets are skipped).
A session longer than W adds one window per later position t (rows t-W+1..t) with
losses only at its last position, which is exactly what serving scores after event t.
Windows are stored as (start, length, first loss position) into one array of event
rows (33 bytes per event) and encoded batch by batch, so memory stays linear in the
number of events, not in events x W.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from stream.errors import ClickscoreError
from stream.events import EVENT_TYPES
from stream.features import (EVENT_ROW, INPUT_NAMES, ITEM_OFFSET, FeatureArtefacts,
                             encode_windows, id_hashes, session_rows)

IGNORE = -1   # next-item target where there is none (last event, OOV item) or no loss


def read_events(data_dir: str | Path) -> pl.DataFrame:
    """DIR/events.parquet of a prepared folder, checked for the columns training needs."""
    path = Path(data_dir) / "events.parquet"
    if not path.is_file():
        raise ClickscoreError(f"{path} not found: --data must be a folder written by "
                              "`clickscore prepare` (events.parquet, stats.json)")
    try:
        frame = pl.read_parquet(path)
    except Exception as exc:  # polars raises several types for a corrupt file
        raise ClickscoreError(f"{path} is not a readable parquet file: {exc}") from None
    needed = ("session_id", "event_type", "item_id", "category_id", "price", "timestamp", "split")
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise ClickscoreError(f"{path} lacks columns {missing}; re-run `clickscore prepare`")
    unknown = set(frame["event_type"].unique().to_list()) - set(EVENT_TYPES)
    if unknown:
        raise ClickscoreError(f"{path} has event types {sorted(map(str, unknown))} "
                              f"outside {sorted(EVENT_TYPES)}")
    return frame


def split_frame(frame: pl.DataFrame, split: str | Sequence[str]) -> pl.DataFrame:
    """Rows of one split, or of several (e.g. ("train", "valid")) in the file's order."""
    splits = [split] if isinstance(split, str) else list(split)
    part = frame.filter(pl.col("split").is_in(splits))
    # Contract: rows grouped by session, then by time. Check rather than trust.
    runs = part["session_id"].rle_id().max()
    if part.height and runs + 1 != part["session_id"].n_unique():
        raise ClickscoreError(f"split {split!r}: events of a session are not contiguous; "
                              "events.parquet must be ordered by session (re-run prepare)")
    return part


def _gaps_seconds(part: pl.DataFrame) -> np.ndarray:
    return part.select(
        (pl.col("timestamp").diff().over("session_id") / 1000.0).fill_null(float("nan"))
    ).to_series().to_numpy()


def fit_artefacts(frame: pl.DataFrame, min_item_count: int = 1,
                  splits: Sequence[str] = ("train",)) -> FeatureArtefacts:
    """Vocabularies and statistics from the TRAIN split only (validation/test stay unseen),
    or from train+valid with splits=("train", "valid") (`clickscore train --fit-on
    train+valid`, the data the baselines fit on); never from test."""
    if "train" not in splits or "test" in splits:
        raise ClickscoreError(f"fit_artefacts: splits must include train and exclude test, got {splits}")
    train = split_frame(frame, splits)
    if train.height == 0:
        raise ClickscoreError("the prepared data has no train split")
    return FeatureArtefacts.fit(
        item_ids=train["item_id"].to_list(),
        category_ids=train["category_id"].to_list(),
        gaps_seconds=_gaps_seconds(train),
        prices=train["price"].fill_null(float("nan")).to_numpy(),
        min_item_count=min_item_count)


@dataclass
class Examples:
    """All windows of one split. Per event (N,): rows and targets; per window (M,): where it is."""

    artefacts: FeatureArtefacts
    rows: np.ndarray            # (N,) EVENT_ROW, sessions back to back
    buy_label: np.ndarray       # (N,) float32: the event's session buys
    buy_mask: np.ndarray        # (N,) bool: event comes before the session's first transaction
    next_target: np.ndarray     # (N,) int64 item index of the next event, IGNORE if none/OOV
    window_start: np.ndarray    # (M,) int64 index into rows
    window_length: np.ndarray   # (M,) int64, <= W
    window_loss_from: np.ndarray  # (M,) int64: losses at positions >= this (0, or W-1 for extras)
    window_buys: np.ndarray     # (M,) bool: the window's session buys
    n_sessions: int

    def __len__(self) -> int:
        return len(self.window_start)

    def batch(self, indices: np.ndarray, trim: bool = True) -> dict[str, np.ndarray]:
        """Windows `indices` -> encoded inputs (INPUT_NAMES) plus buy_target, buy_mask and
        next_target, each (B, W'); W' = the longest window in the batch when trim (a causal
        model's outputs at positions < length do not depend on the padding after them)."""
        starts = self.window_start[indices]                          # (B,)
        lengths = self.window_length[indices]                        # (B,)
        windows = [self.rows[s:s + n] for s, n in zip(starts, lengths)]
        batch = encode_windows(windows, self.artefacts)             # each (B, W), length (B,)
        W = self.artefacts.window
        positions = np.arange(W)[None, :]                             # (1, W)
        scored = (positions < lengths[:, None]) & (positions >= self.window_loss_from[indices][:, None])
        at = np.minimum(starts[:, None] + positions, len(self.rows) - 1)  # (B, W) event index
        batch["buy_target"] = self.buy_label[at]
        batch["buy_mask"] = scored & self.buy_mask[at]
        batch["next_target"] = np.where(scored, self.next_target[at], IGNORE)
        if trim:
            width = int(lengths.max()) if len(lengths) else 1
            batch = {k: (v[:, :width] if v.ndim == 2 else v) for k, v in batch.items()}
        return batch

    def inputs(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Full-width (B, W) encoded inputs only, as the exported model receives them."""
        batch = self.batch(indices, trim=False)
        return {name: batch[name] for name in INPUT_NAMES}

    @property
    def buy_positions(self) -> tuple[int, int]:
        """(positive, negative) counts of buy-loss positions over all windows."""
        pos = neg = 0
        for start, length, loss_from in zip(self.window_start, self.window_length, self.window_loss_from):
            sl = slice(start + loss_from, start + length)
            mask = self.buy_mask[sl]
            p = int((mask & (self.buy_label[sl] > 0)).sum())
            pos += p
            neg += int(mask.sum()) - p
        return pos, neg


def build_examples(frame: pl.DataFrame, split: str | Sequence[str], artefacts: FeatureArtefacts) -> Examples:
    """Windows of one split, or of several splits' sessions together (train+valid)."""
    part = split_frame(frame, split)
    W = artefacts.window
    event_types = part["event_type"].replace_strict(EVENT_TYPES, return_dtype=pl.UInt8).to_numpy()
    item_ids = part["item_id"].to_list()
    items = artefacts.item_indices(item_ids)                       # next-item targets
    item_hashes = id_hashes(item_ids)                              # rows hold hashes, as the stream's
    categories = id_hashes(part["category_id"].to_list())
    timestamps = part["timestamp"].to_numpy()
    prices = part["price"].fill_null(float("nan")).to_numpy()
    boundaries = np.flatnonzero(np.diff(part["session_id"].rle_id().to_numpy())) + 1
    starts = np.concatenate([[0], boundaries]).astype(np.int64) if part.height else np.zeros(0, np.int64)
    ends = np.append(starts[1:], part.height).astype(np.int64)

    N = part.height
    rows = np.zeros(N, dtype=EVENT_ROW)
    buy_label = np.zeros(N, dtype=np.float32)
    buy_mask = np.zeros(N, dtype=bool)
    next_target = np.full(N, IGNORE, dtype=np.int64)
    is_transaction = event_types == EVENT_TYPES["transaction"]
    w_start, w_len, w_from, w_buys = [], [], [], []
    for s, e in zip(starts, ends):
        n = e - s
        rows[s:e] = session_rows(event_types[s:e], item_hashes[s:e], categories[s:e], timestamps[s:e], prices[s:e])
        tx = np.flatnonzero(is_transaction[s:e])
        first_tx = tx[0] if len(tx) else n
        buys = len(tx) > 0
        buy_label[s:e] = float(buys)
        buy_mask[s:s + first_tx] = True
        nxt = items[s + 1:e].astype(np.int64)
        next_target[s:e - 1] = np.where(nxt >= ITEM_OFFSET, nxt, IGNORE)
        w_start.append(s); w_len.append(min(n, W)); w_from.append(0); w_buys.append(buys)
        for t in range(W, n):   # long session: the window serving scores after event t
            if buy_mask[s + t] or next_target[s + t] != IGNORE:
                w_start.append(s + t - W + 1); w_len.append(W); w_from.append(W - 1); w_buys.append(buys)
    return Examples(
        artefacts=artefacts, rows=rows, buy_label=buy_label, buy_mask=buy_mask, next_target=next_target,
        window_start=np.asarray(w_start, dtype=np.int64), window_length=np.asarray(w_len, dtype=np.int64),
        window_loss_from=np.asarray(w_from, dtype=np.int64), window_buys=np.asarray(w_buys, dtype=bool),
        n_sessions=len(starts))
