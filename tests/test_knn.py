"""V-SKNN, STAN, VSTAN and SR (training/knn.py) on tiny hand-made sessions.

    .venv/bin/python -m pytest tests/test_knn.py -q

Expected scores are written out from the formulas of the papers (training/knn.py's
docstring) for three training sessions, not computed by the code under test.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from training.baselines import ItemCatalogue
from training.knn import NeighbourParams, NeighbourScorer, SequentialRules

# Training sessions, contract order: S1 = a b c (last event 100 s), S2 = b d (200 s), S3 = e a (300 s).
SESSIONS = ["1", "1", "1", "2", "2", "3", "3"]
ITEMS = ["a", "b", "c", "b", "d", "e", "a"]
TIMES_MS = [50_000, 80_000, 100_000, 150_000, 200_000, 250_000, 300_000]
CATALOGUE = ItemCatalogue.fit(ITEMS)             # a, b (2 events each), then c, d, e
A, B, C, D, E = (int(CATALOGUE.columns([x])[0]) for x in "abcde")
NOW_S = 1000.0
IDF_COMMON, IDF_RARE = math.log(3 / 2), math.log(3 / 1)   # log(sessions / events of the item)


def fitted(params: NeighbourParams) -> NeighbourScorer:
    return NeighbourScorer(params).fit(SESSIONS, ITEMS, TIMES_MS, CATALOGUE)


def scores_after(scorer: NeighbourScorer, prefix: list[str]) -> dict[str, float]:
    columns = CATALOGUE.columns(prefix)
    relevant = np.unique(np.concatenate([scorer.sessions_of_item[c].indices for c in columns]))
    out = scorer.prefix_scores(columns, prefix, NOW_S, relevant)
    return {x: out[c] for x, c in zip("abcde", (A, B, C, D, E))}


def test_catalogue_order_is_the_popularity_order():
    assert (A, B, C, D, E) == (0, 1, 2, 3, 4)


def test_vsknn_scores_by_hand():
    scorer = fitted(NeighbourParams("vsknn", k=100, sample_size=100, similarity="vec",
                                    position_weight="quadratic", lambda_idf=1.0, score_decay="div"))
    got = scores_after(scorer, ["b", "a"])
    # Prefix b(1) a(2), L = 2: weights (1/2)^2 = 0.25 for b, (2/2)^2 = 1 for a; 2 distinct items.
    s1, s2, s3 = (0.25 + 1) / 2, 0.25 / 2, 1 / 2
    # Steps back to the last prefix item the neighbour holds: S1 a (1), S2 b (2), S3 a (1).
    d1, d2, d3 = 1.0, 1 / 2, 1.0
    expected = {
        "a": (s1 * d1 + s3 * d3) * (1 + IDF_COMMON),
        "b": (s1 * d1 + s2 * d2) * (1 + IDF_COMMON),
        "c": s1 * d1 * (1 + IDF_RARE),
        "d": s2 * d2 * (1 + IDF_RARE),
        "e": s3 * d3 * (1 + IDF_RARE),
    }
    assert got == pytest.approx(expected, rel=1e-12)


def _stan_parts():
    w_b, w_a = math.exp(-1.0), 1.0                       # exp((p - L) / 1), L = 2
    norm = math.sqrt(w_b ** 2 + w_a ** 2)
    decay = {n: math.exp(-(NOW_S - t) / 86400.0) for n, t in ((1, 100.0), (2, 200.0), (3, 300.0))}
    sim = {1: (w_b + w_a) / (norm * math.sqrt(3)) * decay[1],
           2: w_b / (norm * math.sqrt(2)) * decay[2],
           3: w_a / (norm * math.sqrt(2)) * decay[3]}
    return sim


def test_stan_scores_by_hand():
    scorer = fitted(NeighbourParams("stan", k=100, sample_size=100, similarity="cosine", position_weight="exp",
                                    lambda_spw=1.0, lambda_snh_days=1.0, lambda_inh=1.0))
    got = scores_after(scorer, ["b", "a"])
    sim = _stan_parts()
    e1 = math.exp(-1.0)
    # Item weights exp(-|q(j) - q*|): S1 = a(1) b(2) c(3), q* = 2 (b); S2 = b(1) d(2), q* = 1;
    # S3 = e(1) a(2), q* = 2.
    expected = {
        "a": sim[1] * e1 + sim[3] * 1.0,
        "b": sim[1] * 1.0 + sim[2] * 1.0,
        "c": sim[1] * e1,
        "d": sim[2] * e1,
        "e": sim[3] * e1,
    }
    assert got == pytest.approx(expected, rel=1e-12)


def test_vstan_adds_idf_and_the_prefix_position_of_the_match():
    scorer = fitted(NeighbourParams("vstan", k=100, sample_size=100, similarity="cosine", position_weight="exp",
                                    lambda_spw=1.0, lambda_snh_days=1.0, lambda_inh=1.0, lambda_ipw=1.0,
                                    lambda_idf=1.0))
    got = scores_after(scorer, ["b", "a"])
    sim = _stan_parts()
    e1 = math.exp(-1.0)
    ipw = {1: 1.0, 2: math.exp(1 - 2), 3: 1.0}           # exp((p* - L) / 1): S2 matches b at 1
    expected = {
        "a": (sim[1] * ipw[1] * e1 + sim[3] * ipw[3]) * (1 + IDF_COMMON),
        "b": (sim[1] * ipw[1] + sim[2] * ipw[2]) * (1 + IDF_COMMON),
        "c": sim[1] * ipw[1] * e1 * (1 + IDF_RARE),
        "d": sim[2] * ipw[2] * e1 * (1 + IDF_RARE),
        "e": sim[3] * ipw[3] * e1 * (1 + IDF_RARE),
    }
    assert got == pytest.approx(expected, rel=1e-12)


def test_k_and_sample_size_limit_the_neighbours():
    base = dict(similarity="vec", position_weight="quadratic", score_decay="div")
    # k = 1: only S1 (similarity 0.625, the highest) scores; d and e come from S2 and S3 only.
    got = scores_after(fitted(NeighbourParams("vsknn", k=1, sample_size=100, **base)), ["b", "a"])
    assert got["c"] == pytest.approx(0.625) and got["d"] == 0 and got["e"] == 0
    # sample_size = 1: only the most recent sharing session, S3 (last event at 300 s).
    got = scores_after(fitted(NeighbourParams("vsknn", k=100, sample_size=1, **base)), ["b", "a"])
    assert got == pytest.approx({"a": 0.5, "b": 0.0, "c": 0.0, "d": 0.0, "e": 0.5})


def test_a_repeated_item_keeps_its_last_position():
    scorer = fitted(NeighbourParams("vsknn", k=100, sample_size=100, similarity="vec",
                                    position_weight="div", score_decay="div"))
    # a(1) b(2) a(3), L = 3: a weighs 3/3 and b 2/3; 2 distinct items.
    got = scores_after(scorer, ["a", "b", "a"])
    s1, s2, s3 = (1 + 2 / 3) / 2, (2 / 3) / 2, 1 / 2
    d2 = 1 / 2                                           # S2 holds b, the prefix's 2nd event: 2 steps back
    assert got["d"] == pytest.approx(s2 * d2)
    assert got["c"] == pytest.approx(s1) and got["e"] == pytest.approx(s3)


def test_next_item_ranks_walk_the_session():
    scorer = fitted(NeighbourParams("vsknn", k=100, sample_size=100, similarity="vec",
                                    position_weight="quadratic", score_decay="div"))
    # Session b -> d -> x (unknown): after b, S1 (0.5... ) and S2 share b.
    columns = CATALOGUE.columns(["b", "d", "x"])
    ranks = scorer.next_item_ranks([columns], [["b", "d", "x"]], [np.array([0, 1000, 2000])])
    # After "b" (weight 1): S1 and S2 both similarity 1, decay 1; scores a 1, b 2, c 1, d 1:
    # d ties a and c and ranks behind both (ties break toward the more popular item).
    assert ranks[0] == 4
    assert ranks[1] == np.inf                            # "x" is not in the catalogue: a miss


def test_sequential_rules_by_hand():
    rules = SequentialRules(steps=20, weighting="quadratic", pruning=20).fit(SESSIONS, ITEMS, CATALOGUE)
    dense = rules.rules.toarray()
    # S1: a->b 1, b->c 1, a->c 1/2^2; S2: b->d 1; S3: e->a 1.
    expected = np.zeros((5, 5))
    expected[A, B], expected[B, C], expected[A, C], expected[B, D], expected[E, A] = 1, 1, 0.25, 1, 1
    np.testing.assert_allclose(dense, expected)
    pruned = SequentialRules(steps=20, weighting="div", pruning=1).fit(SESSIONS, ITEMS, CATALOGUE)
    assert pruned.rules[A].toarray().ravel().tolist() == [0, 1, 0, 0, 0]     # b (1) beats c (1/2)
    # Session b -> d: after b, c and d tie at 1 and c is the more popular column: d ranks 2.
    assert rules.next_item_ranks([CATALOGUE.columns(["b", "d"])]).tolist() == [2.0]
    steps_one = SequentialRules(steps=1).fit(SESSIONS, ITEMS, CATALOGUE)
    assert steps_one.rules[A, C] == 0                    # c is 2 steps after a
