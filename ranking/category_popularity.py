""" "More from this category": the session's categories, most popular items first.

What many shops run on product pages and after a view. It is the fair bar for content
models: on data where the next item usually shares the last item's category, a tower that
only learned "same category" would tie with it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from railtower.settings import EventWeights, PopularitySettings
from ranking.candidates import Candidate, new_candidate
from ranking.popularity import PopularityRetriever
from ranking.retriever import Catalogue, Query, seed_weights


class CategoryPopularityRetriever:
    """Ranks the items of the query's categories (weighted like the other baselines' seeds)
    by popularity, then fills with globally popular items. Items without a category only
    come from the fill."""

    name = "category_popularity"

    def __init__(
        self, popularity: PopularitySettings, weights: EventWeights, recency_decay: float
    ) -> None:
        self.popularity = PopularityRetriever(popularity, weights)
        self.recency_decay = recency_decay
        self.by_category: dict[str, np.ndarray] = {}

    def fit(self, events: pd.DataFrame, catalogue: Catalogue) -> CategoryPopularityRetriever:
        self.popularity.fit(events, catalogue)
        return self.restore(catalogue)

    def restore(self, catalogue: Catalogue) -> CategoryPopularityRetriever:
        """Rebuild the per-category lists from the (fitted or restored) popularity."""
        self.catalogue = catalogue
        members: dict[str, list[int]] = defaultdict(list)
        for row in self.popularity.order:  # most popular first, so each list is sorted
            category = catalogue.category_of.get(catalogue.ids[row])
            if category is not None:
                members[category].append(int(row))
        self.by_category = {c: np.asarray(rows) for c, rows in members.items()}
        # per category, (item, share of the category's top popularity), most popular first:
        # Python values built once, so a request reads no numpy scalar one at a time
        scores = self.popularity.scores
        self._shelves: dict[str, list[tuple[str, float]]] = {}
        for category, rows in self.by_category.items():
            top = scores[rows[0]]
            shares = scores[rows] / top if top > 0 else np.zeros(len(rows))
            self._shelves[category] = list(
                zip(catalogue.ids[rows].tolist(), shares.tolist(), strict=True)
            )
        return self

    def recommend(self, queries: Sequence[Query], k: int) -> list[list[str]]:
        return [[c.item_id for c in self._one(query, k, fill=True)] for query in queries]

    def candidates(self, queries: Sequence[Query], k: int) -> list[list[Candidate]]:
        """Items of the query's categories only (no global fill), scored by the category's
        seed weight times the item's share of its category's popularity."""
        return [self._one(query, k, fill=False) for query in queries]

    def _one(self, query: Query, k: int, fill: bool) -> list[Candidate]:
        weight: dict[str, float] = defaultdict(float)
        for item, w in seed_weights(query, self.recency_decay).items():
            category = self.catalogue.category_of.get(item)
            if category is not None:
                weight[category] += w
        picked: list[Candidate] = []
        taken: set[str] = set(query.exclude)
        ranked = sorted(weight, key=lambda c: (-weight[c], c))
        groups: list[tuple[float, Iterable[tuple[str, float]]]] = [
            (weight[c], self._shelves[c]) for c in ranked if c in self._shelves
        ]
        if fill:  # then every item by popularity, each scored 0
            everything = self.catalogue.ids[self.popularity.order].tolist()
            groups.append((0.0, ((item, 0.0) for item in everything)))
        for category_weight, shelf in groups:
            for item, share in shelf:
                if len(picked) >= k:
                    return picked
                if item not in taken:
                    picked.append(new_candidate((item, category_weight * share)))
                    taken.add(item)
        return picked
