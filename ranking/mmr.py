"""Maximal marginal relevance: trade a little relevance for rails that are not all one shelf.

Applied after the re-ranker and before the merchandising rules. Similarity is deliberately
coarse (category and price band only), so a merchandiser can predict what MMR will do.
"""

from __future__ import annotations

import math
from collections import defaultdict
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
    scores = [c.score for c in pool]
    low, high = min(scores), max(scores)
    rel = [(s - low) / (high - low) if high > low else 1.0 for s in scores]
    # λ·rel(i) once per candidate; the objective below is then the same float expression as
    # λ·rel(i) − (1 − λ)·penalty(i), so the picks are exactly those of the textbook loop
    # (tests/ranking/test_mmr.py compares them with it).
    gain = [lambda_ * r for r in rel]
    cost = 1.0 - lambda_
    shelf = _Shelves([attributes.get(c.item_id) for c in pool])
    # Best first (a ranker's list always is): the objective of a later candidate is at most
    # its gain, so the scan for the best stops at the first one whose gain cannot beat it.
    best_first = all(a >= b for a, b in zip(scores, scores[1:], strict=False))
    penalty = [0.0] * len(pool)  # max similarity to anything picked so far
    left = list(range(len(pool)))
    picked: list[Candidate] = []
    while left and len(picked) < slots:
        # Ties go to the higher raw score (normalising can round two scores to one rel),
        # then to the earlier candidate (`left` is in order and only a better one replaces).
        best, best_value = left[0], gain[left[0]] - cost * penalty[left[0]]
        for i in left[1:]:
            if best_first and best_value >= gain[i]:
                break
            value = gain[i] - cost * penalty[i]
            if value > best_value or (value == best_value and scores[i] > scores[best]):
                best, best_value = i, value
        left.remove(best)
        picked.append(pool[best])
        shelf.penalise(best, penalty)
    return picked


class _Shelves:
    """`similarity` to the picks, kept per candidate as groups: a pick raises everything in
    its top-level category to SAME_AISLE and everything on its shelf (leaf and known price
    band) to SAME_SHELF, each group once. The same penalties as taking the max of
    `similarity` against every pick, in a pass over each group instead of a call per
    candidate and pick."""

    def __init__(self, info: Sequence[ItemInfo | None]) -> None:
        self.top: list[tuple[str | None] | None] = []  # None: no category, never alike
        self.shelf: list[tuple[str, int] | None] = []
        self.members: dict[object, list[int]] = defaultdict(list)
        for i, item in enumerate(info):
            top = shelf = None
            if item is not None and item.category_path is not None:
                top = (item.top_category,)
                if item.price_band != 0:
                    shelf = (item.category_path, item.price_band)
                    self.members[shelf].append(i)
                self.members[top].append(i)
            self.top.append(top)
            self.shelf.append(shelf)
        self.done: set[object] = set()

    def penalise(self, pick: int, penalty: list[float]) -> None:
        for group, value in ((self.top[pick], SAME_AISLE), (self.shelf[pick], SAME_SHELF)):
            if group is not None and group not in self.done:
                self.done.add(group)
                for i in self.members[group]:
                    if penalty[i] < value:
                        penalty[i] = value
