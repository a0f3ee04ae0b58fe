"""Session-based kNN (V-SKNN style): recommend what similar past sessions went on to touch.

Published comparisons (Ludewig & Jannach 2018, Latifi et al. 2021) find such neighbourhood
methods match or beat neural session models, so this is a bar the towers must clear.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from railtower.settings import EventWeights, PopularitySettings, SessionKnnSettings
from ranking.candidates import Candidate
from ranking.popularity import PopularityRetriever
from ranking.retriever import (
    Catalogue,
    Query,
    query_matrix,
    scored_top_k,
    top_k_with_backfill,
)

_CHUNK = 512


class SessionKnnRetriever:
    """Scores items by the similarity-weighted votes of the nearest past sessions.

    Similarity is the dot product of the query's position-weighted (recent items count
    more), IDF-weighted item vector with each past session's item set, normalised by the
    square root of that session's length. Only the `sample_sessions` most recent sessions
    sharing an item are considered (recency sampling), then the top `neighbours` vote.
    """

    name = "session_knn"

    def __init__(
        self, settings: SessionKnnSettings, weights: EventWeights, popularity: PopularitySettings
    ) -> None:
        self.settings = settings
        self.popularity = PopularityRetriever(popularity, weights)

    def fit(self, events: pd.DataFrame, catalogue: Catalogue) -> SessionKnnRetriever:
        self.catalogue = catalogue
        self.popularity.fit(events, catalogue)
        items = catalogue.indices(events["item_id"])
        known = items >= 0
        ends = events.loc[known].groupby("session_id", sort=False)["event_time"].max()
        # Session rows ordered oldest -> newest, so a larger row index means more recent.
        ends = ends.sort_values(kind="stable")
        row_of = pd.Series(np.arange(len(ends)), index=ends.index)
        rows = events.loc[known, "session_id"].map(row_of).to_numpy()
        member = sp.csr_matrix(
            (np.ones(len(rows)), (rows, items[known])), shape=(len(ends), len(catalogue))
        )
        member.data[:] = 1.0
        self.sessions = member
        length = np.asarray(member.sum(axis=1)).ravel()
        self.norm = 1.0 / np.sqrt(np.maximum(length, 1.0))
        df = np.asarray(member.sum(axis=0)).ravel()
        self.idf = (
            np.log((len(ends) + 1) / (df + 1)) + 1.0
            if self.settings.idf_weighting
            else np.ones(len(catalogue))
        )
        return self

    def recommend(self, queries: Sequence[Query], k: int) -> list[list[str]]:
        out: list[list[str]] = []
        for start in range(0, len(queries), _CHUNK):
            chunk = queries[start : start + _CHUNK]
            votes = self._votes(chunk)
            out += top_k_with_backfill(votes, chunk, self.catalogue, self.popularity.order, k)
        return out

    def candidates(self, queries: Sequence[Query], k: int) -> list[list[Candidate]]:
        out: list[list[Candidate]] = []
        for start in range(0, len(queries), _CHUNK):
            chunk = queries[start : start + _CHUNK]
            out += scored_top_k(self._votes(chunk), chunk, self.catalogue, k)
        return out

    def _votes(self, queries: Sequence[Query]) -> sp.csr_matrix:
        seeds = query_matrix(queries, self.catalogue, self.settings.recency_decay)
        sims = (seeds @ sp.diags(self.idf) @ self.sessions.T).tocsr() @ sp.diags(self.norm)
        return (self._nearest(sp.csr_matrix(sims)) @ self.sessions).tocsr()

    def _nearest(self, sims: sp.csr_matrix) -> sp.csr_matrix:
        """Per row: the most recent `sample_sessions` matches, then the top `neighbours`."""
        rows, cols, vals = [], [], []
        for r in range(sims.shape[0]):
            start, end = sims.indptr[r], sims.indptr[r + 1]
            c, v = sims.indices[start:end], sims.data[start:end]
            if len(c) > self.settings.sample_sessions:
                recent = np.argpartition(-c, self.settings.sample_sessions - 1)
                keep = recent[: self.settings.sample_sessions]
                c, v = c[keep], v[keep]
            if len(c) > self.settings.neighbours:
                top = np.lexsort((-c, -v))[: self.settings.neighbours]
                c, v = c[top], v[top]
            rows.append(np.full(len(c), r))
            cols.append(c)
            vals.append(v)
        return sp.csr_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=sims.shape
        )
