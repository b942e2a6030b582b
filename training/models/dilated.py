"""Dilated causal convolution session model (WaveNet / NextItNet style).

    model = DilatedConvModel(DilatedConfig(n_items=2002, n_categories=53))
    buy_logit, next_item_logits = model(**inputs)   # (B, W), (B, W, n_items)

A stack of residual blocks, each a causal 1-D convolution (kernel k, dilation d,
left-padded by (k-1)*d so position t reads t, t-d, .., t-(k-1)d and nothing later),
LayerNorm, ReLU and a 1x1 convolution back into the residual stream. The receptive
field is 1 + (k-1) * sum(dilations); the config refuses one shorter than the window,
so every prediction can see the whole <= 100-event window (1,2,4,..,32 x k=3 -> 127).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from stream.features import WINDOW
from training.models.embedding import OutputHeads, SessionEmbedding


@dataclass
class DilatedConfig:
    n_items: int
    n_categories: int
    embedding_dim: int = 64
    hidden_dim: int = 96
    kernel_size: int = 3
    dilations: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    small_dim: int = 8
    dropout: float = 0.1
    window: int = WINDOW

    def __post_init__(self):
        self.dilations = tuple(int(d) for d in self.dilations)   # asdict/JSON give lists back
        assert self.n_items > 2 and self.n_categories >= 3, "vocabularies hold padding/OOV/missing and at least one item"
        assert self.kernel_size >= 2 and all(d >= 1 for d in self.dilations)
        assert self.receptive_field >= self.window, (
            f"receptive field {self.receptive_field} < window {self.window}: "
            "add dilations or widen the kernel")

    @property
    def receptive_field(self) -> int:
        return 1 + (self.kernel_size - 1) * sum(self.dilations)


class CausalResidualBlock(nn.Module):
    def __init__(self, channels: int, kernel_size: int, dilation: int, dropout: float):
        super().__init__()
        self.left_pad = (kernel_size - 1) * dilation
        self.conv = nn.Conv1d(channels, channels, kernel_size, dilation=dilation)
        self.norm = nn.LayerNorm(channels)
        self.mix = nn.Conv1d(channels, channels, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        """x (B, C, W) -> (B, C, W); output at t depends on x[..., :t+1] only."""
        y = self.conv(F.pad(x, (self.left_pad, 0)))      # (B, C, W + pad) -> (B, C, W)
        y = self.norm(y.transpose(1, 2)).transpose(1, 2)  # LayerNorm over channels: (B, W, C) and back
        y = self.mix(torch.relu(y))                      # (B, C, W)
        return x + self.dropout(y)


class DilatedConvModel(nn.Module):
    kind = "dilated"

    def __init__(self, config: DilatedConfig):
        super().__init__()
        self.config = config
        self.embedding = SessionEmbedding(config.n_items, config.n_categories, config.embedding_dim,
                                          config.small_dim, config.dropout)
        self.input = nn.Linear(config.embedding_dim, config.hidden_dim)
        self.blocks = nn.ModuleList(
            CausalResidualBlock(config.hidden_dim, config.kernel_size, d, config.dropout)
            for d in config.dilations)
        self.norm = nn.LayerNorm(config.hidden_dim)
        self.heads = OutputHeads(config.hidden_dim, self.embedding)

    def encode(self, event_type, item, category, hour, weekday, month, week, dwell, price):
        """Inputs (B, W) -> per-position state (B, W, hidden_dim)."""
        x = self.embedding(event_type, item, category, hour, weekday, month, week, dwell, price)  # (B, W, E)
        x = self.input(x).transpose(1, 2)         # (B, W, H) -> (B, H, W) for Conv1d
        for block in self.blocks:
            x = block(x)                          # (B, H, W)
        return self.norm(x.transpose(1, 2))       # (B, W, H)

    def forward(self, event_type, item, category, hour, weekday, month, week, dwell, price):
        hidden = self.encode(event_type, item, category, hour, weekday, month, week, dwell, price)
        return self.heads(hidden)                 # (B, W), (B, W, n_items)
