"""Valid-only experiments for the stacked buy head (issue 10; docs/experiments-log.md):
in-graph GBM feature sets and buy calibrations compared on the VALID split of a
`--fit-on train` checkpoint, never reading test.

    nice -n 19 .venv/bin/python -m bench.stack_valid --checkpoint runs/yb/held-out \
        --data ../main/data/yoochoose-buys

Prints, per feature set (the 22 aggregates; + the recency features), the in-graph GBM's
valid AUC (parameters tuned on valid as train.fit_stack does), the blend's valid AUC, and
per calibration (Platt / temperature / isotonic of the blend logit) the cross-fitted
valid ECE: fitted on one random half of the valid sessions, measured on the other, both
ways, averaged over a few splits.
"""
from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import torch

from training import metrics
from training.baselines import AggregateBuyModel, tune_gbm
from training.checkpoint import load_checkpoint
from training.examples import build_examples, read_events
from training.models.stack import (N_AGGREGATE, BuyStack, example_events, examples_features, item_tables,
                                   norm_of)
from training.train import STACK_FOLDS, buy_logits, fit_blend
from training.calibration import CALIBRATIONS, cross_fitted_ece


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a --fit-on train checkpoint; without it: the in-graph GBM "
                        "alone, on artefacts fitted here with --min-item-count")
    parser.add_argument("--min-item-count", type=int, default=1)
    parser.add_argument("--oov-distinct", action="store_true", help="Norm.oov_distinct (stack.py)")
    parser.add_argument("--data", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-tune", action="store_true", help="GBM defaults instead of the valid grid")
    args = parser.parse_args()
    torch.set_num_threads(1)
    frame = read_events(args.data)
    if not args.checkpoint:
        return gbm_only(frame, args)
    model, artefacts, info = load_checkpoint(args.checkpoint)
    model.attach_stack(None)                      # the GRU's own calibrated logit
    train_ex, valid_ex, norm, (pop, rate), (x_train, y_train), (x_valid, y_valid) = _features(frame, artefacts, args)
    gru_valid, targets = buy_logits(model, valid_ex, torch.device("cpu"), 512, ordered=True)
    assert np.array_equal(targets, y_valid)
    valid_session, _, _ = example_events(valid_ex)
    # the session of each scored valid prefix (for session-level halves)
    prefix_session = _prefix_sessions(valid_ex, valid_session)
    print(f"train prefixes {len(y_train):,} ({y_train.mean():.4f} buy), valid {len(y_valid):,} "
          f"({y_valid.mean():.4f}); GRU alone valid AUC {metrics.roc_auc(targets, gru_valid):.4f}")
    # the GRU's own calibrated buy logit as one more GBM column (train: in-sample logits)
    gru_train, _ = buy_logits(model, train_ex, torch.device("cpu"), 512, ordered=True)
    variants = {"22 aggregates": (x_train[:, :N_AGGREGATE], x_valid[:, :N_AGGREGATE]),
                "+ recency": (x_train, x_valid),
                "+ recency + GRU logit (in-sample on train)": (np.column_stack([x_train, gru_train]),
                                                               np.column_stack([x_valid, gru_valid]))}
    for name, (xt, xv) in variants.items():
        params, _ = (tune_gbm(xt, y_train, xv, y_valid, seed=args.seed) if not args.no_tune
                     else ({}, []))
        gbm = AggregateBuyModel("gbm", seed=args.seed, params=params).fit(xt, y_train)
        stack = BuyStack.from_lightgbm(gbm.model, pop[0], rate[0], norm)
        gbm_valid = stack.gbm_logit(torch.from_numpy(np.ascontiguousarray(xv))).numpy()
        blend = fit_blend(gbm_valid, gru_valid, targets)
        blended = blend[0] * gbm_valid + blend[1] * gru_valid + blend[2]
        print(f"{name}: params {params}; valid AUC gbm {metrics.roc_auc(targets, gbm_valid):.4f} "
              f"blend {metrics.roc_auc(targets, blended):.4f} (a {blend[0]:.3f} b {blend[1]:.3f} c {blend[2]:+.3f})")
        inputs = np.stack([gbm_valid, gru_valid], axis=1)                     # (N, 2)
        for kind in CALIBRATIONS:   # the blend refitted on each fitting half too (all of it held out)
            ece = cross_fitted_ece(kind, inputs, targets, prefix_session, seed=args.seed, blend_fn=_blend_fn)
            print(f"  calibration {kind}: cross-fitted valid ECE {ece:.4f}")


def gbm_only(frame, args) -> None:
    """The in-graph GBM's valid AUC with item tables over the vocabulary of
    --min-item-count (1: every training item has its own row)."""
    from training.examples import fit_artefacts

    artefacts = fit_artefacts(frame, args.min_item_count)
    train_ex, valid_ex, norm, (pop, rate), (x_train, y_train), (x_valid, y_valid) = _features(frame, artefacts, args)
    for name, cols in (("22 aggregates", slice(0, N_AGGREGATE)), ("+ recency", slice(None))):
        params, _ = (tune_gbm(x_train[:, cols], y_train, x_valid[:, cols], y_valid, seed=args.seed)
                     if not args.no_tune else ({}, []))
        p = AggregateBuyModel("gbm", seed=args.seed, params=params).fit(x_train[:, cols], y_train)
        print(f"min-item-count {args.min_item_count} ({artefacts.n_items:,} item indices) {name}: "
              f"in-graph GBM valid AUC {metrics.roc_auc(y_valid, p.predict_proba(x_valid[:, cols])):.4f} {params}")


def _features(frame, artefacts, args):
    """The stack's features as train.fit_stack builds them: training rows with out-of-fold
    item tables, valid rows with the tables of all training sessions."""
    train_ex = build_examples(frame, "train", artefacts)
    valid_ex = build_examples(frame, "valid", artefacts)
    norm = dataclasses.replace(norm_of(artefacts), oov_distinct=args.oov_distinct)
    session, item, buys = example_events(train_ex)
    oof_pop, oof_rate, fold = item_tables(session, item, buys, artefacts.n_items, folds=STACK_FOLDS, seed=args.seed)
    pop, rate, _ = item_tables(session, item, buys, artefacts.n_items)
    train = examples_features(train_ex, oof_pop, oof_rate, norm, fold)
    valid = examples_features(valid_ex, pop, rate, norm)
    return train_ex, valid_ex, norm, (pop, rate), train, valid


def _blend_fn(inputs, targets):
    a, b, c = fit_blend(inputs[:, 0], inputs[:, 1], targets)
    return lambda x: a * x[:, 0] + b * x[:, 1] + c


def _prefix_sessions(examples, session_of_event: np.ndarray) -> np.ndarray:
    """Session index of every scored buy prefix, in window order (as examples_features)."""
    out = []
    for i in range(len(examples)):
        batch = examples.batch(np.array([i]))
        out.append(np.full(int(batch["buy_mask"].sum()), session_of_event[examples.window_start[i]]))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


if __name__ == "__main__":
    main()
