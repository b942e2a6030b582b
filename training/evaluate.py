"""`clickscore evaluate`: offline metrics of a model on a prepared folder, beside baselines.

    clickscore evaluate --model onnx_models/default --data data/yoochoose-100k --json
    clickscore evaluate --model runs/gru --data data/diginetica --report reports/diginetica.md

Protocol
--------
Data: DIR/events.parquet of a prepared folder (docs/CONTRACTS.md), the sessions of
`--split` (default test). The model is an exported folder (model.onnx, scored through
stream.scoring.ModelScorer, the runtime the streaming worker uses) or a training
checkpoint folder (checkpoint.pt, loaded with training.checkpoint.load_checkpoint).

Prefixes: each session's rows are built with stream.features.session_rows (item and
category id hashes, mapped to the model's own features.json at encoding), and the prefix ending at
event t is scored from its window, the last <= W (100) rows ending at t, exactly what
the worker holds after event t; windows are scored in batches. The model's answer
for a prefix is read at position length-1.

Buy prediction: one example per prefix that ends before the session's first
transaction; its label is 1 when the session contains a transaction. A buying
session whose first event is the transaction has no example and is not counted.
- auc (ROC, ties count 1/2) and pr_auc (average precision) over all those examples;
- prefix_auc["L"] for L in 1, 3, 10: the ROC AUC over one example per session, its
  prefix of exactly L events, among sessions with at least L pre-purchase events;
- ece: expected calibration error over 10 equal-width probability bins;
- auc_ci95 / pr_auc_ci95: 95% percentile bootstrap intervals resampling whole
  sessions (--bootstrap resamples, default 1000), because a session's prefixes are
  correlated;
- every buy metric is null when the split has no buying or no non-buying session
  (yoochoose-100k has no buys); `notes` says so.

Next item: one example per prefix that has a next event, target = item of event
t+1. The target is ranked against the model's FULL item vocabulary (no sampled
negatives; padding and OOV indices excluded; ties break toward the lower index, as
in stream.scoring.top_k_items). A target outside the vocabulary (an item unseen
in training) counts as a miss; its share is test_targets_oov_share.
recall_at_20 = share of targets in the top 20, mrr_at_20 = mean of 1/rank (0 beyond 20);
recall_at_20_ci95 / mrr_at_20_ci95 (model and each kNN-family baseline): 95% session bootstrap.

Baselines, fitted on the same folder's train split, plus valid when evaluating on
test (train+valid is session-rec's train_full for yoochoose; `--baseline-train train`
to use train only): most-popular items and session-kNN (SKNN) for next item, each
ranking against the full catalogue of items it saw, unseen targets again misses;
V-SKNN, STAN, VSTAN and sequential rules (training/knn.py, session-rec's parameters
for rsc15); gradient boosting (LightGBM, its parameters chosen on valid: `baselines.aggregates_gbm.tuning`)
and logistic regression on hand-made prefix aggregates for buy, scored on the very same buy
examples. See training/baselines.py.

Data/model fit: evaluation refuses (ClickscoreError) a folder whose dataset differs
from the one the model was trained on (when the model records it), or whose test
events mostly (> 90%) carry items the model's vocabulary does not know, well beyond
the folder's own unseen-in-train share: that is another dataset's data.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl

from stream.errors import ClickscoreError
from stream.events import EVENT_TYPES
from stream.features import (INPUT_NAMES, ITEM_OFFSET, WINDOW, FeatureArtefacts, encode_windows, id_hashes,
                             session_rows)
from training import metrics
from training.baselines import (GBM_DEFAULTS, GBM_GRID, AggregateBuyModel, ItemBuyStats, ItemCatalogue,
                                Popular, SessionKNN, prefix_aggregates, tune_gbm)
from training.knn import NeighbourScorer, SequentialRules

log = logging.getLogger(__name__)

PREFIX_LENGTHS = (1, 3, 10)
TOP_K = 20
UNKNOWN_ITEM_LIMIT = 0.9     # above this share of test events unknown to the vocabulary ...
UNKNOWN_ITEM_MARGIN = 0.05   # ... and this far above the folder's own cold-start share: refuse
EVENT_COLUMNS = ("session_id", "event_type", "item_id", "category_id", "price", "timestamp", "split")


# -- model ---------------------------------------------------------------------------

@dataclass
class LoadedModel:
    """What evaluation needs of a model, whichever format it came in."""

    name: str
    kind: str
    version: str
    format: str                                   # "onnx" or "checkpoint"
    dataset: str | None                           # training dataset, when the model records it
    artefacts: FeatureArtefacts
    predict: Callable[[dict], tuple[np.ndarray, np.ndarray]]   # inputs -> (buy (B,), scores (B, n_items))
    batch_size: int


def load_model(model_dir: str | Path, threads: int = 0, provider: str = "auto") -> LoadedModel:
    folder = Path(model_dir)
    if (folder / "model.onnx").is_file():
        from stream.scoring import ModelScorer

        scorer = ModelScorer(folder, provider=provider, threads=threads)
        meta = dict(scorer.session.get_modelmeta().custom_metadata_map)
        return LoadedModel(
            name=scorer.info.name, kind=scorer.info.kind, version=scorer.info.version, format="onnx",
            dataset=meta.get("dataset") or None, artefacts=scorer.artefacts, predict=scorer.predict,
            batch_size=_batch_size(scorer.artefacts.n_items, 256))
    if (folder / "checkpoint.pt").is_file():
        return _load_checkpoint(folder, threads)
    raise ClickscoreError(f"--model {folder}: neither model.onnx (an exported folder, "
                          "`clickscore export`) nor checkpoint.pt (`clickscore train`) is there")


def _batch_size(n_items: int, largest: int, budget_bytes: float = 256e6, positions: int = 1) -> int:
    """Windows per model call so that the (B, positions, n_items) scores stay under budget."""
    return int(max(1, min(largest, budget_bytes // (4 * positions * max(n_items, 1)))))


def _load_checkpoint(folder: Path, threads: int) -> LoadedModel:
    try:
        from training.checkpoint import load_checkpoint
    except ImportError as exc:
        raise ClickscoreError(f"--model {folder} is a checkpoint folder but training.checkpoint "
                              f"cannot be imported ({exc}); export it with `clickscore export`") from None
    import torch

    if threads:
        torch.set_num_threads(threads)
    model, artefacts, info = load_checkpoint(folder)
    model.eval()
    info = info if isinstance(info, dict) else getattr(info, "__dict__", {})

    def predict(inputs: dict) -> tuple[np.ndarray, np.ndarray]:
        lengths = inputs["length"]
        width = int(lengths.max())            # causal: positions past the longest window change nothing
        tensors = [torch.from_numpy(np.ascontiguousarray(inputs[name][:, :width])) for name in INPUT_NAMES[:9]]
        with torch.no_grad():
            buy_logit, item_logits = model(*tensors)       # (B, w), (B, w, n_items)
        last = torch.from_numpy(lengths - 1)
        rows = torch.arange(len(lengths))
        buy = torch.sigmoid(buy_logit[rows, last]).numpy()
        return buy, item_logits[rows, last].numpy()

    train = info.get("train") if isinstance(info.get("train"), dict) else {}
    args = train.get("args") if isinstance(train.get("args"), dict) else {}
    kind = str(info.get("model_kind") or info.get("kind") or "unknown")
    return LoadedModel(
        name=str(info.get("model_name") or info.get("name") or folder.name),
        kind=kind, version=str(info.get("model_version") or info.get("version") or "checkpoint"),
        format="checkpoint", dataset=info.get("dataset") or train.get("dataset") or args.get("dataset"),
        artefacts=artefacts, predict=predict,
        batch_size=_batch_size(artefacts.n_items, 64, positions=WINDOW))


# -- data ----------------------------------------------------------------------------

def load_prepared(data_dir: str | Path) -> tuple[pl.DataFrame, dict]:
    folder = Path(data_dir)
    events_path, stats_path = folder / "events.parquet", folder / "stats.json"
    if not events_path.is_file():
        raise ClickscoreError(f"--data {folder}: no events.parquet; prepare the data first with "
                              "`clickscore prepare --dataset NAME --input PATH --out DIR`")
    events = pl.read_parquet(events_path)
    missing = [c for c in EVENT_COLUMNS if c not in events.columns]
    if missing:
        raise ClickscoreError(f"{events_path} lacks columns {missing} (see docs/CONTRACTS.md)")
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    return events.select(EVENT_COLUMNS), stats


def check_fit(model: LoadedModel, split_events: pl.DataFrame, stats: dict, data_dir: str) -> float:
    """Refuse data the model was not trained for; returns the share of events whose item
    the vocabulary does not know."""
    data_dataset = stats.get("dataset")
    vocab = model.artefacts
    described = (f"model vocabulary (hash {vocab.vocab_hash}, {len(vocab.items)} items"
                 + (f", trained on '{model.dataset}')" if model.dataset else ")"))
    if model.dataset and data_dataset and model.dataset != data_dataset:
        raise ClickscoreError(f"{described} was trained on dataset '{model.dataset}' but {data_dir} "
                              f"holds '{data_dataset}': evaluate on data prepared from the same dataset")
    items = split_events["item_id"].to_numpy()
    unknown = float(np.mean(vocab.item_indices(items) < ITEM_OFFSET)) if len(items) else 0.0
    expected = float(stats.get("test_events_unseen_item_share") or 0.0)
    # Named the same dataset on both sides: a vocabulary cut by --min-item-count may know few
    # items (Taobao, min count 3: 8.6%) and that is no sign of foreign data.
    same_dataset = bool(model.dataset and data_dataset and model.dataset == data_dataset)
    if not same_dataset and unknown > UNKNOWN_ITEM_LIMIT and unknown > expected + UNKNOWN_ITEM_MARGIN:
        raise ClickscoreError(
            f"{described} knows {100 * (1 - unknown):.1f}% of the items of the events in {data_dir} "
            f"(dataset '{data_dataset}'; its own share of test events unseen in training is "
            f"{100 * expected:.1f}%): evaluate on data prepared from the same dataset")
    return unknown


@dataclass
class Sessions:
    """One split's events, session by session (contract order), as arrays."""

    starts: np.ndarray         # (S + 1,) offsets into the event arrays
    session_ids: np.ndarray    # (S,)
    item_ids: np.ndarray       # (E,) str
    event_types: np.ndarray    # (E,) str
    timestamps: np.ndarray     # (E,) int64 ms
    first_buy: np.ndarray      # (S,) position of the first transaction, or the length
    labels: np.ndarray         # (S,) 1 when the session buys

    @classmethod
    def from_events(cls, events: pl.DataFrame) -> "Sessions":
        session = events["session_id"].to_numpy()
        change = np.flatnonzero(session[1:] != session[:-1]) + 1 if len(session) else np.zeros(0, int)
        starts = np.concatenate([[0], change, [len(session)]]).astype(np.int64)
        if len(session) == 0:
            starts = np.zeros(1, dtype=np.int64)
        types = events["event_type"].to_numpy()
        lengths = np.diff(starts)
        is_buy = types == "transaction"
        first_buy = lengths.copy()
        for s in range(len(lengths)):
            hit = np.flatnonzero(is_buy[starts[s]:starts[s + 1]])
            if hit.size:
                first_buy[s] = hit[0]
        return cls(starts=starts, session_ids=session[starts[:-1]], item_ids=events["item_id"].to_numpy(),
                   event_types=types, timestamps=events["timestamp"].to_numpy(),
                   first_buy=first_buy, labels=(first_buy < lengths).astype(np.int64))

    def __len__(self) -> int:
        return len(self.starts) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.starts)

    def prefixes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every event as the end of a prefix: (session, position, is buy example, has next)."""
        lengths = self.lengths
        session = np.repeat(np.arange(len(self)), lengths)
        position = np.arange(int(lengths.sum())) - np.repeat(self.starts[:-1], lengths)
        buy_example = position < self.first_buy[session]
        has_next = position < lengths[session] - 1
        return session, position, buy_example, has_next


# -- model scoring ---------------------------------------------------------------------

@dataclass
class ModelScores:
    buy_probability: np.ndarray    # per buy example, in prefix order
    next_item_ranks: np.ndarray    # per prefix with a next event, in prefix order
    oov_targets: int


def score_model(model: LoadedModel, events: pl.DataFrame, sessions: Sessions) -> ModelScores:
    """Score every needed prefix through the model, window by window."""
    art = model.artefacts
    type_codes = np.array([EVENT_TYPES[t] for t in sessions.event_types], dtype=np.uint8)
    items = art.item_indices(sessions.item_ids)           # next-item targets
    item_hashes = id_hashes(sessions.item_ids)            # rows hold id hashes, as the stream's
    categories = id_hashes(events["category_id"].to_list())
    prices = events["price"].cast(pl.Float64).fill_null(float("nan")).to_numpy()
    session, position, buy_example, has_next = sessions.prefixes()
    needed = np.flatnonzero(buy_example | has_next)

    rows_by_session = [
        session_rows(type_codes[a:b], item_hashes[a:b], categories[a:b], sessions.timestamps[a:b], prices[a:b])
        for a, b in zip(sessions.starts[:-1], sessions.starts[1:])]

    buy_parts, rank_parts = [], []
    from tqdm import tqdm   # a bar on a terminal; disable=None: nothing when stderr is not one
    chunks = np.array_split(needed, max(1, math.ceil(len(needed) / model.batch_size)))
    for chunk in tqdm(chunks, desc=f"scoring {len(needed):,} prefixes", unit="batch", disable=None,
                      leave=False, file=sys.stderr):
        if not chunk.size:
            continue
        windows = [rows_by_session[session[g]][max(0, position[g] - art.window + 1):position[g] + 1]
                   for g in chunk]
        buy, scores = model.predict(encode_windows(windows, art))   # (B,), (B, n_items)
        buy_parts.append(np.asarray(buy, dtype=np.float64)[buy_example[chunk]])
        with_next = has_next[chunk]
        targets = items[chunk[with_next] + 1]                       # item index of event t+1
        rank_parts.append(metrics.target_ranks(scores[with_next], targets, first_real=ITEM_OFFSET))
    targets_all = items[np.flatnonzero(has_next) + 1]
    return ModelScores(
        buy_probability=np.concatenate(buy_parts) if buy_parts else np.zeros(0),
        next_item_ranks=np.concatenate(rank_parts) if rank_parts else np.zeros(0),
        oov_targets=int(np.sum(targets_all < ITEM_OFFSET)))


# -- metrics ---------------------------------------------------------------------------

def buy_metrics(labels: np.ndarray, probability: np.ndarray, session: np.ndarray, position: np.ndarray,
                n_bootstrap: int, seed: int, with_ci: bool = True) -> dict:
    """The buy block of the JSON for one scorer, on the buy examples."""
    defined = labels.size and 0 < labels.sum() < labels.size
    out = {
        "auc": metrics.roc_auc(labels, probability) if defined else None,
        "pr_auc": metrics.pr_auc(labels, probability) if defined else None,
        "auc_ci95": None, "pr_auc_ci95": None,
        "prefix_auc": {},
        "ece": metrics.expected_calibration_error(labels, probability) if defined else None,
    }
    if defined and with_ci and n_bootstrap > 0:
        out["auc_ci95"] = _pair(metrics.bootstrap_ci(session, labels, probability, metrics.roc_auc,
                                                     n_bootstrap, seed))
        out["pr_auc_ci95"] = _pair(metrics.bootstrap_ci(session, labels, probability, metrics.pr_auc,
                                                        n_bootstrap, seed))
    for length in PREFIX_LENGTHS:
        at = position == length - 1
        out["prefix_auc"][str(length)] = metrics.roc_auc(labels[at], probability[at]) if defined else None
    return out


def _pair(ci):
    return None if ci is None else [ci[0], ci[1]]


def next_item_metrics(ranks: np.ndarray) -> dict:
    return {"recall_at_20": metrics.recall_at_k(ranks, TOP_K), "mrr_at_20": metrics.mrr_at_k(ranks, TOP_K)}


# -- baselines -------------------------------------------------------------------------

def run_baselines(events: pl.DataFrame, split: str, baseline_train: str, sessions: Sessions,
                  buy_rows: np.ndarray, buy_labels: np.ndarray, buy_session: np.ndarray,
                  buy_position: np.ndarray, n_bootstrap: int, seed: int,
                  buy_defined: bool, next_ranks: dict | None = None) -> tuple[dict, dict, list[str]]:
    """(baselines JSON block, buy probabilities per aggregate baseline, notes). `next_ranks`,
    when given, receives each next-item baseline's per-target ranks (for paired intervals)."""
    next_ranks = {} if next_ranks is None else next_ranks
    fit_splits = ["train"] + (["valid"] if baseline_train == "train+valid" and split == "test" else [])
    train = events.filter(pl.col("split").is_in(fit_splits))
    notes = [f"baselines fitted on split(s) {'+'.join(fit_splits)}"]
    out: dict = {}
    if train.height == 0:
        notes.append("no training events: baselines skipped")
        return out, {}, notes

    started = time.monotonic()
    catalogue = ItemCatalogue.fit(train["item_id"].to_numpy())
    columns = catalogue.columns(sessions.item_ids)
    per_session = [columns[a:b] for a, b in zip(sessions.starts[:-1], sessions.starts[1:])]
    raw = [sessions.item_ids[a:b] for a, b in zip(sessions.starts[:-1], sessions.starts[1:])]
    next_ranks["popular"] = Popular(catalogue).next_item_ranks(per_session)
    out["popular"] = next_item_metrics(next_ranks["popular"])
    knn = SessionKNN().fit(train["session_id"].to_numpy(), train["item_id"].to_numpy(),
                           train["timestamp"].to_numpy(), catalogue)
    next_ranks["sknn"] = knn.next_item_ranks(per_session, raw)
    out["sknn"] = next_item_metrics(next_ranks["sknn"])
    # V-SKNN, STAN, VSTAN and SR (training/knn.py), with session-rec's rsc15 parameters.
    times = [sessions.timestamps[a:b] for a, b in zip(sessions.starts[:-1], sessions.starts[1:])]
    fit_args = (train["session_id"].to_numpy(), train["item_id"].to_numpy())
    for name in ("vsknn", "stan", "vstan"):
        scorer = getattr(NeighbourScorer, name)().fit(*fit_args, train["timestamp"].to_numpy(), catalogue)
        next_ranks[name] = scorer.next_item_ranks(per_session, raw, times)
        out[name] = next_item_metrics(next_ranks[name])
    next_ranks["sr"] = SequentialRules().fit(*fit_args, catalogue).next_item_ranks(per_session)
    out["sr"] = next_item_metrics(next_ranks["sr"])
    log.info("next-item baselines in %.1f s", time.monotonic() - started)

    probabilities: dict[str, np.ndarray] = {}
    if not buy_defined:
        for name in ("aggregates_gbm", "aggregates_logistic"):
            out[name] = buy_metrics(np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0), 0, seed)
        return out, probabilities, notes
    stats = ItemBuyStats.fit(train)
    x_train, y_train = buy_examples(train, stats, out_of_fold=5, seed=seed)
    if not 0 < y_train.sum() < len(y_train):
        notes.append("training split has no buying or no non-buying session: aggregate baselines skipped")
        return out, probabilities, notes
    split_events = events.filter(pl.col("split") == split)
    x_test = prefix_aggregates(split_events, stats)[buy_rows]
    gbm_params, tuning = tune_gbm_on_valid(events, seed)
    for kind in ("gbm", "logistic"):
        model = AggregateBuyModel(kind, seed=seed, params=gbm_params if kind == "gbm" else None)
        probability = model.fit(x_train, y_train).predict_proba(x_test)
        name = f"aggregates_{kind}"
        probabilities[name] = probability
        out[name] = buy_metrics(buy_labels, probability, buy_session, buy_position, n_bootstrap, seed)
    out["aggregates_gbm"]["tuning"] = tuning
    notes.append("the logistic aggregate baseline uses balanced class weights, so its probabilities are not "
                 "calibrated (ece reflects that); the LightGBM one is unweighted, its parameters chosen on valid")
    return out, probabilities, notes


