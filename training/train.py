"""`clickscore train`: a prepared folder -> a checkpoint folder.

    clickscore train --data data/sim --model gru --out runs/gru
    clickscore train --data data/yoochoose-100k --model dilated --out runs/dil --epochs 5

Writes OUT/checkpoint.pt (model_kind, config, state_dict of the best epoch, train
info), OUT/features.json (vocabularies fitted on the TRAIN split only),
OUT/train_log.json (per-epoch losses and validation metrics) and
OUT/parity_inputs.npz (real encoded validation windows for export's parity check).

One loss per head, summed: buy BCE at every prefix before the session's first
transaction, next-item cross-entropy at every position with a known next item
(training/examples.py builds the windows and masks). Batches are bucketed by length
and trimmed to their longest window, which a causal model allows and which makes an
epoch several times cheaper than scoring 100 positions per window.

Early stopping (--patience) watches the validation score = mean of buy ROC AUC and
next-item Recall@20 (either alone where the other is undefined, e.g. no buys in the
data). Validation loss was rejected: with --imbalance weight/oversample the training
loss is reweighted and its scale says little about ranking quality, which is what
the marketing triggers and the recommendations use.

Fitting on train+valid (--fit-on train+valid): the vocabularies/statistics and the
training windows come from the train and valid splits together, the data the
baselines in training/baselines.py are fitted on by default (session-rec's train_full
on yoochoose). Nothing is held out, so there is no early stopping. Without --epochs the
command picks its own epoch count (train_refit): it first runs the same training with
--fit-on train into OUT/held-out (early stopping, calibration, stack and neighbour mix
fitted on valid), then refits on train+valid for that run's best epoch count, reusing
its valid-fitted choices. With --epochs N exactly N epochs are trained (--patience is
ignored), the last is kept, and the valid-fitted steps are fitted in-sample (logged as
such). The test split is never used for any choice. The per-epoch "valid" figures
logged in this mode are computed on sessions the model trains on, so they are only a
training-fit diagnostic, not a held-out score.

Heads that read the window (GRU; models/context.py; --repeat/--wide, on by default):
the next-item loss is the cross-entropy of the repeat/catalogue mixture plus
--explore-loss-weight x the cross-entropy of the catalogue logits alone (without it the
item embeddings learn from the non-repeated targets only and recall lags; see
docs/experiments-log.md). After training, Platt scaling of the buy logit is fitted on
the valid prefixes (--calibrate) and stored in the config, so the exported graphs carry
it; with --fit-on train+valid the held-out stage's fit is reused (train_refit), or with
--epochs N it is fitted in-sample (valid was trained on) and the log says so. The stacked
buy head (--stack-gbm; fit_stack) chooses on valid whether its GBM reads the recency
features and counts out-of-vocabulary items as distinct; its train+valid refit keeps the
held-out blend weights but refits the blend intercept on out-of-fold train+valid scores
(refit_intercept), so the served probability matches the refit data's base rate instead
of carrying the valid day's. --select-on picks the epoch by one valid figure (buy_auc for buy deployments:
the buy AUC peaks epochs before Recall@20 does on labelled YOOCHOOSE).

Item neighbours (GRU with --repeat or --wide; --neighbours, on by default;
models/neighbours.py): after training, a table of each item's top --neighbour-top-n
co-occurring items is fitted on the training sessions and loaded into the model (graph
constants: N * 8 bytes per item), and the weight a of its mixture with the catalogue
distribution is chosen on valid from NEIGHBOUR_MIX_GRID by R@20 + MRR@20 (like the Platt
fit). With --fit-on train+valid nothing is held out, so a is the held-out stage's fit
(train_refit), --neighbour-mix when given, or NEIGHBOUR_MIX_DEFAULT with --epochs N.

Session neighbours (GRU with --repeat or --wide; --session-neighbours, on by default;
models/sessions.py): VSTAN's neighbourhood of whole training sessions (posting lists of
the --session-posting most recent sessions per item, each session's --session-length
most recent items) is fitted on the training sessions after training and the final
output becomes log((1 - b) p + b p_sess); b is fitted on valid from SESSION_MIX_GRID after
the item-neighbour weight (fit_session_mix), or taken like a above (SESSION_MIX_DEFAULT).

Class imbalance (--imbalance) acts on the buy head only unless it resamples:
- weight: BCE pos_weight = negative/positive buy positions in train;
- undersample: each epoch the buy loss of a random share of non-buying windows is
  masked so positives and negatives balance in expectation (their next-item loss stays);
- oversample: buying sessions' windows repeated ~negative/positive times per epoch;
- none: plain BCE.
Each of the first three multiplies the odds the loss is minimised at by a known
factor (w, the repeat count, 1/keep share); training adds log(factor) to the buy
logit inside the loss (prior correction), so the model itself outputs probabilities
calibrated to the real prevalence and the served buy_probability means what it says.
Measured 2026-11-22 (GRU, --embedding-dim 32 --hidden-dim 64, --epochs 6 --patience 2,
--threads 1, seeds 0 and 1, mean of the two; valid split, buy figures at every prefix
before the first transaction, best epoch by the early-stopping score):

  data                                      imbalance    ROC AUC  PR AUC  ECE    log loss  Recall@20
  simulated: simulate --sessions 6000       weight       0.865    0.425   0.095  0.338     0.555
    --seed 0 --items 2000; prepare          undersample  0.871    0.421   0.057  0.265     0.553
    --dataset canonical (40 buying          oversample   0.851    0.471   0.055  0.284     0.596
    sessions in valid)                      none         0.847    0.404   0.067  0.299     0.612
  Taobao UserBehavior sample (real labels;  weight       0.585    0.118   0.030  0.239     0.063
    prepare --dataset taobao; 119 buying    undersample  0.556    0.088   0.026  0.239     0.033
    sessions in valid; --min-item-count 3)  oversample   0.567    0.075   0.040  0.281     0.045
                                            none         0.577    0.099   0.007  0.227     0.106

Same comparison on the default model's data (simulate --sessions 20000 --seed 0
--items 2000; GRU 64/96, dropout 0.1, seed 0, --epochs 15 --patience 3):
  weight: ROC AUC 0.824, PR AUC 0.460, Recall@20 0.682, MRR@20 0.310 (best epoch 6)
  none:   ROC AUC 0.839, PR AUC 0.511, Recall@20 0.726, MRR@20 0.341 (best epoch 10)
  (weight with --dropout 0.3: 0.859, 0.509, 0.654, 0.283)

Default `none`: it has the best early-stopping score (mean of buy ROC AUC and
Recall@20) on all three datasets. Its buy ranking is within seed noise of the best
on the simulated data (seeds differ by up to 0.06 ROC AUC there); on the Taobao
labels `weight` ranks buyers somewhat better (PR AUC 0.118 vs 0.099, 119 buying
sessions, so wide intervals) but costs 4 points of Recall@20 there and 4-6 on the
simulated data: the weighted buy loss pulls the shared state towards the buy head.
Use `--imbalance weight` for a buy-only deployment. Diginetica was not used: its
valid split holds only 9 buying sessions. Prior correction keeps every variant's
ECE low, so the choice is about ranking, not calibration.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import platform
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from stream.errors import ClickscoreError
from stream.features import INPUT_NAMES, ITEM_OFFSET, WINDOW, encode_windows
from training import metrics
from training.examples import IGNORE, Examples, build_examples, fit_artefacts, read_events
from training.models import build_model
from training.models.dilated import DilatedConfig
from training.models.gru import GRUConfig
from training.models.neighbours import NeighbourTableParams, fit_neighbour_table
from training.models.sessions import MAX_WINDOW as SESSION_MAX_WINDOW
from training.models.sessions import SessionIndexParams, fit_session_index

CHECKPOINT_FILE = "checkpoint.pt"
FEATURES_FILE = "features.json"
LOG_FILE = "train_log.json"
PARITY_FILE = "parity_inputs.npz"
MODEL_INPUTS = INPUT_NAMES[:-1]   # the 9 (B, W) inputs; `length` is the export wrapper's
PARITY_WINDOWS = 300
TOP_K = 20
# --select-on -> the valid figure that picks the epoch (score = mean of buy AUC and R@20)
SELECT_ON = {"score": "score", "buy_auc": "buy_roc_auc", "recall": "recall@20", "mrr": "mrr@20"}
FIT_ON = {"train": ("train",), "train+valid": ("train", "valid")}   # --fit-on -> splits trained on
DEFAULT_EPOCHS = 40          # most epochs of an early-stopped run (--epochs not given)
HELD_OUT_DIR = "held-out"    # train_refit's stage 1, inside OUT
# --neighbour-mix auto: the mixture weights tried on valid (0 = the model alone)
# --fit-on train+valid without --neighbour-mix: the weight chosen on yoochoose-100k valid
# (docs/experiments-log.md), since nothing is held out to fit it on
NEIGHBOUR_MIX_DEFAULT = 0.4
NEIGHBOUR_MIX_GRID = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8)
# --session-mix: the same for the session-neighbour head (models/sessions.py), fitted after
# the item-neighbour mix; the default is the weight chosen on yoochoose-100k valid
SESSION_MIX_DEFAULT = 0.3
SESSION_MIX_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


def choose_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ClickscoreError("--device cuda requested but torch sees no CUDA device; use auto or cpu")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_config(kind: str, artefacts, args: argparse.Namespace):
    common = dict(n_items=artefacts.n_items, n_categories=artefacts.n_categories,
                  embedding_dim=args.embedding_dim, hidden_dim=args.hidden_dim, dropout=args.dropout,
                  window=artefacts.window)
    if kind == "gru":
        repeat, wide = bool(getattr(args, "repeat", False)), bool(getattr(args, "wide", False))
        # the neighbour head reads the recent items the window context keeps, so it needs it
        neighbours = getattr(args, "neighbours", False) and (repeat or wide)
        return GRUConfig(**common, repeat=repeat, wide=wide,
                         repeat_mode=getattr(args, "repeat_mode", None) or "mixture",
                         item_rates=bool(getattr(args, "wide", False)),
                         neighbours=int(getattr(args, "neighbour_top_n", 100)) if neighbours else 0,
                         neighbour_window=int(getattr(args, "neighbour_window", 10) or 10),
                         neighbour_decay=float(getattr(args, "neighbour_decay", 2.0) or 2.0),
                         neighbour_mode=getattr(args, "neighbour_mode", None) or "explore",
                         session_neighbours=(int(args.session_k) if getattr(args, "session_neighbours", False)
                                             and (repeat or wide) else 0),
                         session_posting=int(getattr(args, "session_posting", 500)),
                         session_length=int(getattr(args, "session_length", 20)),
                         session_window=int(getattr(args, "session_window", 10)))
    return DilatedConfig(**common)


def bucketed_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of similar-length windows: shuffle, sort within chunks of 50
    batches by length, cut, shuffle the batch order. Less padding, still random."""
    order = rng.permutation(len(lengths))
    chunk = batch_size * 50
    batches = []
    for i in range(0, len(order), chunk):
        part = order[i:i + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches.extend(part[j:j + batch_size] for j in range(0, len(part), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def to_tensors(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in batch.items()}


def losses(model, batch: dict[str, torch.Tensor], pos_weight: torch.Tensor | None, logit_shift: float = 0.0,
           explore_weight: float = 0.0):
    """(buy loss, next-item loss, buy logits/targets at masked positions, next logits/targets).

    The buy loss sees logit + logit_shift: reweighting or resampling multiplies the
    odds the loss is minimised at by a known factor, so shifting by its log during
    training leaves the model's own logit calibrated to the real class balance."""
    inputs = tuple(batch[name] for name in MODEL_INPUTS)
    hidden = model.encode(*inputs)                                        # (B, W', H)
    buy_mask = batch["buy_mask"]                                          # (B, W')
    next_mask = batch["next_target"] != IGNORE                            # (B, W')
    if hasattr(model, "outputs_masked"):   # heads that also read the window (models/context.py)
        either = buy_mask | next_mask                                     # (B, W') one pass for both heads
        aux: dict = {}
        buy_all, next_all = model.outputs_masked(hidden, inputs, either, aux)   # (R,), (R, n_items)
        buy_logit, next_logits = buy_all[buy_mask[either]], next_all[next_mask[either]]
        explore = aux.get("explore")
    else:
        explore = None
        buy_logit = model.heads.buy_logit(hidden[buy_mask])                # (P,)
        next_logits = model.heads.next_item_logits(hidden[next_mask])      # (Q, n_items)
    buy_target = batch["buy_target"][buy_mask]                             # (P,)
    next_target = batch["next_target"][next_mask]                          # (Q,)
    zero = hidden.sum() * 0.0
    buy_loss = (F.binary_cross_entropy_with_logits(buy_logit + logit_shift, buy_target, pos_weight=pos_weight)
                if buy_logit.numel() else zero)
    next_loss = F.cross_entropy(next_logits, next_target) if next_logits.numel() else zero
    if explore_weight and explore is not None and next_logits.numel() and explore is not next_all:
        # the repeat head's catalogue logits get their own loss (see models/context.py)
        next_loss = next_loss + explore_weight * F.cross_entropy(explore[next_mask[either]], next_target)
    return buy_loss, next_loss, buy_logit, buy_target, next_logits, next_target


@torch.no_grad()
def validate(model, examples: Examples, device: torch.device, batch_size: int) -> dict:
    """Buy ROC/PR AUC, calibration and log loss at every scored prefix; next-item Recall/MRR@20."""
    model.eval()
    lengths = examples.window_length
    order = np.argsort(lengths, kind="stable")
    buy_p, buy_y, ranks = [], [], []
    next_loss_sum, next_count = 0.0, 0
    for i in range(0, len(order), batch_size):
        batch = to_tensors(examples.batch(order[i:i + batch_size]), device)
        _, _, buy_logit, buy_target, next_logits, next_target = losses(model, batch, None)
        buy_p.append(torch.sigmoid(buy_logit).cpu().numpy())
        buy_y.append(buy_target.cpu().numpy())
        if next_target.numel():
            next_loss_sum += float(F.cross_entropy(next_logits, next_target, reduction="sum"))
            next_count += next_target.numel()
            ranks.append(metrics.target_ranks(next_logits.cpu().numpy(), next_target.cpu().numpy(),
                                              first_real=ITEM_OFFSET))
    model.train()
    p = np.concatenate(buy_p) if buy_p else np.zeros(0)
    y = np.concatenate(buy_y) if buy_y else np.zeros(0)
    r = np.concatenate(ranks) if ranks else np.zeros(0)
    clipped = np.clip(p, 1e-7, 1 - 1e-7)
    result = {
        "buy_positions": int(len(y)), "buy_positive": int(y.sum()),
        "buy_roc_auc": metrics.roc_auc(y, p) if len(y) else None,
        "buy_pr_auc": metrics.pr_auc(y, p) if len(y) else None,
        "buy_ece": metrics.expected_calibration_error(y, p) if len(y) else None,
        "buy_log_loss": float(-(y * np.log(clipped) + (1 - y) * np.log(1 - clipped)).mean()) if len(y) else None,
        "next_positions": int(len(r)),
        "recall@20": metrics.recall_at_k(r, TOP_K) if len(r) else None,
        "mrr@20": metrics.mrr_at_k(r, TOP_K) if len(r) else None,
        "next_loss": next_loss_sum / next_count if next_count else None,
    }
    parts = [v for v in (result["buy_roc_auc"], result["recall@20"]) if v is not None]
    result["score"] = float(np.mean(parts)) if parts else None
    return result


@torch.no_grad()
def buy_logits(model, examples: Examples, device: torch.device, batch_size: int,
               ordered: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(buy logits, targets) at every scored prefix of `examples`, as the model outputs them;
    `ordered`: in window order (as stack.examples_features), not batched by length."""
    model.eval()
    order = np.arange(len(examples)) if ordered else np.argsort(examples.window_length, kind="stable")
    logits, targets = [], []
    for i in range(0, len(order), batch_size):
        batch = to_tensors(examples.batch(order[i:i + batch_size]), device)
        _, _, logit, target, _, _ = losses(model, batch, None)
        logits.append(logit.double().cpu().numpy())
        targets.append(target.double().cpu().numpy())
    model.train()
    return (np.concatenate(logits) if logits else np.zeros(0)), (np.concatenate(targets) if targets else np.zeros(0))


def fit_platt(logits: np.ndarray, targets: np.ndarray) -> tuple[float, float] | None:
    """Platt scaling: (scale, shift) minimising the log loss of sigmoid(scale * logit + shift).
    None without both classes. Two parameters, so it cannot overfit a few thousand
    prefixes the way isotonic regression can, and it stays one Mul + Add in the graph."""
    if len(targets) == 0 or targets.min() == targets.max():
        return None
    z = torch.from_numpy(logits)
    y = torch.from_numpy(targets)
    params = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([params], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z * params[0] + params[1], y)
        loss.backward()
        return loss

    optimizer.step(closure)
    scale, shift = (float(v) for v in params.detach())
    return (scale, shift) if math.isfinite(scale) and math.isfinite(shift) else None


def calibrate(model, config, valid_ex: Examples, device: torch.device, batch_size: int) -> dict | None:
    """Fit Platt scaling on the valid prefixes and store it in `config` (the model reads
    it there, so the exported graphs carry it). Returns what was fitted and the valid ECE
    before/after, or None when valid has no buy labels of both classes."""
    if not hasattr(config, "calibration_scale"):
        return None
    config.calibration_scale, config.calibration_shift = 1.0, 0.0
    logits, targets = buy_logits(model, valid_ex, device, batch_size)
    fitted = fit_platt(logits, targets)
    if fitted is None:
        return None
    config.calibration_scale, config.calibration_shift = fitted
    before = metrics.expected_calibration_error(targets, 1 / (1 + np.exp(-logits)))
    after = metrics.expected_calibration_error(targets, 1 / (1 + np.exp(-(logits * fitted[0] + fitted[1]))))
    return {"scale": fitted[0], "shift": fitted[1], "valid_ece_before": before, "valid_ece_after": after,
            "prefixes": int(len(targets)), "positive": int(targets.sum())}


def fit_blend(gbm_logit: np.ndarray, gru_logit: np.ndarray, targets: np.ndarray) -> tuple[float, float, float] | None:
    """Logistic regression of the label on the two logits (unregularised, log loss): the
    blend (a, b, c) of p = sigmoid(a * gbm + b * gru + c), calibrated by construction
    (Platt on two inputs). None without both classes."""
    if len(targets) == 0 or targets.min() == targets.max():
        return None
    x = torch.from_numpy(np.stack([gbm_logit, gru_logit], axis=1).astype(np.float64))
    y = torch.from_numpy(targets.astype(np.float64))
    params = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([params], lr=0.5, max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ params[:2] + params[2], y)
        loss.backward()
        return loss

    optimizer.step(closure)
    a, b, c = (float(v) for v in params.detach())
    return (a, b, c) if all(math.isfinite(v) for v in (a, b, c)) else None


STACK_FOLDS = 5


def fit_stack(model, artefacts, train_ex: Examples, valid_ex: Examples, device: torch.device, batch_size: int,
              seed: int, tune: bool = True, fixed: dict | None = None, refit: bool = False) -> dict | None:
    """After training: the aggregate LightGBM on the in-graph features (training/models/stack.py)
    of the TRAIN windows (out-of-fold item tables), its parameters tuned on valid
    (baselines.tune_gbm), then the blend with the GRU's buy logit fitted on the VALID prefixes
    (fit_blend) and the whole attached to the model (so both exported graphs carry it).
    Returns the valid figures of GBM alone, GRU alone and the blend, or None (no buy labels).

    `refit` (train_refit's train+valid stage): nothing is tuned or blended here (valid is
    in the training rows); `fixed` is the held-out run's stack record, whose GBM parameters
    are refitted on these training rows and whose blend and keep decision are reused.
    No stack when the held-out run kept none."""
    from training.baselines import GBM_DEFAULTS, AggregateBuyModel, tune_gbm
    from training.models.stack import (N_AGGREGATE, BuyStack, example_events, examples_features, item_tables,
                                       norm_of)

    model.attach_stack(None)
    if refit and not (fixed and fixed.get("kept")):
        return None                        # the held-out run kept no stack: nothing to refit
    session, item, buys = example_events(train_ex)
    oof_pop, oof_rate, fold = item_tables(session, item, buys, artefacts.n_items, folds=STACK_FOLDS, seed=seed)
    pop, rate, _ = item_tables(session, item, buys, artefacts.n_items)

    def features(examples, oov_distinct: bool, out_of_fold: bool):
        norm = dataclasses.replace(norm_of(artefacts), oov_distinct=oov_distinct)
        return (examples_features(examples, oof_pop, oof_rate, norm, fold) if out_of_fold
                else examples_features(examples, pop, rate, norm))

    if refit:
        # the held-out run's choices (older records: 22 features, OOV items as one item)
        oov_distinct, n_features = bool(fixed.get("oov_distinct", False)), int(fixed.get("features", N_AGGREGATE))
        x_train, y_train = features(train_ex, oov_distinct, True)
        if not len(y_train) or y_train.min() == y_train.max():
            return None
        x_train = x_train[:, :n_features]
        gbm = AggregateBuyModel("gbm", seed=seed, params=fixed["gbm_params"]).fit(x_train, y_train)
        norm = dataclasses.replace(norm_of(artefacts), oov_distinct=oov_distinct)
        stack = BuyStack.from_lightgbm(gbm.model, pop[0], rate[0], norm)
        blend = dict(fixed["blend"])
        intercept = refit_intercept(model, train_ex, x_train, y_train, fold, session, fixed["gbm_params"], blend,
                                    seed, device, batch_size)
        if intercept is not None:
            blend["bias"] = intercept["bias"]
        stack.blend_gbm, stack.blend_gru, stack.blend_bias = blend["gbm"], blend["gru"], blend["bias"]
        model.attach_stack(stack)
        return {"gbm_params": fixed["gbm_params"], "gbm_trials": [], "trees": int(len(stack.roots)),
                "depth": stack.depth, "train_rows": int(len(y_train)), "out_of_fold": STACK_FOLDS,
                "features": n_features, "oov_distinct": oov_distinct,
                "blend": blend, "held_out_blend": fixed["blend"], "intercept": intercept,
                "valid": fixed.get("valid"), "kept": True,
                "fit_on": "GBM refitted on train+valid with the held-out run's parameters; blend weights and "
                          "valid figures from the held-out run (OUT/held-out); blend intercept refitted on "
                          "train+valid out-of-fold GBM scores (refit_intercept)"}
    # Chosen on valid by the GBM's own AUC: out-of-vocabulary items as one shared item (the
    # first stacks) or each as a new item (Norm.oov_distinct), and the baseline's 22 aggregates
    # or those + the recency features (stack.RECENCY_FEATURES). The graph computes all
    # columns; the trees read the ones they split on.
    candidates = []
    for oov_distinct in (False, True):
        x_train, y_train = features(train_ex, oov_distinct, True)
        x_valid, y_valid = features(valid_ex, oov_distinct, False)
        if not len(y_train) or y_train.min() == y_train.max() or not len(y_valid) or y_valid.min() == y_valid.max():
            return None
        for n_features in (N_AGGREGATE, x_train.shape[1]):
            xt, xv = x_train[:, :n_features], x_valid[:, :n_features]
            params, trials = tune_gbm(xt, y_train, xv, y_valid, seed=seed) if tune else (dict(GBM_DEFAULTS), [])
            gbm = AggregateBuyModel("gbm", seed=seed, params=params).fit(xt, y_train)
            assert gbm.used.all(), "in-graph features are never NaN"
            auc = metrics.roc_auc(y_valid, gbm.predict_proba(xv))
            candidates.append({"auc": auc if auc is not None else -1.0, "oov_distinct": oov_distinct,
                               "features": n_features, "params": params, "trials": trials, "gbm": gbm,
                               "x_valid": xv, "y_valid": y_valid, "rows": len(y_train)})
    best = max(candidates, key=lambda c: c["auc"])    # ties: the first (the simpler variant)
    oov_distinct, n_features, params, trials, gbm = (best[k] for k in ("oov_distinct", "features", "params",
                                                                        "trials", "gbm"))
    x_valid, y_valid, train_rows = best["x_valid"], best["y_valid"], best["rows"]
    variants = [{"oov_distinct": c["oov_distinct"], "features": c["features"], "valid_auc": c["auc"]}
                for c in candidates]
    norm = dataclasses.replace(norm_of(artefacts), oov_distinct=oov_distinct)
    stack = BuyStack.from_lightgbm(gbm.model, pop[0], rate[0], norm)
    gbm_valid = stack.gbm_logit(torch.from_numpy(x_valid)).numpy()
    gru_valid, targets = buy_logits(model, valid_ex, device, batch_size, ordered=True)   # calibrated GRU logit
    assert np.array_equal(targets, y_valid), "the GBM and the GRU read the same valid prefixes"
    blend = fit_blend(gbm_valid, gru_valid, targets)
    if blend is None:
        return None
    stack.blend_gbm, stack.blend_gru, stack.blend_bias = blend
    sigmoid = lambda z: 1 / (1 + np.exp(-z))   # noqa: E731
    figures = {}
    for name, logit in (("gbm", gbm_valid), ("gru", gru_valid),
                        ("blend", blend[0] * gbm_valid + blend[1] * gru_valid + blend[2])):
        figures[name] = {"valid_auc": metrics.roc_auc(targets, logit),
                         "valid_ece": metrics.expected_calibration_error(targets, sigmoid(logit))}
    gbm_platt = fit_platt(gbm_valid, targets)
    if gbm_platt:   # the GBM alone, Platt-calibrated on valid too: what the blend must beat on ECE
        figures["gbm"]["valid_ece_platt"] = metrics.expected_calibration_error(
            targets, sigmoid(gbm_valid * gbm_platt[0] + gbm_platt[1]))
    mode, blend, kept = choose_stack(figures, blend, gbm_platt)
    stack.blend_gbm, stack.blend_gru, stack.blend_bias = blend
    if kept:
        model.attach_stack(stack)
    return {"gbm_params": params, "gbm_trials": trials, "trees": int(len(stack.roots)), "depth": stack.depth,
            "features": n_features, "variants": variants, "oov_distinct": oov_distinct, "mode": mode,
            "train_rows": int(train_rows), "valid_prefixes": int(len(targets)), "out_of_fold": STACK_FOLDS,
            "blend": {"gbm": blend[0], "gru": blend[1], "bias": blend[2]}, "valid": figures, "kept": kept}


def choose_stack(figures: dict, blend: tuple, gbm_platt: tuple | None) -> tuple[str, tuple, bool]:
    """(mode, blend (a, b, c), kept) from the valid figures of "gbm", "gru", "blend".

    Chosen on valid: the blend, or the GBM alone (Platt: GRU weight 0) where it ranks
    better than the blend (the blend's log-loss fit need not maximise AUC: Taobao valid
    0.6419 blend vs 0.6473 GBM); and a stack at all only where that ranks at least as well
    as the GRU alone (on a few dozen buying valid sessions the GBM can be noise, e.g. Diginetica)."""
    auc = {name: figures[name]["valid_auc"] for name in ("gbm", "gru", "blend")}
    mode = "blend"
    if (gbm_platt and gbm_platt[0] > 0 and auc["gbm"] is not None and auc["blend"] is not None
            and auc["gbm"] > auc["blend"]):
        mode, blend = "gbm", (gbm_platt[0], 0.0, gbm_platt[1])
    chosen = auc[mode]
    kept = blend[0] > 0 and chosen is not None and auc["gru"] is not None and chosen >= auc["gru"]
    return mode, tuple(blend), bool(kept)


def refit_intercept(model, train_ex: Examples, x_train: np.ndarray, y_train: np.ndarray, fold: np.ndarray,
                    session: np.ndarray, gbm_params: dict, blend: dict, seed: int, device: torch.device,
                    batch_size: int) -> dict | None:
    """The train+valid refit's blend intercept c of sigmoid(a * gbm + b * gru + c), with the
    held-out weights a, b kept, refitted by log loss on every train+valid prefix, where the
    GBM logit is out-of-fold (STACK_FOLDS session folds, the item tables' own folds) and
    the GRU logit is the refitted GRU's (calibrated with the held-out Platt fit).

    Why: the held-out intercept was fitted on the valid day alone; with the GBM and GRU fitted
    on train only it also corrected the train -> valid base-rate drift (YOOCHOOSE: 6.96% ->
    8.41% buying sessions), which a model refitted on both days has partly learnt already, so
    reused it over-predicts (test ECE 0.052). Fitted here, the intercept matches the base rate
    of all the refit's data. Returns {bias, held_out_bias, prefix_rate, mean_probability}."""
    from training.baselines import AggregateBuyModel

    if not len(y_train) or y_train.min() == y_train.max():
        return None
    window_fold = fold[session[train_ex.window_start]]                       # (windows,)
    # fold of each scored prefix, in window order (as examples_features returns them)
    prefix_fold = np.repeat(window_fold, [int(train_ex.batch(np.array([i]))["buy_mask"].sum())
                                          for i in range(len(train_ex))])
    gbm_oof = np.zeros(len(y_train))
    for k in range(STACK_FOLDS):
        inside = prefix_fold == k
        if not inside.any() or y_train[~inside].min() == y_train[~inside].max():
            return None
        booster = AggregateBuyModel("gbm", seed=seed, params=gbm_params).fit(x_train[~inside], y_train[~inside])
        gbm_oof[inside] = booster.model.predict(x_train[inside], raw_score=True)
    gru, targets = buy_logits(model, train_ex, device, batch_size, ordered=True)   # stack detached here
    assert np.array_equal(targets, y_train), "the GBM and the GRU read the same training prefixes"
    offset = torch.from_numpy(blend["gbm"] * gbm_oof + blend["gru"] * gru)
    y = torch.from_numpy(y_train.astype(np.float64))
    bias = torch.tensor([float(blend["bias"])], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([bias], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(offset + bias, y)
        loss.backward()
        return loss

    optimizer.step(closure)
    fitted = float(bias.detach()[0])
    if not math.isfinite(fitted):
        return None
    return {"bias": fitted, "held_out_bias": float(blend["bias"]), "prefix_rate": float(y_train.mean()),
            "mean_probability": float(torch.sigmoid(offset + fitted).mean())}


def check_neighbour_args(args: argparse.Namespace) -> None:
    """Bad --neighbour-* values fail before any data is read, naming the option to fix."""
    try:
        neighbour_table_params(args)
    except ValueError as exc:
        raise ClickscoreError(f"--neighbour-top-n/--neighbour-steps/--neighbour-backward/"
                              f"--neighbour-recency-days/--neighbour-idf: {exc}") from None
    if not 1 <= args.neighbour_window <= WINDOW:
        raise ClickscoreError(f"--neighbour-window must be in 1..{WINDOW}, got {args.neighbour_window}")
    if args.neighbour_decay <= 0:
        raise ClickscoreError(f"--neighbour-decay must be > 0, got {args.neighbour_decay}")
    if args.neighbour_mix >= 1 or (args.neighbour_mix < 0 and args.neighbour_mix != -1):
        raise ClickscoreError(f"--neighbour-mix must be in [0, 1), or -1 to fit it on valid; got {args.neighbour_mix}")


def check_session_args(args: argparse.Namespace) -> None:
    """Bad --session-* values fail before any data is read, naming the option to fix."""
    try:
        session_index_params(args)
    except ValueError as exc:
        raise ClickscoreError(f"--session-posting/--session-length/--session-recency-days/--session-idf/"
                              f"--session-max-sessions: {exc}") from None
    if args.session_k < 1:
        raise ClickscoreError(f"--session-k must be >= 1, got {args.session_k}")
    if not 1 <= args.session_window <= SESSION_MAX_WINDOW:
        raise ClickscoreError(f"--session-window must be in 1..{SESSION_MAX_WINDOW}, got {args.session_window}")
    if args.session_mix >= 1 or (args.session_mix < 0 and args.session_mix != -1):
        raise ClickscoreError(f"--session-mix must be in [0, 1), or -1 to fit it on valid; got {args.session_mix}")


def session_index_params(args: argparse.Namespace) -> SessionIndexParams:
    return SessionIndexParams(posting=args.session_posting, length=args.session_length,
                              recency_days=args.session_recency_days, idf=args.session_idf,
                              sessions=getattr(args, "session_max_sessions", 50_000))


def session_index(frame, splits, artefacts, params: SessionIndexParams):
    """The session-neighbour index (training/models/sessions.py) from the sessions of `splits`."""
    from training.examples import split_frame

    part = split_frame(frame, splits)
    return fit_session_index(part["session_id"].rle_id().to_numpy(), artefacts.item_indices(part["item_id"].to_list()),
                             part["timestamp"].to_numpy() / 1000.0, artefacts.n_items, params)


def neighbour_table_params(args: argparse.Namespace) -> NeighbourTableParams:
    return NeighbourTableParams(top_n=args.neighbour_top_n, steps=args.neighbour_steps,
                                backward=args.neighbour_backward, recency_days=args.neighbour_recency_days,
                                idf=args.neighbour_idf)


def neighbour_table(frame, splits, artefacts, params: NeighbourTableParams) -> tuple[np.ndarray, np.ndarray]:
    """The item-neighbour table (training/models/neighbours.py) from the sessions of `splits`."""
    from training.examples import split_frame

    part = split_frame(frame, splits)
    session_index = part["session_id"].rle_id().to_numpy()
    items = artefacts.item_indices(part["item_id"].to_list())
    return fit_neighbour_table(session_index, items, part["timestamp"].to_numpy() / 1000.0,
                               artefacts.n_items, params)


def valid_next_batches(valid_ex: Examples, device: torch.device, batch_size: int):
    """Valid windows in batches of similar length, with their next-item mask (B, W') and
    model inputs; batches without a next-item target are skipped (the mixture fits)."""
    order = np.argsort(valid_ex.window_length, kind="stable")
    for i in range(0, len(order), batch_size):
        batch = to_tensors(valid_ex.batch(order[i:i + batch_size]), device)
        mask = batch["next_target"] != IGNORE                             # (B, W')
        if mask.any():
            yield batch, mask, tuple(batch[name] for name in MODEL_INPUTS)


@torch.no_grad()
def fit_neighbour_mix(model, config, valid_ex: Examples, device: torch.device, batch_size: int,
                      grid=NEIGHBOUR_MIX_GRID) -> dict:
    """Valid R@20 / MRR@20 of the model mixed with its neighbour table for each weight in
    `grid`; stores the best (by R@20 + MRR@20) in config.neighbour_mix, so both exported
    graphs carry it. The table must be loaded (model.neighbours.load_table)."""
    model.eval()
    ranks: dict[float, list] = {a: [] for a in grid}
    for batch, mask, inputs in valid_next_batches(valid_ex, device, batch_size):
        hidden = model.encode(*inputs)                                    # (B, W', H), once for the grid
        target = batch["next_target"][mask].cpu().numpy()                 # (Q,)
        for a in grid:
            config.neighbour_mix = float(a)                               # the model reads it from its config
            _, scores = model.outputs_masked(hidden, inputs, mask)         # (Q, n_items)
            ranks[a].append(metrics.target_ranks(scores.cpu().numpy(), target, first_real=ITEM_OFFSET))
    model.train()
    table, config.neighbour_mix = pick_mix(grid, ranks)
    return {"grid": table, "mix": config.neighbour_mix}


def pick_mix(grid, ranks: dict) -> tuple[list[dict], float]:
    """Valid R@20 / MRR@20 of each mixture weight (ranks[w]: lists of target ranks) and the
    weight with the highest R@20 + MRR@20 (ties: the smaller weight)."""
    table = []
    for w in grid:
        r = np.concatenate(ranks[w]) if ranks[w] else np.zeros(0)
        table.append({"mix": w, "recall@20": metrics.recall_at_k(r, TOP_K) if len(r) else None,
                      "mrr@20": metrics.mrr_at_k(r, TOP_K) if len(r) else None})
    scored = [row for row in table if row["recall@20"] is not None]
    best = max(scored, key=lambda row: (row["recall@20"] + row["mrr@20"], -row["mix"])) if scored else table[0]
    return table, float(best["mix"])


def parity_inputs(examples: Examples, n: int, seed: int) -> dict[str, np.ndarray]:
    """Real encoded validation windows: whole windows and random prefixes of them, so
    the exported model's gather at length-1 is checked at many lengths (1..100)."""
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(examples), size=min(n, len(examples)), replace=False)
    full = examples.window_length[picked] >= examples.artefacts.window
    picked = np.concatenate([picked[full], picked[~full]])   # full-width windows first, so a cut keeps them
    windows = []
    for j, i in enumerate(picked):
        start, length = examples.window_start[i], examples.window_length[i]
        cut = length if j % 2 == 0 else int(rng.integers(1, length + 1))
        windows.append(examples.rows[start:start + cut])
    return encode_windows(windows, examples.artefacts)


def train(args: argparse.Namespace, from_held_out: dict | None = None) -> dict:
    """One fit. `from_held_out` (train_refit's second stage): the train_info of the
    early-stopped --fit-on train run whose valid-fitted choices (calibration, stack blend
    and GBM parameters) this train+valid refit reuses instead of fitting them in-sample."""
    seed_everything(args.seed)
    device = choose_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    data = Path(args.data)
    frame = read_events(data)
    stats_path = data / "stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    fit_on = getattr(args, "fit_on", "train") or "train"
    if fit_on not in FIT_ON:
        raise ClickscoreError(f"--fit-on must be one of {list(FIT_ON)}, got {fit_on!r}")
    fit_splits = FIT_ON[fit_on]
    held_out = fit_on == "train"
    if args.epochs is not None and args.epochs < 1:
        raise ClickscoreError(f"--epochs must be >= 1, got {args.epochs}")
    if not held_out and args.epochs is None and from_held_out is None:
        return train_refit(args)
    max_epochs = args.epochs or DEFAULT_EPOCHS
    if args.model == "gru" and getattr(args, "neighbours", False):
        check_neighbour_args(args)
    sessions_on = args.model == "gru" and getattr(args, "session_neighbours", False)
    if sessions_on:
        check_session_args(args)
    artefacts = fit_artefacts(frame, args.min_item_count, splits=fit_splits)
    train_ex = build_examples(frame, fit_splits, artefacts)
    valid_ex = build_examples(frame, "valid", artefacts)
    table = None
    if args.model == "gru" and getattr(args, "neighbours", False):
        params = neighbour_table_params(args)
        table = neighbour_table(frame, fit_splits, artefacts, params)
        # --fit-on train+valid: the table for fitting the mix on valid holds out valid
        fit_table = table if held_out else neighbour_table(frame, ("train",), artefacts, params)
    index = session_index(frame, fit_splits, artefacts, session_index_params(args)) if sessions_on else None
    del frame
    if len(train_ex) == 0:
        raise ClickscoreError(f"{data}: the train split has no sessions")
    if len(valid_ex) == 0:
        raise ClickscoreError(f"{data}: the valid split has no sessions (needed for early stopping "
                              "and parity inputs); re-run prepare with --valid-days")
    if not held_out:
        print(f"fit on {fit_on}: no held-out data, so no early stopping; training exactly "
              f"{max_epochs} epochs and keeping the last (valid figures below are on training "
              "sessions)", file=sys.stderr)
    if args.max_valid_windows and len(valid_ex) > args.max_valid_windows:
        keep = np.sort(np.random.default_rng(args.seed).choice(len(valid_ex), args.max_valid_windows,
                                                                 replace=False))
        valid_eval = copy.copy(valid_ex)
        for name in ("window_start", "window_length", "window_loss_from", "window_buys"):
            setattr(valid_eval, name, getattr(valid_ex, name)[keep])
    else:
        valid_eval = valid_ex

    config = make_config(args.model, artefacts, args)
    if index is not None and getattr(config, "session_neighbours", 0):
        config.session_rows = index.n_rows      # the head's buffer shapes (loaded after training)
    model = build_model(args.model, config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    n_pos, n_neg = train_ex.buy_positions
    ratio = n_neg / n_pos if n_pos else 1.0
    pos_weight = torch.tensor(ratio if args.imbalance == "weight" and n_pos else 1.0, device=device)
    oversample = max(int(round(ratio)), 1) if args.imbalance == "oversample" and n_pos else 1
    keep_negative = min(1.0, 1.0 / ratio) if args.imbalance == "undersample" and n_pos else 1.0
    # odds factor each method trains towards (weight w, repeat k, keep share r: w, k, 1/r)
    logit_shift = math.log(float(pos_weight) * oversample / keep_negative)
    if n_pos and n_neg:   # start the buy head at the base rate, not at 0.5
        with torch.no_grad():
            model.heads.buy.bias.fill_(math.log(n_pos / n_neg))
    rng = np.random.default_rng(args.seed)
    print(f"train ({fit_on}): {train_ex.n_sessions:,} sessions, {len(train_ex):,} windows, buy positions "
          f"{n_pos:,} positive / {n_neg:,} negative; valid: {valid_ex.n_sessions:,} sessions; "
          f"{artefacts.n_items:,} item indices; {sum(p.numel() for p in model.parameters()):,} "
          f"parameters on {device}", file=sys.stderr)

    log = {"epochs": [], "fit_on": fit_on, "imbalance": args.imbalance, "pos_weight": float(pos_weight),
           "oversample": oversample, "keep_negative": keep_negative, "logit_shift": logit_shift,
           "buy_positions": {"positive": n_pos, "negative": n_neg}}
    best_score, best_state, best_epoch, best_valid, stale, step = -math.inf, None, 0, None, 0, 0
    epochs_run = 0
    for epoch in range(1, max_epochs + 1):
        window_ids = np.arange(len(train_ex))
        buy_off = np.zeros(len(train_ex), dtype=bool)          # windows whose buy loss is dropped
        if args.imbalance == "oversample" and n_pos:
            window_ids = np.concatenate([window_ids] + [np.flatnonzero(train_ex.window_buys)] * (oversample - 1))
        elif args.imbalance == "undersample" and n_pos:
            buy_off = ~train_ex.window_buys & (rng.random(len(train_ex)) >= keep_negative)
        batches = bucketed_batches(train_ex.window_length[window_ids], args.batch_size, rng)
        totals = {"buy_loss": 0.0, "next_loss": 0.0, "batches": 0}
        epoch_start = time.time()
        bar = tqdm(batches, desc=f"epoch {epoch}/{max_epochs}", disable=None, leave=False, file=sys.stderr)
        for batch_ids in bar:
            ids = window_ids[batch_ids]
            batch = train_ex.batch(ids)
            if buy_off.any():
                batch["buy_mask"] &= ~buy_off[ids][:, None]
            batch = to_tensors(batch, device)
            buy_loss, next_loss, *_ = losses(model, batch, pos_weight, logit_shift,
                                             getattr(args, "explore_loss_weight", 0.0) or 0.0)
            loss = args.buy_loss_weight * buy_loss + next_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            totals["buy_loss"] += buy_loss.item()
            totals["next_loss"] += next_loss.item()
            totals["batches"] += 1
            step += 1
            bar.set_postfix(buy=f"{buy_loss.item():.3f}", next=f"{next_loss.item():.3f}")
            if args.max_steps and step >= args.max_steps:
                break
        epochs_run = epoch
        valid = validate(model, valid_eval, device, args.batch_size * 2)
        entry = {"epoch": epoch, "steps": step, "seconds": round(time.time() - epoch_start, 2),
                 "train_buy_loss": totals["buy_loss"] / max(totals["batches"], 1),
                 "train_next_loss": totals["next_loss"] / max(totals["batches"], 1), "valid": valid}
        log["epochs"].append(entry)
        print(f"epoch {epoch}: train buy {entry['train_buy_loss']:.4f} next {entry['train_next_loss']:.4f}"
              f" | valid AUC {_fmt(valid['buy_roc_auc'])} PR-AUC {_fmt(valid['buy_pr_auc'])}"
              f" R@20 {_fmt(valid['recall@20'])} MRR@20 {_fmt(valid['mrr@20'])}"
              f" ({entry['seconds']:.0f} s)", file=sys.stderr)
        select = SELECT_ON.get(getattr(args, "select_on", None) or "score", "score")
        score = valid[select] if valid[select] is not None else (
            valid["score"] if valid["score"] is not None else -entry["train_next_loss"])
        if not held_out:   # nothing held out: the last epoch is the model
            score = float(epoch)
        if score > best_score:
            best_score, best_epoch, best_valid, stale = score, epoch, valid, 0
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if args.patience and stale >= args.patience:
                print(f"early stop: no better validation score for {stale} epochs", file=sys.stderr)
                break
        if args.max_steps and step >= args.max_steps:
            break

    calibration = None
    if getattr(args, "calibrate", False) and from_held_out is not None:
        # the refit reuses the held-out run's Platt fit: refitting it on valid here would be
        # in-sample (valid was trained on) and over-confident
        held = from_held_out.get("calibration")
        if held and hasattr(config, "calibration_scale"):
            config.calibration_scale, config.calibration_shift = held["scale"], held["shift"]
            calibration = {**held, "fit_on": "valid, in the held-out run (OUT/held-out)"}
            print(f"calibration: the held-out run's Platt fit (scale {held['scale']:.4f} shift "
                  f"{held['shift']:+.4f})", file=sys.stderr)
    elif getattr(args, "calibrate", False):
        model.load_state_dict(best_state)
        calibration = calibrate(model, config, valid_ex, device, args.batch_size * 2)
        if calibration:
            calibration["fit_on"] = "valid (held out)" if held_out else "valid (also trained on: in-sample)"
            print(f"calibration (Platt on valid, {calibration['prefixes']:,} prefixes): scale "
                  f"{calibration['scale']:.4f} shift {calibration['shift']:+.4f}; valid ECE "
                  f"{calibration['valid_ece_before']:.4f} -> {calibration['valid_ece_after']:.4f}", file=sys.stderr)
    stacked = None
    if getattr(args, "stack_gbm", False) and args.model == "gru":
        model.load_state_dict(best_state)
        stacked = fit_stack(model, artefacts, train_ex, valid_ex, device, args.batch_size * 2, args.seed,
                            fixed=(from_held_out or {}).get("stack") if from_held_out is not None else None,
                            refit=from_held_out is not None)
        if stacked and stacked["kept"]:
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if stacked and from_held_out is not None:
            icpt = stacked.get("intercept") or {}
            print(f"stack: LightGBM refitted on {stacked['train_rows']:,} train+valid prefixes with the held-out "
                  f"run's parameters {stacked['gbm_params']} ({stacked['features']} features), its blend a "
                  f"{stacked['blend']['gbm']:.3f} gbm + b {stacked['blend']['gru']:.3f} gru; intercept "
                  f"{stacked['held_out_blend']['bias']:+.3f} (held out) -> {stacked['blend']['bias']:+.3f} (refitted "
                  f"on out-of-fold train+valid scores: mean p {_fmt(icpt.get('mean_probability'))} vs rate "
                  f"{_fmt(icpt.get('prefix_rate'))})", file=sys.stderr)
        elif stacked:
            v = stacked["valid"]
            variants = ", ".join(f"{'oov distinct' if v['oov_distinct'] else 'oov shared'}/{v['features']}: "
                                 f"{_fmt(v['valid_auc'])}" for v in stacked["variants"])
            print(f"stack (LightGBM in the graph, {stacked['trees']} trees, {stacked['features']} features, OOV items "
                  f"{'distinct' if stacked['oov_distinct'] else 'shared'}; GBM valid AUC by variant {variants}; "
                  f"params {stacked['gbm_params']}; "
                  f"blend on valid {stacked['valid_prefixes']:,} prefixes: a {stacked['blend']['gbm']:.3f} gbm + "
                  f"b {stacked['blend']['gru']:.3f} gru {stacked['blend']['bias']:+.3f}): valid AUC gbm "
                  f"{_fmt(v['gbm']['valid_auc'])} gru {_fmt(v['gru']['valid_auc'])} blend {_fmt(v['blend']['valid_auc'])}"
                  f"; ECE gbm {_fmt(v['gbm']['valid_ece'])} gru {_fmt(v['gru']['valid_ece'])} blend "
                  f"{_fmt(v['blend']['valid_ece'])}; "
                  + (f"kept ({'the GBM alone: it ranks above the blend' if stacked['mode'] == 'gbm' else 'the blend'})"
                     if stacked["kept"] else "NOT kept (the stack does not beat the GRU alone on valid)"),
                  file=sys.stderr)
    neighbours = None
    if table is not None and getattr(model, "neighbours", None) is not None:
        model.load_state_dict(best_state)
        model.neighbours.load_table(fit_table)
        fixed = getattr(args, "neighbour_mix", None)
        given = fixed is not None and fixed >= 0
        if given or not held_out:
            # train+valid: the model has trained on valid, so a weight fitted there is in-sample
            # (it picks ~0: the model has memorised valid); use the given or the default weight
            fixed = float(fixed) if given else NEIGHBOUR_MIX_DEFAULT
            neighbours = fit_neighbour_mix(model, config, valid_ex, device, args.batch_size * 2, grid=(0.0, fixed))
            config.neighbour_mix = fixed
            neighbours["mix"] = fixed
            neighbours["fit_on"] = ("valid, in the held-out run (OUT/held-out)" if from_held_out is not None
                                    and (from_held_out.get("neighbours") or {}).get("mix") == fixed else
                                    "given (--neighbour-mix)" if given else
                                    f"default {NEIGHBOUR_MIX_DEFAULT} (--fit-on train+valid holds nothing out; pass "
                                    "--neighbour-mix from a --fit-on train run)")
        else:
            neighbours = fit_neighbour_mix(model, config, valid_ex, device, args.batch_size * 2)
            neighbours["fit_on"] = "valid (held out)"
        model.neighbours.load_table(table)
        neighbours.update(top_n=config.neighbours, window=config.neighbour_window, decay=config.neighbour_decay,
                          table=asdict(neighbour_table_params(args)), bytes=int(table[0].nbytes + table[1].nbytes))
        best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        at = {row["mix"]: row for row in neighbours["grid"]}
        print(f"neighbours ({neighbours['fit_on']}): mix {config.neighbour_mix:.2f}; valid R@20 / MRR@20 "
              f"{_fmt(at[0.0]['recall@20'])} / {_fmt(at[0.0]['mrr@20'])} alone -> "
              f"{_fmt(at[config.neighbour_mix]['recall@20'])} / {_fmt(at[config.neighbour_mix]['mrr@20'])} mixed; "
              f"table {neighbours['bytes'] / 1e6:.1f} MB", file=sys.stderr)
    sessions = fit_sessions(args, model, config, index, best_state, valid_ex, device, held_out, from_held_out)
    if sessions is not None:
        best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    elapsed = time.time() - started
    held = None
    if from_held_out is not None:   # what the refit took from the held-out run
        held = {"out": from_held_out.get("out"), "best_epoch": from_held_out.get("best_epoch"),
                "best_valid": from_held_out.get("best_valid")}
    log.update(best_epoch=best_epoch, best_valid=best_valid, seconds=round(elapsed, 2), steps=step,
               calibration=calibration, stack=stacked, neighbours=neighbours, sessions=sessions, held_out_run=held)
    # the command the user ran (a refit's own --epochs is the held-out run's choice, so the
    # model card's rebuild line repeats the two-stage command, not this stage)
    user_args = getattr(args, "user_args", None) or {k: v for k, v in vars(args).items() if k not in ("command", "user_args")}
    train_info = {
        "args": user_args, "held_out_run": held,
        "seed": args.seed, "fit_on": fit_on, "epochs": epochs_run, "calibration": calibration, "stack": stacked,
        "neighbours": neighbours, "sessions": sessions, "best_epoch": best_epoch, "best_valid": best_valid,
        "dataset": stats.get("dataset"), "data": str(data), "data_stats": stats,
        "vocab_hash": artefacts.vocab_hash, "n_items": artefacts.n_items,
        "train_windows": len(train_ex), "train_sessions": train_ex.n_sessions, "valid_windows": len(valid_ex), "steps": step,
        "seconds": round(elapsed, 2), "device": str(device), "torch": str(torch.__version__),
        "python": platform.python_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = {"model_kind": args.model, "config": asdict(config), "state_dict": best_state,
                  "train": train_info}
    tmp = out / (CHECKPOINT_FILE + ".tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(out / CHECKPOINT_FILE)
    artefacts.save(out / FEATURES_FILE)
    (out / LOG_FILE).write_text(json.dumps(log, indent=2) + "\n")
    np.savez_compressed(out / PARITY_FILE, **parity_inputs(valid_ex, PARITY_WINDOWS, args.seed))
    print(f"best epoch {best_epoch}: {json.dumps(best_valid)}\nwrote {out} in {elapsed:.0f} s", file=sys.stderr)
    return train_info


@torch.no_grad()
def fit_session_mix(model, config, valid_ex: Examples, device: torch.device, batch_size: int,
                    grid=SESSION_MIX_GRID) -> dict:
    """fit_neighbour_mix for the session-neighbour weight b: the model's output and p_sess are
    computed once per batch and mixed for every b (p_sess is the costly part); the best b by
    valid R@20 + MRR@20 goes to config.session_mix. The index must be loaded."""
    from training.models.neighbours import recent_per_position

    model.eval()
    config.session_mix = 0.0
    ranks: dict[float, list] = {b: [] for b in grid}
    for batch, mask, inputs in valid_next_batches(valid_ex, device, batch_size):
        _, scores = model.outputs_masked(model.encode(*inputs), inputs, mask)   # (Q, n_items) without
        log_p = torch.log_softmax(scores, dim=-1)
        recent = recent_per_position(batch["item"], config.session_window)[mask]   # (Q, K)
        p_sess = model.sessions.distribution(recent)                      # (Q, n_items)
        target = batch["next_target"][mask].cpu().numpy()
        for b in grid:
            mixed = log_p if b == 0 else model.sessions.mix(log_p, p_sess, b)
            ranks[b].append(metrics.target_ranks(mixed.cpu().numpy(), target, first_real=ITEM_OFFSET))
    model.train()
    table, config.session_mix = pick_mix(grid, ranks)
    return {"grid": table, "mix": config.session_mix}


def fit_sessions(args, model, config, index, best_state, valid_ex: Examples, device: torch.device, held_out: bool,
                 from_held_out: dict | None) -> dict | None:
    """After training: load the session-neighbour index into the model and choose its mix
    weight b on valid (held out), or take the given / held-out run's / default weight when
    valid was trained on (its index holds valid's sessions, so a fit there is in-sample)."""
    if index is None or getattr(model, "sessions", None) is None:
        return None
    model.load_state_dict(best_state)
    model.sessions.load_index(index)
    given = getattr(args, "session_mix", -1.0)
    if given >= 0 or not held_out:
        mix = float(given) if given >= 0 else SESSION_MIX_DEFAULT
        held_mix = ((from_held_out or {}).get("sessions") or {}).get("mix")
        fit = {"grid": [], "mix": mix,
               "fit_on": ("valid, in the held-out run (OUT/held-out)" if from_held_out is not None and held_mix == mix
                          else "given (--session-mix)" if given >= 0 else
                          f"default {SESSION_MIX_DEFAULT} (--fit-on train+valid holds nothing out)")}
        config.session_mix = mix
    else:
        fit = fit_session_mix(model, config, valid_ex, device, args.batch_size * 2)
        fit["fit_on"] = "valid (held out)"
    fit.update(k=model.sessions.k, posting=config.session_posting, length=config.session_length,
               window=config.session_window, rows=index.n_rows, index=asdict(session_index_params(args)),
               bytes=index.nbytes)
    line = f"session neighbours ({fit['fit_on']}): mix {config.session_mix:.2f}"
    if fit["grid"]:
        at = {row["mix"]: row for row in fit["grid"]}
        line += (f"; valid R@20 / MRR@20 {_fmt(at[0.0]['recall@20'])} / {_fmt(at[0.0]['mrr@20'])} without -> "
                 f"{_fmt(at[config.session_mix]['recall@20'])} / {_fmt(at[config.session_mix]['mrr@20'])} mixed")
    print(f"{line}; index {index.nbytes / 1e6:.1f} MB ({index.n_rows - 1:,} sessions)", file=sys.stderr)
    return fit


def train_refit(args: argparse.Namespace) -> dict:
    """`--fit-on train+valid` without `--epochs`: pick the epoch count on held-out data first.

    Stage 1 is the same command with `--fit-on train` into OUT/held-out (early stopping on
    valid, Platt calibration and the stack's GBM parameters and blend fitted on valid);
    stage 2 refits on train+valid for its best epoch count and reuses those valid-fitted
    choices (refitting them on valid would be in-sample). So one command gives the
    train_full row the way session-rec fits its baselines, and the test split chooses
    nothing."""
    out = Path(args.out)
    user_args = {k: v for k, v in vars(args).items() if k not in ("command",)}
    stage = copy.copy(args)
    stage.fit_on, stage.out, stage.user_args = "train", str(out / HELD_OUT_DIR), None
    print(f"fit on train+valid without --epochs: stage 1, an early-stopped --fit-on train run into "
          f"{stage.out} picks the epoch count", file=sys.stderr)
    first = train(stage)
    first["out"] = stage.out
    refit = copy.copy(args)
    refit.epochs, refit.user_args = max(1, int(first["best_epoch"])), user_args
    held_mix = (first.get("neighbours") or {}).get("mix")
    if getattr(refit, "neighbour_mix", None) is not None and refit.neighbour_mix < 0 and held_mix is not None:
        refit.neighbour_mix = float(held_mix)    # the weight the held-out run fitted on valid
    held_session_mix = (first.get("sessions") or {}).get("mix")
    if getattr(refit, "session_mix", None) is not None and refit.session_mix < 0 and held_session_mix is not None:
        refit.session_mix = float(held_session_mix)
    print(f"stage 2: refit on train+valid for {refit.epochs} epochs (the held-out run's best)", file=sys.stderr)
    return train(refit, from_held_out=first)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def run(args: argparse.Namespace) -> int:
    """CLI entry (stream/cli.py)."""
    train(args)
    return 0
