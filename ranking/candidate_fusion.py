"""Fuse the candidate sources of a batch of queries into one table, one row per (query, item).

Each source (towers, co-visitation, session-kNN, popularity) ranks items on its own evidence;
reciprocal-rank fusion (Cormack et al. 2009) orders their union without calibrating scores
that live on different scales, and an item several sources agree on rises. The table keeps
every source's score and rank, because those are the re-ranker's strongest features.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol, runtime_checkable

import numpy as np
import pandas as pd

from ranking.candidates import Candidate, candidates_of
from ranking.retriever import Query

# Every source the ranker's feature contract knows, in a fixed order; a source that is not
# running (no tower bundle, say) contributes empty columns, so the contract never changes.
SOURCES: tuple[str, ...] = (
    "two_tower",
    "covisitation",
    "transitions",
    "session_knn",
    "category_popularity",
    "popularity",
    "buy_again",
)

# Sources that also weigh one item against another: for each, the candidate's weight with
# each of the request's newest items, one column apiece. The KDD Cup 2023 (Amazon-M2)
# winners' strongest ranker features were exactly these; a summed source score hides
# whether the evidence comes from the item just viewed or from one five clicks ago.
PAIR_SOURCES: tuple[str, ...] = ("covisitation", "transitions", "two_tower")
NEWEST_ITEMS = 3
PAIR_COLUMNS: tuple[str, ...] = tuple(
    f"{source}_last{k}" for source in PAIR_SOURCES for k in range(1, NEWEST_ITEMS + 1)
)

# Sources whose pair weights are counts: beside the scaled weight, the raw count and its
# share of the seed's pairs (an estimate of P(candidate | seed)), for each newest item.
EVIDENCE_SOURCES: tuple[str, ...] = ("covisitation", "transitions")
EVIDENCE_COLUMNS: tuple[str, ...] = tuple(
    f"{source}_{kind}_last{k}"
    for source in EVIDENCE_SOURCES
    for kind in ("count", "share")
    for k in range(1, NEWEST_ITEMS + 1)
)


@runtime_checkable
class PairWeights(Protocol):
    """A source that can weigh candidates against given items (0 where it has no evidence)."""

    def pair_weights(self, seeds: Sequence[str], items: Sequence[str]) -> np.ndarray:
        """(len(seeds), len(items)) weights of each item with each seed."""
        ...


@runtime_checkable
class PairLookup(Protocol):
    """A pair source that weighs a whole batch of (seed, item) pairs at once by its own rows
    (co-visitation, transitions): `with_pair_columns` then makes one call per newest-item
    position for the batch instead of one per request."""

    def rows_of(self, items: Sequence[str]) -> np.ndarray:
        """Each item's row in the source (-1 where it has none)."""
        ...

    def weights_at(self, seed_rows: np.ndarray, item_rows: np.ndarray) -> np.ndarray:
        """The weight of each (seed_rows[n], item_rows[n]) pair, as `pair_weights` gives it."""
        ...

    def evidence_at(
        self, seed_rows: np.ndarray, weights: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(raw counts, share of each seed's pairs) of pairs weighing `weights`."""
        ...


def newest_items(query: Query, n: int = NEWEST_ITEMS) -> list[str]:
    """The n items a request is most about, most relevant first, distinct: the page's
    product, then the cart (last added first), then the session (newest first)."""
    ordered = [query.anchor] if query.anchor else []
    ordered += [*reversed(query.cart), *reversed(query.session_items)]
    return list(dict.fromkeys(ordered))[:n]


@dataclass(eq=False)
class CandidateTable:
    """Fused candidates of a batch of queries, column by column.

    Attributes:
        columns: equal-length arrays, one row per (query, item): `query` (position in the
            batch), `item_id`, `fused` (the reciprocal-rank-fusion score), `sources` (how
            many sources named the item), and `<source>_score` / `<source>_rank` (1-based)
            for each of :data:`SOURCES`, NaN where that source did not name the item. Rows
            are sorted by query, then by fused score (best first).
        queries: number of queries in the batch (some may have no row at all).

    The served path reads the arrays; :attr:`frame` is the same table as a DataFrame for
    training and reports. Building a DataFrame costs more than fusing one request's
    candidates, so it is only built when asked for.
    """

    columns: dict[str, np.ndarray]
    queries: int

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, queries: int) -> CandidateTable:
        return cls({str(name): frame[name].to_numpy() for name in frame.columns}, queries)

    @cached_property
    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.columns)

    def __len__(self) -> int:
        return len(self.columns["query"])

    def __getitem__(self, column: str) -> np.ndarray:
        return self.columns[column]

    def with_columns(self, **added: np.ndarray) -> CandidateTable:
        """The same rows with `added` columns (replacing any of the same name)."""
        return CandidateTable({**self.columns, **added}, self.queries)

    def ranked(self, score_column: str = "fused") -> list[list[Candidate]]:
        """Per query, its candidates ordered by `score_column` (ties keep the fused order)."""
        query = self.columns["query"]
        score = np.asarray(self.columns[score_column], dtype=float)
        # lexsort is stable: equal scores keep the fused order; NaN sorts last
        order = np.lexsort((-score, query))
        items = [str(i) for i in self.columns["item_id"][order].tolist()]
        values = score[order].tolist()
        bounds = np.searchsorted(query[order], np.arange(self.queries + 1)).tolist()
        return [
            candidates_of(items[lo:hi], values[lo:hi])
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
        ]

    def item_lists(self) -> list[list[str]]:
        return [[c.item_id for c in row] for row in self.ranked()]


