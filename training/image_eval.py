"""Does the image embedding alone put substitutes together? Neighbour agreement on product type.

For each item, its k nearest neighbours by image embedding (cosine) are taken, leaving out the
item itself and every item of its own product group (colour variants would match trivially).
The share of those neighbours with the same product type is compared with chance: the share
expected if neighbours were drawn at random from the pool, sum over types of p_type².
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from railtower.schemas import CATEGORY_SEPARATOR
from railtower.settings import ImageSettings
from towers.image_encoder import ImageEmbedder, embed_images, load_images

# Rows of the similarity matrix computed at once, to bound memory on large pools.
_CHUNK = 1024


def product_types(category_paths: pd.Series) -> np.ndarray:
    """The last level of each category path ("… > Trousers" → "Trousers"); "" where missing."""
    paths = category_paths.astype("string").fillna("")
    return np.array([p.split(CATEGORY_SEPARATOR)[-1].strip() for p in paths], dtype=object)


def image_neighbour_agreement(
    embeddings: np.ndarray,
    labels: np.ndarray,
    k: int = 10,
    groups: np.ndarray | None = None,
) -> dict[str, float | int]:
    """Precision@k of same-label neighbours by cosine, against the chance share.

    Args:
        embeddings: (N, D) float, one row per item with an image (no zero rows).
        labels: (N,) the label to agree on, e.g. product type.
        k: neighbours per item.
        groups: (N,) optional product groups; neighbours from the item's own group are
            left out. Without it only the item itself is left out.
    Returns:
        {"k", "queries", "precision", "chance", "lift"}: queries are the items with at
        least one eligible neighbour; precision is the mean share of same-label neighbours;
        chance is sum over labels of p_label² on the pool; lift is precision / chance.
    Raises:
        ValueError: shapes disagree, k < 1, or a row is all zeros.
    """
    vectors = np.asarray(embeddings, dtype=np.float32)
    labels = np.asarray(labels)
    groups = np.arange(len(vectors)) if groups is None else np.asarray(groups)
    if vectors.ndim != 2 or len(labels) != len(vectors) or len(groups) != len(vectors):
        raise ValueError(
            f"embeddings (N, D), labels (N,) and groups (N,) must agree, got "
            f"{vectors.shape}, {labels.shape}, {groups.shape}"
        )
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError("embeddings has zero rows; pass only items that have an image")

    # Cosine neighbours, with the item's own product group (itself included) masked out.
    unit = torch.from_numpy(vectors / norms)
    _, label_ids = np.unique(labels, return_inverse=True)
    _, group_ids = np.unique(groups, return_inverse=True)
    label_t, group_t = torch.from_numpy(label_ids), torch.from_numpy(group_ids)
    depth = min(k, len(vectors))
    shares = []
    for start in range(0, len(unit), _CHUNK):
        rows = slice(start, start + _CHUNK)
        scores = unit[rows] @ unit.T
        scores.masked_fill_(group_t[rows, None] == group_t[None, :], float("-inf"))
        top_scores, top = scores.topk(depth, dim=1)
        eligible = torch.isfinite(top_scores)
        same = (label_t[top] == label_t[rows, None]) & eligible
        counts = eligible.sum(dim=1)
        shares.append((same.sum(dim=1) / counts.clamp(min=1))[counts > 0])
    share = torch.cat(shares)

    # Chance: the same-label share if neighbours were random draws from the pool.
    p = np.bincount(label_ids) / len(label_ids)
    chance = float((p**2).sum())
    precision = float(share.mean()) if len(share) else float("nan")
    return {
        "k": k,
        "queries": len(share),
        "precision": precision,
        "chance": chance,
        "lift": precision / chance,
    }


def untrained_embeddings(
    paths: list[str], settings: ImageSettings, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The control: a random-init ViT + projection of the same shape as the distilled one.

    Returns:
        ((N, D) float32 unit vectors, zeros where unreadable; (N,) bool readable).
    """
    torch.manual_seed(seed)
    model = ImageEmbedder(settings)
    images, readable = load_images(paths, settings.image_size)
    vectors = np.zeros((len(paths), model.dim), dtype=np.float32)
    if readable.any():
        vectors[readable] = embed_images(model, images, settings)
    return vectors, readable
