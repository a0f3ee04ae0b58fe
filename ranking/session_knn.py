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
    scored_top_k,
    seed_columns,
    top_k_with_backfill,
    weighted_row_batch,
)


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
        length = np.asarray(member.sum(axis=1)).ravel()
        df = np.asarray(member.sum(axis=0)).ravel()
        idf = (
            np.log((len(ends) + 1) / (df + 1)) + 1.0
            if self.settings.idf_weighting
            else np.ones(len(catalogue))
        )
        return self.restore(catalogue, member, 1.0 / np.sqrt(np.maximum(length, 1.0)), idf)

    def restore(
        self, catalogue: Catalogue, sessions: sp.csr_matrix, norm: np.ndarray, idf: np.ndarray
    ) -> SessionKnnRetriever:
        """Take fitted state (sessions x items membership, per-session norm, per-item idf)."""
        self.catalogue = catalogue
        self.sessions = sp.csr_matrix(sessions)
        self.sessions.sort_indices()
        self.norm, self.idf = norm, idf
        # item -> the sessions holding it, oldest first: a request reads only its seeds'
        # columns, so no per-request work grows with the number of sessions
        self._holding = self.sessions.tocsc()
        self._holding.sort_indices()
        return self

    def recommend(self, queries: Sequence[Query], k: int) -> list[list[str]]:
        return top_k_with_backfill(
            self._votes(queries), queries, self.catalogue, self.popularity.order, k
        )

    def candidates(self, queries: Sequence[Query], k: int) -> list[list[Candidate]]:
        return scored_top_k(self._votes(queries), queries, self.catalogue, k)

    def _votes(self, queries: Sequence[Query]) -> sp.csr_matrix:
        """(Q, I) votes: per query, its neighbour sessions' similarity summed per item."""
        neighbours = [self._neighbours(query) for query in queries]
        return weighted_row_batch(self.sessions, neighbours, len(self.catalogue))

    def _neighbours(self, query: Query) -> tuple[np.ndarray, np.ndarray]:
        """(neighbour sessions ascending, their similarity) of one query; their items'
        votes are the similarity-weighted sum of their rows of `sessions`.

        Similarity of a past session s: sum over the query's seed items i in s of
        weight_i * idf_i, times norm_s. Only the `sample_sessions` most recent sessions
        sharing a seed are candidates (recency sampling), then the `neighbours` most similar
        (ties: the more recent) vote with their similarity for each of their items.
        """
        columns, weights = seed_columns(query, self.catalogue, self.settings.recency_decay)
        sample, holding = self.settings.sample_sessions, self._holding
        parts, shares = [], []
        for col, w in zip(columns.tolist(), weights.tolist(), strict=True):
            # a session among the `sample` most recent of the union is among the `sample`
            # most recent of every seed list holding it, so each list can be cut first
            start, end = holding.indptr[col], holding.indptr[col + 1]
            held = holding.indices[max(start, end - sample) : end]
            parts.append(held)
            shares.append(np.full(len(held), w * self.idf[col]))
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0)
        session, at = np.unique(np.concatenate(parts), return_inverse=True)
        sim = np.bincount(at, weights=np.concatenate(shares), minlength=len(session))
        session, sim = session[-sample:], sim[-sample:] * self.norm[session[-sample:]]
        if len(session) > self.settings.neighbours:
            # the most similar, back in session order (the order the votes are summed in)
            top = np.sort(np.lexsort((-session, -sim))[: self.settings.neighbours])
            session, sim = session[top], sim[top]
        return session, sim
