"""The stacked buy head: the aggregate LightGBM (training/baselines.py) inside the exported
graphs, blended with the GRU's buy logit (wide & deep where the wide part is the GBM).

    feats = session_aggregates(event_type, item, category, hour, weekday, dwell, price,
                               item_pop, item_rate, norm)            # (B, W, N_STACK_FEATURES)
    stack = BuyStack.from_lightgbm(booster, item_pop_table, item_rate_table)   # after training
    logit = stack.blend(stack.gbm_logit(feats), gru_logit)             # (...,)

Why in the graph and in torch: the GBM's features are computed from the model's own 9
window inputs (the same function offline, for the GBM's training rows, and served), so
the worker needs no new inputs and the two can never disagree. The trees are LightGBM's
own (`Booster.dump_model()`), evaluated here as a fixed number of Gather/Where steps
(one per tree level) so they export with the rest of the model through torch.onnx, run
in eager evaluation identically, and step exactly; a separate ai.onnx.ml graph glued on
with onnx.compose would have to be composed twice (window and step graphs) and would not
exist in the checkpoint that `clickscore evaluate` can also read.

The features equal training/baselines.py `prefix_aggregates` (AGGREGATE_FEATURES, same
order) where the definitions coincide (tests/test_stack.py checks it). They differ:
- only the events in the window count (the window is cut at W=100 events);
- time comes from the dwell input (log1p gap, capped at a day, float32): duration is the
  sum of the window's gaps after its first event, not last minus first timestamp;
- a missing price reads as the training mean price (the input encodes it as 0), not NaN;
- out-of-vocabulary items share index 1: one "distinct" item, and the OOV item statistics
  (0 sessions, base rate) rather than the raw id's own;
- item statistics are per vocabulary index, fitted on the training sessions; training rows
  use out-of-fold tables (baselines.prefix_aggregates' `out_of_fold` says why).
Beyond the baseline (appended columns, RECENCY_FEATURES): events and log seconds since
the last add-to-cart, carts and new items among the last 5 events, the mean log gap of
the last 3 and the mean item buy rate of the last 5; and `Norm.oov_distinct`, under which
every out-of-vocabulary event counts as a new item (Taobao: most items are below
--min-item-count, and one shared "OOV item" made every such event a repeat). train.fit_stack
chooses both on valid; old stacks (22 columns, OOV shared) compute what they always did.
Sums run in float64, so the window graph (cumulative sums) and the step graph (the same
function on the carried window, `stack_window`) agree to ~1e-15 and no tree split flips.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from stream.features import DWELL_CAP_SECONDS
from training.baselines import AGGREGATE_FEATURES

# the aggregate baseline's features, same names and order (tests/test_stack.py compares values),
# then recency features the baseline does not have (issue 10: the stack must be more than the
# baseline's GBM). Appended, never inserted: a tree splits on a feature by its column number, so
# stacks fitted on the first 22 columns read the same values in a graph that computes more.
RECENCY_FEATURES = (
    "events_since_cart",       # real events after the last add-to-cart (-1: no cart yet)
    "log_time_since_cart_s",   # log(1 + seconds since the last add-to-cart) (-1: no cart yet)
    "carts_last5",             # add-to-carts among the last 5 events
    "log_mean_gap_last3_s",    # mean log(1 + gap) over the gaps of the last 3 events
    "distinct_items_last5",    # distinct items among the last 5 events (new ids within them)
    "mean_buy_rate_last5",     # mean item buy rate over the last 5 events
)
STACK_FEATURES = AGGREGATE_FEATURES + RECENCY_FEATURES
N_STACK_FEATURES = len(STACK_FEATURES)
N_AGGREGATE = len(AGGREGATE_FEATURES)
RECENT = 5                     # "the last events" of the recency features
# channels of the step state `stack_window` (B, W, 7): the last W events' raw inputs, newest last
WINDOW_CHANNELS = ("event_type", "item", "category", "hour", "weekday", "dwell", "price")
ADDTOCART, CATEGORY_MISSING, ITEM_OOV = 2, 1, 1   # stream.events.EVENT_TYPES / stream.features indices


@dataclass(frozen=True)
class Norm:
    """The artefact's normalisation of dwell and price (features.json stats)."""
    dwell_mean: float
    dwell_std: float
    price_mean: float
    price_std: float
    # out-of-vocabulary items (index 1) count as a new distinct item at every event, not as
    # repeats of one shared "OOV item" (False: the first stacks' definition, kept for them)
    oov_distinct: bool = False


