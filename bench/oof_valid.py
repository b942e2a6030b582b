"""Valid-only experiment for the stacked buy head (issue 10; docs/experiments-log.md): an
out-of-fold GRU buy logit as one more column of the in-graph GBM, measured on the VALID
split of a `--fit-on train` checkpoint, never reading test.

    nice -n 19 .venv/bin/python -m bench.oof_valid --checkpoint runs/yb-tv/held-out \
        --data data/yoochoose-buys --out runs/oof-yb

The TRAIN sessions are split into the stack's session folds (stack.item_tables' `fold`,
STACK_FOLDS = 5, or --folds K); for each fold a GRU with the checkpoint's arguments is
trained (training.train.train, early-stopped on valid, Platt-calibrated on valid as the
full GRU is) on the other folds' windows, and its buy logit is computed on the held-out
fold's prefixes. Those out-of-fold logits are the new GBM column on train; on valid the
column is the full GRU's (the checkpoint's) calibrated logit, as it would be in the graph.
Fold logits are cached in OUT/oof_logits.npz (rerun without retraining).

Prints the valid AUC of: the GBM on the 28 stack columns (OOV shared), the GBM + the OOF
column, each blended with the full GRU (fit_blend on valid, as train.fit_stack), and the
paired session-bootstrap intervals of the differences (metrics.paired_auc_ci).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from training import metrics
from training import train as train_module
from training.baselines import AggregateBuyModel, tune_gbm
from training.checkpoint import load_checkpoint
from training.examples import build_examples, read_events
from training.models.stack import BuyStack, example_events, examples_features, item_tables, norm_of
from training.train import STACK_FOLDS, buy_logits, fit_blend


def subset_windows(examples, keep: np.ndarray):
    """The windows `keep` (bool (M,)) of `examples`; rows stay shared (windows index into them)."""
    out = copy.copy(examples)
    for name in ("window_start", "window_length", "window_loss_from", "window_buys"):
        setattr(out, name, getattr(examples, name)[keep])
    return out


def window_folds(examples, fold: np.ndarray) -> np.ndarray:
    """Session fold (item_tables' `fold`) of every window of `examples`, (M,)."""
    session, _, _ = example_events(examples)
    return fold[session[examples.window_start]]


def prefix_counts(examples) -> np.ndarray:
    """Scored buy prefixes per window, in window order (as examples_features returns them)."""
    return np.array([int(examples.batch(np.array([i]))["buy_mask"].sum()) for i in range(len(examples))])


def fold_gru_logits(args, info: dict, train_ex, valid_ex, fold: np.ndarray,
                    folds: int) -> tuple[np.ndarray, np.ndarray]:
    """(out-of-fold logits on the train prefixes (P,), each fold GRU's valid logits (K, V)):
    fold k's GRU trained by train.train on the windows of the other folds' sessions."""
    wfold = window_folds(train_ex, fold)
    prefix_fold = np.repeat(wfold, prefix_counts(train_ex))
    oof = np.full(len(prefix_fold), np.nan)
    valid_logits = []
    original = train_module.build_examples
    for k in range(folds):
        out = Path(args.out) / f"fold{k}"

        def fold_examples(frame, split, artefacts, _k=k):
            ex = original(frame, split, artefacts)
            if tuple([split] if isinstance(split, str) else split) != ("train",):
                return ex
            return subset_windows(ex, window_folds(ex, fold) != _k)     # the sessions outside fold k

        fold_args = argparse.Namespace(**{**info["args"], "data": args.data, "out": str(out), "stack_gbm": False,
                                          "threads": 1, "epochs": args.epochs, "fit_on": "train",
                                          "patience": info["args"]["patience"] if args.patience is None
                                          else args.patience})
        started = time.time()
        train_module.build_examples = fold_examples
        try:
            fold_info = train_module.train(fold_args)
        finally:
            train_module.build_examples = original
        model, _, _ = load_checkpoint(out)
        model.attach_stack(None)
        inside = wfold == k
        logits, _ = buy_logits(model, subset_windows(train_ex, inside), torch.device("cpu"), 512, ordered=True)
        oof[prefix_fold == k] = logits
        v, _ = buy_logits(model, valid_ex, torch.device("cpu"), 512, ordered=True)
        valid_logits.append(v)
        print(f"fold {k}: GRU on {int((~inside).sum()):,} windows, best epoch {fold_info['best_epoch']} valid AUC "
              f"{fold_info['best_valid']['buy_roc_auc']:.4f}; {int(inside.sum()):,} held-out windows "
              f"({time.time() - started:.0f} s)", flush=True)
    assert not np.isnan(oof).any(), "every training prefix gets a logit from the GRU that did not see it"
    return oof, np.stack(valid_logits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a --fit-on train checkpoint (the full GRU)")
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True, help="folder for the fold GRUs and the cached OOF logits")
    parser.add_argument("--folds", type=int, default=STACK_FOLDS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=None, help="fold GRUs' most epochs (default: train's)")
    parser.add_argument("--patience", type=int, default=None,
                        help="fold GRUs' early-stopping patience (default: the checkpoint's; 0: none, "
                             "the best valid epoch of --epochs is kept)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    frame = read_events(args.data)
    model, artefacts, info = load_checkpoint(args.checkpoint)
    model.attach_stack(None)                      # the full GRU's own calibrated logit
    train_ex = build_examples(frame, "train", artefacts)
    valid_ex = build_examples(frame, "valid", artefacts)
    norm = dataclasses.replace(norm_of(artefacts), oov_distinct=False)   # the chosen YOOCHOOSE variant
    session, item, buys = example_events(train_ex)
    oof_pop, oof_rate, fold = item_tables(session, item, buys, artefacts.n_items, folds=args.folds, seed=args.seed)
    pop, rate, _ = item_tables(session, item, buys, artefacts.n_items)
    x_train, y_train = examples_features(train_ex, oof_pop, oof_rate, norm, fold)
    x_valid, y_valid = examples_features(valid_ex, pop, rate, norm)

    cache = Path(args.out) / "oof_logits.npz"
    if cache.is_file():
        saved = np.load(cache)
        oof, fold_valid = saved["oof"], saved["fold_valid"]
    else:
        oof, fold_valid = fold_gru_logits(args, info, train_ex, valid_ex, fold, args.folds)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(cache, oof=oof, fold_valid=fold_valid)
    gru_valid, targets = buy_logits(model, valid_ex, torch.device("cpu"), 512, ordered=True)
    gru_train, _ = buy_logits(model, train_ex, torch.device("cpu"), 512, ordered=True)     # in-sample
    assert np.array_equal(targets, y_valid) and len(oof) == len(y_train)
    valid_session, _, _ = example_events(valid_ex)
    prefix_session = np.repeat(valid_session[valid_ex.window_start], prefix_counts(valid_ex))   # (V,)
    auc = lambda s: metrics.roc_auc(targets, s)   # noqa: E731
    print(f"train prefixes {len(y_train):,}, valid {len(y_valid):,}; GRU valid AUC: full {auc(gru_valid):.4f}, "
          f"folds {', '.join(f'{auc(v):.4f}' for v in fold_valid)}, fold mean {auc(fold_valid.mean(0)):.4f}; "
          f"train AUC of the GRU logit: out-of-fold {metrics.roc_auc(y_train, oof):.4f}, "
          f"in-sample {metrics.roc_auc(y_train, gru_train):.4f}")

    variants = {"28 columns": (x_train, x_valid),
                "28 + OOF GRU logit (valid: full GRU)": (np.column_stack([x_train, oof]),
                                                         np.column_stack([x_valid, gru_valid])),
                "28 + OOF GRU logit (valid: mean of the fold GRUs)": (np.column_stack([x_train, oof]),
                                                                      np.column_stack([x_valid, fold_valid.mean(0)]))}
    scores, results = {}, {}
    for name, (xt, xv) in variants.items():
        params, _ = tune_gbm(xt, y_train, xv, y_valid, seed=args.seed)
        gbm = AggregateBuyModel("gbm", seed=args.seed, params=params).fit(xt, y_train)
        if xt.shape[1] == x_train.shape[1]:     # the in-graph trees (the 28 columns the graph computes)
            stack = BuyStack.from_lightgbm(gbm.model, pop[0], rate[0], norm)
            gbm_valid = stack.gbm_logit(torch.from_numpy(np.ascontiguousarray(xv))).numpy()
        else:                                   # one column more than BuyStack reads today
            gbm_valid = gbm.model.predict(xv, raw_score=True)
        a, b, c = fit_blend(gbm_valid, gru_valid, targets)
        blended = a * gbm_valid + b * gru_valid + c
        scores[name], scores[name + " + blend"] = gbm_valid, blended
        gain = gbm.model.booster_.feature_importance("gain")
        share = float(gain[x_train.shape[1]:].sum() / gain.sum())   # the GBM's split gain on the GRU column
        # how alike the two rank the valid prefixes: little room for a blend or a column if close to 1
        rho = float(np.corrcoef(np.argsort(np.argsort(gbm_valid)), np.argsort(np.argsort(gru_valid)))[0, 1])
        results[name] = {"params": params, "gbm": auc(gbm_valid), "blend": auc(blended), "weights": [a, b, c],
                         "gru_gain_share": share, "spearman_gbm_gru_valid": rho}
        print(f"{name}: params {params}; valid AUC gbm {auc(gbm_valid):.4f} blend {auc(blended):.4f} "
              f"(a {a:.3f} gbm + b {b:.3f} gru {c:+.3f}); GRU column's share of split gain {share:.3f}; "
              f"Spearman(gbm, full GRU) on valid {rho:.3f}", flush=True)
    base = "28 columns"
    for name in list(variants)[1:]:
        for suffix in ("", " + blend"):
            for against in (base, base + " + blend"):
                d = metrics.paired_auc_ci(prefix_session, targets, scores[name + suffix], scores[against],
                                          args.bootstrap, args.seed)
                print(f"paired valid AUC [{name}{suffix}] - [{against}]: {d['auc_diff']:+.4f} "
                      f"[{d['auc_diff_ci95'][0]:+.4f}, {d['auc_diff_ci95'][1]:+.4f}]")
    (Path(args.out) / "oof_valid.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
