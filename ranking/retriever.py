"""What every candidate source shares: the query it answers and the catalogue it ranks.

A retriever is fitted on canonical training events and answers batches of queries with
ranked item ids drawn from the whole catalogue. The evaluation harness, the candidate
merger and the serving fallbacks all talk to retrievers through this one protocol.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pandas as pd
import scipy.sparse as sp

from railtower.settings import EventWeights
from ranking.candidates import Candidate, candidates_of


@dataclass(frozen=True)
class Query:
    """What a rail knows when it is asked for items.

    Attributes:
        session_items: the session's items so far, oldest first.
        session_types: the event type of each of those items.
        anchor: the product on the page (pdp_fbt), else None.
        cart: items in the cart (cart_upsell), else empty.
        exclude: items that must not be returned (the anchor, the cart, items already seen).
        session_times: epoch seconds of each session item (empty where there is no clock).
        context: device / locale / country of the request, if known.
        past_purchases: what the shopper bought in earlier sessions, one entry per
            (session, item), oldest first; empty for guests (the buy-again source reads it).
    """

    session_items: tuple[str, ...] = ()
    session_types: tuple[str, ...] = ()
    session_times: tuple[float, ...] = ()
    context: str | None = None
    anchor: str | None = None
    cart: tuple[str, ...] = ()
    exclude: frozenset[str] = field(default_factory=frozenset)
    past_purchases: tuple[str, ...] = ()


class Retriever(Protocol):
    name: str

    def fit(self, events: pd.DataFrame, catalogue: Catalogue) -> Retriever: ...

    def recommend(self, queries: Sequence[Query], k: int) -> list[list[str]]: ...


class CandidateSource(Retriever, Protocol):
    """A retriever that also says how strongly it backs each item (the re-ranker's input).

    `candidates` returns only items the source has evidence for, best first, with its own
    score: no popularity backfill, so "this source did not name the item" stays visible.
    """

    def candidates(self, queries: Sequence[Query], k: int) -> list[list[Candidate]]: ...


class Catalogue:
    """Item ids <-> dense indices over the full catalogue, plus category lookups."""

    def __init__(self, items: pd.DataFrame) -> None:
        self.ids: np.ndarray = items["item_id"].astype(str).to_numpy()
        self.index: dict[str, int] = {item: i for i, item in enumerate(self.ids)}
        cats = items["category_path"] if "category_path" in items.columns else None
        self.category_of: dict[str, str] = (
            {}
            if cats is None
            else {
                i: c for i, c in zip(self.ids, cats.to_numpy(), strict=True) if isinstance(c, str)
            }
        )

    def __len__(self) -> int:
        return len(self.ids)

    def indices(self, items: pd.Series) -> np.ndarray:
        """Dense index per item id; -1 where the item is not in the catalogue."""
        return items.map(self.index).fillna(-1).astype(np.int64).to_numpy()


def seed_weights(query: Query, recency_decay: float) -> dict[str, float]:
    """Items the query is about, with a weight each.

    pdp_fbt is about the anchor (the session behind it counts less), cart_upsell about every
    cart item equally, homepage_hero about the session with recent items weighted most.
    """
    weights: dict[str, float] = {}
    history_scale = 0.3 if (query.anchor or query.cart) else 1.0
    for steps_back, item in enumerate(reversed(query.session_items)):
        w = history_scale * recency_decay**steps_back
        weights[item] = max(weights.get(item, 0.0), w)
    for item in query.cart:
        weights[item] = 1.0
    if query.anchor is not None:
        weights[query.anchor] = 1.0
    return weights


def seed_columns(
    query: Query, catalogue: Catalogue, recency_decay: float
) -> tuple[np.ndarray, np.ndarray]:
    """The query's seed items as catalogue columns ascending, with their weights; items
    outside the catalogue are dropped. (Ascending, as in a CSR row of seed weights, so sums
    over the seeds run in the order a sparse product runs them.)"""
    weights = {
        col: w
        for item, w in seed_weights(query, recency_decay).items()
        if (col := catalogue.index.get(item)) is not None
    }
    columns = np.fromiter(sorted(weights), np.int64, len(weights))
    return columns, np.array([weights[c] for c in columns.tolist()], dtype=float)


def weighted_row_batch(
    matrix: sp.csr_matrix, seeds: Sequence[tuple[np.ndarray, np.ndarray]], width: int
) -> sp.csr_matrix:
    """Row q is sum_k weights_q[k] * matrix[rows_q[k]] for `seeds[q] = (rows_q, weights_q)`:
    each query's row of `seeds @ matrix`, reading only the rows its seeds name, the whole
    batch in one pass (a sparse matmul spends most of its time validating formats, and a
    loop of small numpy calls per query most of its time in call overhead).

    Products are summed in the order of each query's rows (bincount adds in input order);
    given ascending rows that is the matmul's order, so both give the same floats, which
    the re-ranker's features rely on.
    """
    counts = [len(rows) for rows, _ in seeds]
    rows = np.concatenate([r for r, _ in seeds] or [np.zeros(0, np.int64)]).astype(np.int64)
    weights = np.concatenate([w for _, w in seeds] or [np.zeros(0)])
    starts, ends = matrix.indptr[rows], matrix.indptr[rows + 1]
    lengths = (ends - starts).astype(np.int64)
    # the positions of every seed row's entries, row after row (a ragged arange)
    before = np.cumsum(lengths) - lengths
    at = np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(starts - before, lengths)
    query = np.repeat(np.repeat(np.arange(len(seeds), dtype=np.int64), counts), lengths)
    key = query * width + matrix.indices[at]
    values = matrix.data[at] * np.repeat(weights, lengths)
    unique, inverse = np.unique(key, return_inverse=True)
    summed = np.bincount(inverse, weights=values, minlength=len(unique))
    owner = unique // width
    indptr = np.searchsorted(owner, np.arange(len(seeds) + 1))
    return sp.csr_matrix((summed, unique % width, indptr), shape=(len(seeds), width))


def event_weight_array(event_types: pd.Series, weights: EventWeights) -> np.ndarray:
    table = {name: weights.of(name) for name in EventWeights.model_fields}
    return event_types.map(table).fillna(0.0).to_numpy(dtype=np.float64)


def scored_top_k(
    scores: sp.csr_matrix, queries: Sequence[Query], catalogue: Catalogue, k: int
) -> list[list[Candidate]]:
    """Per row of a sparse score matrix, the k best positively scored items as candidates.

    Ties break by catalogue index so results are deterministic; excluded items never appear.
    A row may hold fewer than k: a candidate source only names items it has evidence for.
    """
    scores = scores.tocsr()
    rows = np.repeat(np.arange(scores.shape[0]), np.diff(scores.indptr))
    # the whole batch sorted at once: by row, best score first, then catalogue index
    order = np.lexsort((scores.indices, -scores.data, rows))
    order = order[scores.data[order] > 0]
    bounds = np.searchsorted(rows[order], np.arange(len(queries) + 1)).tolist()
    items = catalogue.ids[scores.indices[order]].tolist()
    values = scores.data[order].tolist()
    results: list[list[Candidate]] = []
    for row, query in enumerate(queries):
        lo, hi = bounds[row], bounds[row + 1]
        head = items[lo : min(hi, lo + k)]
        if query.exclude.isdisjoint(head):  # the usual case: the first k are the answer
            results.append(candidates_of(head, values[lo : lo + len(head)]))
            continue
        kept = (
            (item, value)
            for item, value in zip(items[lo:hi], values[lo:hi], strict=True)
            if item not in query.exclude
        )
        results.append([Candidate(*pair) for pair in itertools.islice(kept, k)])
    return results


def top_k_with_backfill(
    scores: sp.csr_matrix,
    queries: Sequence[Query],
    catalogue: Catalogue,
    fallback_order: np.ndarray,
    k: int,
) -> list[list[str]]:
    """Top-k items per row of a sparse score matrix, then popular items until k are filled."""
    results: list[list[str]] = []
    for query, scored in zip(queries, scored_top_k(scores, queries, catalogue, k), strict=True):
        picked = [c.item_id for c in scored]
        taken = set(picked)
        for idx in fallback_order:
            if len(picked) >= k:
                break
            item = catalogue.ids[idx]
            if item not in query.exclude and item not in taken:
                picked.append(item)
                taken.add(item)
        results.append(picked)
    return results
