"""The stacked buy head (training/models/stack.py): in-graph aggregates against the
baseline's prefix_aggregates, LightGBM trees evaluated in torch against LightGBM itself,
exact stepping, and the valid-fitted blend's calibration."""
from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pytest
import torch

from stream.features import WINDOW
from training.baselines import AGGREGATE_FEATURES, ItemBuyStats, prefix_aggregates
from training.examples import build_examples, fit_artefacts
from training.models import build_model
from training.models.stack import (N_AGGREGATE, RECENCY_FEATURES, STACK_FEATURES, BuyStack, Norm, example_events,
                                   examples_features, flatten_trees, item_tables, norm_of, session_aggregates)


def hand_made_log() -> pl.DataFrame:
    """Six short sessions (all events priced, gaps under a day, all items in the
    vocabulary): the case where the in-graph and the baseline definitions coincide."""
    rows = []
    rng = np.random.default_rng(3)
    t0 = 1_400_000_000_000
    for s in range(6):
        t = t0 + s * 10_000_000
        n = 3 + s * 2
        for j in range(n):
            t += int(rng.integers(1_000, 600_000))
            kind = "addtocart" if j % 4 == 2 else "view"
            item = f"i{(s + j * 3) % 5}"
            category = None if j % 5 == 4 else f"c{(s + j) % 3}"
            rows.append({"session_id": f"s{s}", "event_type": kind, "item_id": item, "category_id": category,
                         "price": float(rng.integers(1, 500)) + 0.5, "timestamp": t, "split": "train"})
        if s % 2 == 0:   # buyers end with a transaction (no buy label is read after it)
            rows.append({"session_id": f"s{s}", "event_type": "transaction", "item_id": "i0", "category_id": "c0",
                         "price": 10.5, "timestamp": t + 5000, "split": "train"})
    return pl.DataFrame(rows)


def test_in_graph_aggregates_equal_the_baselines_prefix_aggregates_on_a_hand_made_log():
    events = hand_made_log()
    artefacts = fit_artefacts(events, 1)
    examples = build_examples(events, "train", artefacts)
    session, item, buys = example_events(examples)
    pop, rate, _ = item_tables(session, item, buys, artefacts.n_items)
    got, labels = examples_features(examples, pop, rate, norm_of(artefacts))
    want_all = prefix_aggregates(events, ItemBuyStats.fit(events))
    # the rows the model scores: every event before the session's first transaction
    first_tx = events.with_row_index("r").with_columns(
        tx=(pl.col("event_type") == "transaction").cum_sum().over("session_id"))
    scored = (first_tx["tx"] == 0).to_numpy()
    want = want_all[scored]
    assert STACK_FEATURES[:N_AGGREGATE] == AGGREGATE_FEATURES
    assert got.shape == (want.shape[0], len(STACK_FEATURES)) and len(got) > 30
    assert labels.sum() > 0 and labels.min() == 0
    np.testing.assert_allclose(got[:, :N_AGGREGATE], want, rtol=2e-5, atol=2e-5)


def recency_by_hand(events: pl.DataFrame, item_rate: np.ndarray) -> np.ndarray:
    """RECENCY_FEATURES of every event, computed event by event in plain Python/numpy from
    the raw log (item_rate: the per-event item buy rate, one value per event)."""
    rows, r = [], 0
    for _, part in events.group_by("session_id", maintain_order=True):
        kinds, items = part["event_type"].to_list(), part["item_id"].to_list()
        seconds = part["timestamp"].to_numpy() / 1000.0
        for t in range(part.height):
            carts = [j for j in range(t + 1) if kinds[j] == "addtocart"]
            last5 = range(max(0, t - 4), t + 1)
            gaps = [np.log1p(seconds[j] - seconds[j - 1]) for j in range(max(1, t - 2), t + 1)]
            rows.append([
                t - carts[-1] if carts else -1.0,
                np.log1p(seconds[t] - seconds[carts[-1]]) if carts else -1.0,
                sum(kinds[j] == "addtocart" for j in last5),
                np.mean(gaps) if gaps else 0.0,
                sum(items[j] not in items[:j] for j in last5),
                np.mean([item_rate[r + j - t] for j in last5]),
            ])
            r += 1
    return np.asarray(rows, dtype=np.float64)


def test_recency_features_equal_a_direct_computation():
    events = hand_made_log()
    artefacts = fit_artefacts(events, 1)
    examples = build_examples(events, "train", artefacts)
    session, item, buys = example_events(examples)
    pop, rate, _ = item_tables(session, item, buys, artefacts.n_items)
    got, _ = examples_features(examples, pop, rate, norm_of(artefacts))
    want_all = recency_by_hand(events, prefix_aggregates(events, ItemBuyStats.fit(events))[
        :, AGGREGATE_FEATURES.index("item_buy_rate")])
    first_tx = events.with_columns(tx=(pl.col("event_type") == "transaction").cum_sum().over("session_id"))
    want = want_all[(first_tx["tx"] == 0).to_numpy()]
    assert len(RECENCY_FEATURES) == want.shape[1] == got.shape[1] - N_AGGREGATE
    assert (want[:, 0] >= 0).any() and (want[:, 0] == -1).any()       # both with and without a cart
    np.testing.assert_allclose(got[:, N_AGGREGATE:], want, rtol=2e-5, atol=2e-5)


