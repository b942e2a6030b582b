"""Baselines the models must beat, fitted on the training split of the same folder.

Next item (ranked against the full catalogue of items seen in the baseline's
training data; an item it never saw is a miss, as for the model):
    Popular      items by number of training events, most first.
    SessionKNN   SKNN of session-rec (Ludewig & Jannach 2018, "Evaluation of
                 session-based recommendation algorithms"): the current session's
                 item set is compared with past training sessions that share an
                 item with it (the `sample_size` most recent of them), by cosine
                 similarity |A n B| / sqrt(|A| |B|); the `k` most similar are the
                 neighbours and an item's score is the sum of the similarities of
                 the neighbours that contain it. (session-rec's own `cosine` reads
                 `li / sqrt(la) * sqrt(lb)`, i.e. li * sqrt(lb) / sqrt(la), an
                 operator-precedence slip; we use the cosine its paper describes.)
                 Vectorised: one sparse product per batch of prefixes.

Buy (RecSys Challenge 2015 style hand-made prefix aggregates, the same prefixes
the model scores):
    AggregateBuyModel("gbm")       LightGBM (gradient-boosted trees), its parameters chosen
                                   on the valid split by tune_gbm (GBM_GRID), unweighted
    AggregateBuyModel("logistic")  standardised logistic regression, balanced class weights
                                   (buyers are a few percent of sessions)
LightGBM rather than scikit-learn's HistGradientBoosting: the same histogram trees, but
the reference implementation of the RecSys Challenge 2015 winners' kind of model, with
leaf-wise growth and min_child_samples/subsampling that small labelled sets need.

    catalogue = ItemCatalogue.fit(train_item_ids)
    knn = SessionKNN().fit(train_session_ids, train_item_ids, train_timestamps, catalogue)
    ranks = knn.next_item_ranks(test_sessions)        # one rank per prefix with a next event
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import polars as pl
import scipy.sparse as sp

from training.metrics import MISS, target_ranks_sparse


@dataclass(frozen=True)
class ItemCatalogue:
    """Item id -> column, most frequent first (ties by id), so that a tie in any
    baseline's scores breaks toward the more popular item."""

    ids: np.ndarray            # (n_items,) str, column order
    counts: np.ndarray         # (n_items,) training events per item

    @classmethod
    def fit(cls, item_ids: Sequence[str]) -> "ItemCatalogue":
        ids, counts = np.unique(np.asarray(item_ids, dtype=str), return_counts=True)
        order = np.lexsort((ids, -counts))
        return cls(ids=ids[order], counts=counts[order])

    @property
    def size(self) -> int:
        return len(self.ids)

    def columns(self, item_ids: Sequence[str]) -> np.ndarray:
        """Column of each id, -1 for an id the catalogue never saw."""
        item_ids = np.asarray(item_ids, dtype=str)
        if not self.size:
            return np.full(len(item_ids), -1, dtype=np.int64)
        sorter = np.argsort(self.ids)
        sorted_ids = self.ids[sorter]
        pos = np.clip(np.searchsorted(sorted_ids, item_ids), 0, self.size - 1)
        return np.where(sorted_ids[pos] == item_ids, sorter[pos], -1).astype(np.int64)


def next_item_targets(sessions: Sequence[np.ndarray]) -> np.ndarray:
    """Targets of every prefix with a next event, session by session: items 1..n-1."""
    parts = [s[1:] for s in sessions]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class Popular:
    """Most-popular items: the same ranked list for every prefix."""

    def __init__(self, catalogue: ItemCatalogue):
        self.catalogue = catalogue

    def next_item_ranks(self, sessions: Sequence[np.ndarray]) -> np.ndarray:
        """`sessions`: catalogue columns of each test session's events (-1 unknown)."""
        targets = next_item_targets(sessions)
        # The catalogue is in popularity order, so an item's rank is its column + 1.
        return np.where(targets >= 0, targets + 1.0, MISS)


