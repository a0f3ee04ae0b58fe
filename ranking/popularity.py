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
        self._ranked: list[Candidate] = []
        self._complete = False  # _ranked holds every positively scored item

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
        self._ranked, self._complete = [], False
        return self

    def top(self, n: int) -> list[Candidate]:
        """The (at most) n most popular items with a positive score, as candidates.

        Built once and grown on demand: per request, reading numpy scalars one by one cost
        more than the rest of the source.
        """
        ranked = self._ranked
        if len(ranked) < n and not self._complete:
            head = self.order[: max(n, 2 * len(ranked), 256)]
            rows = head[self.scores[head] > 0]  # sorted by score: the positive ones lead
            self._complete = len(rows) < len(head) or len(head) == len(self.order)
            ranked = [
                Candidate(item, score)
                for item, score in zip(
                    self.catalogue.ids[rows].tolist(), self.scores[rows].tolist(), strict=True
                )
            ]
            self._ranked = ranked  # one assignment: request threads may read it meanwhile
        return ranked[:n]

    def recommend(self, queries: Sequence[Query], k: int) -> list[list[str]]:
        empty = sp.csr_matrix((len(queries), len(self.catalogue)))
        return top_k_with_backfill(empty, queries, self.catalogue, self.order, k)

    def candidates(self, queries: Sequence[Query], k: int) -> list[list[Candidate]]:
        """The most popular items not excluded, scored by their decayed event weight."""
        out = []
        for query in queries:
            exclude = query.exclude
            # at most len(exclude) of the head are excluded, so k + len(exclude) suffice
            picked = [c for c in self.top(k + len(exclude)) if c.item_id not in exclude]
            out.append(picked[:k])
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
