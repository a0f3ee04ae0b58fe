"""Item vectors from content: the bundle's exported item tower over featurised catalogue rows.

The one encoding path of items from their content: drift (training.drift) encodes the
catalogue with it, and serving encodes an item listed after the bundle was trained (an
`item_upsert` on the catalogue topic) with it, exactly as training treats an unseen item:
no id embedding (the featurizer maps ids outside its `warm_items` to bucket 0), text of
title, category path and brand, the price band and category/brand buckets, and the photo at
`image_path` where the encoder has the bundle's image encoder (`photos`); without one, or
for a row without a readable photo, the tower's "no image" input, as training gave it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from towers.image_encoder import PhotoEmbedder
from towers.item_features import ItemFeatures, ItemFeaturizer, item_text
from towers.text_encoder import TEXT_DIM, default_text_model_path, embed_texts, load_text_model

TextEmbedder = Callable[[list[str]], np.ndarray]


class ItemContentEncoder:
    """Encodes catalogue rows into the item tower's space.

    Args:
        item_tower: the bundle's TorchScript item tower (`item_tower.pt`).
        featurizer: the bundle's fitted featurizer (price bands, warm items).
        texts: texts -> (N, 384) float32 MiniLM embeddings (training passes its cached
            TextEncoder; serving an uncached one, `uncached_texts`).
        photos: image paths -> embeddings and has_image, from the image encoder the tower
            was trained with (`towers.image_encoder.uncached_images` of the bundle's
            weights); None: rows are encoded without their photos.
    """

    def __init__(
        self,
        item_tower: Path,
        featurizer: ItemFeaturizer,
        texts: TextEmbedder,
        photos: PhotoEmbedder | None = None,
    ) -> None:
        self.tower = torch.jit.load(str(item_tower), map_location="cpu")
        self.tower.eval()
        self.featurizer, self.texts, self.photos = featurizer, texts, photos

    def encode(
        self,
        items: pd.DataFrame,
        image: np.ndarray | None = None,
        has_image: np.ndarray | None = None,
    ) -> np.ndarray:
        """(N, D) float32 item vectors of catalogue rows (item_id and any of title,
        category_path, brand, price, image_path); `image`/`has_image` are precomputed photo
        embeddings (None: the rows' `image_path` through `photos`, else "no image")."""
        return self.run_tower(self.features(items, image, has_image))

    def features(
        self,
        items: pd.DataFrame,
        image: np.ndarray | None = None,
        has_image: np.ndarray | None = None,
    ) -> ItemFeatures:
        """The item tower's inputs for catalogue rows: text embedded, photos embedded, ids
        and bands featurised (what `encode` feeds the tower, and what a Triton item tower is
        sent)."""
        if image is None and self.photos is not None and "image_path" in items.columns:
            paths = [p if isinstance(p, str) and p else None for p in items["image_path"]]
            if any(paths):  # no model call for a batch without photos
                image, has_image = self.photos(paths)
        texts = item_text(items)
        text = self.texts(texts) if any(texts) else np.zeros((len(items), TEXT_DIM), np.float32)
        return self.featurizer.transform(items, text, image, has_image)

    def run_tower(self, features: ItemFeatures) -> np.ndarray:
        """(N, D) float32 vectors of featurised items from the in-process tower."""
        with torch.inference_mode():
            return self.tower(*features.as_tuple()).numpy().astype(np.float32)


def uncached_texts(model_path: Path | None, batch_size: int = 64) -> TextEmbedder:
    """MiniLM embeddings straight from the local model (loaded now, once per process; None:
    the wheel's), with no embedding-cache reads or writes: what an API process uses."""
    model = load_text_model(model_path or default_text_model_path())

    def embed(texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), TEXT_DIM), np.float32)
        todo = [i for i, t in enumerate(texts) if t]
        if todo:
            out[todo] = embed_texts(model, [texts[i] for i in todo], batch_size)
        return out

    return embed
