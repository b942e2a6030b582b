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
from training.models.embedding import OutputHeads, SessionEmbedding


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

    def __post_init__(self):
        assert self.n_items > 2 and self.n_categories >= 3, "vocabularies hold padding/OOV/missing and at least one item"
        assert self.num_layers >= 1 and self.embedding_dim > 0 and self.hidden_dim > 0


class GRUModel(nn.Module):
    kind = "gru"
    state_names = ("hidden",)

    def __init__(self, config: GRUConfig):
        super().__init__()
        self.config = config
        self.embedding = SessionEmbedding(config.n_items, config.n_categories, config.embedding_dim,
                                          config.small_dim, config.dropout)
        self.gru = nn.GRU(config.embedding_dim, config.hidden_dim, num_layers=config.num_layers,
                          batch_first=True, dropout=config.dropout if config.num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(config.dropout)
        self.heads = OutputHeads(config.hidden_dim, self.embedding)

    def encode(self, event_type, item, category, hour, weekday, month, week, dwell, price):
        """Inputs (B, W) -> per-position state (B, W, hidden_dim)."""
        x = self.embedding(event_type, item, category, hour, weekday, month, week, dwell, price)  # (B, W, E)
        hidden, _ = self.gru(x)                   # (B, W, H); initial state zeros = new session
        return self.dropout(hidden)

    def forward(self, event_type, item, category, hour, weekday, month, week, dwell, price):
        hidden = self.encode(event_type, item, category, hour, weekday, month, week, dwell, price)
        return self.heads(hidden)                 # (B, W), (B, W, n_items)

    # -- incremental scoring -----------------------------------------------------------
    # The state is a tuple in `state_names` order, batch first: (hidden (B, num_layers, H),).
    # Batch first because the worker stacks one row per session.

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-session state shapes (batch dimension left out), in `state_names` order."""
        return {"hidden": (self.config.num_layers, self.config.hidden_dim)}

    def initial_state(self, batch_size: int) -> tuple[torch.Tensor]:
        """The state of a session before its first event: zeros, as nn.GRU starts."""
        return (torch.zeros(batch_size, self.config.num_layers, self.config.hidden_dim),)

    def step(self, event_type, item, category, hour, weekday, month, week, dwell, price, state):
        """One event per session: inputs (B,) each, state -> (buy logit (B,), next-item
        logits (B, n_items), new state). Equals forward() at that position for a session
        stepped from initial_state() (eval mode: no dropout). The same nn.GRU runs one
        position (one fused GRU node per layer in ONNX, as in the window graph)."""
        x = self.embedding(event_type, item, category, hour, weekday, month, week, dwell, price)  # (B,) each -> (B, E)
        (hidden,) = state                                                  # (B, L, H)
        out, new_hidden = self.gru(x.unsqueeze(1), hidden.transpose(0, 1).contiguous())   # (B, 1, H), (L, B, H)
        out = out.squeeze(1)                                               # (B, H)
        return self.heads.buy_logit(out), self.heads.next_item_logits(out), (new_hidden.transpose(0, 1),)

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
