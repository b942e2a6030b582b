"""Heads that read the session window besides the encoder state: a repeat (copy)
distribution over the items already in the window, and wide session aggregates for
the buy head. Everything is computed inside the model from the 9 window inputs, so
the exported graphs need no new inputs, and everything can be stepped exactly.

    ctx = SessionContext(hidden_dim=96, embedding=model.embedding, window=100, repeat=True, wide=True)
    per_position = ctx.window_tensors(hidden, inputs)        # dict of (B, W, ..) tensors
    buy_logit, scores = ctx.outputs(picked, heads)           # picked = ctx.pick(per_position, mask)

Repeat (RepeatNet, Ren et al. 2019, reduced to one attention): 34% of yoochoose-100k
test targets are items already in the session and 26% repeat the last click, which a
softmax over the whole catalogue has to learn from the state alone. Here a gate
g = sigmoid(w . h_t) mixes two distributions:
    p(i) = (1 - g) softmax(explore logits)_i + g sum_{s <= t, item_s = i} alpha_ts
    alpha_ts = softmax_s(q(h_t) . E_item[item_s] + recency[t - s])
and the head returns log p (normalised: cross-entropy on it is the mixture's NLL).

Wide (wide-and-deep, Cheng et al. 2016): cumulative aggregates over positions <= t
(events, counts per event type, distinct items, mean dwell and price) and the mean of
the encoder states (pooling over time, not only the last state) are fed with h_t to
the buy head through one hidden layer.

Step state (`recent_items` (B, W) float item indices, newest last; `totals` (B, F)
running counts and means; `state_mean` (B, H) running mean of encoder states) makes the step graph
equal the window graph for sessions of <= W events (as for the GRU state itself).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from stream.features import N_EVENT_TYPES

# running totals per event: count, one per event type, first occurrences of items (all exact
# integers in float32), then the running MEANS of dwell and price (means, not sums: a sum of
# 100 floats drifts by more than the 1e-5 step parity allows between cumsum and stepping)
# then running MAXIMA (floored at 0, the zero initial state) of dwell, price and item buy propensity.
N_COUNTS = 1 + N_EVENT_TYPES + 1
N_MEANS = 3                                 # dwell, price, item buy propensity
N_MAXIMA = 3                                # the same three
N_TOTALS = N_COUNTS + N_MEANS + N_MAXIMA
N_WIDE = 1 + 2 * N_EVENT_TYPES + 2 + N_MEANS + N_MAXIMA   # features made from the totals (wide_features)
REPEAT_MODES = ("mixture", "bonus")


def wide_features(totals):
    """Running sums (..., N_TOTALS) -> scale-free aggregates (..., N_WIDE)."""
    n = totals[..., :1].clamp(min=1.0)                        # (..., 1) events so far
    counts = totals[..., 1:1 + N_EVENT_TYPES]                 # (..., T)
    distinct = totals[..., 1 + N_EVENT_TYPES:2 + N_EVENT_TYPES]
    rest = totals[..., N_COUNTS:]                             # (..., N_MEANS + N_MAXIMA)
    return torch.cat([torch.log1p(n), torch.log1p(counts), counts / n, torch.log1p(distinct), distinct / n,
                      rest], dim=-1)


class SessionContext(nn.Module):
    state_names = ("recent_items", "totals", "state_mean")

    def __init__(self, hidden_dim: int, embedding, window: int, repeat: bool, wide: bool,
                 repeat_mode: str = "mixture", item_rates: bool = False):
        super().__init__()
        assert repeat_mode in REPEAT_MODES, f"repeat_mode {repeat_mode!r} is not one of {REPEAT_MODES}"
        self.window, self.repeat, self.wide, self.repeat_mode = window, repeat, wide, repeat_mode
        self.item_embedding = embedding.item             # shared with the input and the output layer
        dim = embedding.item.embedding_dim
        if repeat:
            self.query = nn.Linear(hidden_dim, dim)
            self.recency = nn.Parameter(torch.zeros(window))   # bonus by distance t - s
            self.gate = nn.Linear(hidden_dim, 1)
        self.item_rates = item_rates
        if item_rates:
            # a learned buy propensity per item (the neural twin of the aggregate baseline's
            # item buy rate), read only by the buy head through its session mean and maximum
            self.item_buy = nn.Embedding(embedding.item.num_embeddings, 1, padding_idx=0)
            nn.init.zeros_(self.item_buy.weight)
        if wide:
            self.wide_norm = nn.LayerNorm(N_WIDE)
            self.wide = nn.Sequential(nn.Linear(2 * hidden_dim + N_WIDE, hidden_dim), nn.ReLU())

    def state_shapes(self, hidden_dim: int) -> dict[str, tuple[int, ...]]:
        return {"recent_items": (self.window,), "totals": (N_TOTALS,), "state_mean": (hidden_dim,)}

    def initial_state(self, batch_size: int, hidden_dim: int):
        return (torch.zeros(batch_size, self.window), torch.zeros(batch_size, N_TOTALS),
                torch.zeros(batch_size, hidden_dim))

    # -- per-event running sums -------------------------------------------------------

    def _propensity(self, item, like):
        return self.item_buy(item).squeeze(-1) if self.item_rates else torch.zeros_like(like)

    @staticmethod
    def _event_counts(event_type, first, like):
        """Per event (...,) -> its contribution to the running counts (..., N_COUNTS)."""
        one = torch.ones_like(like).unsqueeze(-1)
        kinds = F.one_hot(event_type, N_EVENT_TYPES).to(like.dtype)           # (..., T)
        return torch.cat([one, kinds, first.unsqueeze(-1)], dim=-1)

    # -- window graph -----------------------------------------------------------------

    def window_tensors(self, hidden, item, event_type, dwell, price):
        """hidden (B, W, H) and inputs (B, W) -> what the heads need at every position t:
        hidden, items (B, W), attention logits (B, W, W) over s (-inf where s > t or padding),
        wide features (B, W, N_WIDE), pooled state (B, W, H), totals (B, W, N_TOTALS)."""
        B, W, _ = hidden.shape
        pos = torch.arange(W, device=item.device)
        out = {"hidden": hidden, "item": item}
        real = item != 0                                                      # (B, W)
        if self.repeat:
            keys = self.item_embedding(item)                                  # (B, W, E)
            query = self.query(hidden)                                        # (B, W, E)
            distance = pos.view(W, 1) - pos.view(1, W)                        # (W_t, W_s) t - s
            allowed = (distance >= 0).unsqueeze(0) & real.unsqueeze(1)        # (B, W_t, W_s)
            bonus = self.recency[distance.clamp(min=0)]                      # (W, W)
            logits = (query @ keys.transpose(1, 2) if self.repeat_mode == "mixture" else 0.0) + bonus   # (B, W_t, W_s)
            out["attention"] = logits.masked_fill(~allowed, float("-inf"))
        same = item.unsqueeze(2) == item.unsqueeze(1)                         # (B, W_s, W_r)
        earlier = (pos.view(W, 1) > pos.view(1, W)).unsqueeze(0)              # r < s
        first = 1.0 - (same & earlier).any(dim=2).to(hidden.dtype)            # (B, W)
        counts = torch.cumsum(self._event_counts(event_type, first, dwell), dim=1)   # (B, W, N_COUNTS)
        values = torch.stack([dwell, price, self._propensity(item, dwell)], dim=-1)  # (B, W, 3)
        n = (pos + 1).to(hidden.dtype).view(1, W, 1)                          # events up to t
        means = torch.cumsum(values, dim=1) / n                               # (B, W, 3)
        upto = (pos.view(W, 1) >= pos.view(1, W)).view(1, W, W, 1)           # s <= t
        # floored at 0 like the step graph (its zero initial state): without the clamp a batch
        # trimmed to its longest window left that window's last position unfloored (a training/serving skew)
        maxima = torch.where(upto, values.unsqueeze(1), torch.zeros_like(values).unsqueeze(1)).amax(dim=2)
        maxima = maxima.clamp(min=0.0)                                        # (B, W_t, 3)
        out["totals"] = torch.cat([counts, means, maxima], dim=-1)            # (B, W, N_TOTALS)
        out["state_mean"] = torch.cumsum(hidden, dim=1) / n                   # (B, W, H)
        return out

    @staticmethod
    def pick(tensors: dict, mask):
        """Training: the positions where mask (B, W) is true -> dict of (Q, ..)."""
        picked = {"hidden": tensors["hidden"][mask], "totals": tensors["totals"][mask],
                  "state_mean": tensors["state_mean"][mask]}
        W = mask.size(1)
        picked["item"] = tensors["item"].unsqueeze(1).expand(-1, W, -1)[mask]   # (Q, W_s)
        if "attention" in tensors:
            picked["attention"] = tensors["attention"][mask]                  # (Q, W_s)
        return picked

    def last_tensors(self, hidden, item, event_type, dwell, price, length):
        """Export: what window_tensors() and pick() give at position length-1 of each
        window, (B, ..), computed for that position alone. The exported window graph needs
        nothing else, and window_tensors' (B, W, W) attention logits and (B, W, W, 3) masked
        copy for the running maxima were 44% of its time at batch 256 (onnxruntime profile,
        issue 11). Here the attention row and the maxima are (B, W); the counts, means and
        pooled state keep window_tensors' cumsums, so each value is computed the same way
        (tests/test_models.py checks the result against forward() and the step graph)."""
        B, W, _ = hidden.shape
        pos = torch.arange(W, device=item.device)
        last = (length - 1).clamp(min=0)                                      # (B,); empty window: position 0

        def at(x):                                                            # (B, W, D) -> (B, D)
            return x.gather(1, last.view(-1, 1, 1).expand(-1, 1, x.size(2))).squeeze(1)

        h = at(hidden)                                                        # (B, H)
        out = {"hidden": h, "item": item}
        upto = pos.view(1, W) <= last.view(-1, 1)                             # (B, W_s) s <= t
        if self.repeat:
            distance = (last.view(-1, 1) - pos.view(1, W)).clamp(min=0)      # (B, W_s) t - s
            logits = self.recency[distance]                                   # (B, W_s)
            if self.repeat_mode == "mixture":
                keys = self.item_embedding(item)                              # (B, W, E)
                logits = (keys @ self.query(h).unsqueeze(2)).squeeze(2) + logits
            out["attention"] = logits.masked_fill(~(upto & (item != 0)), float("-inf"))
        same = item.unsqueeze(2) == item.unsqueeze(1)                         # (B, W_s, W_r)
        earlier = (pos.view(W, 1) > pos.view(1, W)).unsqueeze(0)              # r < s
        first = 1.0 - (same & earlier).any(dim=2).to(hidden.dtype)            # (B, W)
        counts = at(torch.cumsum(self._event_counts(event_type, first, dwell), dim=1))   # (B, N_COUNTS)
        values = torch.stack([dwell, price, self._propensity(item, dwell)], dim=-1)  # (B, W, 3)
        n = (pos + 1).to(hidden.dtype).view(1, W, 1)
        means = at(torch.cumsum(values, dim=1) / n)                           # (B, 3)
        maxima = torch.where(upto.unsqueeze(2), values, torch.zeros_like(values)).amax(dim=1)
        out["totals"] = torch.cat([counts, means, maxima.clamp(min=0.0)], dim=-1)   # (B, N_TOTALS)
        out["state_mean"] = at(torch.cumsum(hidden, dim=1) / n)               # (B, H)
        return out

    def recent_after(self, item, length):
        """Window items (B, W) -> the step state's recent_items after position length-1:
        slot j holds position length-W+j (0 before the session), as floats."""
        W = self.window
        index = (length - W).view(-1, 1) + torch.arange(W, device=item.device).view(1, W)   # (B, W)
        taken = item.gather(1, index.clamp(min=0))
        return torch.where(index >= 0, taken, torch.zeros_like(taken)).to(torch.float32)

    # -- heads ------------------------------------------------------------------------

    def outputs(self, picked: dict, heads, aux: dict | None = None, knn=None):
        """Picked (Q, ..) tensors -> (buy logit (Q,), next-item log-scores (Q, n_items)).
        `aux`, when given, receives the catalogue (explore) logits: training adds their own
        cross-entropy, so the item embeddings learn as fast as without the repeat path.
        `knn`, when given, is (a neighbour distribution (Q, n_items), weight a): the explore
        side of the mixture becomes (1 - a) softmax(logits) + a p_knn (models/neighbours.py),
        so the repeat gate still decides between the session's items and the catalogue."""
        h = picked["hidden"]
        if self.wide:
            pooled = picked["state_mean"]                                     # (Q, H) mean state so far
            features = self.wide_norm(wide_features(picked["totals"]))        # (Q, N_WIDE)
            buy_logit = heads.buy_logit(self.wide(torch.cat([h, pooled, features], dim=-1)))
        else:
            buy_logit = heads.buy_logit(h)
        logits = heads.next_item_logits(h)                                    # (Q, n_items)
        if aux is not None:
            aux["explore"] = logits
        if not self.repeat:
            return buy_logit, logits
        if self.repeat_mode == "bonus":
            # additive: every earlier occurrence of an item adds recency[t - s] + gate(h_t) to
            # its logit; one softmax, so the whole catalogue keeps its full gradient
            attention = picked["attention"]
            bonus = torch.where(torch.isinf(attention), torch.zeros_like(attention), attention + self.gate(h))
            return buy_logit, logits + torch.zeros_like(logits).scatter_add(1, picked["item"], bonus)
        alpha = torch.softmax(picked["attention"], dim=-1)                    # (Q, W_s)
        alpha = torch.where(torch.isnan(alpha), torch.zeros_like(alpha), alpha)   # no real event: no repeat
        repeat_p = torch.zeros_like(logits).scatter_add(1, picked["item"], alpha)   # (Q, n_items)
        gate = torch.sigmoid(self.gate(h))                                    # (Q, 1)
        explore = torch.log_softmax(logits, dim=-1)
        if knn is not None:
            explore = _log_mix(explore, knn[0], knn[1])
        explore = torch.log1p(-gate + 1e-6) + explore
        repeat = torch.log(gate + 1e-6) + torch.log(repeat_p.clamp(min=1e-30))
        top = torch.maximum(explore, repeat)
        return buy_logit, top + torch.log(torch.exp(explore - top) + torch.exp(repeat - top))

    # -- step graph -------------------------------------------------------------------

    def step(self, h, item, event_type, dwell, price, state, heads, knn_of=None):
        """One event: encoder output h (B, H), inputs (B,), context state -> (buy logit,
        log-scores, new context state); equals the window graph at that position.
        `knn_of`: recent items (B, W) newest last -> the `knn` argument of outputs(), or None."""
        recent, totals, state_mean = state
        previous = recent.to(torch.int64)                                     # (B, W)
        seen = ((previous == item.view(-1, 1)) & (previous != 0)).any(dim=1)
        first = 1.0 - seen.to(h.dtype)
        counts = totals[:, :N_COUNTS] + self._event_counts(event_type, first, dwell)   # (B, N_COUNTS)
        values = torch.stack([dwell, price, self._propensity(item, dwell)], dim=-1)  # (B, 3)
        means = totals[:, N_COUNTS:N_COUNTS + N_MEANS]
        means = means + (values - means) / counts[:, :1]                      # running means
        maxima = torch.maximum(totals[:, N_COUNTS + N_MEANS:], values)
        totals = torch.cat([counts, means, maxima], dim=1)
        state_mean = state_mean + (h - state_mean) / counts[:, :1]
        items = torch.cat([previous[:, 1:], item.view(-1, 1)], dim=1)        # (B, W) newest last
        picked = {"hidden": h, "totals": totals, "state_mean": state_mean, "item": items}
        if self.repeat:
            if self.repeat_mode == "mixture":
                keys = self.item_embedding(items)                             # (B, W, E)
                logits = (keys @ self.query(h).unsqueeze(2)).squeeze(2)      # (B, W)
            else:
                logits = torch.zeros_like(items, dtype=h.dtype)
            logits = logits + self.recency.flip(0)                            # slot j is W-1-j events back
            picked["attention"] = logits.masked_fill(items == 0, float("-inf"))
        buy_logit, scores = self.outputs(picked, heads, knn=knn_of(items) if knn_of is not None else None)
        return buy_logit, scores, (items.to(torch.float32), totals, state_mean)


def _log_mix(log_p, q, a: float):
    """log_p (Q, n) log-probabilities, q (Q, n) probabilities -> log((1 - a) p + a q), stably."""
    import math

    first = log_p + math.log1p(-a)
    second = torch.log(q.clamp(min=1e-30)) + math.log(a)
    top = torch.maximum(first, second)
    return top + torch.log(torch.exp(first - top) + torch.exp(second - top))