def fuse(
    per_source: Mapping[str, Sequence[Sequence[Candidate]]], queries: int, depth: int, rrf_k: int
) -> CandidateTable:
    """Fuse the sources' ranked candidates and keep each query's `depth` best.

    Args:
        per_source: source name (one of :data:`SOURCES`) -> per query, its candidates best
            first. Every source must answer every query (an empty list is an answer).
        queries: the batch size.
        depth: candidates kept per query after fusion.
        rrf_k: the fusion constant; an item at rank r of a source earns 1 / (rrf_k + r).

    Raises:
        ValueError: an unknown source, or a source answering a different number of queries.
    """
    unknown = set(per_source) - set(SOURCES)
    if unknown:
        raise ValueError(f"unknown candidate sources {sorted(unknown)}; known: {list(SOURCES)}")
    names = list(per_source)
    for name, rows in per_source.items():
        if len(rows) != queries:
            raise ValueError(f"source {name!r} answered {len(rows)} queries, expected {queries}")
    # One long list of (query, item, source, rank, score), then numpy all the way: this
    # runs on every served rail, and a pandas pivot here cost more than all other stages.
    lengths = [len(r) for name in names for r in per_source[name]]
    query = np.tile(np.arange(queries, dtype=np.int64), len(names)).repeat(lengths)
    source = np.repeat(
        np.arange(len(names), dtype=np.int64), [sum(map(len, per_source[n])) for n in names]
    )
    starts = np.repeat(np.cumsum([0, *lengths])[:-1], lengths).astype(np.int64)
    rank = np.arange(1, sum(lengths) + 1, dtype=np.int64) - starts  # 1.. within each list
    items: list[str] = []
    scores: list[float] = []
    for name in names:
        for r in per_source[name]:
            if r:  # transposed in C: a generator per candidate cost more than the fusion
                row_items, row_scores = zip(*r, strict=True)
                items += row_items
                scores += row_scores
    score = np.array(scores, dtype=float)
    codes, ids = pd.factorize(np.asarray(items, dtype=object))
    key = query.astype(np.int64) * max(len(ids), 1) + codes
    # A source names an item once; should it repeat one, its best rank counts.
    order = np.lexsort((rank, source, key))
    first = np.ones(len(order), dtype=bool)
    first[1:] = (key[order][1:] != key[order][:-1]) | (source[order][1:] != source[order][:-1])
    keep = order[first]
    pairs, row = np.unique(key[keep], return_inverse=True)
    fused = np.bincount(row, weights=1.0 / (rrf_k + rank[keep]), minlength=len(pairs))
    count = np.bincount(row, minlength=len(pairs))
    columns = np.array([SOURCES.index(n) for n in names], dtype=np.int64)
    scores = np.full((len(pairs), len(SOURCES)), np.nan)
    ranks = np.full((len(pairs), len(SOURCES)), np.nan)
    scores[row, columns[source[keep]]] = score[keep]
    ranks[row, columns[source[keep]]] = rank[keep]
    pair_query = pairs // max(len(ids), 1)
    pair_item = ids[pairs % max(len(ids), 1)] if len(ids) else np.zeros(0, dtype=object)
    # Best fused first; ties go to the item with the best single rank, then the id, so the
    # order never depends on dict or hash order.
    best_rank = np.nanmin(ranks, axis=1) if len(pairs) else np.zeros(0)
    # each distinct id's rank in string order (a query names an item once, so ranking the
    # distinct ids orders every query's items as ranking all pairs did, at a fraction)
    id_rank = np.argsort(np.argsort(ids.astype(str), kind="stable"), kind="stable")
    by_id = id_rank[pairs % max(len(ids), 1)] if len(ids) else np.zeros(0, np.int64)
    order = np.lexsort((by_id, best_rank, -fused, pair_query))
    starts = np.searchsorted(pair_query[order], np.arange(queries))
    position = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    order = order[position < depth]
    data: dict[str, np.ndarray] = {
        "query": pair_query[order].astype(np.int64),
        "item_id": pair_item[order],
        "fused": fused[order],
        "sources": count[order].astype(np.int64),
    }
    for j, name in enumerate(SOURCES):
        data[f"{name}_score"] = scores[order, j]
        data[f"{name}_rank"] = ranks[order, j]
    return CandidateTable(data, queries)


