"""Evaluation metrics: pure functions over numpy arrays, no model, no I/O.

    ranks = target_ranks(next_item_scores, targets)       # (B,) 1-based, inf = miss
    recall_at_k(ranks, 20), mrr_at_k(ranks, 20)
    roc_auc(labels, buy_probability), pr_auc(labels, buy_probability)
    expected_calibration_error(labels, buy_probability)
    bootstrap_ci(session_of_example, labels, buy_probability, roc_auc)

Conventions, shared by the model and every baseline so their numbers compare:
- A rank is 1-based over the whole catalogue. Ties break toward the lower item
  index (as `stream.scoring.top_k_items` does), so a constant scorer ranks items in
  vocabulary order (most frequent first) and never gets credit for a tie.
- A target the scorer cannot name (out of vocabulary) has rank `inf`: a miss.
- A buy metric that is undefined (no positive or no negative example) is None, never
  NaN, so it survives JSON.
- `pr_auc` is average precision (the step-wise area under the precision-recall
  curve, sklearn's `average_precision_score`), not the trapezoidal area, which is
  optimistic for a ranker with few positives.
- Every buy metric accepts example weights; bootstrap resampling of sessions is
  expressed as weights (how many times each session was drawn), so a resample costs
  O(n) and never re-sorts the scores.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import scipy.sparse as sp

MISS = np.inf


# -- next item -----------------------------------------------------------------------

def target_ranks(scores: np.ndarray, targets: np.ndarray, first_real: int = 0) -> np.ndarray:
    """Rank of each row's target among columns first_real.. of a dense (B, n) score matrix.

    `targets` are column indices; a target < first_real (padding/OOV for the model,
    -1 for a baseline that never saw the item) is a miss (rank inf).
    """
    scores = np.asarray(scores)
    targets = np.asarray(targets, dtype=np.int64)
    B, n = scores.shape
    known = (targets >= first_real) & (targets < n)
    safe = np.where(known, targets, first_real)
    target_score = scores[np.arange(B), safe][:, None]               # (B, 1)
    real = scores[:, first_real:]                                   # (B, n - first_real)
    columns = np.arange(first_real, n)[None, :]
    better = (real > target_score).sum(axis=1)
    tied_before = ((real == target_score) & (columns < safe[:, None])).sum(axis=1)
    return np.where(known, better + tied_before + 1, MISS).astype(np.float64)


def target_ranks_sparse(scores: sp.csr_matrix, targets: np.ndarray) -> np.ndarray:
    """As `target_ranks` for a sparse (B, n) matrix of non-negative scores whose absent
    entries are 0 (every column is a real item; a target < 0 is a miss)."""
    scores = sp.csr_matrix(scores)
    scores.eliminate_zeros()
    B, n = scores.shape
    targets = np.asarray(targets, dtype=np.int64)
    known = (targets >= 0) & (targets < n)
    safe = np.where(known, targets, 0)
    rows = np.repeat(np.arange(B), np.diff(scores.indptr))          # row of every stored entry
    cols, data = scores.indices, scores.data
    target_score = np.asarray(scores[np.arange(B), safe]).ravel()   # (B,)
    better = np.bincount(rows[data > target_score[rows]], minlength=B)
    before = cols < safe[rows]
    tied_before = np.bincount(rows[(data == target_score[rows]) & before], minlength=B)
    # A target scored 0 ties with every unscored item; those with a lower index win.
    stored_before = np.bincount(rows[before], minlength=B)
    zeros_before = safe - stored_before
    rank = better + np.where(target_score > 0, tied_before, zeros_before) + 1
    return np.where(known, rank, MISS).astype(np.float64)


def recall_at_k(ranks: np.ndarray, k: int = 20) -> float | None:
    """Share of examples whose target ranks in the top k (misses count as 0)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return float(np.mean(ranks <= k)) if ranks.size else None


