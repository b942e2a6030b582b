"""GRU session model (GRU4Rec lineage) with a buy head and a next-item head.

    model = GRUModel(GRUConfig(n_items=2002, n_categories=53))
    buy_logit, next_item_logits = model(**inputs)   # (B, W), (B, W, n_items)

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
