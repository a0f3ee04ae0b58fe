"""Recency-weighted popularity: the list most shops run today, and every rail's last fallback."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from railtower.settings import EventWeights, PopularitySettings
from ranking.candidates import Candidate
from ranking.retriever import Catalogue, Query, event_weight_array, top_k_with_backfill


class PopularityRetriever:
    """Scores each item by its type-weighted events, halved every half-life before the cut.

    The half-life is a share of the training window, so the same setting suits a three-hour
    sample and a two-year log; without a clock (ids-only data) it is a plain weighted count.
    """

    name = "popularity"

    def __init__(self, settings: PopularitySettings, weights: EventWeights) -> None:
        self.settings, self.weights = settings, weights
        self.order: np.ndarray = np.empty(0, dtype=np.int64)
        self.scores: np.ndarray = np.empty(0)

    def fit(self, events: pd.DataFrame, catalogue: Catalogue) -> PopularityRetriever:
        self.catalogue = catalogue
        idx = catalogue.indices(events["item_id"])
        w = event_weight_array(events["event_type"], self.weights)
        seconds = (events["event_time"] - events["event_time"].max()).dt.total_seconds().to_numpy()
        span = -seconds.min() if len(seconds) else 0.0
        if span > 0:
            half_life = self.settings.half_life_share * span
            w = w * np.power(0.5, -seconds / half_life)
        keep = idx >= 0
        return self.restore(
            catalogue, np.bincount(idx[keep], weights=w[keep], minlength=len(catalogue))
        )

    def restore(self, catalogue: Catalogue, scores: np.ndarray) -> PopularityRetriever:
        """Set the fitted state (a saved bundle's scores) without the events."""
        self.catalogue, self.scores = catalogue, scores
        # Ties (and never-seen items) fall back to catalogue order, so results are stable.
        self.order = np.lexsort((np.arange(len(catalogue)), -self.scores))
        return self

    def recommend(self, queries: Sequence[Query], k: int) -> list[list[str]]:
        empty = sp.csr_matrix((len(queries), len(self.catalogue)))
        return top_k_with_backfill(empty, queries, self.catalogue, self.order, k)

    def candidates(self, queries: Sequence[Query], k: int) -> list[list[Candidate]]:
        """The most popular items not excluded, scored by their decayed event weight."""
        out = []
        for query in queries:
            picked: list[Candidate] = []
            for idx in self.order:
                if len(picked) >= k or self.scores[idx] <= 0:
                    break
                item = str(self.catalogue.ids[idx])
                if item not in query.exclude:
                    picked.append(Candidate(item, float(self.scores[idx])))
            out.append(picked)
        return out


class RandomRetriever:
    """Uniformly random items from the catalogue: the floor every model must clear."""

    name = "random"

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def fit(self, events: pd.DataFrame, catalogue: Catalogue) -> RandomRetriever:  # noqa: ARG002
        self.catalogue = catalogue
        return self

    def recommend(self, queries: Sequence[Query], k: int) -> list[list[str]]:
        rng = np.random.default_rng(self.seed)
        out = []
        for query in queries:
            draw = rng.choice(
                len(self.catalogue),
                size=min(k + len(query.exclude), len(self.catalogue)),
                replace=False,
            )
            out.append([i for i in self.catalogue.ids[draw] if i not in query.exclude][:k])
        return out