def test_oov_distinct_counts_each_out_of_vocabulary_event_as_a_new_item():
    # one session, newest last: items 5, OOV, 5, OOV, OOV (index 1 = ITEM_OOV)
    item = torch.tensor([[0, 0, 5, 1, 5, 1, 1]])
    ones = torch.ones_like(item)
    args = (ones, item, ones * 3, ones, ones, torch.zeros(1, 7), torch.zeros(1, 7),
            torch.zeros(1, 7, dtype=torch.float64), torch.zeros(1, 7, dtype=torch.float64))
    distinct, repeats = STACK_FEATURES.index("log_distinct_items"), STACK_FEATURES.index("current_item_repeats")
    norm = Norm(0.0, 1.0, 0.0, 1.0)
    shared = session_aggregates(*args, norm)[0, 2:]
    apart = session_aggregates(*args, Norm(0.0, 1.0, 0.0, 1.0, oov_distinct=True))[0, 2:]
    np.testing.assert_allclose(np.expm1(shared[:, distinct].numpy()), [1, 2, 2, 2, 2])
    np.testing.assert_allclose(shared[:, repeats].numpy(), [1, 1, 2, 2, 3])
    np.testing.assert_allclose(np.expm1(apart[:, distinct].numpy()), [1, 2, 2, 3, 4])
    np.testing.assert_allclose(apart[:, repeats].numpy(), [1, 1, 2, 1, 1])


def test_in_graph_aggregates_differ_where_documented_missing_price_reads_as_the_mean():
    events = hand_made_log().with_columns(price=pl.when(pl.col("event_type") == "view").then(None)
                                          .otherwise(pl.col("price")))
    artefacts = fit_artefacts(events, 1)
    examples = build_examples(events, "train", artefacts)
    session, item, buys = example_events(examples)
    pop, rate, _ = item_tables(session, item, buys, artefacts.n_items)
    got, _ = examples_features(examples, pop, rate, norm_of(artefacts))
    column = STACK_FEATURES.index("log_price")
    assert np.isfinite(got).all()                                   # never NaN: the trees see a value
    np.testing.assert_allclose(got[got[:, STACK_FEATURES.index("is_addtocart")] == 0, column],
                               artefacts.price_mean, rtol=1e-6)


def test_out_of_fold_tables_leave_each_fold_out():
    session = np.array([0, 0, 1, 2, 3, 3, 4])
    item = np.array([2, 3, 2, 2, 3, 2, 4])
    buys = np.array([1, 1, 0, 1, 0, 0, 1], dtype=float)
    pop, rate, fold = item_tables(session, item, buys, 6, folds=2, seed=1)
    assert pop.shape == (2, 6)
    for k in range(2):
        kept = [s for s in range(5) if fold[s] != k]
        sessions_with_2 = sum(1 for s in kept if 2 in item[session == s])
        np.testing.assert_allclose(np.expm1(pop[k, 2]), sessions_with_2 * 2.0)
    full_pop, full_rate, _ = item_tables(session, item, buys, 6)
    np.testing.assert_allclose(np.expm1(full_pop[0, 2]), 4.0)       # sessions 0, 1, 2, 3
    base = 3 / 5
    np.testing.assert_allclose(full_rate[0, 2], (2 + 20 * base) / (4 + 20))
    np.testing.assert_allclose(full_rate[0, 1], base)               # OOV: the base rate


def fitted_gbm(seed=0, n=600):
    import lightgbm

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, len(STACK_FEATURES)))
    y = (x[:, 0] + 0.5 * x[:, 3] * x[:, 5] + rng.normal(scale=0.7, size=n) > 0.3).astype(int)
    model = lightgbm.LGBMClassifier(n_estimators=40, num_leaves=15, min_child_samples=5, verbose=-1,
                                    n_jobs=1, deterministic=True, force_row_wise=True).fit(x, y)
    return model, x


def test_trees_in_torch_give_lightgbms_raw_score():
    model, x = fitted_gbm()
    trees = flatten_trees(model)
    assert trees["depth"] >= 2 and len(trees["roots"]) == 40
    stack = BuyStack.from_lightgbm(model, np.zeros(5), np.zeros(5), norm_of_default())
    got = stack.gbm_logit(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, model.booster_.predict(x, raw_score=True), rtol=0, atol=1e-9)


def norm_of_default():
    from training.models.stack import Norm
    return Norm(1.0, 2.0, 3.0, 1.5)


def stacked_gru(n_items=50, oov_distinct=False, **extra):
    """A tiny GRU (window heads on) with a real LightGBM stack on random item tables (its
    trees split on all STACK_FEATURES columns, the recency ones included)."""
    from tests.test_models import tiny_config

    torch.manual_seed(0)
    model = build_model("gru", dict(tiny_config("gru"), **extra))
    gbm, _ = fitted_gbm()
    rng = np.random.default_rng(1)
    n = model.config.n_items
    norm = Norm(*dataclasses.astuple(norm_of_default())[:4], oov_distinct=oov_distinct)
    stack = BuyStack.from_lightgbm(gbm, rng.uniform(0, 5, n), rng.uniform(0, 0.3, n), norm, blend=(0.8, 0.5, -0.3))
    model.attach_stack(stack)
    return model