def _running_max(values, real):
    """values (B, W) float64, real (B, W) bool -> max over real s <= t, floored at 0 (B, W)."""
    W = values.size(1)
    pos = torch.arange(W, device=values.device)
    upto = (pos.view(W, 1) >= pos.view(1, W)).unsqueeze(0) & real.unsqueeze(1)   # (B, W_t, W_s)
    return torch.where(upto, values.unsqueeze(1), torch.zeros_like(values).unsqueeze(1)).amax(dim=2)


def _seen_before(ids, real):
    """ids (B, W) -> (B, W_s, W_r) true where r < s is a real event with the same id."""
    W = ids.size(1)
    pos = torch.arange(W, device=ids.device)
    earlier = (pos.view(W, 1) > pos.view(1, W)).unsqueeze(0)                   # (1, W_s, W_r)
    return (ids.unsqueeze(2) == ids.unsqueeze(1)) & earlier & real.unsqueeze(1)


def _last(values, k):
    """Running sums (B, W) -> the sum of the last k positions' increments at each t (B, W):
    c[t] - c[t-k]. Real events are contiguous in both layouts (padding all before or all
    after), so the last k positions up to a real t are the last k events or the session start."""
    shifted = torch.cat([torch.zeros_like(values[:, :k]), values[:, :-k]], dim=1)[:, :values.size(1)]
    return values - shifted


def session_aggregates(event_type, item, category, hour, weekday, dwell, price, item_pop, item_rate,
                       norm: Norm):
    """Window inputs (B, W) (left-aligned with padding after, or newest-last with padding
    before: only real events, item != 0, count) and per-event item statistics (B, W)
    -> features (B, W, N_STACK_FEATURES) float64 at every position (0 at padding)."""
    real = item != 0                                                            # (B, W)
    r = real.to(torch.float64)
    n = torch.cumsum(r, dim=1)                                                  # events so far
    # which earlier events can count as the same item (OOV: none, under oov_distinct)
    known = real & (item != ITEM_OOV) if norm.oov_distinct else real
    seen = _seen_before(item, known)                                            # (B, W_s, W_r)
    first_item = r * (1.0 - seen.any(dim=2).to(torch.float64))
    has_category = real & (category != CATEGORY_MISSING)
    first_category = has_category.to(torch.float64) * (
        1.0 - _seen_before(category, has_category).any(dim=2).to(torch.float64))
    distinct_items = torch.cumsum(first_item, dim=1)
    cart = (event_type == ADDTOCART).to(torch.float64) * r
    # dwell = (log1p(gap) - mean) / std; the session's first event has no gap (n == 1)
    log_gap = dwell.to(torch.float64) * norm.dwell_std + norm.dwell_mean
    gap = (torch.exp(log_gap) - 1.0).clamp(0.0, DWELL_CAP_SECONDS) * (n >= 2).to(torch.float64) * r
    duration = torch.cumsum(gap, dim=1)
    log_price = price.to(torch.float64) * norm.price_std + norm.price_mean      # log1p(price)
    raw_price = (torch.exp(log_price) - 1.0) * r
    same_item = seen.to(torch.float64).sum(dim=2) + 1.0                         # this event included
    # repeats of the current item up to t: earlier equal real events, counted at s only
    pop = item_pop.to(torch.float64) * r
    rate = item_rate.to(torch.float64) * r
    safe_n = n.clamp(min=1.0)
    log = lambda x: torch.log(1.0 + x)   # noqa: E731  (Log1p is not an ONNX op)
    # recency: n and duration at the last cart (running max of values that only grow)
    n_at_cart = _running_max(cart * n, real)                                    # 0: no cart yet
    duration_at_cart = _running_max(cart * (duration + 1.0), real) - 1.0        # -1: no cart yet
    has_cart = n_at_cart > 0
    minus_one = torch.full_like(n, -1.0)
    recent_n = _last(n, RECENT).clamp(min=1.0)                                  # events in the last 5
    log_gap = log(gap)
    gaps3 = _last(torch.cumsum((n >= 2).to(torch.float64) * r, dim=1), 3)       # real gaps in the last 3
    features = torch.stack([
        log(n), log(distinct_items), torch.cumsum(first_category, dim=1), torch.cumsum(cart, dim=1), cart,
        log(duration), log(duration / (n - 1.0).clamp(min=1.0)), log(_running_max(gap, real)), log(gap),
        (hour.to(torch.float64) - 1.0), weekday.to(torch.float64),
        log_price, log(torch.cumsum(raw_price, dim=1) / safe_n),
        _running_max(log_price.clamp(min=0.0), real),
        distinct_items / safe_n, same_item,
        pop, torch.cumsum(pop, dim=1) / safe_n, _running_max(pop, real),
        rate, torch.cumsum(rate, dim=1) / safe_n, _running_max(rate, real),
        torch.where(has_cart, n - n_at_cart, minus_one),
        torch.where(has_cart, log((duration - duration_at_cart).clamp(min=0.0)), minus_one),
        _last(torch.cumsum(cart, dim=1), RECENT),
        _last(torch.cumsum(log_gap, dim=1), 3) / gaps3.clamp(min=1.0),
        _last(distinct_items, RECENT),
        _last(torch.cumsum(rate, dim=1), RECENT) / recent_n,
    ], dim=-1)                                                                  # (B, W, F)
    return torch.where(real.unsqueeze(-1), features, torch.zeros_like(features))