class SessionKNN:
    """SKNN with recent-session sampling and cosine similarity (see module docstring)."""

    def __init__(self, k: int = 100, sample_size: int = 500, batch_size: int = 2000):
        self.k = k
        self.sample_size = sample_size
        self.batch_size = batch_size

    def fit(self, session_ids: Sequence, item_ids: Sequence[str], timestamps: Sequence[int],
            catalogue: ItemCatalogue) -> "SessionKNN":
        self.catalogue = catalogue
        session_codes, session_index = np.unique(np.asarray(session_ids, dtype=str), return_inverse=True)
        columns = catalogue.columns(item_ids)
        keep = columns >= 0
        n_sessions = len(session_codes)
        # (n_sessions, n_items) binary: does training session s contain item i
        incidence = sp.csr_matrix(
            (np.ones(int(keep.sum()), dtype=np.float64), (session_index[keep], columns[keep])),
            shape=(n_sessions, catalogue.size))
        incidence.data[:] = 1.0                       # duplicates were summed: back to 0/1
        self.sessions = incidence                       # (S, n_items)
        self.sessions_t = incidence.T.tocsr()           # (n_items, S)
        self.session_sizes = np.asarray(incidence.sum(axis=1)).ravel()      # |B|
        last = np.full(n_sessions, np.iinfo(np.int64).min, dtype=np.int64)
        np.maximum.at(last, session_index, np.asarray(timestamps, dtype=np.int64))
        self.session_time = last                        # recency = the session's last event
        return self

    # -- scoring ---------------------------------------------------------------------
    def scores(self, prefix_items: sp.csr_matrix, prefix_sizes: np.ndarray) -> sp.csr_matrix:
        """(B, n_items) binary prefix item sets and |A| (distinct items, unknown ones
        included, as session-rec counts them) -> (B, n_items) sparse item scores."""
        B = prefix_items.shape[0]
        overlap = (prefix_items @ self.sessions_t).tocoo()          # (B, S) |A n B|
        rows, cols, shared = overlap.row, overlap.col, overlap.data
        # Candidates: the sample_size most recent sessions sharing an item.
        order = np.lexsort((-self.session_time[cols], rows))
        rows, cols, shared = rows[order], cols[order], shared[order]
        keep = _rank_within(rows, B) < self.sample_size
        rows, cols, shared = rows[keep], cols[keep], shared[keep]
        similarity = shared / np.sqrt(prefix_sizes[rows] * self.session_sizes[cols])
        # Neighbours: the k most similar candidates (ties: the more recent session).
        order = np.lexsort((-self.session_time[cols], -similarity, rows))
        rows, cols, similarity = rows[order], cols[order], similarity[order]
        keep = _rank_within(rows, B) < self.k
        neighbours = sp.csr_matrix((similarity[keep], (rows[keep], cols[keep])),
                                   shape=(B, self.sessions.shape[0]))     # (B, S)
        return (neighbours @ self.sessions).tocsr()                       # (B, n_items)

    def next_item_ranks(self, sessions: Sequence[np.ndarray],
                        session_raw_items: Sequence[Sequence[str]] | None = None) -> np.ndarray:
        """Rank of the next item after every prefix (all but each session's last event).

        `sessions`: catalogue columns of each session's events (-1 unknown);
        `session_raw_items`: the raw ids, so that distinct unknown items count in |A|
        (default: every unknown event counts as one more distinct item).
        """
        ranks = []
        batch_rows: list[tuple[np.ndarray, int]] = []   # (known columns in prefix, |A|)
        batch_targets: list[int] = []

        def flush():
            if not batch_rows:
                return
            indptr = np.cumsum([0] + [len(c) for c, _ in batch_rows])
            indices = np.concatenate([c for c, _ in batch_rows]) if indptr[-1] else np.zeros(0, np.int64)
            prefix = sp.csr_matrix((np.ones(len(indices)), indices, indptr),
                                   shape=(len(batch_rows), self.catalogue.size))
            sizes = np.array([n for _, n in batch_rows], dtype=np.float64)
            ranks.append(target_ranks_sparse(self.scores(prefix, sizes), np.array(batch_targets)))
            batch_rows.clear()
            batch_targets.clear()

        for s, columns in enumerate(sessions):
            raw = session_raw_items[s] if session_raw_items is not None else None
            seen_known: list[int] = []
            seen_known_set: set[int] = set()
            seen_unknown: set = set()
            for t in range(len(columns) - 1):
                c = int(columns[t])
                if c >= 0:
                    if c not in seen_known_set:
                        seen_known_set.add(c)
                        seen_known.append(c)
                else:
                    seen_unknown.add(raw[t] if raw is not None else ("#", t))
                batch_rows.append((np.array(sorted(seen_known), dtype=np.int64),
                                   len(seen_known) + len(seen_unknown)))
                batch_targets.append(int(columns[t + 1]))
                if len(batch_rows) >= self.batch_size:
                    flush()
        flush()
        return np.concatenate(ranks) if ranks else np.zeros(0)


