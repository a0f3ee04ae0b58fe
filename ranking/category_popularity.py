""" "More from this category": the session's categories, most popular items first.

What many shops run on product pages and after a view. It is the fair bar for content
models: on data where the next item usually shares the last item's category, a tower that
only learned "same category" would tie with it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import pandas as pd

from railtower.settings import EventWeights, PopularitySettings
from ranking.candidates import Candidate
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
        taken: set[str] = set()
        ranked = sorted(weight, key=lambda c: (-weight[c], c))
        groups = [(weight[c], self.by_category[c]) for c in ranked if c in self.by_category]
        if fill:
            groups.append((0.0, self.popularity.order))
        scores = self.popularity.scores
        for category_weight, rows in groups:
            top = scores[rows[0]] if len(rows) else 0.0
            for row in rows:
                if len(picked) >= k:
                    return picked
                item = str(self.catalogue.ids[row])
                if item not in query.exclude and item not in taken:
                    share = scores[row] / top if top > 0 else 0.0
                    picked.append(Candidate(item, category_weight * share))
                    taken.add(item)
        return picked
