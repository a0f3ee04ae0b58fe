"""Item-to-item co-visitation: items that appear near each other in sessions or baskets.

The standard strong baseline for "frequently bought together" and a candidate source for
every rail. Click sessions count pairs within a window of positions, nearer pairs more;
baskets (where line order means nothing) count every pair in the basket.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from railtower.settings import (
    CovisitationSettings,
    EventWeights,
    PopularitySettings,
    TransitionSettings,
)
from ranking.candidates import Candidate
from ranking.popularity import PopularityRetriever
from ranking.retriever import (
    Catalogue,
    Query,
    event_weight_array,
    scored_top_k,
    seed_columns,
    top_k_with_backfill,
    weighted_row_batch,
)


class CovisitationRetriever:
    """Scores items by their co-visitation with the query's seed items.

    Args:
        settings: window, decay and how many neighbours each item keeps.
        weights: event-type weights (a pair whose second item was bought counts more).
        basket: True when sessions are baskets with no meaningful order.
    """

    name = "covisitation"
    # Whether a pair counts only from the earlier item to the later one (transitions).
    directed = False

    def __init__(
        self,
        settings: CovisitationSettings,
        weights: EventWeights,
        popularity: PopularitySettings,
        basket: bool,
    ) -> None:
        self.settings, self.weights, self.basket = settings, weights, basket
        self.popularity = PopularityRetriever(popularity, weights)
        self.matrix = sp.csr_matrix((0, 0))
        # Per catalogue row: the raw weight of its best kept neighbour (the matrix rows are
        # scaled to it) and the raw weight of all its pairs before the top-n cut. The scaled
        # matrix alone says "best neighbour of this seed"; these say how much evidence
        # stands behind it (one shared session or a thousand), which the re-ranker needs.
        self.row_stats = np.zeros((0, 2))
        self._pair_keys: tuple[sp.csr_matrix, np.ndarray] | None = None

    def fit(self, events: pd.DataFrame, catalogue: Catalogue) -> CovisitationRetriever:
        self.catalogue = catalogue
        self.popularity.fit(events, catalogue)
        ev = events.sort_values(["session_id", "position"], kind="stable")
        items = catalogue.indices(ev["item_id"])
        sessions = ev["session_id"].astype("category").cat.codes.to_numpy()
        known = items >= 0
        items, sessions = items[known], sessions[known]
        w = event_weight_array(ev["event_type"], self.weights)[known]
        counts = (
            self._basket_pairs(items, sessions)
            if self.basket
            else self._window_pairs(items, sessions, w)
        )
        counts.setdiag(0)
        counts.eliminate_zeros()
        counts = counts.tocsr()
        self.matrix, scale = _keep_top_per_row(counts, self.settings.neighbours)
        self.row_stats = np.column_stack([scale, np.asarray(counts.sum(axis=1)).ravel()])
        return self

    def _window_pairs(
        self, items: np.ndarray, sessions: np.ndarray, w: np.ndarray
    ) -> sp.csr_matrix:
        """Pairs within `window` positions, weighted by distance and the target's event type.

        A pair counts once per session (its strongest occurrence), so one shopper paging
        back and forth between two items cannot outweigh many shoppers.
        """
        frames = []
        for d in range(1, self.settings.window + 1):
            same = sessions[d:] == sessions[:-d]
            a, b = items[:-d][same], items[d:][same]
            s = sessions[d:][same]
            decay = self.settings.position_decay ** (d - 1)
            frames.append(pd.DataFrame({"s": s, "a": a, "b": b, "w": w[d:][same] * decay}))
            if not self.directed:
                frames.append(pd.DataFrame({"s": s, "a": b, "b": a, "w": w[:-d][same] * decay}))
        pairs = pd.concat(frames, ignore_index=True)
        pairs = pairs[pairs["a"] != pairs["b"]].groupby(["s", "a", "b"], sort=False)["w"].max()
        pairs = pairs.groupby(level=["a", "b"]).sum()
        a = pairs.index.get_level_values("a").to_numpy()
        b = pairs.index.get_level_values("b").to_numpy()
        n = len(self.catalogue)
        return sp.csr_matrix((pairs.to_numpy(), (a, b)), shape=(n, n))

    def _basket_pairs(self, items: np.ndarray, sessions: np.ndarray) -> sp.csr_matrix:
        """Every pair in a basket; large (wholesale) baskets count less per pair."""
        n_sessions, n_items = int(sessions.max()) + 1, len(self.catalogue)
        member = sp.csr_matrix(
            (np.ones(len(items)), (sessions, items)), shape=(n_sessions, n_items)
        )
        member.data[:] = 1.0  # an item bought on several lines of one invoice counts once
        size = np.asarray(member.sum(axis=1)).ravel()
        weighted = sp.diags(1.0 / np.log2(2.0 + size)) @ member
        return (member.T @ weighted).tocsr()

    def scores(self, queries: Sequence[Query]) -> sp.csr_matrix:
        """(Q, I) co-visitation score of every item with each query's seed items."""
        decay = self.settings.recency_decay
        seeds = [seed_columns(query, self.catalogue, decay) for query in queries]
        return weighted_row_batch(self.matrix, seeds, len(self.catalogue))

    def rows_of(self, items: Sequence[str]) -> np.ndarray:
        """Each item's row of the matrix; -1 for an item outside the catalogue it was fitted on."""
        index = self.catalogue.index
        return np.fromiter((index.get(i, -1) for i in items), np.int64, len(items))

    def weights_at(self, seed_rows: np.ndarray, item_rows: np.ndarray) -> np.ndarray:
        """The co-visitation weight of each (seed_rows[n], item_rows[n]) pair (0 where either
        is -1 or the pair was never seen), for a whole batch of pairs at once: every stored
        pair as one sorted key row * width + column, looked up by binary search."""
        matrix = self.matrix
        cached = getattr(self, "_pair_keys", None)  # built once per fitted or loaded matrix
        if cached is None or cached[0] is not matrix:
            if not matrix.has_sorted_indices:
                matrix.sort_indices()
            rows = np.repeat(np.arange(matrix.shape[0], dtype=np.int64), np.diff(matrix.indptr))
            self._pair_keys = (matrix, rows * matrix.shape[1] + matrix.indices)
        keys = self._pair_keys[1]
        height, width = matrix.shape
        wanted = seed_rows * width + item_rows
        at = np.minimum(np.searchsorted(keys, wanted), max(len(keys) - 1, 0))
        hit = (seed_rows >= 0) & (seed_rows < height) & (item_rows >= 0) & (item_rows < width)
        hit &= len(keys) > 0
        hit[hit] &= keys[at[hit]] == wanted[hit]
        return np.where(hit, matrix.data[at] if len(keys) else 0.0, 0.0)

    def evidence_at(
        self, seed_rows: np.ndarray, weights: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """From `weights_at`'s `weights` of pairs with `seed_rows`: (the raw pair weight, the
        pair's share of all the seed's pair weight), NaN for a seed outside the catalogue
        the source was fitted on."""
        stats = np.full((len(seed_rows), 2), np.nan)
        known = (seed_rows >= 0) & (seed_rows < len(self.row_stats))
        stats[known] = self.row_stats[seed_rows[known]]
        raw = weights * stats[:, 0]
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where(stats[:, 1] > 0, raw / stats[:, 1], 0.0)
        return raw, np.where(np.isnan(raw), np.nan, share)

    def pair_weights(self, seeds: Sequence[str], items: Sequence[str]) -> np.ndarray:
        """(len(seeds), len(items)) co-visitation weight of each item with each seed item
        (0 for an item or seed outside the catalogue the matrix was fitted on)."""
        seed_rows, item_rows = self.rows_of(seeds), self.rows_of(items)
        grid = self.weights_at(np.repeat(seed_rows, len(items)), np.tile(item_rows, len(seeds)))
        return grid.reshape(len(seeds), len(items))

    def pair_evidence(
        self, seeds: Sequence[str], weights: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """`evidence_at` for :meth:`pair_weights`' (len(seeds), len(items)) `weights`."""
        rows = np.repeat(self.rows_of(seeds), weights.shape[1])
        raw, share = self.evidence_at(rows, weights.reshape(-1))
        return raw.reshape(weights.shape), share.reshape(weights.shape)

    def recommend(self, queries: Sequence[Query], k: int) -> list[list[str]]:
        scores = self.scores(queries)
        return top_k_with_backfill(scores, queries, self.catalogue, self.popularity.order, k)

    def candidates(self, queries: Sequence[Query], k: int) -> list[list[Candidate]]:
        return scored_top_k(self.scores(queries), queries, self.catalogue, k)


class TransitionRetriever(CovisitationRetriever):
    """What shoppers go to next: co-visitation counted forward only, a short window.

    Symmetric co-visitation answers "seen together"; a next-item rail asks "seen after".
    Counting a pair only from the earlier item to the later one keeps the direction of
    browsing (accessory after phone, not phone after accessory), and the query weighs its
    newest items most (`recency_decay` of its own). KDD Cup 2023 (Amazon-M2) solutions
    used exactly such forward matrices beside the symmetric one.

    Baskets have no order, so there the source is co-purchase lift instead: the basket
    co-occurrence divided by the partner's basket count to the power `lift`, which lets a
    specific complement outrank an item that is in every basket anyway.
    """

    name = "transitions"
    directed = True

    def __init__(
        self,
        settings: TransitionSettings,
        weights: EventWeights,
        popularity: PopularitySettings,
        basket: bool,
    ) -> None:
        super().__init__(settings, weights, popularity, basket)
        self.lift = settings.lift

    def _basket_pairs(self, items: np.ndarray, sessions: np.ndarray) -> sp.csr_matrix:
        counts = super()._basket_pairs(items, sessions)
        n = len(self.catalogue)
        distinct = np.unique(sessions.astype(np.int64) * n + items)  # (basket, item) once
        baskets = np.bincount(distinct % n, minlength=n).astype(float)
        damp = np.power(np.maximum(baskets, 1.0), -self.lift)
        return (counts @ sp.diags(damp)).tocsr()


def _keep_top_per_row(matrix: sp.csr_matrix, n: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """Keep each row's n largest entries, scaled so the row's best neighbour scores 1, and
    each row's scale (its largest raw entry, 0 for an empty row).

    Scaling makes seed items comparable: a popular seed would otherwise drown the others.
    """
    scale = np.zeros(matrix.shape[0])
    rows, cols, vals = [], [], []
    for r in range(matrix.shape[0]):
        start, end = matrix.indptr[r], matrix.indptr[r + 1]
        if start == end:
            continue
        c, v = matrix.indices[start:end], matrix.data[start:end]
        if len(v) > n:
            top = np.argpartition(-v, n - 1)[:n]
            c, v = c[top], v[top]
        scale[r] = v.max()
        rows.append(np.full(len(c), r))
        cols.append(c)
        vals.append(v / scale[r])
    if not rows:
        return sp.csr_matrix(matrix.shape), scale
    kept = sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=matrix.shape
    )
    return kept, scale
