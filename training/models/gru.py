"""GRU session model (GRU4Rec lineage) with a buy head and a next-item head.

    model = GRUModel(GRUConfig(n_items=2002, n_categories=53))
    buy_logit, next_item_logits = model(**inputs)   # (B, W), (B, W, n_items)

    # incremental: one event at a time, the hidden state carried by the caller
    state = model.initial_state(batch_size)          # (hidden (B, num_layers, H),)
    buy_logit, next_item_logits, state = model.step(*event_inputs, state)   # (B,), (B, n_items)
    hidden, state = model.encode_with_state(*window_inputs, length)         # state after length-1

Causal by construction: a unidirectional GRU's state at position t has read only
positions 0..t. Events are left-aligned, so padding after the last event never
reaches the positions that are read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from stream.features import WINDOW
from training.models.context import SessionContext
from training.models.embedding import OutputHeads, SessionEmbedding
from training.models.stack import WINDOW_CHANNELS, BuyStack, Norm
from training.models.neighbours import NeighbourHead, recent_per_position
from training.models.sessions import SessionNeighbourHead


@dataclass
class GRUConfig:
    n_items: int
    n_categories: int
    embedding_dim: int = 64
    hidden_dim: int = 96
    num_layers: int = 1
    small_dim: int = 8
    dropout: float = 0.1
    window: int = WINDOW
    # Off by default so checkpoints written before they existed rebuild unchanged;
    # `clickscore train` turns them on (see training/models/context.py).
    repeat: bool = False              # gated copy distribution over the window's items
    repeat_mode: str = "mixture"      # mixture (RepeatNet gate) or bonus (additive recency bonus)
    wide: bool = False                # session aggregates + pooled states into the buy head
    item_rates: bool = False          # wide: learned per-item buy propensity, session mean and max
    # Platt scaling of the buy logit, fitted on valid after training (train.py) and so
    # baked into both exported graphs: p = sigmoid(scale * logit + shift).
    calibration_scale: float = 1.0
    calibration_shift: float = 0.0
    # The stacked buy head (training/models/stack.py): the aggregate LightGBM in the graph,
    # fitted after training (train.fit_stack); 0 trees = off. Sizes rebuild the buffers.
    stack_trees: int = 0
    stack_nodes: int = 0
    stack_depth: int = 0
    stack_norm: tuple = (0.0, 1.0, 0.0, 1.0)          # dwell mean/std, price mean/std (features.json)[, oov_distinct]
    stack_blend: tuple = (1.0, 0.0, 0.0)              # buy logit = a * gbm + b * calibrated gru + c
    # Item-neighbour table (training/models/neighbours.py): top-N co-occurring items per
    # item, fitted on the training sessions; the last `neighbour_window` items' rows form
    # p_knn and the next-item output is log((1 - neighbour_mix) p_model + neighbour_mix p_knn),
    # neighbour_mix fitted on valid after training (train.py). 0 neighbours: off.
    neighbours: int = 0
    neighbour_window: int = 10
    neighbour_decay: float = 2.0
    neighbour_mix: float = 0.0
    neighbour_mode: str = "explore"   # explore: into the catalogue side of the repeat gate; output: the final scores
    # Session neighbours (training/models/sessions.py): VSTAN's neighbourhood of whole training
    # sessions as posting lists in the graph; the final next-item output becomes
    # log((1 - session_mix) p + session_mix p_sess), session_mix fitted on valid after
    # training (train.py). 0 session_neighbours (k) or 0 session_rows (S+1): off.
    session_neighbours: int = 0
    session_rows: int = 0
    session_posting: int = 500
    session_length: int = 20
    session_window: int = 10
    session_spw: float = 0.5
    session_ipw: float = 2.0
    session_inh: float = 2.0
    session_mix: float = 0.0

    def __post_init__(self):
        assert self.n_items > 2 and self.n_categories >= 3, "vocabularies hold padding/OOV/missing and at least one item"
        assert self.num_layers >= 1 and self.embedding_dim > 0 and self.hidden_dim > 0
        assert not self.neighbours or self.repeat or self.wide, \
            "neighbours need the window context (repeat or wide): the step state carries the recent items"
        assert 0.0 <= self.neighbour_mix < 1.0, "neighbour_mix is a mixture weight in [0, 1)"
        assert self.neighbour_mode in ("explore", "output"), f"neighbour_mode {self.neighbour_mode!r}"
        assert self.neighbour_window <= self.window, "neighbour_window cannot exceed the window"
        assert not self.session_neighbours or self.repeat or self.wide, \
            "session neighbours need the window context (repeat or wide): the step state carries the recent items"
        assert 0.0 <= self.session_mix < 1.0, "session_mix is a mixture weight in [0, 1)"
        assert self.session_window <= self.window, "session_window cannot exceed the window"


class GRUModel(nn.Module):
    kind = "gru"

    def __init__(self, config: GRUConfig):
        super().__init__()
        self.config = config
        self.embedding = SessionEmbedding(config.n_items, config.n_categories, config.embedding_dim,
                                          config.small_dim, config.dropout)
        self.gru = nn.GRU(config.embedding_dim, config.hidden_dim, num_layers=config.num_layers,
                          batch_first=True, dropout=config.dropout if config.num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(config.dropout)
        self.heads = OutputHeads(config.hidden_dim, self.embedding)
        self.context = (SessionContext(config.hidden_dim, self.embedding, config.window, config.repeat, config.wide,
                                       config.repeat_mode, config.item_rates)
                        if config.repeat or config.wide else None)
        self.state_names = ("hidden",) + (SessionContext.state_names if self.context is not None else ())
        self.neighbours = (NeighbourHead(config.n_items, config.neighbours, config.neighbour_window,
                                         config.neighbour_decay) if config.neighbours else None)
        self.sessions = (SessionNeighbourHead(config.n_items, config.session_rows, config.session_posting,
                                              config.session_length, config.session_neighbours,
                                              config.session_window, config.session_spw, config.session_ipw,
                                              config.session_inh)
                         if config.session_neighbours and config.session_rows else None)

        self.stack = None
        if config.stack_trees:
            self.attach_stack(BuyStack(config.n_items, config.stack_nodes, config.stack_trees, config.stack_depth,
                                       Norm(*config.stack_norm), tuple(config.stack_blend)))

    def attach_stack(self, stack: BuyStack | None):
        """Put (or, None, take off) the stacked buy head; the config records its sizes and
        blend so a checkpoint rebuilds it."""
        c = self.config
        self.stack = stack
        base = ("hidden",) + (SessionContext.state_names if self.context is not None else ())
        if stack is None:
            c.stack_trees = c.stack_nodes = c.stack_depth = 0
            self.state_names = base
            return
        c.stack_trees, c.stack_nodes, c.stack_depth = len(stack.roots), len(stack.feature), stack.depth
        n = stack.norm
        c.stack_norm = (n.dwell_mean, n.dwell_std, n.price_mean, n.price_std) + ((True,) if n.oov_distinct else ())
        c.stack_blend = (stack.blend_gbm, stack.blend_gru, stack.blend_bias)
        self.state_names = base + ("stack_window",)

    def buy_output(self, gru_logit, features=None):
        """The GRU's buy logit (calibrated), blended with the in-graph GBM when stacked."""
        logit = self.calibrated(gru_logit)
        if self.stack is None:
            return logit
        return self.stack.blend(self.stack.gbm_logit(features), logit)

    @staticmethod
    def _stack_inputs(inputs):
        event_type, item, category, hour, weekday, _month, _week, dwell, price = inputs
        return event_type, item, category, hour, weekday, dwell, price

    @property
    def _explore_mix(self) -> bool:
        """The neighbours mix into the explore side of the repeat gate (context.outputs)."""
        c = self.config
        return (self.neighbours is not None and c.neighbour_mix > 0 and c.neighbour_mode == "explore"
                and c.repeat and c.repeat_mode == "mixture")

    def knn_of(self, recent):
        """Recent items (Q, >=K) newest last -> (p_knn (Q, n_items), a) for context.outputs, or None."""
        if not self._explore_mix:
            return None
        recent = recent[:, -self.config.neighbour_window:].to(torch.int64)    # (Q, K)
        return self.neighbours.distribution(recent), self.config.neighbour_mix

    def with_neighbours(self, scores, recent):
        """Output mode: next-item scores (Q, n_items) and the last K items (Q, K) -> the
        neighbour mixture's log-probabilities (unchanged while the mixture weight is 0)."""
        a = self.config.neighbour_mix
        if self.neighbours is None or a == 0.0 or self._explore_mix:
            return scores
        return self.neighbours.mix(torch.log_softmax(scores, dim=-1), recent.to(torch.int64), a)

    def with_sessions(self, scores, recent):
        """Next-item scores (Q, n_items) and recent items (Q, >=K) newest last -> the session-
        neighbour mixture's log-probabilities (unchanged while its weight is 0)."""
        b = self.config.session_mix
        if self.sessions is None or b == 0.0:
            return scores
        recent = recent[:, -self.config.session_window:].to(torch.int64)      # (Q, K)
        return self.sessions.mix(torch.log_softmax(scores, dim=-1), self.sessions.distribution(recent), b)

    def calibrated(self, buy_logit):
        """Platt scaling fitted on valid (identity until train.py fits it)."""
        c = self.config
        if c.calibration_scale == 1.0 and c.calibration_shift == 0.0:
            return buy_logit
        return buy_logit * c.calibration_scale + c.calibration_shift

    def outputs_masked(self, hidden, inputs, mask, aux: dict | None = None):
        """hidden (B, W, H), the 9 inputs (B, W), mask (B, W) -> (buy logit (Q,), next-item
        scores (Q, n_items)) at the Q positions where mask is true (training, validation)."""
        features = (self.stack.features(*self._stack_inputs(inputs))[mask]     # (Q, F)
                    if self.stack is not None else None)
        if self.context is None:
            picked = hidden[mask]                                          # (Q, H)
            return self.buy_output(self.heads.buy_logit(picked), features), self.heads.next_item_logits(picked)
        event_type, item, *_rest, dwell, price = inputs
        tensors = self.context.window_tensors(hidden, item, event_type, dwell, price)
        recent = (recent_per_position(item, self.config.neighbour_window)[mask]            # (Q, K)
                  if self.neighbours is not None and self.config.neighbour_mix else None)
        buy_logit, scores = self.context.outputs(self.context.pick(tensors, mask), self.heads, aux,
                                                 knn=self.knn_of(recent) if recent is not None else None)
        if recent is not None:
            scores = self.with_neighbours(scores, recent)
        if self.sessions is not None and self.config.session_mix:
            scores = self.with_sessions(scores, recent_per_position(item, self.config.session_window)[mask])
        return self.buy_output(buy_logit, features), scores

    def score_last(self, event_type, item, category, hour, weekday, month, week, dwell, price, length):
        """The exported window graph: inputs (B, W), length (B,) -> (buy probability (B,),
        next-item scores (B, n_items), *state after position length-1)."""
        hidden, state = self.encode_with_state(event_type, item, category, hour, weekday, month, week,
                                               dwell, price, length)   # (B, W, H)
        last = (length - 1).clamp(min=0)
        features, stack_state = None, ()
        if self.stack is not None:
            stack_inputs = (event_type, item, category, hour, weekday, dwell, price)
            every = self.stack.features(*stack_inputs)                     # (B, W, F)
            features = every.gather(1, last.view(-1, 1, 1).expand(-1, 1, every.size(2))).squeeze(1)   # (B, F)
            stack_state = (BuyStack.window_after(stack_inputs, length, self.config.window),)
        if self.context is None:
            final = hidden.gather(1, last.view(-1, 1, 1).expand(-1, 1, hidden.size(2))).squeeze(1)   # (B, H)
            buy_logit, scores = self.heads.buy_logit(final), self.heads.next_item_logits(final)
            return torch.sigmoid(self.buy_output(buy_logit, features)), scores, *state, *stack_state
        picked = self.context.last_tensors(hidden, item, event_type, dwell, price, length)
        recent = self.context.recent_after(item, length)                   # (B, W) newest last
        buy_logit, scores = self.context.outputs(picked, self.heads, knn=self.knn_of(recent))
        seen = (length > 0).to(hidden.dtype).view(-1, 1)                   # (B, 1): empty window, zero state
        context_state = (recent, picked["totals"] * seen, picked["state_mean"] * seen)
        scores = self.with_neighbours(scores, recent[:, -self.config.neighbour_window:])   # (B, K) newest last
        scores = self.with_sessions(scores, recent)
        return (torch.sigmoid(self.buy_output(buy_logit, features)), scores, *state, *context_state,
                *stack_state)

    def encode(self, event_type, item, category, hour, weekday, month, week, dwell, price):
        """Inputs (B, W) -> per-position state (B, W, hidden_dim)."""
        x = self.embedding(event_type, item, category, hour, weekday, month, week, dwell, price)  # (B, W, E)
        hidden, _ = self.gru(x)                   # (B, W, H); initial state zeros = new session
        return self.dropout(hidden)

    def forward(self, event_type, item, category, hour, weekday, month, week, dwell, price):
        inputs = (event_type, item, category, hour, weekday, month, week, dwell, price)
        hidden = self.encode(*inputs)             # (B, W, H)
        everywhere = torch.ones_like(item, dtype=torch.bool)
        buy_logit, scores = self.outputs_masked(hidden, inputs, everywhere)   # (B*W,), (B*W, n_items)
        return buy_logit.view(item.shape), scores.view(*item.shape, -1)   # (B, W), (B, W, n_items)

    # -- incremental scoring -----------------------------------------------------------
    # The state is a tuple in `state_names` order, batch first: (hidden (B, num_layers, H),).
    # Batch first because the worker stacks one row per session.

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-session state shapes (batch dimension left out), in `state_names` order."""
        shapes = {"hidden": (self.config.num_layers, self.config.hidden_dim)}
        if self.context is not None:
            shapes.update(self.context.state_shapes(self.config.hidden_dim))
        if self.stack is not None:
            shapes["stack_window"] = (self.config.window, len(WINDOW_CHANNELS))
        return shapes

    def initial_state(self, batch_size: int) -> tuple[torch.Tensor]:
        """The state of a session before its first event: zeros, as nn.GRU starts."""
        state = (torch.zeros(batch_size, self.config.num_layers, self.config.hidden_dim),)
        if self.context is not None:
            state += self.context.initial_state(batch_size, self.config.hidden_dim)
        if self.stack is not None:
            state += (torch.zeros(batch_size, self.config.window, len(WINDOW_CHANNELS)),)
        return state

    def step(self, event_type, item, category, hour, weekday, month, week, dwell, price, state):
        """One event per session: inputs (B,) each, state -> (buy logit (B,), next-item
        logits (B, n_items), new state). Equals forward() at that position for a session
        stepped from initial_state() (eval mode: no dropout). The same nn.GRU runs one
        position (one fused GRU node per layer in ONNX, as in the window graph)."""
        x = self.embedding(event_type, item, category, hour, weekday, month, week, dwell, price)  # (B,) each -> (B, E)
        hidden = state[0]                                                  # (B, L, H)
        out, new_hidden = self.gru(x.unsqueeze(1), hidden.transpose(0, 1).contiguous())   # (B, 1, H), (L, B, H)
        out = out.squeeze(1)                                               # (B, H)
        features, stack_state = None, ()
        if self.stack is not None:   # its window is the last state
            features, window = self.stack.step(event_type, item, category, hour, weekday, dwell, price, state[-1])
            stack_state, state = (window,), state[:-1]
        if self.context is None:
            return (self.buy_output(self.heads.buy_logit(out), features), self.heads.next_item_logits(out),
                    (new_hidden.transpose(0, 1), *stack_state))
        buy_logit, scores, context_state = self.context.step(out, item, event_type, dwell, price, state[1:],
                                                             self.heads, knn_of=self.knn_of)
        scores = self.with_neighbours(scores, context_state[0][:, -self.config.neighbour_window:])   # (B, K) newest last
        scores = self.with_sessions(scores, context_state[0])
        return (self.buy_output(buy_logit, features), scores,
                (new_hidden.transpose(0, 1), *context_state, *stack_state))

    def encode_with_state(self, event_type, item, category, hour, weekday, month, week, dwell, price,
                          length):
        """Window inputs (B, W) and length (B,) -> (per-position state (B, W, H), the
        step state after position length-1: a cache miss rebuilds a session in one call).
        An empty window (length 0) gives the initial (zero) state."""
        x = self.embedding(event_type, item, category, hour, weekday, month, week, dwell, price)  # (B, W, E)
        last = (length - 1).clamp(min=0).view(-1, 1, 1)                   # (B, 1, 1)
        seen = (length > 0).to(x.dtype).view(-1, 1)                        # (B, 1)
        finals = []
        if self.config.num_layers == 1:
            x, _ = self.gru(x)                                             # (B, W, H)
            finals.append(x.gather(1, last.expand(-1, 1, x.size(2))).squeeze(1) * seen)   # (B, H)
        else:
            # Layer by layer with the same weights, so each layer's state at length-1 is read.
            for layer in range(self.config.num_layers):
                x = _gru_layer(self.gru, layer, x)                         # (B, W, H)
                finals.append(x.gather(1, last.expand(-1, 1, x.size(2))).squeeze(1) * seen)
        return self.dropout(x), (torch.stack(finals, dim=1),)             # (B, W, H), ((B, L, H),)


def _gru_layer(gru: nn.GRU, layer: int, x):
    """Layer `layer` of a multi-layer nn.GRU on its own (eval mode: no inter-layer dropout)."""
    single = nn.GRU(x.size(2), gru.hidden_size, batch_first=True)
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        setattr(single, f"{name}_l0", getattr(gru, f"{name}_l{layer}"))
    out, _ = single(x)
    return out