class BuyStack(nn.Module):
    """Item statistics tables, LightGBM trees as flat node arrays, and the blend.

    Shapes are fixed by (n_items, n_nodes, n_trees), which the GRU config stores, so a
    checkpoint rebuilds it empty and load_state_dict fills the buffers."""

    def __init__(self, n_items: int, n_nodes: int, n_trees: int, depth: int, norm: Norm,
                 blend: tuple[float, float, float]):
        super().__init__()
        self.depth, self.norm = depth, norm
        self.blend_gbm, self.blend_gru, self.blend_bias = blend
        self.register_buffer("item_pop", torch.zeros(n_items, dtype=torch.float64))
        self.register_buffer("item_rate", torch.zeros(n_items, dtype=torch.float64))
        self.register_buffer("feature", torch.zeros(n_nodes, dtype=torch.int64))
        self.register_buffer("threshold", torch.zeros(n_nodes, dtype=torch.float64))
        self.register_buffer("left", torch.zeros(n_nodes, dtype=torch.int64))
        self.register_buffer("right", torch.zeros(n_nodes, dtype=torch.int64))
        self.register_buffer("value", torch.zeros(n_nodes, dtype=torch.float64))
        self.register_buffer("roots", torch.zeros(n_trees, dtype=torch.int64))

    @classmethod
    def from_lightgbm(cls, booster, item_pop: np.ndarray, item_rate: np.ndarray, norm: Norm,
                      blend: tuple[float, float, float] = (1.0, 0.0, 0.0)) -> "BuyStack":
        trees = flatten_trees(booster)
        stack = cls(len(item_pop), len(trees["feature"]), len(trees["roots"]), trees["depth"], norm, blend)
        with torch.no_grad():
            for name in ("feature", "threshold", "left", "right", "value", "roots"):
                getattr(stack, name).copy_(torch.from_numpy(trees[name]))
            stack.item_pop.copy_(torch.from_numpy(np.asarray(item_pop, dtype=np.float64)))
            stack.item_rate.copy_(torch.from_numpy(np.asarray(item_rate, dtype=np.float64)))
        return stack

    def features(self, event_type, item, category, hour, weekday, dwell, price):
        """Window inputs (B, W) -> (B, W, F) with this stack's item tables."""
        return session_aggregates(event_type, item, category, hour, weekday, dwell, price,
                                  self.item_pop[item], self.item_rate[item], self.norm)

    def gbm_logit(self, features):
        """features (..., F) float64 -> the LightGBM raw score (...,) float64."""
        shape = features.shape[:-1]
        x = features.reshape(-1, features.size(-1))                             # (N, F)
        node = self.roots.unsqueeze(0).expand(x.size(0), -1)                    # (N, T)
        for _ in range(self.depth):   # leaves point to themselves, so extra levels are no-ops
            go_left = x.gather(1, self.feature[node]) <= self.threshold[node]
            node = torch.where(go_left, self.left[node], self.right[node])
        return self.value[node].sum(dim=1).reshape(shape)

    def blend(self, gbm_logit, gru_logit):
        """Logistic regression on the two logits, fitted on valid (train.fit_stack): the
        blended logit is calibrated (Platt) by construction."""
        return (self.blend_gbm * gbm_logit + self.blend_bias).to(gru_logit.dtype) + self.blend_gru * gru_logit

    # -- step state ----------------------------------------------------------------
    @staticmethod
    def window_channels(event_type, item, category, hour, weekday, dwell, price):
        return torch.stack([event_type.to(torch.float32), item.to(torch.float32), category.to(torch.float32),
                            hour.to(torch.float32), weekday.to(torch.float32), dwell, price], dim=-1)

    @staticmethod
    def unpack(window):
        """stack_window (B, W, 7) float32 -> the 7 inputs (B, W) (indices back to int64)."""
        parts = window.unbind(-1)
        return tuple(p.to(torch.int64) for p in parts[:5]) + (parts[5], parts[6])

    def step(self, event_type, item, category, hour, weekday, dwell, price, window):
        """One event (B,) each and the carried window (B, W, 7) -> (features of the new last
        event (B, F), new window). Same function as the window graph, on the newest-last window."""
        new = self.window_channels(event_type, item, category, hour, weekday, dwell, price)   # (B, 7)
        window = torch.cat([window[:, 1:], new.unsqueeze(1)], dim=1)                      # (B, W, 7)
        return self.features(*self.unpack(window))[:, -1], window

    @staticmethod
    def window_after(inputs: tuple, length, W: int):
        """The 7 window inputs (B, W) -> stack_window after position length-1 (newest last,
        zeros before the session), as step() would have carried it."""
        index = (length - W).view(-1, 1) + torch.arange(W, device=length.device).view(1, W)   # (B, W)
        stacked = BuyStack.window_channels(*inputs)                                            # (B, W, 7)
        taken = stacked.gather(1, index.clamp(min=0).unsqueeze(-1).expand(-1, -1, stacked.size(2)))
        return torch.where((index >= 0).unsqueeze(-1), taken, torch.zeros_like(taken))


