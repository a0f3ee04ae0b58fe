"""Maximal marginal relevance: trade a little relevance for rails that are not all one shelf.

Applied after the re-ranker and before the merchandising rules. Similarity is deliberately
coarse (category and price band only), so a merchandiser can predict what MMR will do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ranking.candidates import Candidate, unique_by_item
from ranking.item_attributes import ItemAttributes, ItemInfo

SAME_SHELF = 1.0  # same leaf category and same price band
SAME_AISLE = 0.5  # same leaf category in another band, or only the same top-level category


def similarity(a: ItemInfo | None, b: ItemInfo | None) -> float:
    """How interchangeable two items look to a shopper, in {0, 0.5, 1}.

    - 1.0: same leaf category (full `category_path`) and the same known price band;
    - 0.5: same leaf category but another (or an unknown) price band, or a different leaf
      under the same top-level category;
    - 0.0: different top-level categories, or either item has no category (nothing says
      they are alike, so they are not penalised).

    Args:
        a: attributes of one item, None if the catalogue does not know it.
        b: attributes of the other item, likewise.

    Returns:
        The similarity, symmetric in `a` and `b`.
    """
    if a is None or b is None or a.category_path is None or b.category_path is None:
        return 0.0
    if a.category_path == b.category_path:
        same_band = a.price_band != 0 and a.price_band == b.price_band
        return SAME_SHELF if same_band else SAME_AISLE
    return SAME_AISLE if a.top_category == b.top_category else 0.0


def mmr(
    candidates: Sequence[Candidate], attributes: ItemAttributes, slots: int, lambda_: float
) -> list[Candidate]:
    """Pick `slots` candidates greedily by maximal marginal relevance.

    Each step picks the candidate maximising ``λ·rel(i) − (1 − λ)·max_{j picked} sim(i, j)``,
    where ``rel`` is the score min-max normalised over the candidates (all 1.0 when every
    score is equal) and ``sim`` is :func:`similarity`; the first pick has no penalty. Ties go
    to the higher score, then to the earlier candidate, so λ = 1 returns the candidates sorted
    by score with ties in input order: the input order itself for a ranked list (the
    re-ranker's output).

    Args:
        candidates: ranked candidates, best first; a repeated item id keeps its first
            occurrence only.
        attributes: category and price band per item; unknown items have no category.
        slots: how many to return (>= 0).
        lambda_: relevance weight in [0, 1]; 1 = pure relevance, lower spreads categories.

    Returns:
        min(slots, number of distinct item ids) candidates, unchanged scores, no duplicates.

    Raises:
        ValueError: slots < 0, lambda_ outside [0, 1], or a score that is not finite.
    """
    if slots < 0:
        raise ValueError(f"slots must be >= 0, got {slots}")
    if not 0.0 <= lambda_ <= 1.0:
        raise ValueError(f"lambda_ must be in [0, 1] (1 = no diversification), got {lambda_}")
    pool = unique_by_item(candidates)
    for c in pool:
        if not math.isfinite(c.score):
            raise ValueError(f"candidate {c.item_id!r} has score {c.score}; scores must be finite")
    if not pool or slots == 0:
        return []

    # Normalise so λ weighs two quantities on the same 0..1 scale as the similarity.
    low, high = min(c.score for c in pool), max(c.score for c in pool)
    rel = [(c.score - low) / (high - low) if high > low else 1.0 for c in pool]
    info = [attributes.get(c.item_id) for c in pool]
    # max similarity to anything picked so far, updated after each pick: O(slots · n).
    penalty = [0.0] * len(pool)
    left = list(range(len(pool)))
    picked: list[Candidate] = []
    while left and len(picked) < slots:
        # Ties go to the higher raw score (normalising can round two scores to one rel),
        # then to the earlier candidate: max() keeps the first maximum, `left` is in order.
        best = max(
            left, key=lambda i: (lambda_ * rel[i] - (1.0 - lambda_) * penalty[i], pool[i].score)
        )
        left.remove(best)
        picked.append(pool[best])
        for i in left:
            penalty[i] = max(penalty[i], similarity(info[i], info[best]))
    return picked
