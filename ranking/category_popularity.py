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
        self.catalogue = catalogue
        self.popularity.fit(events, catalogue)
        members: dict[str, list[int]] = defaultdict(list)
        for row in self.popularity.order:  # most popular first, so each list is sorted
            category = catalogue.category_of.get(catalogue.ids[row])
            if category is not None:
                members[category].append(int(row))
        self.by_category = {c: np.asarray(rows) for c, rows in members.items()}
        return self

    def recommend(self, queries: Sequence[Query], k: int) -> list[list[str]]:
        return [self._one(query, k) for query in queries]

    def _one(self, query: Query, k: int) -> list[str]:
        weight: dict[str, float] = defaultdict(float)
        for item, w in seed_weights(query, self.recency_decay).items():
            category = self.catalogue.category_of.get(item)
            if category is not None:
                weight[category] += w
        picked: list[str] = []
        taken: set[str] = set()
        ranked = sorted(weight, key=lambda c: (-weight[c], c))
        for rows in [*(self.by_category[c] for c in ranked), self.popularity.order]:
            for row in rows:
                if len(picked) >= k:
                    return picked
                item = self.catalogue.ids[row]
                if item not in query.exclude and item not in taken:
                    picked.append(item)
                    taken.add(item)
        return picked