def flatten_trees(booster) -> dict:
    """LightGBM Booster (or LGBMClassifier) -> flat node arrays over all trees: internal
    nodes split `x[feature] <= threshold` (left) else right; leaves point to themselves and
    hold their value. Refuses what this evaluator does not implement (categorical splits,
    NaN-routing on features that are never NaN here is fine, zero-as-missing is not)."""
    booster = getattr(booster, "booster_", booster)
    dump = booster.dump_model()
    feature, threshold, left, right, value, roots = [], [], [], [], [], []
    depth = 0

    def add(node, level) -> int:
        nonlocal depth
        i = len(feature)
        feature.append(0); threshold.append(0.0); left.append(i); right.append(i); value.append(0.0)
        if "leaf_value" in node or "split_feature" not in node:
            value[i] = float(node.get("leaf_value", 0.0))
            depth = max(depth, level)
            return i
        if node.get("decision_type") != "<=" or node.get("missing_type") == "Zero":
            raise ValueError(f"unsupported LightGBM split {node.get('decision_type')} / {node.get('missing_type')}")
        feature[i], threshold[i] = int(node["split_feature"]), float(node["threshold"])
        left[i] = add(node["left_child"], level + 1)
        right[i] = add(node["right_child"], level + 1)
        return i

    for tree in dump["tree_info"]:
        roots.append(add(tree["tree_structure"], 0))
    return {"feature": np.asarray(feature, np.int64), "threshold": np.asarray(threshold, np.float64),
            "left": np.asarray(left, np.int64), "right": np.asarray(right, np.int64),
            "value": np.asarray(value, np.float64), "roots": np.asarray(roots, np.int64), "depth": depth}


# -- item statistics (offline) ----------------------------------------------------------

PRIOR_WEIGHT = 20.0   # = baselines.BUY_RATE_PRIOR_WEIGHT


