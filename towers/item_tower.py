"""The item tower: content and identity of an item -> one L2-normalised vector."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from railtower.settings import TowerSettings
from towers.item_features import CATEGORY_LEVELS, IMAGE_DIM, TEXT_DIM


@dataclass(frozen=True)
class ItemTowerConfig:
    dim: int
    id_buckets: int
    category_buckets: int
    brand_buckets: int
    price_bands: int
    dropout: float

    @classmethod
    def from_settings(cls, s: TowerSettings) -> ItemTowerConfig:
        return cls(
            s.dim, s.id_buckets, s.category_buckets, s.brand_buckets, s.price_bands + 1, s.dropout
        )


class ItemTower(nn.Module):
    """Embeds items from hashed id, category levels, brand, price band, text and image.

    Bucket 0 of every id-like input is "missing" and embeds to zeros, so an item without a
    warm id (a new item) is represented by its content alone. Where text or image is
    missing, a learned "no text" / "no image" vector stands in.

    Shapes: item_id, brand, price_band (N,) int64; categories (N, 3) int64;
    text, image (N, 384) float32; has_text, has_image (N,) bool -> (N, dim) float32.
    """

    def __init__(self, cfg: ItemTowerConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.item_id = nn.Embedding(cfg.id_buckets, d, padding_idx=0)
        self.categories = nn.ModuleList(
            nn.Embedding(cfg.category_buckets, d // 2, padding_idx=0)
            for _ in range(CATEGORY_LEVELS)
        )
        self.brand = nn.Embedding(cfg.brand_buckets, d // 2, padding_idx=0)
        self.price_band = nn.Embedding(cfg.price_bands, d // 4, padding_idx=0)
        self.text = nn.Linear(TEXT_DIM, d)
        self.image = nn.Linear(IMAGE_DIM, d)
        self.no_text = nn.Parameter(torch.zeros(d))
        self.no_image = nn.Parameter(torch.zeros(d))
        width = d + CATEGORY_LEVELS * (d // 2) + d // 2 + d // 4 + d + d
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * d), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(2 * d, d)
        )
        nn.init.normal_(self.item_id.weight, std=0.02)

    def forward(
        self,
        item_id: torch.Tensor,
        categories: torch.Tensor,
        brand: torch.Tensor,
        price_band: torch.Tensor,
        text: torch.Tensor,
        has_text: torch.Tensor,
        image: torch.Tensor,
        has_image: torch.Tensor,
    ) -> torch.Tensor:
        text_vec = torch.where(has_text.unsqueeze(-1), self.text(text), self.no_text)
        image_vec = torch.where(has_image.unsqueeze(-1), self.image(image), self.no_image)
        parts = [
            self.item_id(item_id),
            *(emb(categories[:, i]) for i, emb in enumerate(self.categories)),
            self.brand(brand),
            self.price_band(price_band),
            text_vec,
            image_vec,
        ]
        # The id also bypasses the MLP: content makes similar items similar, but the next
        # item is one exact item, and a warm item's own embedding is what tells it apart from
        # its look-alikes (SASRec's whole item representation). A cold item has id 0 (zeros).
        return F.normalize(self.mlp(torch.cat(parts, dim=-1)) + self.item_id(item_id), dim=-1)
