"""Dilated causal convolution session model (WaveNet / NextItNet style).

    model = DilatedConvModel(DilatedConfig(n_items=2002, n_categories=53))
    buy_logit, next_item_logits = model(**inputs)   # (B, W), (B, W, n_items)

A stack of residual blocks, each a causal 1-D convolution (kernel k, dilation d,
left-padded by (k-1)*d so position t reads t, t-d, .., t-(k-1)d and nothing later),
LayerNorm, ReLU and a 1x1 convolution back into the residual stream. The receptive
field is 1 + (k-1) * sum(dilations); the config refuses one shorter than the window,
so every prediction can see the whole <= 100-event window (1,2,4,..,32 x k=3 -> 127).

Incremental scoring (the Fast WaveNet scheme): each block keeps the last (k-1)*d
inputs it has seen, (B, H, (k-1)*d); one new event is one convolution over that
cache plus the new input, so a step costs O(layers), not O(window):

    state = model.initial_state(batch_size)                             # zeros = the left padding
    buy_logit, next_item_logits, state = model.step(*event_inputs, state)   # (B,), (B, n_items)
    hidden, state = model.encode_with_state(*window_inputs, length)         # caches after length-1
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
        return self._after_conv(x, self.conv(F.pad(x, (self.left_pad, 0))))   # (B, C, W + pad) -> (B, C, W)

    def _after_conv(self, x, y):
        y = self.norm(y.transpose(1, 2)).transpose(1, 2)  # LayerNorm over channels: (B, W, C) and back
        y = self.mix(torch.relu(y))                      # (B, C, W)
        return x + self.dropout(y)

    def step(self, x, cache):
        """x (B, C) one new position, cache (B, C, left_pad) the inputs before it ->
        (output (B, C), new cache). The dilated kernel over left_pad + 1 positions
        yields exactly one output: the one forward() gives at that position. Channels
        last, so LayerNorm and the 1x1 convolution need no transposes."""
        span = torch.cat([cache, x.unsqueeze(2)], dim=2)  # (B, C, left_pad + 1)
        y = self.conv(span).squeeze(2)                    # (B, C, 1) -> (B, C)
        y = F.linear(torch.relu(self.norm(y)), self.mix.weight.squeeze(2), self.mix.bias)   # (B, C)
        return x + self.dropout(y), span[:, :, 1:]

    def cache_at(self, x, length):
        """x (B, C, W) this block's inputs over a window -> its cache after position
        length-1: inputs length-left_pad .. length-1, zeros before the window."""
        padded = F.pad(x, (self.left_pad, 0))                                  # (B, C, W + pad)
        index = length.view(-1, 1, 1) + torch.arange(self.left_pad, device=x.device).view(1, 1, -1)  # (B, 1, pad)
        return padded.gather(2, index.expand(-1, x.size(1), -1))               # (B, C, pad)


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
        self.state_names = tuple(f"cache_{i}" for i in range(len(config.dilations)))

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

    # -- incremental scoring -----------------------------------------------------------
    # The state is a tuple in `state_names` order, one input cache per block, batch first:
    # cache_i (B, H, (k-1) * dilation_i).

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-session state shapes (batch dimension left out), in `state_names` order."""
        return {name: (self.config.hidden_dim, block.left_pad) for name, block in zip(self.state_names, self.blocks)}

    def initial_state(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        """Before a session's first event every cache holds the zeros forward() pads with."""
        return tuple(torch.zeros(batch_size, self.config.hidden_dim, block.left_pad) for block in self.blocks)

    def step(self, event_type, item, category, hour, weekday, month, week, dwell, price, state):
        """One event per session: inputs (B,) each, state -> (buy logit (B,), next-item
        logits (B, n_items), new state). Equals forward() at that position for a session
        stepped from initial_state() (eval mode: no dropout)."""
        x = self.input(self.embedding(event_type, item, category, hour, weekday, month, week, dwell, price))  # (B, H)
        new_state = []
        for block, cache in zip(self.blocks, state):
            x, cache = block.step(x, cache)                                # (B, H), (B, H, pad)
            new_state.append(cache)
        hidden = self.norm(x)                                              # (B, H)
        return self.heads.buy_logit(hidden), self.heads.next_item_logits(hidden), tuple(new_state)

    def encode_with_state(self, event_type, item, category, hour, weekday, month, week, dwell, price,
                          length):
        """Window inputs (B, W) and length (B,) -> (per-position state (B, W, H), every
        block's cache after position length-1: a cache miss rebuilds a session in one call)."""
        x = self.embedding(event_type, item, category, hour, weekday, month, week, dwell, price)  # (B, W, E)
        x = self.input(x).transpose(1, 2)         # (B, W, H) -> (B, H, W)
        caches = []
        for block in self.blocks:
            caches.append(block.cache_at(x, length))   # (B, H, pad): this block's inputs before length
            x = block(x)                          # (B, H, W)
        return self.norm(x.transpose(1, 2)), tuple(caches)   # (B, W, H), ((B, H, pad_i), ..)
