"""The input layer both model families share: the 9 encoded (B, W) inputs of
stream.features.encode_windows -> one vector per position, (B, W, embedding_dim).

Concatenate-then-project rather than sum: the vocabularies differ by orders of
magnitude (4 event types, 25 hours, thousands of items), so each feature gets an
embedding as wide as it can use (`small_dim` for the calendar and event type,
`embedding_dim` for the item, half of it for the category), and the linear
projection learns interactions (e.g. add-to-cart x price) that a sum would have to
squeeze into one shared space. The item embedding is exactly `embedding_dim` wide so
the next-item head can be tied to it (logits = h . E_item^T).
Index 0 is padding everywhere (padding_idx=0: a zero vector that gets no gradient).
"""
from __future__ import annotations

import torch
from torch import nn

from stream.features import N_EVENT_TYPES, N_HOURS, N_MONTHS, N_WEEKDAYS, N_WEEKS

CATEGORICAL_INPUTS = ("event_type", "item", "category", "hour", "weekday", "month", "week")
SCALAR_INPUTS = ("dwell", "price")


class SessionEmbedding(nn.Module):
    def __init__(self, n_items: int, n_categories: int, embedding_dim: int, small_dim: int = 8,
                 dropout: float = 0.0):
        super().__init__()
        category_dim = max(small_dim, embedding_dim // 2)
        self.item = nn.Embedding(n_items, embedding_dim, padding_idx=0)
        self.category = nn.Embedding(n_categories, category_dim, padding_idx=0)
        self.event_type = nn.Embedding(N_EVENT_TYPES, small_dim, padding_idx=0)
        self.hour = nn.Embedding(N_HOURS, small_dim, padding_idx=0)
        self.weekday = nn.Embedding(N_WEEKDAYS, small_dim, padding_idx=0)
        self.month = nn.Embedding(N_MONTHS, small_dim, padding_idx=0)
        self.week = nn.Embedding(N_WEEKS, small_dim, padding_idx=0)
        concat_dim = embedding_dim + category_dim + 5 * small_dim + len(SCALAR_INPUTS)
        self.project = nn.Linear(concat_dim, embedding_dim)
        self.dropout = nn.Dropout(dropout)
        nn.init.normal_(self.item.weight, std=embedding_dim ** -0.5)
        with torch.no_grad():
            self.item.weight[0].zero_()

    def forward(self, event_type, item, category, hour, weekday, month, week, dwell, price):
        """Each input (B, W) -> (B, W, embedding_dim); or one event per session, each
        input (B,) -> (B, embedding_dim), as the step graphs call it."""
        parts = [
            self.item(item),                      # (B, W, E)
            self.category(category),              # (B, W, E/2)
            self.event_type(event_type),          # (B, W, S)
            self.hour(hour), self.weekday(weekday), self.month(month), self.week(week),
            dwell.unsqueeze(-1), price.unsqueeze(-1),   # (B, W, 1) each
        ]
        x = torch.cat(parts, dim=-1)              # (B, W, E + E/2 + 5S + 2)
        return self.dropout(torch.relu(self.project(x)))   # (B, W, E)


class OutputHeads(nn.Module):
    """Per-position heads on a (B, W, H) state: buy logit and next-item logits.

    The next-item head projects to the item-embedding width and scores against the
    item embedding itself (weight tying): half the parameters of a separate output
    layer, and rarely seen items share what their input embedding learned.
    """

    def __init__(self, hidden_dim: int, embedding: SessionEmbedding):
        super().__init__()
        self.item_embedding = embedding.item      # shared module, not a copy
        self.buy = nn.Linear(hidden_dim, 1)
        self.to_item_space = nn.Linear(hidden_dim, embedding.item.embedding_dim)
        self.item_bias = nn.Parameter(torch.zeros(embedding.item.num_embeddings))

    def buy_logit(self, hidden):
        return self.buy(hidden).squeeze(-1)                   # (..., H) -> (...)

    def next_item_logits(self, hidden):
        query = self.to_item_space(hidden)                    # (..., E)
        return query @ self.item_embedding.weight.t() + self.item_bias   # (..., n_items)

    def forward(self, hidden):
        return self.buy_logit(hidden), self.next_item_logits(hidden)