@pytest.mark.parametrize("oov_distinct", [False, True])
def test_stacked_checkpoint_config_rebuilds_the_same_model(oov_distinct):
    from dataclasses import asdict

    model = stacked_gru(oov_distinct=oov_distinct, repeat=True, wide=True, item_rates=True)
    rebuilt = build_model("gru", asdict(model.config))
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.state_names[-1] == "stack_window"
    assert rebuilt.stack is not None and rebuilt.stack.depth == model.stack.depth
    assert rebuilt.stack.norm == model.stack.norm and rebuilt.stack.norm.oov_distinct == oov_distinct


def test_a_stack_recorded_before_oov_distinct_rebuilds_with_oov_shared():
    from dataclasses import asdict

    config = asdict(stacked_gru().config)
    config["stack_norm"] = tuple(config["stack_norm"])[:4]            # as the first stacks stored it
    assert build_model("gru", config).stack.norm.oov_distinct is False


def test_oov_distinct_stack_is_causal_and_steps_exactly():
    from tests.test_models import assert_causal_and_steps_exactly

    extra = {"repeat": True, "wide": True, "item_rates": True}
    model = stacked_gru(oov_distinct=True, **extra)
    with torch.no_grad():
        for p in model.context.parameters():
            p.add_(0.3 * torch.randn_like(p))
    assert_causal_and_steps_exactly(model, extra)


def test_blend_is_monotone_and_its_ece_is_computed():
    from training.metrics import expected_calibration_error
    from training.train import fit_blend

    rng = np.random.default_rng(0)
    gbm = rng.normal(size=4000)
    gru = 0.5 * gbm + rng.normal(size=4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-(-2.5 + 1.2 * gbm + 0.4 * gru)))).astype(float)
    a, b, c = fit_blend(gbm, gru, y)
    assert a > 0 and b > 0                        # both logits raise the probability
    assert abs(a - 1.2) < 0.25 and abs(b - 0.4) < 0.2 and abs(c + 2.5) < 0.3
    p = 1 / (1 + np.exp(-(a * gbm + b * gru + c)))
    assert expected_calibration_error(y, p) < 0.03
    skewed = 1 / (1 + np.exp(-(a * gbm + b * gru + c + 1.5)))
    assert expected_calibration_error(y, skewed) > expected_calibration_error(y, p) + 0.05


@pytest.mark.parametrize("aucs, want_mode, want_kept", [
    ({"gbm": 0.79, "gru": 0.76, "blend": 0.80}, "blend", True),     # labelled YOOCHOOSE-like
    ({"gbm": 0.647, "gru": 0.566, "blend": 0.642}, "gbm", True),    # Taobao-like: the GBM alone
    ({"gbm": 0.55, "gru": 0.66, "blend": 0.65}, "blend", False),    # Diginetica-like: the GRU alone
])
def test_choose_stack_picks_by_valid_auc(aucs, want_mode, want_kept):
    from training.train import choose_stack

    figures = {name: {"valid_auc": auc} for name, auc in aucs.items()}
    mode, blend, kept = choose_stack(figures, (0.8, 0.4, 0.5), (1.1, -0.2))
    assert (mode, kept) == (want_mode, want_kept)
    assert blend == ((1.1, 0.0, -0.2) if mode == "gbm" else (0.8, 0.4, 0.5))


def test_oof_valid_fold_windows_never_hold_the_held_out_sessions_and_line_up_with_the_feature_rows():
    """bench/oof_valid.py: fold k's GRU trains on windows of sessions outside fold k, and the
    out-of-fold logits computed on fold k's windows land on exactly those windows' feature rows."""
    from bench.oof_valid import prefix_counts, subset_windows, window_folds

    events = hand_made_log()
    artefacts = fit_artefacts(events, 1)
    examples = build_examples(events, "train", artefacts)
    session, item, buys = example_events(examples)
    pop, rate, fold = item_tables(session, item, buys, artefacts.n_items, folds=3, seed=2)
    norm = norm_of(artefacts)
    x, _ = examples_features(examples, pop, rate, norm, fold)
    wfold = window_folds(examples, fold)
    prefix_fold = np.repeat(wfold, prefix_counts(examples))                       # (P,)
    assert len(prefix_fold) == len(x) and len(np.unique(wfold)) >= 2
    for k in np.unique(wfold):
        trained_on = subset_windows(examples, wfold != k)
        seen = set(session[trained_on.window_start].tolist())
        assert seen and not seen & set(np.flatnonzero(fold == k).tolist())     # never a fold-k session
        held = subset_windows(examples, wfold == k)
        got, _ = examples_features(held, pop, rate, norm, fold)
        np.testing.assert_array_equal(got, x[prefix_fold == k])               # same rows, same order
