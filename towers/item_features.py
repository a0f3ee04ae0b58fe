"""Item features: the one definition used by training, export and serving.

Every input of the item tower is listed in :data:`ITEM_FEATURES`; the featurizer turns a
canonical catalogue into the tensors those specs describe. Categorical inputs are hashed
into fixed buckets (bucket 0 = missing), so a new brand or category needs no vocabulary
rebuild, and the hashed item id is given only to warm items (seen in training), so a new
item is embedded from its content alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Literal

import numpy as np
import orjson
import pandas as pd
import torch

from railtower.schemas import category_levels
from railtower.settings import TowerSettings

Kind = Literal["id", "text", "image", "numeric", "band"]
TEXT_DIM = 384
IMAGE_DIM = 384
CATEGORY_LEVELS = 3


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    tower: Literal["user", "item", "context", "rank"]
    kind: Kind
    cardinality: int | None = None
    dim: int | None = None


def item_feature_specs(settings: TowerSettings) -> tuple[FeatureSpec, ...]:
    return (
        FeatureSpec("item_id", "item", "id", settings.id_buckets),
        *(
            FeatureSpec(f"category_l{i + 1}", "item", "id", settings.category_buckets)
            for i in range(CATEGORY_LEVELS)
        ),
        FeatureSpec("brand", "item", "id", settings.brand_buckets),
        FeatureSpec("price_band", "item", "band", settings.price_bands + 1),
        FeatureSpec("text", "item", "text", dim=TEXT_DIM),
        FeatureSpec("image", "item", "image", dim=IMAGE_DIM),
    )


def spec_hash(specs: Iterable[FeatureSpec]) -> str:
    """Fingerprint of a feature definition; a bundle built with another one is refused."""
    blob = orjson.dumps([[f.name, f.tower, f.kind, f.cardinality, f.dim] for f in specs])
    return hashlib.sha256(blob).hexdigest()[:16]


def stable_bucket(values: Iterable[object], buckets: int, salt: str) -> np.ndarray:
    """Hash each value into 1..buckets-1 (stable across processes); None/NA -> 0."""
    out = []
    for value in values:
        if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
            out.append(0)
            continue
        digest = hashlib.blake2b(f"{salt}:{value}".encode(), digest_size=8).digest()
        out.append(1 + int.from_bytes(digest, "little") % (buckets - 1))
    return np.asarray(out, dtype=np.int64)


def item_text(items: pd.DataFrame) -> list[str]:
    """What the text encoder reads: title, category path and brand, whatever the item has."""
    parts = [items[c] for c in ("title", "category_path", "brand") if c in items.columns]
    texts = []
    for row in zip(*parts, strict=True) if parts else [()] * len(items):
        texts.append(". ".join(str(v) for v in row if isinstance(v, str) and v))
    return texts


@dataclass
class PriceBands:
    """Quantile price bands per top-level category (band 0 = no price)."""

    bands: int
    edges: dict[str, list[float]]

    @classmethod
    def fit(cls, items: pd.DataFrame, bands: int) -> PriceBands:
        edges: dict[str, list[float]] = {}
        if "price" not in items.columns:
            return cls(bands, edges)
        frame = pd.DataFrame({"top": _top_level(items), "price": items["price"].astype(float)})
        frame = frame.dropna(subset=["price"])
        quantiles = np.linspace(0, 1, bands + 1)[1:-1]
        for top, group in frame.groupby("top", dropna=False):
            edges[str(top)] = np.quantile(group["price"], quantiles).tolist()
        edges["*"] = np.quantile(frame["price"], quantiles).tolist() if len(frame) else []
        return cls(bands, edges)

    def assign(self, items: pd.DataFrame) -> np.ndarray:
        if "price" not in items.columns or not self.edges.get("*"):
            return np.zeros(len(items), dtype=np.int64)
        prices = items["price"].astype(float).to_numpy()
        out = np.zeros(len(items), dtype=np.int64)
        for i, (top, price) in enumerate(zip(_top_level(items), prices, strict=True)):
            if not np.isnan(price):
                edges = self.edges.get(str(top), self.edges["*"])
                out[i] = 1 + int(np.searchsorted(edges, price, side="right"))
        return out


def _top_level(items: pd.DataFrame) -> list[str]:
    if "category_path" not in items.columns:
        return ["*"] * len(items)
    return [str(category_levels(p, 1)[0]) for p in items["category_path"]]


@dataclass(frozen=True)
class TowerInput:
    """One input of the exported item tower as Triton declares it (dims per item)."""

    name: str
    dtype: Literal["INT64", "FP32", "BOOL"]
    dims: int


# The item tower's inputs in argument order (the fields of ItemFeatures): the Triton model's
# config.pbtxt is rendered from these (training/triton_export.py) and its client feeds them.
ITEM_TOWER_INPUTS: tuple[TowerInput, ...] = (
    TowerInput("item_id", "INT64", 1),
    TowerInput("categories", "INT64", CATEGORY_LEVELS),
    TowerInput("brand", "INT64", 1),
    TowerInput("price_band", "INT64", 1),
    TowerInput("text", "FP32", TEXT_DIM),
    TowerInput("has_text", "BOOL", 1),
    TowerInput("image", "FP32", IMAGE_DIM),
    TowerInput("has_image", "BOOL", 1),
)


@dataclass
class ItemFeatures:
    """Item-tower inputs for N items, row-aligned with the catalogue order.

    Shapes: item_id (N,), categories (N, 3), brand (N,), price_band (N,) int64;
    text (N, 384), image (N, 384) float32; has_text, has_image (N,) bool.
    """

    item_id: torch.Tensor
    categories: torch.Tensor
    brand: torch.Tensor
    price_band: torch.Tensor
    text: torch.Tensor
    has_text: torch.Tensor
    image: torch.Tensor
    has_image: torch.Tensor

    def __len__(self) -> int:
        return int(self.item_id.shape[0])

    def take(self, index: torch.Tensor) -> ItemFeatures:
        return ItemFeatures(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def to(self, device: torch.device | str) -> ItemFeatures:
        return ItemFeatures(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def as_tuple(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))


@dataclass
class ItemFeaturizer:
    """Turns a canonical catalogue into :class:`ItemFeatures`.

    Its fitted state (price band edges, warm items) is saved in the bundle, so serving
    featurises a new item exactly as training did.
    """

    settings: TowerSettings
    price_bands: PriceBands
    warm_items: frozenset[str]

    @classmethod
    def fit(
        cls, items: pd.DataFrame, warm_items: Iterable[str], settings: TowerSettings
    ) -> ItemFeaturizer:
        return cls(settings, PriceBands.fit(items, settings.price_bands), frozenset(warm_items))

    def transform(
        self,
        items: pd.DataFrame,
        text: np.ndarray,
        image: np.ndarray | None = None,
        has_image: np.ndarray | None = None,
    ) -> ItemFeatures:
        """Build features for `items`; `text`/`image` are their precomputed embeddings."""
        s = self.settings
        ids = items["item_id"].astype(str).tolist()
        warm_ids = [i if i in self.warm_items else None for i in ids]
        paths = items["category_path"] if "category_path" in items.columns else [None] * len(ids)
        levels = [
            category_levels(p if isinstance(p, str) else None, CATEGORY_LEVELS) for p in paths
        ]
        categories = np.stack(
            [
                stable_bucket([lv[i] for lv in levels], s.category_buckets, f"cat{i}")
                for i in range(CATEGORY_LEVELS)
            ],
            axis=1,
        )
        brands = items["brand"] if "brand" in items.columns else [None] * len(ids)
        if image is None:
            image = np.zeros((len(ids), IMAGE_DIM), np.float32)
            has_image = np.zeros(len(ids), bool)
        return ItemFeatures(
            item_id=torch.from_numpy(stable_bucket(warm_ids, s.id_buckets, "item")),
            categories=torch.from_numpy(categories),
            brand=torch.from_numpy(stable_bucket(brands, s.brand_buckets, "brand")),
            price_band=torch.from_numpy(self.price_bands.assign(items)),
            text=torch.from_numpy(np.asarray(text, np.float32)),
            has_text=torch.from_numpy(np.abs(text).sum(axis=1) > 0),
            image=torch.from_numpy(np.asarray(image, np.float32)),
            has_image=torch.from_numpy(np.asarray(has_image, bool)),
        )

    def state(self) -> dict[str, object]:
        return {
            "price_bands": {"bands": self.price_bands.bands, "edges": self.price_bands.edges},
            "warm_items": sorted(self.warm_items),
        }

    @classmethod
    def from_state(cls, state: dict[str, object], settings: TowerSettings) -> ItemFeaturizer:
        bands = state["price_bands"]
        assert isinstance(bands, dict)
        warm = state["warm_items"]
        assert isinstance(warm, list)
        return cls(settings, PriceBands(int(bands["bands"]), dict(bands["edges"])), frozenset(warm))