def _rank_within(rows: np.ndarray, n_rows: int) -> np.ndarray:
    """Position of each entry within its row, for entries already grouped by row."""
    starts = np.searchsorted(rows, np.arange(n_rows))
    return np.arange(len(rows)) - starts[rows]


# -- buy: prefix aggregates ------------------------------------------------------------

AGGREGATE_FEATURES = (
    "log_events", "log_distinct_items", "distinct_categories", "addtocarts", "is_addtocart",
    "log_duration_s", "log_mean_gap_s", "log_max_gap_s", "log_last_gap_s", "hour", "weekday",
    "log_price", "log_mean_price", "log_max_price", "distinct_item_share", "current_item_repeats",
    "item_log_sessions", "item_mean_log_sessions", "item_max_log_sessions",
    "item_buy_rate", "item_mean_buy_rate", "item_max_buy_rate",
)
BUY_RATE_PRIOR_WEIGHT = 20.0   # pseudo-sessions: an item seen in few sessions keeps the base rate


@dataclass(frozen=True)
class ItemBuyStats:
    """Per item: training sessions containing it and how many of them buy."""

    table: pl.DataFrame          # item_id, item_sessions, item_buying_sessions
    base_rate: float             # share of training sessions that buy

    @classmethod
    def fit(cls, events: pl.DataFrame) -> "ItemBuyStats":
        labels = session_labels(events)
        pairs = events.select("session_id", "item_id").unique().join(labels, on="session_id")
        table = pairs.group_by("item_id").agg(
            pl.len().alias("item_sessions"), pl.col("buys").sum().alias("item_buying_sessions"))
        base = float(labels["buys"].mean()) if labels.height else 0.0
        return cls(table=table, base_rate=base)


def session_labels(events: pl.DataFrame) -> pl.DataFrame:
    """session_id -> buys (1 when the session contains a transaction)."""
    return events.group_by("session_id").agg(
        (pl.col("event_type") == "transaction").any().cast(pl.Int8).alias("buys"))


