"""Retrieval with a trained bundle: session vector -> HNSW top-K over the catalogue."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from ranking.bundle import TowerBundle
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

    def recommend(self, queries: Sequence[Query], k: int) -> list[list[str]]:
        out: list[list[str]] = []
        for start in range(0, len(queries), _BATCH):
            chunk = queries[start : start + _BATCH]
            histories = [
                history_of(q.session_items, q.session_types, q.session_times, q.anchor, q.cart)
                for q in chunk
            ]
            vectors = self.bundle.encode_sessions(histories, [q.context for q in chunk])
            ids, _ = self.bundle.index.search(vectors, k, [q.exclude for q in chunk])
            out.extend(ids)
        return out
