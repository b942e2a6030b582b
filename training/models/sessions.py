"""Session-neighbour scorer shipped inside the model graphs: VSTAN's neighbourhood of
whole training sessions (Ludewig et al. 2021; training/knn.py) as posting lists and
per-session item lists, and a head that turns the session's last K items into a
next-item distribution mixed with the model's output.

    index = fit_session_index(session_index, items, seconds, n_items, SessionIndexParams())
    head = SessionNeighbourHead(n_items, index.n_rows, posting=500, length=20, k=500, window=10)
    head.load_index(index)                       # constant buffers (checkpoint, ONNX graphs)
    p_sess = head.distribution(recent)           # recent (Q, K) item indices, newest last -> (Q, n_items)

Why: the item-level table (models/neighbours.py) lifted R@20 above VSTAN but not MRR@20;
VSTAN ranks the target higher because it weights WHOLE training sessions by their
similarity to the current one. That search fits a fixed graph as two scatter-adds:

- sim (Q, S+1): each distinct recent item (its last slot; weight exp(-(steps back) /
  spw), VSTAN's position weight) adds its weight into the sessions of its posting list
  (the P most recent training sessions holding it; VSTAN samples recent sessions too),
  times each session's constant weight 1/sqrt(|N|) (cosine) x exp(-(T - t_n) / snh)
  (recency against the last training time T: VSTAN's exp(-(now - t_n)/snh) differs
  by a factor common to every candidate, so the ranking and the normalised scores are
  the same). The current session's cosine norm is common to all candidates: left out.
- the k most similar sessions (TopK); each adds sim_n x exp(-(K-1 - p*_n) / ipw) (p*_n:
  the newest recent slot whose item n holds) x (1 + idf_w idf_j) x exp(-|q_n(j) - q*_n|
  / inh) (q_n(j): last position of j in n; q*_n: the last position in n of a recent
  item) to each of its L most recent distinct items j; normalised to sum 1.

p*_n without a max-scatter (opset 17 has none for ScatterElements): every recent slot j
also adds 2^j into a second (Q, S+1) row; for distinct slots the sum is a bit mask,
exact in float32 for K <= 24, whose highest bit is counted with K comparisons.

Approximations against training/knn.py's VSTAN: only the last K window items take part,
candidates are the union of per-item posting lists (not the 10,000 most recent of all
sharers), and neighbours keep their L most recent distinct items. Padding (0), OOV (1)
and the dummy session row S (posting padding) contribute nothing. Constants: P * 4 bytes
per item, L * 8 + 4 bytes per training session; `sessions` caps the sessions indexed
(the most recent) and so the index and the (B, S+1) similarity rows for big logs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from stream.features import ITEM_OFFSET

MAX_WINDOW = 24          # the bit mask of recent slots is exact in float32 up to 2^24


@dataclass(frozen=True)
class SessionIndexParams:
    posting: int = 500            # P: most recent training sessions kept per item
    length: int = 20              # L: most recent distinct items kept per session
    recency_days: float = 5.0     # VSTAN lambda_snh (0: off)
    idf: float = 2.0              # VSTAN lambda_idf: item weight 1 + idf * log(S / events of j) (0: off)
    sessions: int = 50_000        # most recent training sessions indexed (0: all); bounds the (B, S+1) rows

    def __post_init__(self):
        if self.posting < 1 or self.length < 1:
            raise ValueError(f"session index needs posting >= 1 and length >= 1, got {self.posting}, {self.length}")
        if self.sessions < 0 or self.recency_days < 0 or self.idf < 0:
            raise ValueError("session index sessions, recency_days and idf must be >= 0")


@dataclass
class SessionIndex:
    """The fitted constants; row S (the last) of the per-session arrays is the dummy session."""
    posting: np.ndarray            # (n_items, P) int32 session rows, S = padding
    session_weight: np.ndarray     # (S+1,) float32: 1/sqrt(|N|) x recency; 0 for the dummy
    items: np.ndarray              # (S+1, L) int32 item indices, 0 = padding
    positions: np.ndarray          # (S+1, L) float32 last position (1-based) of each item in its session
    item_weight: np.ndarray        # (n_items,) float32: 1 + idf * idf_j

    @property
    def n_rows(self) -> int:
        return len(self.session_weight)

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in (self.posting, self.session_weight, self.items, self.positions,
                                           self.item_weight)))


def fit_session_index(session_index: np.ndarray, items: np.ndarray, seconds: np.ndarray, n_items: int,
                      params: SessionIndexParams) -> SessionIndex:
    """Events in contract order (grouped by session, time order inside): session index
    (0..S-1), item index (vocabulary: 0 pad, 1 OOV, 2.. known), time in seconds -> the index."""
    session_index = np.asarray(session_index, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    seconds = np.asarray(seconds, dtype=np.float64)
    S = int(session_index.max()) + 1 if len(session_index) else 0
    starts = np.searchsorted(session_index, np.arange(S))
    position = np.arange(len(items)) - starts[session_index] + 1                 # 1-based, all events
    last_time = np.full(S, -np.inf)
    np.maximum.at(last_time, session_index, seconds)                            # (S,) t_n
    if params.sessions and S > params.sessions:
        # keep the most recent sessions (VSTAN samples recent ones too), renumbered 0..M-1;
        # idf still counts every training session and event
        kept = np.zeros(S, dtype=bool)
        kept[np.argsort(-last_time, kind="stable")[:params.sessions]] = True
        counts = np.bincount(items[items >= ITEM_OFFSET], minlength=n_items).astype(np.float64)
        index = fit_session_index(np.cumsum(kept)[session_index][kept[session_index]] - 1,
                                  items[kept[session_index]], seconds[kept[session_index]], n_items,
                                  SessionIndexParams(params.posting, params.length, params.recency_days, 0.0, 0))
        if params.idf:
            index.item_weight[ITEM_OFFSET:] = (1.0 + params.idf * np.log(S / np.maximum(counts, 1.0)))[ITEM_OFFSET:]
        return index
    known = items >= ITEM_OFFSET
    # distinct (session, item) with the item's last position: sort, keep the last of each run
    s, it, pos = session_index[known], items[known], position[known]
    order = np.lexsort((pos, it, s))
    s, it, pos = s[order], it[order], pos[order]
    last = np.concatenate([(s[1:] != s[:-1]) | (it[1:] != it[:-1]), [True]]) if len(s) else np.zeros(0, bool)
    s, it, pos = s[last], it[last], pos[last]                                   # one row per (session, item)
    distinct = np.bincount(s, minlength=S).astype(np.float64)                   # |N|

    weight = np.zeros(S + 1)
    has = distinct > 0
    weight[:S][has] = 1.0 / np.sqrt(distinct[has])
    if params.recency_days and S:
        finite = np.where(np.isfinite(last_time), last_time, 0.0)
        weight[:S] *= np.exp(-(finite.max() - finite) / (params.recency_days * 86400.0))

    # per session its L most recent distinct items (by last position, newest first)
    order = np.lexsort((-pos, s))
    s2, it2, pos2 = s[order], it[order], pos[order]
    rank = np.arange(len(s2)) - np.searchsorted(s2, s2)                         # 0 = newest in its session
    keep = rank < params.length
    out_items = np.zeros((S + 1, params.length), dtype=np.int32)
    out_positions = np.zeros((S + 1, params.length), dtype=np.float32)
    out_items[s2[keep], rank[keep]] = it2[keep]
    out_positions[s2[keep], rank[keep]] = pos2[keep]

    # per item its P most recent sessions (by the session's last event; ties: higher index)
    order = np.lexsort((-s, -last_time[s], it))
    it3, s3 = it[order], s[order]
    rank = np.arange(len(it3)) - np.searchsorted(it3, it3)
    keep = rank < params.posting
    posting = np.full((n_items, params.posting), S, dtype=np.int32)
    posting[it3[keep], rank[keep]] = s3[keep]

    item_weight = np.ones(n_items)
    if params.idf and len(items):
        counts = np.bincount(items[known], minlength=n_items).astype(np.float64)
        item_weight = 1.0 + params.idf * np.log(max(S, 1) / np.maximum(counts, 1.0))
    item_weight[:ITEM_OFFSET] = 0.0
    return SessionIndex(posting, weight.astype(np.float32), out_items, out_positions, item_weight.astype(np.float32))


class SessionNeighbourHead(nn.Module):
    """The index as buffers (saved in the checkpoint, constants in the ONNX graphs)."""

    def __init__(self, n_items: int, n_rows: int, posting: int, length: int, k: int, window: int,
                 spw: float = 0.5, ipw: float = 2.0, inh: float = 2.0):
        super().__init__()
        assert n_rows >= 1 and posting >= 1 and length >= 1 and k >= 1, "session neighbours: sizes >= 1"
        assert 1 <= window <= MAX_WINDOW, f"session neighbours: window must be in 1..{MAX_WINDOW}"
        assert spw > 0 and ipw >= 0 and inh >= 0, "session neighbours: spw > 0, ipw and inh >= 0 (0: off)"
        self.n_items, self.window, self.k = n_items, window, min(k, n_rows)
        self.ipw, self.inh = ipw, inh
        self.register_buffer("posting", torch.full((n_items, posting), n_rows - 1, dtype=torch.int32))
        self.register_buffer("session_weight", torch.zeros(n_rows))
        self.register_buffer("items", torch.zeros(n_rows, length, dtype=torch.int32))
        self.register_buffer("positions", torch.zeros(n_rows, length))
        self.register_buffer("item_weight", torch.zeros(n_items))
        back = torch.arange(window - 1, -1, -1, dtype=torch.float32)            # slot j is K-1-j steps back
        self.register_buffer("slot_weight", torch.exp(-back / spw), persistent=False)
        self.register_buffer("slot_bit", 2.0 ** torch.arange(window, dtype=torch.float32), persistent=False)

    def load_index(self, index: SessionIndex) -> None:
        for name, value in (("posting", index.posting), ("session_weight", index.session_weight),
                            ("items", index.items), ("positions", index.positions),
                            ("item_weight", index.item_weight)):
            buffer = getattr(self, name)
            assert value.shape == tuple(buffer.shape), f"session index {name} {value.shape} != {tuple(buffer.shape)}"
            buffer.copy_(torch.from_numpy(np.asarray(value)).to(buffer.dtype))

    def distribution(self, recent: torch.Tensor) -> torch.Tensor:
        """recent (Q, K) item indices, newest last -> (Q, n_items) summing to 1, or all 0
        when no recent item has a training session. Chunked outside export (the (Q, S+1)
        similarity rows are the memory cost)."""
        if torch.onnx.is_in_onnx_export() or recent.size(0) <= 256:
            return self._distribution(recent)
        return torch.cat([self._distribution(part) for part in recent.split(256)], dim=0)

    def _distribution(self, recent: torch.Tensor) -> torch.Tensor:
        Q, K = recent.shape
        S1 = self.session_weight.size(0)
        later = torch.ones(K, K, dtype=torch.bool, device=recent.device).triu(1)   # (K_j, K_m) m > j
        repeated = ((recent.unsqueeze(2) == recent.unsqueeze(1)) & later).any(dim=2)   # a newer slot holds it
        real = ((recent >= ITEM_OFFSET) & ~repeated).to(self.session_weight.dtype)      # (Q, K) distinct, known
        sessions = self.posting[recent].to(torch.int64).reshape(Q, -1)              # (Q, K*P)
        P = self.posting.size(1)

        def spread(values):                                                          # (Q, K) -> (Q, S+1)
            v = values.unsqueeze(2).expand(Q, K, P).reshape(Q, -1)                  # (Q, K*P)
            return torch.zeros(Q, S1, dtype=v.dtype, device=v.device).scatter_add(1, sessions, v)

        sim = spread(real * self.slot_weight) * self.session_weight                 # (Q, S+1)
        top, chosen = sim.topk(self.k, dim=1)                                       # (Q, k)
        factor = top
        if self.ipw:
            mask = spread(real * self.slot_bit).gather(1, chosen)                    # (Q, k) bits of shared slots
            newest = (mask.unsqueeze(2) >= self.slot_bit[1:].view(1, 1, -1)).to(top.dtype).sum(2)   # (Q, k) p*
            factor = factor * torch.exp((newest - (K - 1)) / self.ipw)
        items = self.items[chosen].to(torch.int64)                                  # (Q, k, L)
        value = factor.unsqueeze(2) * self.item_weight[items]                       # (Q, k, L)
        if self.inh:
            positions = self.positions[chosen]                                      # (Q, k, L)
            recent_real = torch.where(real > 0, recent, torch.full_like(recent, -1))   # (Q, K)
            shared = (items.unsqueeze(3) == recent_real.view(Q, 1, 1, K)).any(dim=3)   # (Q, k, L)
            q_star = (positions * shared.to(positions.dtype)).amax(dim=2, keepdim=True)  # (Q, k, 1)
            value = value * torch.exp(-(positions - q_star).abs() / self.inh)
        scores = torch.zeros(Q, self.n_items, dtype=value.dtype, device=value.device)
        scores = scores.scatter_add(1, items.reshape(Q, -1), value.reshape(Q, -1))  # (Q, n_items)
        return scores / scores.sum(dim=1, keepdim=True).clamp(min=1e-12)

    @staticmethod
    def mix(log_p: torch.Tensor, p_sess: torch.Tensor, b: float) -> torch.Tensor:
        """log_p (Q, n_items) log-probabilities -> log((1 - b) p + b p_sess), stably."""
        model = log_p + float(np.log1p(-b))
        sess = torch.log(p_sess.clamp(min=1e-30)) + float(np.log(b))
        top = torch.maximum(model, sess)
        return top + torch.log(torch.exp(model - top) + torch.exp(sess - top))
