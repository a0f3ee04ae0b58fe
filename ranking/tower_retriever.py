"""Retrieval with a trained bundle: session vector -> HNSW top-K over the catalogue."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ranking.bundle import TowerBundle
from ranking.candidates import Candidate
from ranking.retriever import Catalogue, Query
from towers.session_features import history_of

_BATCH = 1024


class BundleRetriever:
    """Answers rail queries with a loaded :class:`TowerBundle`.

    Every rail is a session history: pdp_fbt adds the product on the page as the newest
    view, cart_upsell adds the cart; the index never returns an excluded item.
    """

    name = "two_tower"

    def __init__(self, bundle: TowerBundle) -> None:
        self.bundle = bundle

    def fit(self, events: pd.DataFrame, catalogue: Catalogue) -> BundleRetriever:  # noqa: ARG002
        return self  # already trained: a bundle is a fitted model

    def pair_weights(self, seeds: Sequence[str], items: Sequence[str]) -> np.ndarray:
        return self.bundle.pair_weights(seeds, items)

    def recommend(self, queries: Sequence[Query], k: int) -> list[list[str]]:
        return [[c.item_id for c in row] for row in self.candidates(queries, k)]

    def candidates(self, queries: Sequence[Query], k: int) -> list[list[Candidate]]:
        """The k nearest items per query, scored by inner product with the session vector."""
        out: list[list[Candidate]] = []
        for start in range(0, len(queries), _BATCH):
            chunk = queries[start : start + _BATCH]
            histories = [
                history_of(q.session_items, q.session_types, q.session_times, q.anchor, q.cart)
                for q in chunk
            ]
            vectors = self.bundle.encode_sessions(histories, [q.context for q in chunk])
            ids, scores = self.bundle.index.search(vectors, k, [q.exclude for q in chunk])
            out.extend(
                [Candidate(i, float(s)) for i, s in zip(row, row_scores, strict=True)]
                for row, row_scores in zip(ids, scores, strict=True)
            )
        return out
