"""Evaluation metrics and baselines against small examples worked out by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from training import metrics
from training.baselines import ItemCatalogue, Popular, SessionKNN
from training.metrics import (bootstrap_ci, expected_calibration_error, mrr_at_k, pr_auc, recall_at_k,
                              roc_auc, target_ranks, target_ranks_sparse)

OFFSET = 2   # model scores: column 0 padding, 1 OOV, 2.. items


def test_ranks_recall_and_mrr_by_hand():
    # 4 prefixes over 30 real items (columns 2..31). Target ranks, by construction:
    #   row 0: the target has the top score                       -> rank 1
    #   row 1: exactly 2 items score higher                       -> rank 3
    #   row 2: exactly 24 items score higher                      -> rank 25 (outside the top 20)
    #   row 3: the target is OOV (index 1)                        -> miss
    # recall@20 = (1 + 1 + 0 + 0) / 4 = 0.5
    # mrr@20    = (1/1 + 1/3 + 0 + 0) / 4 = 1/3
    n = OFFSET + 30
    scores = np.zeros((4, n), dtype=np.float32)
    scores[:, :OFFSET] = 100.0                 # padding/OOV columns never compete
    scores[0, 10] = 5.0
    scores[1, 10] = 5.0
    scores[1, [3, 4]] = 6.0
    scores[2, 31] = 5.0
    scores[2, OFFSET:OFFSET + 24] = 6.0        # 24 items above the target
    targets = np.array([10, 10, 31, 1])
    ranks = target_ranks(scores, targets, first_real=OFFSET)
    assert ranks[:3].tolist() == [1, 3, 25]
    assert math.isinf(ranks[3])
    assert recall_at_k(ranks, 20) == pytest.approx(0.5)
    assert mrr_at_k(ranks, 20) == pytest.approx((1 + 1 / 3) / 4)


def test_rank_ties_break_toward_lower_index_and_sparse_agrees():
    # Items 0..4 (no padding offset) scored [0, 2, 2, 0, 1]:
    #   target 2 ties with item 1 (lower index wins)      -> rank 2
    #   target 1                                          -> rank 1
    #   target 4 (score 1) is below items 1, 2            -> rank 3
    #   target 3 (score 0) is below 1, 2, 4, tied with 0  -> rank 5
    #   target -1: unknown                                -> miss
    scores = np.array([[0, 2, 2, 0, 1]] * 5, dtype=np.float64)
    targets = np.array([2, 1, 4, 3, -1])
    dense = target_ranks(scores, targets)
    assert dense[:4].tolist() == [2, 1, 3, 5] and math.isinf(dense[4])
    sparse = target_ranks_sparse(sp.csr_matrix(scores), targets)
    assert np.array_equal(dense, sparse)


def test_auc_with_ties_by_hand():
    # positives 0.9, 0.6, 0.4; negatives 0.7, 0.4, 0.1. Pairs won (tie = 1/2):
    #   0.9 beats 0.7, 0.4, 0.1           -> 3
    #   0.6 beats 0.4, 0.1, loses to 0.7  -> 2
    #   0.4 ties 0.4, beats 0.1           -> 1.5
    # AUC = 6.5 / 9
    labels = [1, 1, 1, 0, 0, 0]
    scores = [0.9, 0.6, 0.4, 0.7, 0.4, 0.1]
    assert roc_auc(labels, scores) == pytest.approx(6.5 / 9)
    # perfectly inverted -> 0, all tied -> 1/2
    assert roc_auc([1, 0], [0.1, 0.9]) == 0.0
    assert roc_auc([1, 0, 1, 0], [0.5] * 4) == 0.5


def test_pr_auc_is_average_precision_by_hand():
    # Same example, thresholds from the top (the tied 0.4 pair is one threshold):
    #   >= 0.9: tp 1 fp 0, precision 1,   recall 1/3
    #   >= 0.7: tp 1 fp 1, recall unchanged (adds nothing)
    #   >= 0.6: tp 2 fp 1, precision 2/3, recall 2/3
    #   >= 0.4: tp 3 fp 2, precision 3/5, recall 1
    # AP = 1/3 * 1 + 1/3 * 2/3 + 1/3 * 3/5 = 34/45
    labels = [1, 1, 1, 0, 0, 0]
    scores = [0.9, 0.6, 0.4, 0.7, 0.4, 0.1]
    assert pr_auc(labels, scores) == pytest.approx(34 / 45)


def test_ece_by_hand():
    # bins of width 0.1:
    #   [0.0, 0.1): p 0.05, label 0         -> |0.05 - 0|  = 0.05, 1 of 5
    #   [0.1, 0.2): p 0.15, 0.15; labels 0,1 -> |0.15 - 0.5| = 0.35, 2 of 5
    #   [0.8, 0.9): p 0.85, label 1         -> 0.15, 1 of 5
    #   [0.9, 1.0]: p 0.95, label 1         -> 0.05, 1 of 5
    # ECE = (0.05 + 2 * 0.35 + 0.15 + 0.05) / 5 = 0.19
    labels = [0, 0, 1, 1, 1]
    probabilities = [0.05, 0.15, 0.15, 0.85, 0.95]
    assert expected_calibration_error(labels, probabilities) == pytest.approx(0.19)
    assert expected_calibration_error([1, 0], [1.0, 0.0]) == 0.0   # 1.0 falls in the last bin


def test_undefined_buy_metrics_are_none():
    assert roc_auc([0, 0, 0], [0.1, 0.2, 0.3]) is None
    assert pr_auc([0, 0], [0.1, 0.2]) is None
    assert bootstrap_ci([1, 2], [0, 0], [0.1, 0.2], roc_auc, n_resamples=10) is None
    assert recall_at_k(np.zeros(0), 20) is None


def _sessions(n_sessions, rng):
    """n sessions of 3 prefixes each; a session buys with p 0.3; scores separate noisily."""
    session = np.repeat(np.arange(n_sessions), 3)
    label = np.repeat(rng.random(n_sessions) < 0.3, 3).astype(float)
    score = label * 0.8 + rng.normal(0, 0.6, size=label.size)
    return session, label, score


def test_bootstrap_ci_contains_estimate_and_narrows_with_more_sessions():
    rng = np.random.default_rng(7)
    widths = []
    for n in (100, 1600):
        session, label, score = _sessions(n, rng)
        for metric in (roc_auc, pr_auc):
            low, high = bootstrap_ci(session, label, score, metric, n_resamples=300, seed=1)
            assert low <= metric(label, score) <= high
        low, high = bootstrap_ci(session, label, score, roc_auc, n_resamples=300, seed=1)
        widths.append(high - low)
    # 16x the sessions: the width should shrink about 4x; ask for at least 2x.
    assert widths[1] < widths[0] / 2


def test_bootstrap_resamples_sessions_not_prefixes():
    # Each session repeats its example 50 times. Resampling prefixes would treat that as
    # 50x the data; resampling sessions must give the interval of the 20 sessions.
    rng = np.random.default_rng(3)
    session, label, score = _sessions(20, rng)
    repeated = np.repeat(session, 50), np.repeat(label, 50), np.repeat(score, 50)
    low, high = bootstrap_ci(*repeated, roc_auc, n_resamples=300, seed=2)
    by_prefix = bootstrap_ci(np.arange(repeated[0].size), repeated[1], repeated[2], roc_auc,
                             n_resamples=300, seed=2)
    assert (high - low) > 3 * (by_prefix[1] - by_prefix[0])


# -- baselines ---------------------------------------------------------------------

# Training sessions (item sets) and the time of their last event:
#   S1 = {A, B}     t=1
#   S2 = {A, C}     t=2
#   S3 = {B, C, D}  t=3
#   S4 = {D, E}     t=4
TRAIN = [("S1", "A", 1), ("S1", "B", 1), ("S2", "A", 2), ("S2", "C", 2),
         ("S3", "B", 3), ("S3", "C", 3), ("S3", "D", 3), ("S4", "D", 4), ("S4", "E", 4)]


def _knn(**kwargs):
    sessions, items, times = zip(*TRAIN)
    catalogue = ItemCatalogue.fit(items)
    return SessionKNN(**kwargs).fit(sessions, items, times, catalogue), catalogue


def _scores(knn, catalogue, prefix):
    cols = catalogue.columns(prefix)
    row = sp.csr_matrix((np.ones(len(cols)), (np.zeros(len(cols), int), cols)), shape=(1, catalogue.size))
    dense = knn.scores(row, np.array([len(prefix)], dtype=float)).toarray()[0]
    return dict(zip(catalogue.ids.tolist(), dense))


def test_catalogue_orders_by_popularity_then_id():
    _, catalogue = _knn()
    # A, B, C, D appear twice, E once
    assert catalogue.ids.tolist() == ["A", "B", "C", "D", "E"]
    assert catalogue.columns(["C", "Z"]).tolist() == [2, -1]


def test_sknn_scores_by_hand():
    knn, catalogue = _knn(k=100, sample_size=500)
    r2 = 1 / math.sqrt(2)
    # Prefix {A}: neighbours sharing A are S1, S2, each cos = 1 / sqrt(1 * 2).
    #   A: S1 + S2 = 2/sqrt2; B: S1 = 1/sqrt2; C: S2 = 1/sqrt2; D, E: 0
    s = _scores(knn, catalogue, ["A"])
    assert s == pytest.approx({"A": 2 * r2, "B": r2, "C": r2, "D": 0.0, "E": 0.0})
    # Prefix {A, B}: S1 cos 2/sqrt(2*2) = 1; S2 1/sqrt(2*2) = 0.5; S3 1/sqrt(2*3); S4 shares nothing.
    #   A: 1 + 0.5; B: 1 + 1/sqrt6; C: 0.5 + 1/sqrt6; D: 1/sqrt6; E: 0
    r6 = 1 / math.sqrt(6)
    s = _scores(knn, catalogue, ["A", "B"])
    assert s == pytest.approx({"A": 1.5, "B": 1 + r6, "C": 0.5 + r6, "D": r6, "E": 0.0})


def test_sknn_k_and_recent_sampling_by_hand():
    # k = 2: only the two most similar, S1 (1) and S2 (0.5): A 1.5, B 1, C 0.5, D 0
    knn, catalogue = _knn(k=2, sample_size=500)
    assert _scores(knn, catalogue, ["A", "B"]) == pytest.approx(
        {"A": 1.5, "B": 1.0, "C": 0.5, "D": 0.0, "E": 0.0})
    # sample_size = 2: candidates S1, S2, S3 -> the 2 most recent, S3 (t=3) and S2 (t=2):
    #   A 0.5; B 1/sqrt6; C 0.5 + 1/sqrt6; D 1/sqrt6
    knn, catalogue = _knn(k=100, sample_size=2)
    r6 = 1 / math.sqrt(6)
    assert _scores(knn, catalogue, ["A", "B"]) == pytest.approx(
        {"A": 0.5, "B": r6, "C": 0.5 + r6, "D": r6, "E": 0.0})


def test_sknn_and_popular_ranks_on_a_test_session():
    knn, catalogue = _knn()
    # Test session A, B, C, Z (Z unseen). Prefixes and targets:
    #   {A} -> B: A 1.414 > B 0.707 = C 0.707 (B has the lower column) -> rank 2
    #   {A,B} -> C: A 1.5 > B 1.408 > C 0.908                          -> rank 3
    #   {A,B,C} -> Z: unseen                                           -> miss
    session = catalogue.columns(["A", "B", "C", "Z"])
    ranks = knn.next_item_ranks([session], [np.array(["A", "B", "C", "Z"])])
    assert ranks[:2].tolist() == [2, 3] and math.isinf(ranks[2])
    # Popular ranks by catalogue order A, B, C, D, E: B -> 2, C -> 3, Z -> miss
    popular = Popular(catalogue).next_item_ranks([session])
    assert popular[:2].tolist() == [2, 3] and math.isinf(popular[2])


def test_unknown_items_count_in_the_prefix_size():
    # Prefix {A, Z} with Z unseen: |A| = 2, so S1 scores 1/sqrt(2*2) = 0.5, S2 likewise.
    knn, catalogue = _knn()
    row = sp.csr_matrix(([1.0], ([0], [0])), shape=(1, catalogue.size))
    dense = knn.scores(row, np.array([2.0])).toarray()[0]
    assert dense[0] == pytest.approx(1.0)        # A: S1 + S2 = 0.5 + 0.5
    assert metrics.MISS == np.inf


def test_next_item_interval_holds_the_figures_and_is_exact_when_every_session_agrees():
    from training.metrics import mrr_at_k, next_item_ci, recall_at_k

    rng = np.random.default_rng(0)
    sessions = np.repeat(np.arange(200), 3)
    ranks = rng.integers(1, 40, sessions.size)             # > 20 = missed
    ci = next_item_ci(sessions, ranks, 20, 500, 0)
    assert ci["recall_ci95"][0] < recall_at_k(ranks, 20) < ci["recall_ci95"][1]
    assert ci["mrr_ci95"][0] < mrr_at_k(ranks, 20) < ci["mrr_ci95"][1]
    ones = next_item_ci(sessions, np.ones_like(ranks), 20, 100, 0)   # every target ranked first
    assert ones["recall_ci95"] == [1.0, 1.0] and ones["mrr_ci95"] == [1.0, 1.0]
