"""The user tower: a small transformer over the session's item vectors plus context."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from railtower.settings import TowerSettings
from towers.session_features import AGE_BUCKETS, CONTEXT_BUCKETS, EVENT_TYPE_INDEX, HOURS


@dataclass(frozen=True)
class UserTowerConfig:
    dim: int
    max_history: int
    layers: int
    heads: int
    dropout: float

    @classmethod
    def from_settings(cls, s: TowerSettings) -> UserTowerConfig:
        return cls(s.dim, s.max_history, s.layers, s.heads, s.dropout)


class UserTower(nn.Module):
    """Session items (as item-tower vectors) + event types + recency + context -> vector.

    A context token (hour, device/locale) is appended after the newest item; the
    transformer's output at that token is the session vector. An empty session still
    gets a vector from its context, and no attention row is ever fully masked.

    Shapes: item_vectors (B, L, D) float32; types, ages (B, L) int64, 0 = padding;
    hour, context (B,) int64 -> (B, D) float32, L2-normalised.
    """

    def __init__(self, cfg: UserTowerConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.types = nn.Embedding(len(EVENT_TYPE_INDEX) + 1, d, padding_idx=0)
        self.ages = nn.Embedding(AGE_BUCKETS, d, padding_idx=0)
        self.positions = nn.Embedding(cfg.max_history + 1, d)
        self.hour = nn.Embedding(HOURS, d)
        self.context = nn.Embedding(CONTEXT_BUCKETS, d)
        self.context_token = nn.Parameter(torch.zeros(d))
        layer = nn.TransformerEncoderLayer(
            d,
            cfg.heads,
            dim_feedforward=2 * d,
            dropout=cfg.dropout,
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.out = nn.Linear(d, d)
        self.newest_weight = nn.Parameter(torch.tensor(1.0))

    def forward(
        self,
        item_vectors: torch.Tensor,
        types: torch.Tensor,
        ages: torch.Tensor,
        hour: torch.Tensor,
        context: torch.Tensor,
    ) -> torch.Tensor:
        batch, length, _ = item_vectors.shape
        steps = torch.arange(length, device=types.device)
        # positions count back from the newest item (0 = newest), the same for any padding
        positions = self.positions((length - 1 - steps).clamp(min=0)).unsqueeze(0)
        tokens = item_vectors + self.types(types) + self.ages(ages) + positions
        ctx = (self.context_token + self.hour(hour) + self.context(context)).unsqueeze(1)
        sequence = torch.cat([tokens, ctx], dim=1)
        padding = torch.cat(
            [types == 0, torch.zeros(batch, 1, dtype=torch.bool, device=types.device)], dim=1
        )
        encoded = self.encoder(sequence, src_key_padding_mask=padding)
        # The newest item is the strongest single signal of what comes next; adding it
        # back lets the transformer learn a correction to it rather than all of it.
        newest = item_vectors[:, -1]
        return F.normalize(self.out(encoded[:, -1]) + self.newest_weight * newest, dim=-1)


class SessionEncoder(nn.Module):
    """The user tower with the catalogue's item vectors baked in: ids in, vector out.

    This is what is exported (TorchScript) for Triton and loaded in process, so serving
    never has to ship item vectors alongside the request.

    Shapes: items, types, ages (B, L) int64 (items are catalogue rows + 1, 0 = padding);
    hour, context (B,) int64 -> (B, D) float32.
    """

    def __init__(self, user_tower: UserTower, item_vectors: torch.Tensor) -> None:
        super().__init__()
        self.user_tower = user_tower
        table = torch.cat([torch.zeros(1, item_vectors.shape[1]), item_vectors], dim=0)
        self.register_buffer("item_table", table)

    def forward(
        self,
        items: torch.Tensor,
        types: torch.Tensor,
        ages: torch.Tensor,
        hour: torch.Tensor,
        context: torch.Tensor,
    ) -> torch.Tensor:
        return self.user_tower(self.item_table[items], types, ages, hour, context)
