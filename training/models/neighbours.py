"""Item-neighbour scorer shipped inside the model graphs: a table of each item's top-N
co-occurring items, fitted on the training sessions (numpy), and a head that turns the
session's last K items into a next-item distribution mixed with the model's own.

    table = fit_neighbour_table(session_index, items, seconds, n_items, NeighbourTableParams())
    head = NeighbourHead(n_items, top_n=100, window=10, decay=2.0)
    head.load_table(table)                        # the two (n_items, N) buffers
    p_knn = head.distribution(recent)             # recent (Q, K) item indices, newest last -> (Q, n_items)
    log_p = head.mix(log_p_model, recent, a)      # log((1 - a) p_model + a p_knn)

Why: on yoochoose-100k the GRU's gap to VSTAN is on targets not already in the session,
where the kNN family scores with item co-occurrence over all of train_full, weighted by
distance inside the session and by session recency (training/knn.py). The session-level
neighbour search of VSTAN cannot live in a fixed graph, but its item-level projection
can: sequential-rule style pair weights (Kamehkhosh et al. 2017; Ludewig & Jannach
2018), b after a at distance d gains 1/d (b before a gains `backward`/d), each pair
times the session's recency weight exp(-(T - t_session) / recency_days) and the target's
(1 + idf * log(S / count_b)) as in VSTAN; each source row keeps its N strongest targets
and is normalised to sum 1. The session score sums the rows of its last K items,
weighted exp(-(steps back) / decay) like VSTAN's position weights, and is normalised
to a distribution. The mixture weight `a` is fitted on valid after training
(training/train.py), like the Platt calibration, and baked into both graphs.

The table is two constant tensors in the graphs (int32 targets, float32 weights:
N * 8 bytes per item; 2,935 items x N=100 = 2.3 MB), so serving needs no new input and
the step graph stays exact: its `recent_items` state already holds the window's items.
Padding (0) and out-of-vocabulary (1) rows are zero, so they contribute nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from stream.features import ITEM_OFFSET


@dataclass(frozen=True)
class NeighbourTableParams:
    top_n: int = 100               # targets kept per source item
    steps: int = 10                # largest in-session distance that forms a pair
    backward: float = 0.5          # weight of b BEFORE a relative to b after a (0: rules only)
    recency_days: float = 0.0      # session recency half-scale in days (0: off)
    idf: float = 1.0               # target weight (1 + idf * log(S / count_b)) (0: off)

    def __post_init__(self):
        if self.top_n < 1 or self.steps < 1:
            raise ValueError(f"neighbour table needs top_n >= 1 and steps >= 1, got {self.top_n}, {self.steps}")
        if self.backward < 0 or self.recency_days < 0 or self.idf < 0:
            raise ValueError("neighbour table weights (backward, recency_days, idf) must be >= 0")


def fit_neighbour_table(session_index: np.ndarray, items: np.ndarray, seconds: np.ndarray, n_items: int,
                        params: NeighbourTableParams) -> tuple[np.ndarray, np.ndarray]:
    """Events in contract order (grouped by session, time order inside): session index,
    item index (vocabulary: 0 pad, 1 OOV, 2.. known) and time in seconds per event ->
    (targets (n_items, N) int32, weights (n_items, N) float32), rows summing to 1 (or 0)."""
    session_index = np.asarray(session_index)
    items = np.asarray(items, dtype=np.int64)
    seconds = np.asarray(seconds, dtype=np.float64)
    n_sessions = int(session_index.max()) + 1 if len(session_index) else 0
    session_weight = np.ones(n_sessions)
    if params.recency_days and n_sessions:
        last = np.full(n_sessions, -np.inf)
        np.maximum.at(last, session_index, seconds)                  # (S,) last event
        session_weight = np.exp(-(last.max() - last) / (params.recency_days * 86400.0))
    sources, targets, weights = [], [], []
    for d in range(1, params.steps + 1):
        same = session_index[d:] == session_index[:-d]               # pairs d apart, same session
        a, b = items[:-d][same], items[d:][same]
        w = session_weight[session_index[d:][same]] / d
        keep = (a >= ITEM_OFFSET) & (b >= ITEM_OFFSET) & (a != b)    # repeats are the repeat head's
        sources += [a[keep]]
        targets += [b[keep]]
        weights += [w[keep]]
        if params.backward:
            sources += [b[keep]]
            targets += [a[keep]]
            weights += [params.backward * w[keep]]
    rows = np.concatenate(sources) if sources else np.zeros(0, np.int64)
    cols = np.concatenate(targets) if targets else np.zeros(0, np.int64)
    data = np.concatenate(weights) if weights else np.zeros(0)
    if params.idf and len(items):
        counts = np.bincount(items[items >= ITEM_OFFSET], minlength=n_items).astype(np.float64)
        idf = np.log(max(n_sessions, 1) / np.maximum(counts, 1.0))
        data = data * (1.0 + params.idf * idf[cols])
    pairs = sp.coo_matrix((data, (rows, cols)), shape=(n_items, n_items)).tocsr()   # (n_items, n_items)
    pairs.sum_duplicates()
    coo = pairs.tocoo()
    # strongest first within each source (ties: the lower target index, deterministic)
    order = np.lexsort((coo.col, -coo.data, coo.row))
    row, col, value = coo.row[order], coo.col[order], coo.data[order]
    starts = np.searchsorted(row, np.arange(n_items))
    rank = np.arange(len(row)) - starts[row]
    keep = rank < params.top_n
    out_targets = np.zeros((n_items, params.top_n), dtype=np.int32)
    out_weights = np.zeros((n_items, params.top_n), dtype=np.float64)
    out_targets[row[keep], rank[keep]] = col[keep]
    out_weights[row[keep], rank[keep]] = value[keep]
    totals = out_weights.sum(axis=1, keepdims=True)
    out_weights = np.divide(out_weights, totals, out=np.zeros_like(out_weights), where=totals > 0)
    return out_targets, out_weights.astype(np.float32)


def recent_per_position(item: torch.Tensor, window: int) -> torch.Tensor:
    """Window items (B, W) -> (B, W, K): at position t the items of positions t-K+1..t,
    newest last, 0 before the session (the same slots as the step state's last K)."""
    W = item.size(1)
    index = (torch.arange(W, device=item.device).view(W, 1) - (window - 1)
             + torch.arange(window, device=item.device).view(1, window))          # (W, K)
    taken = item[:, index.clamp(min=0)]                                           # (B, W, K)
    return torch.where(index >= 0, taken, torch.zeros_like(taken))


class NeighbourHead(nn.Module):
    """The table as buffers (saved in the checkpoint, constants in the ONNX graphs)."""

    def __init__(self, n_items: int, top_n: int, window: int, decay: float):
        super().__init__()
        assert top_n >= 1 and window >= 1 and decay > 0, "neighbours: top_n, window >= 1 and decay > 0"
        self.n_items, self.window = n_items, window
        self.register_buffer("targets", torch.zeros(n_items, top_n, dtype=torch.int32))
        self.register_buffer("weights", torch.zeros(n_items, top_n))
        back = torch.arange(window - 1, -1, -1, dtype=torch.float32)                # slot j is K-1-j steps back
        self.register_buffer("position_weights", torch.exp(-back / decay), persistent=False)

    def load_table(self, table: tuple[np.ndarray, np.ndarray]) -> None:
        targets, weights = table
        assert targets.shape == tuple(self.targets.shape), f"table {targets.shape} != {tuple(self.targets.shape)}"
        self.targets.copy_(torch.from_numpy(np.asarray(targets, dtype=np.int32)))
        self.weights.copy_(torch.from_numpy(np.asarray(weights, dtype=np.float32)))

    def distribution(self, recent: torch.Tensor) -> torch.Tensor:
        """recent (Q, K) item indices, newest last -> (Q, n_items) summing to 1, or all 0
        when none of the K items has neighbours (padding, OOV, unseen pairs)."""
        Q, K = recent.shape
        targets = self.targets[recent].to(torch.int64)                            # (Q, K, N)
        weights = self.weights[recent] * self.position_weights.view(1, K, 1)      # (Q, K, N)
        scores = torch.zeros(Q, self.n_items, dtype=weights.dtype, device=weights.device)
        scores = scores.scatter_add(1, targets.reshape(Q, -1), weights.reshape(Q, -1))   # (Q, n_items)
        return scores / scores.sum(dim=1, keepdim=True).clamp(min=1e-12)

    def mix(self, log_p: torch.Tensor, recent: torch.Tensor, a: float) -> torch.Tensor:
        """log_p (Q, n_items) normalised model log-probabilities -> log((1-a) p + a p_knn)."""
        model = log_p + float(np.log1p(-a))
        knn = torch.log(self.distribution(recent).clamp(min=1e-30)) + float(np.log(a))
        top = torch.maximum(model, knn)
        return top + torch.log(torch.exp(model - top) + torch.exp(knn - top))