def mrr_at_k(ranks: np.ndarray, k: int = 20) -> float | None:
    """Mean reciprocal rank, 0 for targets outside the top k."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if not ranks.size:
        return None
    return float(np.mean(np.where(ranks <= k, 1.0 / ranks, 0.0)))


# -- buy prediction ------------------------------------------------------------------

def _tie_groups(scores: np.ndarray) -> tuple[np.ndarray, int]:
    """Index of each score among the distinct scores (ascending), and their number."""
    distinct, group = np.unique(np.asarray(scores, dtype=np.float64), return_inverse=True)
    return group.ravel(), len(distinct)


def _class_weights(group, n_groups, labels, weights):
    positive = np.bincount(group, weights=weights * labels, minlength=n_groups)
    negative = np.bincount(group, weights=weights * (1.0 - labels), minlength=n_groups)
    return positive, negative        # (n_groups,) each, ascending score


def _auc_from_groups(positive, negative) -> float | None:
    P, N = positive.sum(), negative.sum()
    if P <= 0 or N <= 0:
        return None
    negatives_below = np.cumsum(negative) - negative
    # A tied positive/negative pair counts one half (Mann-Whitney U).
    return float(np.sum(positive * (negatives_below + 0.5 * negative)) / (P * N))


def _ap_from_groups(positive, negative) -> float | None:
    P, N = positive.sum(), negative.sum()
    if P <= 0 or N <= 0:
        return None
    tp = np.cumsum(positive[::-1])       # threshold at each distinct score, highest first
    fp = np.cumsum(negative[::-1])
    keep = (tp + fp) > 0
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=keep)
    recall_step = positive[::-1] / P
    return float(np.sum(recall_step * precision))


def _prepare(labels, scores, weights):
    labels = np.asarray(labels, dtype=np.float64).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    weights = np.ones_like(labels) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    if not (labels.shape == scores.shape == weights.shape):
        raise ValueError(f"labels {labels.shape}, scores {scores.shape}, weights {weights.shape} differ")
    return labels, scores, weights


def roc_auc(labels, scores, weights=None) -> float | None:
    """Area under the ROC curve = P(score of a positive > score of a negative), ties 1/2."""
    labels, scores, weights = _prepare(labels, scores, weights)
    group, n = _tie_groups(scores)
    return _auc_from_groups(*_class_weights(group, n, labels, weights))


def pr_auc(labels, scores, weights=None) -> float | None:
    """Average precision: sum over distinct thresholds of (recall step) x precision."""
    labels, scores, weights = _prepare(labels, scores, weights)
    group, n = _tie_groups(scores)
    return _ap_from_groups(*_class_weights(group, n, labels, weights))


def expected_calibration_error(labels, probabilities, n_bins: int = 10, weights=None) -> float | None:
    """sum over equal-width probability bins of (bin share) x |mean probability - buy rate|.
    Bin b holds [b/n, (b+1)/n); the last bin also holds 1.0."""
    labels, probabilities, weights = _prepare(labels, probabilities, weights)
    total = weights.sum()
    if total <= 0:
        return None
    bins = np.clip((probabilities * n_bins).astype(np.int64), 0, n_bins - 1)
    predicted = np.bincount(bins, weights=weights * probabilities, minlength=n_bins)
    observed = np.bincount(bins, weights=weights * labels, minlength=n_bins)
    return float(np.sum(np.abs(predicted - observed)) / total)


def calibration_curve(labels, probabilities, n_bins: int = 10):
    """(mean predicted, observed rate, count) per non-empty bin, for the report's plot."""
    labels, probabilities, _ = _prepare(labels, probabilities, None)
    bins = np.clip((probabilities * n_bins).astype(np.int64), 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    predicted = np.bincount(bins, weights=probabilities, minlength=n_bins)
    observed = np.bincount(bins, weights=labels, minlength=n_bins)
    used = count > 0
    return predicted[used] / count[used], observed[used] / count[used], count[used]


def roc_curve(labels, scores):
    """(false positive rate, true positive rate) at every distinct threshold, for plots."""
    labels, scores, weights = _prepare(labels, scores, None)
    group, n = _tie_groups(scores)
    positive, negative = _class_weights(group, n, labels, weights)
    tp = np.concatenate([[0.0], np.cumsum(positive[::-1])])
    fp = np.concatenate([[0.0], np.cumsum(negative[::-1])])
    return fp / max(fp[-1], 1e-12), tp / max(tp[-1], 1e-12)


def precision_recall_curve(labels, scores):
    """(recall, precision) at every distinct threshold, highest threshold first."""
    labels, scores, weights = _prepare(labels, scores, None)
    group, n = _tie_groups(scores)
    positive, negative = _class_weights(group, n, labels, weights)
    tp = np.cumsum(positive[::-1])
    fp = np.cumsum(negative[::-1])
    return tp / max(tp[-1], 1e-12), tp / np.maximum(tp + fp, 1e-12)


# -- uncertainty ---------------------------------------------------------------------

_GROUPED = {"roc_auc": _auc_from_groups, "pr_auc": _ap_from_groups}


def bootstrap_ci(sessions, labels, scores, metric: Callable = roc_auc, n_resamples: int = 1000,
                 seed: int = 0, level: float = 0.95) -> tuple[float, float] | None:
    """Percentile confidence interval of `metric` (roc_auc or pr_auc) when whole
    SESSIONS are resampled with replacement: a session's prefixes are correlated, so
    resampling prefixes would give intervals that are too narrow.

    `sessions` gives each example's session (any hashable codes). Resamples in which
    the metric is undefined (no positive drawn) are dropped; None when every one is.
    """
    labels, scores, _ = _prepare(labels, scores, None)
    grouped = _GROUPED.get(getattr(metric, "__name__", ""))
    if grouped is None:
        raise ValueError("bootstrap_ci supports roc_auc and pr_auc")
    _, session_index = np.unique(np.asarray(sessions), return_inverse=True)
    session_index = session_index.ravel()
    n_sessions = int(session_index.max()) + 1 if session_index.size else 0
    if n_sessions == 0:
        return None
    group, n_groups = _tie_groups(scores)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_resamples):
        drawn = np.bincount(rng.integers(0, n_sessions, n_sessions), minlength=n_sessions)
        weights = drawn[session_index].astype(np.float64)         # (n_examples,)
        value = grouped(*_class_weights(group, n_groups, labels, weights))
        if value is not None:
            values.append(value)
    if not values:
        return None
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def paired_next_item_ci(sessions, ranks_a, ranks_b, k: int = 20, n_resamples: int = 1000, seed: int = 0,
                        level: float = 0.95) -> dict:
    """Recall@k and MRR@k differences a - b on the same targets, with percentile
    intervals from resampling whole sessions (the pairing removes the between-session
    variance both scorers share, so the interval is much tighter than two separate ones).
    `sessions` gives each target's session (int codes)."""
    def hits_rr(ranks):
        ranks = np.asarray(ranks, dtype=np.float64)
        hit = (ranks >= 1) & (ranks <= k)
        return hit.astype(np.float64), np.where(hit, 1.0 / np.where(hit, ranks, 1.0), 0.0)

    hit_a, rr_a = hits_rr(ranks_a)
    hit_b, rr_b = hits_rr(ranks_b)
    _, index = np.unique(np.asarray(sessions), return_inverse=True)
    n = int(index.max()) + 1 if index.size else 0
    out = {"recall_diff": float(hit_a.mean() - hit_b.mean()) if hit_a.size else None,
           "mrr_diff": float(rr_a.mean() - rr_b.mean()) if rr_a.size else None,
           "recall_diff_ci95": None, "mrr_diff_ci95": None}
    if n == 0 or n_resamples <= 0:
        return out
    per_session = np.bincount(index, minlength=n).astype(np.float64)
    d_hit = np.bincount(index, hit_a - hit_b, minlength=n)
    d_rr = np.bincount(index, rr_a - rr_b, minlength=n)
    rng = np.random.default_rng(seed)
    boot = np.empty((n_resamples, 2))
    for r in range(n_resamples):
        drawn = np.bincount(rng.integers(0, n, n), minlength=n)    # session multiplicities
        count = drawn @ per_session
        boot[r] = (drawn @ d_hit / count, drawn @ d_rr / count)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(boot, [tail, 100.0 - tail], axis=0)
    out["recall_diff_ci95"] = [float(low[0]), float(high[0])]
    out["mrr_diff_ci95"] = [float(low[1]), float(high[1])]
    return out