def with_pair_columns(
    table: CandidateTable, queries: Sequence[Query], sources: Mapping[str, object]
) -> CandidateTable:
    """`table` plus :data:`PAIR_COLUMNS` and :data:`EVIDENCE_COLUMNS`: each candidate's
    weight with each of its request's newest items, from every pair source that is running
    (NaN where none is, or the request has fewer items; 0 where the source knows both items
    but never saw them together), and for count sources the raw count and its share."""
    values = np.full((len(table), len(PAIR_COLUMNS)), np.nan)
    evidence = np.full((len(table), len(EVIDENCE_COLUMNS)), np.nan)
    seeds = [newest_items(query) for query in queries]
    for s, name in enumerate(PAIR_SOURCES):
        source = sources.get(name)
        if isinstance(source, PairLookup):
            _batch_pairs(table, seeds, source, name, values[:, s * NEWEST_ITEMS :], evidence)
        elif isinstance(source, PairWeights):
            _per_request_pairs(table, seeds, source, values[:, s * NEWEST_ITEMS :])
    return table.with_columns(
        **{column: values[:, j] for j, column in enumerate(PAIR_COLUMNS)},
        **{column: evidence[:, j] for j, column in enumerate(EVIDENCE_COLUMNS)},
    )


def _batch_pairs(
    table: CandidateTable,
    seeds: Sequence[Sequence[str]],
    source: PairLookup,
    name: str,
    values: np.ndarray,
    evidence: np.ndarray,
) -> None:
    """A lookup source's pair columns for the whole table: per newest-item position, the
    rows whose request has that many newest items, weighed in one call (NaN elsewhere)."""
    query = np.asarray(table["query"], dtype=np.int64)
    codes, uniques = pd.factorize(np.asarray(table["item_id"], dtype=object))
    item_rows = source.rows_of(uniques.tolist())[codes] if len(uniques) else codes
    seed_rows = np.full((len(seeds), NEWEST_ITEMS), -1, np.int64)
    has = np.zeros((len(seeds), NEWEST_ITEMS), bool)
    for q, newest in enumerate(seeds):
        seed_rows[q, : len(newest)] = source.rows_of(newest)
        has[q, : len(newest)] = True
    first = EVIDENCE_SOURCES.index(name) * 2 * NEWEST_ITEMS if name in EVIDENCE_SOURCES else None
    for k in range(NEWEST_ITEMS):
        on = has[query, k]
        rows = seed_rows[query[on], k]
        weights = source.weights_at(rows, item_rows[on])
        values[on, k] = weights
        if first is not None:
            raw, share = source.evidence_at(rows, weights)
            evidence[on, first + k] = raw
            evidence[on, first + NEWEST_ITEMS + k] = share


def _per_request_pairs(
    table: CandidateTable, seeds: Sequence[Sequence[str]], source: PairWeights, values: np.ndarray
) -> None:
    """Any other pair source's columns (the towers' cosine: one small matmul per request)."""
    bounds = np.searchsorted(table["query"], np.arange(table.queries + 1))
    items = table["item_id"]
    for q, newest in enumerate(seeds):
        lo, hi = bounds[q], bounds[q + 1]
        if lo == hi or not newest:
            continue
        weights = source.pair_weights(newest, items[lo:hi].tolist())
        values[lo:hi, : len(newest)] = weights.T


def source_order(table: CandidateTable | pd.DataFrame, source: str) -> np.ndarray:
    """Scores that put `source`'s own candidates first, in its rank order, and the rest of
    the pool behind them in fused order (a rail served by one source, e.g. session-kNN)."""
    rank = np.asarray(table[f"{source}_rank"], dtype=float)
    fused = np.asarray(table["fused"], dtype=float)
    # fused scores are reciprocal-rank sums below 1, ranks are at most a few hundred
    return np.where(np.isfinite(rank), 1e6 - rank, fused)