def buy_examples(frame: pl.DataFrame, stats: ItemBuyStats, out_of_fold: int = 0,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(prefix aggregates, session label) of every buy example of `frame` (see Protocol)."""
    features = prefix_aggregates(frame, stats, out_of_fold=out_of_fold, seed=seed)
    frame_sessions = Sessions.from_events(frame)
    _, _, buy_example, _ = frame_sessions.prefixes()
    labels = frame_sessions.labels[np.repeat(np.arange(len(frame_sessions)), frame_sessions.lengths)]
    return features[buy_example], labels[buy_example]


def tune_gbm_on_valid(events: pl.DataFrame, seed: int) -> tuple[dict, dict]:
    """LightGBM parameters chosen by grid search (training.baselines.GBM_GRID): fitted on
    train, ROC AUC on valid; test is never read. Defaults when valid cannot score."""
    train = events.filter(pl.col("split") == "train")
    valid = events.filter(pl.col("split") == "valid")
    tuning: dict = {"fit_on": "train", "scored_on": "valid", "grid": GBM_GRID}
    if train.height == 0 or valid.height == 0:
        return dict(GBM_DEFAULTS), {**tuning, "chosen": GBM_DEFAULTS, "note": "no train or valid split: defaults"}
    stats = ItemBuyStats.fit(train)
    x_train, y_train = buy_examples(train, stats, out_of_fold=5, seed=seed)
    x_valid, y_valid = buy_examples(valid, stats)
    if not (0 < y_train.sum() < len(y_train) and 0 < y_valid.sum() < len(y_valid)):
        return dict(GBM_DEFAULTS), {**tuning, "chosen": GBM_DEFAULTS,
                                    "note": "train or valid has one class only: defaults"}
    best, trials = tune_gbm(x_train, y_train, x_valid, y_valid, seed=seed)
    log.info("LightGBM tuned on valid: %s", best)
    return best, {**tuning, "chosen": best,
                  "best_valid_auc": max(t["valid_auc"] for t in trials if t["valid_auc"] is not None),
                  "trials": trials}


# -- paired comparison ----------------------------------------------------------------

NEXT_BASELINES = ("sknn", "vsknn", "stan", "vstan", "sr")


def paired_vs_baselines(scores: ModelScores, next_ranks: dict, target_session: np.ndarray,
                        buy_labels: np.ndarray, buy_session: np.ndarray, buy_probabilities: dict,
                        block: dict, n_bootstrap: int, seed: int) -> dict:
    """Model minus baseline on the very same targets/examples, 95% intervals from one
    session bootstrap shared by both scorers: next item against every kNN-family baseline
    (`best` = the one with the highest Recall@20 on this split) and buy AUC against every
    aggregate baseline (`best` = highest AUC). An interval above 0 means the model wins."""
    out: dict = {"next_item": {}, "buy": {}}
    ranks = scores.next_item_ranks
    for name in NEXT_BASELINES:
        if name in next_ranks and len(next_ranks[name]) == len(ranks) and len(ranks):
            out["next_item"][name] = metrics.paired_next_item_ci(target_session, ranks, next_ranks[name],
                                                                 TOP_K, n_bootstrap, seed)
    candidates = [n for n in out["next_item"] if block.get(n, {}).get("recall_at_20") is not None]
    out["next_item_best"] = max(candidates, key=lambda n: block[n]["recall_at_20"]) if candidates else None
    for name, probability in buy_probabilities.items():
        out["buy"][name] = metrics.paired_auc_ci(buy_session, buy_labels, scores.buy_probability, probability,
                                                 n_bootstrap, seed)
    candidates = [n for n in out["buy"] if block.get(n, {}).get("auc") is not None]
    out["buy_best"] = max(candidates, key=lambda n: block[n]["auc"]) if candidates else None
    return out


# -- the command -----------------------------------------------------------------------

@dataclass
class Evaluation:
    summary: dict                                     # the JSON object
    buy_labels: np.ndarray = field(default_factory=lambda: np.zeros(0))
    buy_probabilities: dict = field(default_factory=dict)   # scorer name -> (n_buy_examples,)


def evaluate(model_dir: str | Path, data_dir: str | Path, split: str = "test", n_bootstrap: int = 1000,
             seed: int = 0, baseline_train: str = "train+valid", baselines: bool = True,
             threads: int = 0) -> Evaluation:
    started = time.monotonic()
    model = load_model(model_dir, threads=threads)
    events, stats = load_prepared(data_dir)
    split_events = events.filter(pl.col("split") == split)
    if split_events.height == 0:
        raise ClickscoreError(f"--data {data_dir}: split '{split}' has no events")
    check_fit(model, split_events, stats, str(data_dir))
    sessions = Sessions.from_events(split_events)
    notes: list[str] = ["next-item targets outside the vocabulary (items unseen in training) count as misses"]

    session, position, buy_example, has_next = sessions.prefixes()
    scores = score_model(model, split_events, sessions)
    log.info("model scored in %.1f s", time.monotonic() - started)

    buy_rows = np.flatnonzero(buy_example)
    buy_labels = sessions.labels[session[buy_rows]]
    buy_session, buy_position = session[buy_rows], position[buy_rows]
    buy_defined = bool(buy_labels.size and 0 < buy_labels.sum() < buy_labels.size)
    if not buy_defined:
        notes.append(f"split '{split}' has no buying or no non-buying session: buy metrics are null")
    n_targets = int(has_next.sum())
    summary = {
        **buy_metrics(buy_labels, scores.buy_probability, buy_session, buy_position, n_bootstrap, seed),
        **next_item_metrics(scores.next_item_ranks),
        "n_test_sessions": len(sessions),
        "n_test_events": int(split_events.height),
        "n_buy_examples": int(buy_rows.size),
        "n_next_item_examples": n_targets,
        "n_positive_sessions": int(np.unique(buy_session[buy_labels == 1]).size),
        "test_targets_oov_share": scores.oov_targets / n_targets if n_targets else None,
        "model": {"name": model.name, "kind": model.kind, "version": model.version, "format": model.format,
                  "vocab_hash": model.artefacts.vocab_hash, "n_items": model.artefacts.n_items},
        "data": {"dataset": stats.get("dataset"), "split": split, "path": str(data_dir),
                 "split_method": stats.get("split_method")},
        "bootstrap": {"resamples": n_bootstrap, "seed": seed, "unit": "session"},
    }
    target_session = session[has_next]
    if n_targets and n_bootstrap > 0:
        ci = metrics.next_item_ci(target_session, scores.next_item_ranks, TOP_K, n_bootstrap, seed)
        summary.update(recall_at_20_ci95=ci["recall_ci95"], mrr_at_20_ci95=ci["mrr_ci95"])
    probabilities = {"model": scores.buy_probability}
    if baselines:
        next_ranks: dict = {}
        block, baseline_probabilities, baseline_notes = run_baselines(
            events, split, baseline_train, sessions, buy_rows, buy_labels, buy_session, buy_position,
            n_bootstrap, seed, buy_defined, next_ranks)
        summary["baselines"] = block
        for name, ranks in next_ranks.items():   # each baseline's own 95% intervals too
            if name in block and len(ranks) == n_targets and n_targets and n_bootstrap > 0:
                ci = metrics.next_item_ci(target_session, ranks, TOP_K, n_bootstrap, seed)
                block[name].update(recall_at_20_ci95=ci["recall_ci95"], mrr_at_20_ci95=ci["mrr_ci95"])
        probabilities.update(baseline_probabilities)
        notes += baseline_notes
        summary["paired"] = paired_vs_baselines(
            scores, next_ranks, session[has_next], buy_labels, buy_session, baseline_probabilities,
            block, n_bootstrap, seed)
    summary["notes"] = notes
    summary["seconds"] = round(time.monotonic() - started, 1)
    return Evaluation(summary=_clean(summary), buy_labels=buy_labels.astype(np.float64),
                      buy_probabilities=probabilities)


def _clean(value):
    """NaN/inf -> None and numpy scalars -> Python, so json.dumps(allow_nan=False) holds."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def format_summary(summary: dict) -> str:
    def num(v):
        return "null" if v is None else f"{v:.4f}"

    def ci(pair):
        return "" if not pair else f"[{pair[0]:.3f}, {pair[1]:.3f}]"

    lines = [f"model {summary['model']['name']} ({summary['model']['kind']}) on "
             f"{summary['data']['dataset']} [{summary['data']['split']}]: "
             f"{summary['n_test_sessions']} sessions, {summary['n_test_events']} events, "
             f"{summary['n_positive_sessions']} buying",
             f"  buy   auc {num(summary['auc'])} {ci(summary['auc_ci95'])}  pr_auc {num(summary['pr_auc'])} "
             f"{ci(summary['pr_auc_ci95'])}  ece {num(summary['ece'])}  prefix_auc "
             + " ".join(f"@{k} {num(v)}" for k, v in summary["prefix_auc"].items()),
             f"  next  recall@20 {num(summary['recall_at_20'])} {ci(summary.get('recall_at_20_ci95'))}  "
             f"mrr@20 {num(summary['mrr_at_20'])} {ci(summary.get('mrr_at_20_ci95'))}  "
             f"oov targets {num(summary['test_targets_oov_share'])}"]
    for name, block in summary.get("baselines", {}).items():
        if "recall_at_20" in block:
            lines.append(f"  {name:<20} recall@20 {num(block['recall_at_20'])} {ci(block.get('recall_at_20_ci95'))}  "
                         f"mrr@20 {num(block['mrr_at_20'])} {ci(block.get('mrr_at_20_ci95'))}")
        else:
            lines.append(f"  {name:<20} auc {num(block['auc'])} {ci(block['auc_ci95'])}  "
                         f"pr_auc {num(block['pr_auc'])}  ece {num(block['ece'])}")
    paired = summary.get("paired") or {}
    for name, diff in paired.get("next_item", {}).items():
        lines.append(f"  model - {name:<12} recall@20 {diff['recall_diff']:+.4f} {ci(diff['recall_diff_ci95'])}  "
                     f"mrr@20 {diff['mrr_diff']:+.4f} {ci(diff['mrr_diff_ci95'])}")
    for name, diff in paired.get("buy", {}).items():
        if diff.get("auc_diff") is not None:
            lines.append(f"  model - {name:<12} auc {diff['auc_diff']:+.4f} {ci(diff['auc_diff_ci95'])}")
    lines += [f"  note: {n}" for n in summary.get("notes", [])]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = evaluate(args.model, args.data, split=args.split, n_bootstrap=args.bootstrap, seed=args.seed,
                      baseline_train=args.baseline_train, baselines=args.baselines, threads=args.threads)
    if args.report:
        from training.report import write_report

        path = write_report(result, args.report)
        print(f"report written to {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.summary, allow_nan=False))
    else:
        print(format_summary(result.summary))
    return 0