def item_tables(session: np.ndarray, item: np.ndarray, buys: np.ndarray, n_items: int,
                folds: int = 0, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per event: session index (N,), vocabulary item index (N,), session buys (N,) ->
    (item_pop (K, n_items), item_rate (K, n_items), fold of each session): log(1 + sessions
    with the item) and the smoothed buy rate (buying + prior * base) / (sessions + prior).
    K = 1 (all sessions; folds=0) or `folds` out-of-fold tables, table k fitted without
    fold k's sessions and its counts scaled by K/(K-1) (baselines.prefix_aggregates).
    Padding (0) and OOV (1) keep 0 sessions: pop 0, the base rate."""
    n_sessions = int(session.max()) + 1 if len(session) else 0
    session_buys = np.zeros(n_sessions)
    session_buys[session] = buys
    base = float(session_buys.mean()) if n_sessions else 0.0
    pairs = np.unique(np.stack([session, item]), axis=1) if len(session) else np.zeros((2, 0), np.int64)
    pairs = pairs[:, pairs[1] >= 2]                                            # known items only
    fold = (np.random.default_rng(seed).integers(0, folds, n_sessions) if folds > 1
            else np.zeros(n_sessions, dtype=np.int64))
    total = np.bincount(pairs[1], minlength=n_items).astype(np.float64)
    total_buy = np.bincount(pairs[1], weights=session_buys[pairs[0]], minlength=n_items)
    pops, rates = [], []
    for k in range(max(folds, 1) if folds > 1 else 1):
        if folds > 1:
            inside = fold[pairs[0]] == k
            scale = folds / (folds - 1.0)
            sessions = (total - np.bincount(pairs[1][inside], minlength=n_items)) * scale
            buying = (total_buy - np.bincount(pairs[1][inside], weights=session_buys[pairs[0][inside]],
                                              minlength=n_items)) * scale
        else:
            sessions, buying = total, total_buy
        pops.append(np.log1p(sessions))
        rates.append((buying + PRIOR_WEIGHT * base) / (sessions + PRIOR_WEIGHT))
    return np.stack(pops), np.stack(rates), fold


def example_events(examples) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """training.examples.Examples -> per event (session index, vocabulary item index, session
    buys), for item_tables. A session starts where the stored gap is NaN (session_rows)."""
    session = np.cumsum(np.isnan(examples.rows["gap"])) - 1
    item = examples.artefacts.item_indices_of_hashes(examples.rows["item"]).astype(np.int64)
    return session.astype(np.int64), item, examples.buy_label.astype(np.float64)


def examples_features(examples, item_pop: np.ndarray, item_rate: np.ndarray, norm: Norm,
                      session_fold: np.ndarray | None = None, batch_size: int = 256
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(features (P, F), labels (P,)) at every scored buy position of `examples` (the
    positions the buy loss and validation read), item tables (K, n_items) picked per window
    by its session's fold (K = 1: one table for all)."""
    session, _, _ = example_events(examples)
    xs, ys = [], []
    for i in range(0, len(examples), batch_size):
        ids = np.arange(i, min(i + batch_size, len(examples)))
        batch = examples.batch(ids)
        item = batch["item"]
        k = (session_fold[session[examples.window_start[ids]]] if session_fold is not None
             else np.zeros(len(ids), dtype=np.int64))[:, None]                  # (B, 1) table per window
        t = {name: torch.from_numpy(np.ascontiguousarray(batch[name]))
             for name in ("event_type", "item", "category", "hour", "weekday", "dwell", "price")}
        with torch.no_grad():
            feats = session_aggregates(t["event_type"], t["item"], t["category"], t["hour"], t["weekday"],
                                       t["dwell"], t["price"], torch.from_numpy(item_pop[k, item]),
                                       torch.from_numpy(item_rate[k, item]), norm).numpy()   # (B, W', F)
        mask = batch["buy_mask"]
        xs.append(feats[mask])
        ys.append(batch["buy_target"][mask])
    if not xs:
        return np.zeros((0, N_STACK_FEATURES)), np.zeros(0)
    return np.concatenate(xs), np.concatenate(ys).astype(np.float64)


def norm_of(artefacts) -> Norm:
    return Norm(artefacts.dwell_mean, artefacts.dwell_std, artefacts.price_mean, artefacts.price_std)