def next_item_ci(sessions, ranks, k: int = 20, n_resamples: int = 1000, seed: int = 0) -> dict:
    """Recall@k and MRR@k of one scorer with 95% session-bootstrap intervals: the paired
    interval against a scorer that never hits (rank 0), whose figures are all 0."""
    ranks = np.asarray(ranks)
    out = paired_next_item_ci(sessions, ranks, np.zeros_like(ranks), k, n_resamples, seed)
    return {"recall_ci95": out["recall_diff_ci95"], "mrr_ci95": out["mrr_diff_ci95"]}


def paired_auc_ci(sessions, labels, scores_a, scores_b, n_resamples: int = 1000, seed: int = 0,
                  level: float = 0.95) -> dict:
    """ROC AUC difference a - b on the same examples, 95% interval from resampling whole
    sessions (the same draw for both scorers)."""
    labels = np.asarray(labels, dtype=np.float64)
    out = {"auc_diff": None, "auc_diff_ci95": None}
    auc_a, auc_b = roc_auc(labels, scores_a), roc_auc(labels, scores_b)
    if auc_a is None or auc_b is None or (isinstance(auc_a, float) and math.isnan(auc_a)):
        return out
    out["auc_diff"] = float(auc_a - auc_b)
    _, index = np.unique(np.asarray(sessions), return_inverse=True)
    n = int(index.max()) + 1
    groups = [_tie_groups(_prepare(labels, s, None)[1]) for s in (scores_a, scores_b)]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_resamples):
        weights = np.bincount(rng.integers(0, n, n), minlength=n)[index].astype(np.float64)
        pair = [_auc_from_groups(*_class_weights(g, ng, labels, weights)) for g, ng in groups]
        if pair[0] is not None and pair[1] is not None:
            values.append(pair[0] - pair[1])
    if values:
        tail = (1.0 - level) / 2.0 * 100.0
        low, high = np.percentile(values, [tail, 100.0 - tail])
        out["auc_diff_ci95"] = [float(low), float(high)]
    return out
