"""Ranking metrics against the full catalogue, and session-clustered bootstrap intervals.

Every function takes the ranked list a model returned (best first). Duplicates in a list
count once, at their first position, so a model cannot earn credit twice for one item.
Relevance is binary: an item is relevant when it is in the case's target set.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from itertools import combinations

import numpy as np


def dedupe(ranked: Sequence[Hashable]) -> list[Hashable]:
    """Keep the first occurrence of each item, in order."""
    return list(dict.fromkeys(ranked))


def recall_at(ranked: Sequence[Hashable], targets: set[Hashable], k: int) -> float:
    """Share of the targets found in the top k. With one target this is the hit rate."""
    if not targets:
        raise ValueError("recall needs at least one target")
    return len(set(dedupe(ranked)[:k]) & targets) / len(targets)


def ndcg_at(ranked: Sequence[Hashable], targets: set[Hashable], k: int) -> float:
    """Binary-relevance NDCG@k; the ideal list puts min(|targets|, k) hits first."""
    if not targets:
        raise ValueError("ndcg needs at least one target")
    top = dedupe(ranked)[:k]
    dcg = sum(1.0 / np.log2(i + 2) for i, item in enumerate(top) if item in targets)
    ideal = sum(1.0 / np.log2(i + 2) for i in range(min(len(targets), k)))
    return float(dcg / ideal)


def reciprocal_rank(ranked: Sequence[Hashable], targets: set[Hashable], depth: int) -> float:
    """1 / rank of the first relevant item within `depth`, else 0."""
    for i, item in enumerate(dedupe(ranked)[:depth]):
        if item in targets:
            return 1.0 / (i + 1)
    return 0.0


def coverage_at(lists: Sequence[Sequence[Hashable]], catalogue_size: int, k: int) -> float:
    """Share of the catalogue that appears in at least one top-k list."""
    if catalogue_size <= 0:
        raise ValueError("catalogue_size must be positive")
    shown = {item for ranked in lists for item in dedupe(ranked)[:k]}
    return len(shown) / catalogue_size


def intra_list_diversity(
    ranked: Sequence[Hashable], category_of: Mapping[Hashable, str], k: int
) -> float | None:
    """Share of pairs in the top k whose categories differ (items without one are left out).

    Returns None when fewer than two of the top k items have a category.
    """
    cats = [category_of[i] for i in dedupe(ranked)[:k] if i in category_of]
    if len(cats) < 2:
        return None
    pairs = list(combinations(cats, 2))
    return sum(a != b for a, b in pairs) / len(pairs)


def rank_by_score(items: Sequence[Hashable], scores: Sequence[float]) -> list[Hashable]:
    """Order items by descending score; ties keep the input order (deterministic)."""
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")
    return [items[i] for i in order]


def bootstrap_ci(
    values: np.ndarray,
    clusters: np.ndarray,
    samples: int,
    level: float,
    seed: int,
    denominators: np.ndarray | None = None,
) -> tuple[float, float, float]:
    """Mean and percentile interval, resampling whole clusters (sessions) with replacement.

    Cases from one session are correlated (several prefixes of one session), so the session,
    not the case, is the unit resampled.

    Args:
        values: (N,) per-case metric; NaN values are left out.
        clusters: (N,) cluster id per case.
        denominators: (N,) optional; the statistic is then the ratio sum(values) /
            sum(denominators) (self-normalised estimators), else the mean.
    Returns:
        (mean or ratio, low, high).
    """
    keep = ~np.isnan(values)
    values, clusters = values[keep], clusters[keep]
    if len(values) == 0:
        return (float("nan"),) * 3
    _, cluster_idx = np.unique(clusters, return_inverse=True)
    n = int(cluster_idx.max()) + 1
    sums = np.bincount(cluster_idx, weights=values, minlength=n)
    per_case = np.ones(len(values)) if denominators is None else denominators[keep]
    counts = np.bincount(cluster_idx, weights=per_case, minlength=n).astype(float)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=samples).astype(float)
    means = (weights @ sums) / np.maximum(weights @ counts, 1e-12)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    point = values.mean() if denominators is None else sums.sum() / max(counts.sum(), 1e-12)
    return float(point), float(low), float(high)