def prefix_aggregates(events: pl.DataFrame, stats: ItemBuyStats, out_of_fold: int = 0,
                      seed: int = 0) -> np.ndarray:
    """One feature row (AGGREGATE_FEATURES) per event: the aggregates of the prefix
    ending at that event. `events` is in contract order (session, then time).

    `out_of_fold` = K > 1: the events are the ones `stats` was fitted on (the
    baseline's training rows). Each session is then given item statistics computed
    without the fold of sessions it belongs to (K random folds, counts scaled by
    K/(K-1)), so a training row never sees its own label. Leave-one-session-out
    would not do: (total - own label) / (n - 1) is a function of the own label and
    the model learns it backwards.
    """
    s = pl.col("session_id")
    seconds = pl.col("timestamp").cast(pl.Float64) / 1000.0
    frame = events.with_row_index("_row")
    if out_of_fold > 1:
        sessions = frame.select("session_id").unique(maintain_order=True)
        fold = np.random.default_rng(seed).integers(0, out_of_fold, sessions.height)
        sessions = sessions.with_columns(_fold=pl.Series(fold, dtype=pl.Int64))
        frame = frame.join(sessions, on="session_id", how="left")
        in_fold = (frame.select("_fold", "session_id", "item_id").unique()
                   .join(session_labels(events), on="session_id")
                   .group_by("_fold", "item_id")
                   .agg(pl.len().alias("fold_sessions"), pl.col("buys").sum().alias("fold_buys")))
        scale = out_of_fold / (out_of_fold - 1.0)
        frame = (frame.join(stats.table, on="item_id", how="left")
                 .join(in_fold, on=["_fold", "item_id"], how="left").sort("_row")
                 .with_columns(
                     item_sessions=(pl.col("item_sessions").fill_null(0) - pl.col("fold_sessions").fill_null(0))
                     .cast(pl.Float64) * scale,
                     item_buying_sessions=(pl.col("item_buying_sessions").fill_null(0)
                                           - pl.col("fold_buys").fill_null(0)).cast(pl.Float64) * scale))
    else:
        frame = frame.join(stats.table, on="item_id", how="left").sort("_row")
    item_sessions = pl.col("item_sessions").cast(pl.Float64).fill_null(0.0)
    item_buys = pl.col("item_buying_sessions").cast(pl.Float64).fill_null(0.0)
    prior = BUY_RATE_PRIOR_WEIGHT
    when = pl.from_epoch("timestamp", time_unit="ms")
    frame = frame.with_columns(
        n=(pl.int_range(pl.len()).over(s) + 1).cast(pl.Float64),
        gap=(seconds - seconds.shift(1)).over(s).fill_null(0.0).clip(0.0),
        duration=(seconds - seconds.first()).over(s).clip(0.0),
        new_item=pl.struct("session_id", "item_id").is_first_distinct().cast(pl.Float64),
        new_category=(pl.struct("session_id", "category_id").is_first_distinct()
                      & pl.col("category_id").is_not_null()).cast(pl.Float64),
        cart=(pl.col("event_type") == "addtocart").cast(pl.Float64),
        repeats=(pl.int_range(pl.len()).over("session_id", "item_id") + 1).cast(pl.Float64),
        has_price=pl.col("price").is_not_null().cast(pl.Float64),
        price0=pl.col("price").fill_null(0.0).fill_nan(0.0),
        item_pop=(item_sessions + 1.0).log(),
        item_rate=(item_buys + prior * stats.base_rate) / (item_sessions + prior),
        hour=when.dt.hour().cast(pl.Float64),
        weekday=when.dt.weekday().cast(pl.Float64),
    ).with_columns(
        distinct_items=pl.col("new_item").cum_sum().over(s),
        distinct_categories=pl.col("new_category").cum_sum().over(s),
        addtocarts=pl.col("cart").cum_sum().over(s),
        max_gap=pl.col("gap").cum_max().over(s),
        priced=pl.col("has_price").cum_sum().over(s),
        price_sum=pl.col("price0").cum_sum().over(s),
        price_max=pl.col("price").fill_null(-1.0).fill_nan(-1.0).cum_max().over(s),
        pop_sum=pl.col("item_pop").cum_sum().over(s),
        pop_max=pl.col("item_pop").cum_max().over(s),
        rate_sum=pl.col("item_rate").cum_sum().over(s),
        rate_max=pl.col("item_rate").cum_max().over(s),
    )
    nan = float("nan")
    out = frame.select(
        log_events=pl.col("n").log1p(),
        log_distinct_items=pl.col("distinct_items").log1p(),
        distinct_categories=pl.col("distinct_categories"),
        addtocarts=pl.col("addtocarts"),
        is_addtocart=pl.col("cart"),
        log_duration_s=pl.col("duration").log1p(),
        log_mean_gap_s=(pl.col("duration") / (pl.col("n") - 1.0).clip(1.0)).log1p(),
        log_max_gap_s=pl.col("max_gap").log1p(),
        log_last_gap_s=pl.col("gap").log1p(),
        hour=pl.col("hour"),
        weekday=pl.col("weekday"),
        log_price=pl.col("price").fill_nan(None).log1p().fill_null(nan),
        log_mean_price=pl.when(pl.col("priced") > 0)
            .then((pl.col("price_sum") / pl.col("priced")).log1p()).otherwise(nan),
        log_max_price=pl.when(pl.col("price_max") >= 0).then(pl.col("price_max").log1p()).otherwise(nan),
        distinct_item_share=pl.col("distinct_items") / pl.col("n"),
        current_item_repeats=pl.col("repeats"),
        item_log_sessions=pl.col("item_pop"),
        item_mean_log_sessions=pl.col("pop_sum") / pl.col("n"),
        item_max_log_sessions=pl.col("pop_max"),
        item_buy_rate=pl.col("item_rate"),
        item_mean_buy_rate=pl.col("rate_sum") / pl.col("n"),
        item_max_buy_rate=pl.col("rate_max"),
    )
    assert tuple(out.columns) == AGGREGATE_FEATURES
    return out.to_numpy().astype(np.float64)        # (n_events, n_features)


# A small grid, searched on the valid split only (tune_gbm): tree size, learning rate x
# rounds, and leaf size, the knobs that matter on a few thousand labelled sessions.
GBM_GRID = {
    "num_leaves": (7, 31),
    "learning_rate": (0.03, 0.1),
    "n_estimators": (100, 400),
    "min_child_samples": (20, 100),
}
GBM_DEFAULTS = {"num_leaves": 15, "learning_rate": 0.05, "n_estimators": 200, "min_child_samples": 50}


class AggregateBuyModel:
    """A classifier on prefix aggregates: kind "gbm" (LightGBM, `params` from tune_gbm) or "logistic"."""

    def __init__(self, kind: str = "gbm", seed: int = 0, params: dict | None = None):
        from sklearn.impute import SimpleImputer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        if kind == "gbm":
            import lightgbm

            # NaN (no price) is a value the trees route on their own. One thread and
            # deterministic: same data and seed, same model (CI runs on 2 shared cores).
            self.model = lightgbm.LGBMClassifier(
                **{**GBM_DEFAULTS, **(params or {})}, subsample=0.8, subsample_freq=1, colsample_bytree=0.8,
                reg_lambda=1.0, random_state=seed, n_jobs=1, deterministic=True, force_row_wise=True,
                verbose=-1)
        elif kind == "logistic":
            self.model = make_pipeline(
                SimpleImputer(strategy="median", keep_empty_features=True), StandardScaler(),
                LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000))
        else:
            raise ValueError(f"unknown aggregate model kind {kind!r}")
        self.kind = kind

    def fit(self, features: np.ndarray, labels: np.ndarray) -> "AggregateBuyModel":
        # A dataset without prices (or categories) leaves columns all-NaN: drop them.
        self.used = np.isfinite(features).any(axis=0)
        self.model.fit(features[:, self.used], np.asarray(labels, dtype=np.int64))
        return self

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        return self.model.predict_proba(features[:, self.used])[:, 1]


def tune_gbm(x_train: np.ndarray, y_train: np.ndarray, x_valid: np.ndarray, y_valid: np.ndarray,
             seed: int = 0, grid: dict | None = None) -> tuple[dict, list[dict]]:
    """Grid search of the LightGBM parameters: fit on train, ROC AUC on valid.

    Returns (best parameters, one {params, valid_auc} per trial). Test is never read;
    the caller refits the best parameters on its own fitting splits.
    """
    import itertools

    from training.metrics import roc_auc

    grid = grid or GBM_GRID
    names = list(grid)
    trials = []
    for values in itertools.product(*(grid[n] for n in names)):
        params = dict(zip(names, values))
        probability = AggregateBuyModel("gbm", seed=seed, params=params).fit(x_train, y_train).predict_proba(x_valid)
        trials.append({"params": params, "valid_auc": roc_auc(y_valid, probability)})
    scored = [t for t in trials if t["valid_auc"] is not None]
    best = max(scored, key=lambda t: t["valid_auc"])["params"] if scored else dict(GBM_DEFAULTS)
    return best, trials
