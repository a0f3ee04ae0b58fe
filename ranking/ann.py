"""Approximate nearest-neighbour search over item vectors, shared by training and serving.

Training builds an index on the item tower's L2-normalised vectors (so inner product equals
cosine), tunes HNSW's search beam `ef` against exact search and saves the folder; serving loads
the folder and answers user vectors with item ids, best first. Two implementations share one
protocol, :class:`VectorIndex`: :class:`ExactIndex` (numpy brute force, the reference and the
small-catalogue choice) and :class:`HnswIndex` (hnswlib graph, for large catalogues).

Saved folders (format and checks in :mod:`ranking.ann_files`) load with :func:`load_index`,
which raises :class:`~railtower.errors.ArtifactMismatch` on any missing or inconsistent file.

One module on purpose: two implementations of one protocol plus the `ef` tuning that
compares them; the file format and its checks already live in ranking.ann_files.
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, Protocol, Self

import hnswlib
import numpy as np

from railtower.errors import ArtifactMismatch
from railtower.logs import get_logger
from railtower.settings import IndexSettings
from ranking.ann_files import (
    HNSW_FILE,
    META,
    NODES_FILE,
    SPACE,
    VECTORS_FILE,
    check_hnsw_header,
    load_npy,
    read_folder,
    read_meta,
    write_folder,
)

log = get_logger(__name__)

# Score at most this many query x item products at once, so a 1,000-query batch against a
# 1M catalogue stays at ~256 MB of scores instead of 4 GB.
_EXACT_CHUNK_CELLS = 64 * 1024 * 1024

SearchResult = tuple[list[list[str]], list[np.ndarray]]


class VectorIndex(Protocol):
    """What training and serving need from a vector index, whatever its implementation.

    Example:
        >>> index = ExactIndex()
        >>> index.build(np.array(["a", "b"]), np.eye(2, dtype=np.float32))
        >>> index.search(np.array([[0.0, 1.0]], dtype=np.float32), k=1)[0]
        [['b']]
    """

    ids: np.ndarray

    def build(self, ids: np.ndarray, vectors: np.ndarray) -> None: ...

    def search(
        self, queries: np.ndarray, k: int, exclude: Sequence[Collection[str]] | None = None
    ) -> SearchResult: ...

    def save(self, folder: Path) -> None: ...

    @classmethod
    def load(cls, folder: Path) -> Self: ...

    def vector(self, item_id: str) -> np.ndarray: ...

    def __len__(self) -> int: ...


class _IdMap:
    """Item ids <-> dense labels 0..N-1 (hnswlib and numpy rows both use the labels)."""

    def __init__(self) -> None:
        self.ids: np.ndarray = np.empty(0, dtype="<U1")
        self._label_of: dict[str, int] | None = None

    def set(self, ids: np.ndarray) -> None:
        self.ids, self._label_of = ids, None

    @property
    def label_of(self) -> dict[str, int]:
        # Built on first use: a 1M-id dict costs ~150 MB and seconds, and batch scoring
        # without excludes never needs it.
        if self._label_of is None:
            self._label_of = {item: i for i, item in enumerate(self.ids.tolist())}
        return self._label_of

    def labels(self, items: Collection[str]) -> np.ndarray:
        """Labels of the items that are in the index; unknown ids are ignored."""
        known = [self.label_of[i] for i in set(items) if i in self.label_of]
        return np.asarray(known, dtype=np.int64)

    def vector_label(self, item_id: str) -> int:
        label = self.label_of.get(item_id)
        if label is None:
            raise KeyError(f"item {item_id!r} is not in the index ({len(self.ids):,} items)")
        return label


class ExactIndex(_IdMap):
    """Brute-force inner-product search: one matmul and an argpartition per query chunk.

    The reference every approximate index is measured against, and fast enough on its own for
    catalogues of tens of thousands of items.

    Example:
        >>> index = ExactIndex()
        >>> index.build(np.array(["tv", "hdmi"]), np.eye(2, dtype=np.float32))
        >>> ids, scores = index.search(np.eye(2, dtype=np.float32)[:1], k=2)
        >>> ids
        [['tv', 'hdmi']]
    """

    def __init__(self) -> None:
        super().__init__()
        self.vectors: np.ndarray = np.empty((0, 0), dtype=np.float32)

    def __len__(self) -> int:
        return len(self.ids)

    def build(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Index `vectors` under `ids`.

        Args:
            ids: (N,) unique item ids.
            vectors: (N, D) float32, L2-normalised rows.
        """
        ids, self.vectors = _validated(ids, vectors)
        self.set(ids)

    def search(
        self, queries: np.ndarray, k: int, exclude: Sequence[Collection[str]] | None = None
    ) -> SearchResult:
        """The k items with the highest inner product per query, never an excluded one.

        Args:
            queries: (Q, D) float32.
            k: items wanted per query.
            exclude: per query, ids that must not be returned (unknown ids are ignored).

        Returns:
            ids: Q lists, best first, each of min(k, N - |exclude ∩ ids|) items.
            scores: Q float32 arrays of the same lengths, non-increasing.
        """
        queries, excluded = _checked_query(self, queries, k, exclude)
        return self._exact(queries, k, excluded)

    def _exact(self, queries: np.ndarray, k: int, excluded: list[np.ndarray]) -> SearchResult:
        n = len(self.ids)
        ids: list[list[str]] = []
        scores: list[np.ndarray] = []
        chunk = max(1, _EXACT_CHUNK_CELLS // max(n, 1))
        for start in range(0, len(queries), chunk):
            block = queries[start : start + chunk] @ self.vectors.T  # (q, N)
            for row, labels in enumerate(excluded[start : start + chunk]):
                block[row, labels] = -np.inf  # excluded items sort last and are cut below
            top = _top_k_rows(block, k)
            for row, labels in enumerate(excluded[start : start + chunk]):
                keep = top[row, : min(k, n - len(labels))]
                ids.append(self.ids[keep].tolist())
                scores.append(block[row, keep].astype(np.float32))
        return ids, scores

    def vector(self, item_id: str) -> np.ndarray:
        """(D,) float32 vector of one item; KeyError if it is not indexed."""
        return np.array(self.vectors[self.vector_label(item_id)], dtype=np.float32)

    def save(self, folder: Path) -> None:
        """Write `vectors.npy`, `ids.npy` and `index.json` into `folder` (created if needed)."""
        meta = {"kind": "exact", "space": SPACE, "dim": self.vectors.shape[1], "count": len(self)}
        write_folder(folder, self.ids, meta)
        np.save(folder / VECTORS_FILE, self.vectors, allow_pickle=False)

    @classmethod
    def load(cls, folder: Path) -> ExactIndex:
        """Read a folder written by :meth:`save`.

        Raises:
            ArtifactMismatch: a file is missing or unreadable, or the JSON disagrees with them.
        """
        meta, ids = read_folder(folder, "exact", VECTORS_FILE)
        vectors = load_npy(folder / VECTORS_FILE)
        if vectors.ndim != 2 or vectors.shape != (meta["count"], meta["dim"]):
            raise ArtifactMismatch(
                f"{folder / VECTORS_FILE} holds shape {vectors.shape} but {folder / META} "
                f"says count={meta['count']}, dim={meta['dim']}; rebuild the index"
            )
        index = cls()
        index.set(ids)
        index.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        return index


class HnswIndex(_IdMap):
    """hnswlib HNSW graph over inner product, with over-fetching so excludes never shorten lists.

    Items with identical vectors share one graph node. An item tower without content gives
    every item it has no id embedding for the same vector (Amazon-M2's untrained items, a
    hashed-id collision), and thousands of equal points wreck an HNSW graph: on Amazon-M2's
    catalogue recall@120 against exact search stalled at 0.79-0.83 whatever the beam, and
    reached 0.992 at ef 256 (0.999 at 400) once the duplicates shared a node. A node's items
    come back together, in catalogue order (the exact index's tie order).

    Args:
        m: graph degree (hnswlib `M`).
        ef_construction: build-time beam width.
        ef: search beam width; :func:`tune_ef` picks it against exact search.
        num_threads: build and batch-query threads; None means every core this process may use.
        seed: hnswlib's level-assignment seed (a multithreaded build is still not bit-identical
            run to run, because insertion order varies).

    Example:
        >>> index = HnswIndex(m=8, ef_construction=64)
        >>> index.build(np.array(["tv", "hdmi"]), np.eye(2, dtype=np.float32))
        >>> index.search(np.eye(2, dtype=np.float32)[1:], k=1)[0]
        [['hdmi']]
    """

    def __init__(
        self,
        m: int = 16,
        ef_construction: int = 128,
        ef: int = 128,
        num_threads: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.m, self.ef_construction, self._ef, self.seed = m, ef_construction, ef, seed
        self.num_threads = num_threads or len(os.sched_getaffinity(0))
        self._graph: hnswlib.Index | None = None
        # The graph node of each item label, and the item labels of each node: node j holds
        # members[starts[j]:starts[j + 1]], ascending. Identity when no two vectors are equal.
        self._node_of = np.empty(0, dtype=np.int64)
        self._members = np.empty(0, dtype=np.int64)
        self._starts = np.zeros(1, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def ef(self) -> int:
        return self._ef

    @ef.setter
    def ef(self, value: int) -> None:
        if value < 1:
            raise ValueError(f"ef must be >= 1, got {value}")
        self._ef = int(value)
        if self._graph is not None:
            self._graph.set_ef(self._ef)

    def build(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Insert `vectors` under `ids` with `num_threads` threads.

        Args:
            ids: (N,) unique item ids.
            vectors: (N, D) float32, L2-normalised rows.
        """
        ids, vectors = _validated(ids, vectors)
        node_of, representatives = _shared_nodes(vectors)
        graph = hnswlib.Index(space=SPACE, dim=vectors.shape[1])
        graph.init_index(
            max_elements=len(representatives),
            ef_construction=self.ef_construction,
            M=self.m,
            random_seed=self.seed,
        )
        graph.add_items(
            vectors[representatives],
            np.arange(len(representatives)),
            num_threads=self.num_threads,
        )
        graph.set_ef(self._ef)
        self._graph = graph
        self.set(ids)
        self._set_nodes(node_of)

    def _set_nodes(self, node_of: np.ndarray) -> None:
        self._node_of = np.asarray(node_of, dtype=np.int64)
        self._members = np.argsort(self._node_of, kind="stable")
        nodes = int(self._node_of.max()) + 1 if len(self._node_of) else 0
        self._starts = np.searchsorted(self._node_of[self._members], np.arange(nodes + 1))

    @property
    def nodes(self) -> int:
        """Graph nodes: distinct vectors (fewer than items when some are identical)."""
        return len(self._starts) - 1

    def _expand(self, nodes: np.ndarray, distances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Graph nodes, best first -> their item labels and distances, best first."""
        if self.nodes == len(self.ids):
            return self._members[nodes], distances
        counts = self._starts[nodes + 1] - self._starts[nodes]
        within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        return self._members[np.repeat(self._starts[nodes], counts) + within], np.repeat(
            distances, counts
        )

    def search(
        self, queries: np.ndarray, k: int, exclude: Sequence[Collection[str]] | None = None
    ) -> SearchResult:
        """The k items with the highest inner product per query (approximately), never excluded.

        Fetches k + |exclude| neighbours per row (rounded up to a power of two) and filters;
        rows still short (the graph missed some) are fetched again with twice as many, and
        once a fetch would cover the whole catalogue the row is scored exactly instead, so
        lists are always full. A row's answer never depends on the other rows of the batch.

        Args:
            queries: (Q, D) float32.
            k: items wanted per query.
            exclude: per query, ids that must not be returned (unknown ids are ignored).

        Returns:
            ids: Q lists, best first, each of min(k, N - |exclude ∩ ids|) items.
            scores: Q float32 arrays of the same lengths, non-increasing.
        """
        queries, excluded = _checked_query(self, queries, k, exclude)
        n = len(self.ids)
        wanted = [min(k, n - len(labels)) for labels in excluded]
        ids: list[list[str]] = [[] for _ in wanted]
        scores: list[np.ndarray] = [np.empty(0, np.float32) for _ in wanted]
        # Each row's first fetch depends on its own exclude set only (k + |exclude|, rounded
        # up to a power of two so rows share a few knn_query calls): hnswlib's answer changes
        # with the depth asked, and a request must get what it would get in any batch.
        nodes = self.nodes
        first = np.array([_fetch_depth(k + len(labels), nodes) for labels in excluded], np.int64)
        short = []
        for fetch in np.unique(first).tolist():
            pending = np.flatnonzero(first == fetch)
            while pending.size and fetch < nodes:
                pending = self._fetch(queries, pending, fetch, excluded, wanted, ids, scores)
                fetch = min(nodes, fetch * 2)
            short += pending.tolist()
        pending = np.asarray(sorted(short), dtype=np.int64)
        if pending.size:
            # Fetching all N is brute force anyway; exact scoring also covers graph nodes
            # that the search cannot reach.
            exact = ExactIndex()
            exact.set(self.ids)
            exact.vectors = self.vectors
            rest = exact._exact(queries[pending], k, [excluded[i] for i in pending])
            for row, row_ids, row_scores in zip(pending, *rest, strict=True):
                ids[row], scores[row] = row_ids, row_scores
        return ids, scores

    def _fetch(
        self,
        queries: np.ndarray,
        pending: np.ndarray,
        fetch: int,
        excluded: list[np.ndarray],
        wanted: list[int],
        ids: list[list[str]],
        scores: list[np.ndarray],
    ) -> np.ndarray:
        """One knn_query for the pending rows; fills finished rows, returns those still short."""
        try:
            labels, distances = self.graph.knn_query(
                queries[pending], k=fetch, num_threads=self.num_threads
            )
        except RuntimeError:
            # hnswlib refuses when a search finds fewer than `fetch` nodes; retry bigger.
            return pending
        labels = labels.astype(np.int64)
        short = []
        for row, row_nodes, node_distances in zip(pending, labels, distances, strict=True):
            row_labels, row_distances = self._expand(row_nodes, node_distances)
            keep = ~np.isin(row_labels, excluded[row]) if excluded[row].size else slice(None)
            row_labels, row_distances = row_labels[keep], row_distances[keep]
            if len(row_labels) < wanted[row]:
                short.append(row)
                continue
            ids[row] = self.ids[row_labels[: wanted[row]]].tolist()
            # hnswlib's "ip" distance is 1 - inner product.
            scores[row] = (1.0 - row_distances[: wanted[row]]).astype(np.float32)
        return np.asarray(short, dtype=np.int64)

    @property
    def graph(self) -> hnswlib.Index:
        if self._graph is None:
            raise RuntimeError("the index is empty; call build() or load() first")
        return self._graph

    def vector(self, item_id: str) -> np.ndarray:
        """(D,) float32 vector of one item, read back from the graph; KeyError if absent."""
        node = self._node_of[self.vector_label(item_id)]
        row = self.graph.get_items([node], return_type="numpy")
        return np.asarray(row[0], dtype=np.float32)

    @property
    def vectors(self) -> np.ndarray:
        """(N, D) float32 copy of every indexed vector, in `ids` order."""
        every = self.graph.get_items(self._node_of, return_type="numpy")
        return np.asarray(every, dtype=np.float32)

    def save(self, folder: Path) -> None:
        """Write `hnsw.bin`, `ids.npy` and `index.json` (with the tuned ef) into `folder`."""
        meta = {
            "kind": "hnsw",
            "space": SPACE,
            "dim": self.graph.dim,
            "count": len(self),
            "M": self.m,
            "ef_construction": self.ef_construction,
            "ef": self._ef,
        }
        if self.nodes != len(self.ids):
            meta["nodes"] = self.nodes
        write_folder(folder, self.ids, meta)
        self.graph.save_index(str(folder / HNSW_FILE))
        if self.nodes != len(self.ids):
            np.save(folder / NODES_FILE, self._node_of, allow_pickle=False)

    @classmethod
    def load(cls, folder: Path, num_threads: int | None = None) -> HnswIndex:
        """Read a folder written by :meth:`save`, restoring its tuned ef.

        Raises:
            ArtifactMismatch: a file is missing or unreadable, or the JSON disagrees with them.
        """
        meta, ids = read_folder(folder, "hnsw", HNSW_FILE)
        nodes = int(meta.get("nodes", meta["count"]))
        check_hnsw_header(folder / HNSW_FILE, {**meta, "count": nodes})
        node_of = _read_nodes(folder, len(ids), nodes) if "nodes" in meta else np.arange(len(ids))
        graph = hnswlib.Index(space=SPACE, dim=meta["dim"])
        try:
            graph.load_index(str(folder / HNSW_FILE), max_elements=nodes)
        except RuntimeError as exc:
            raise ArtifactMismatch(f"{folder / HNSW_FILE} cannot be loaded: {exc}") from None
        index = cls(meta["M"], meta["ef_construction"], meta["ef"], num_threads=num_threads)
        index._graph = graph
        index.ef = meta["ef"]
        index.set(ids)
        index._set_nodes(node_of)
        return index


class DeltaIndex:
    """A bundle's index plus the items listed since it was built: a small exact index of the
    new items is searched beside the main one and the two answers are merged by score.

    Copy-on-write: `with_items` returns a new DeltaIndex and leaves this one untouched, so
    the caller swaps it in by one reference assignment while searches on the old one go on
    (hnswlib's `add_items` is not safe beside `knn_query`, and the graph has no headroom).
    The nightly rebuild folds new items into the main index.

    Example:
        >>> main = ExactIndex()
        >>> main.build(np.array(["tv", "hdmi"]), np.eye(3, dtype=np.float32)[:2])
        >>> index = DeltaIndex(main).with_items(np.array(["new"]), np.eye(3, dtype=np.float32)[2:])
        >>> index.search(np.array([[0.1, 0.0, 1.0]], dtype=np.float32), k=2)[0]
        [['new', 'tv']]
    """

    def __init__(self, main: ExactIndex | HnswIndex, delta: ExactIndex | None = None) -> None:
        self.main, self.delta = main, delta

    @property
    def ids(self) -> np.ndarray:
        """Every indexed id: the main index's, then the new items'."""
        if self.delta is None:
            return self.main.ids
        return np.concatenate([self.main.ids.astype(str), self.delta.ids.astype(str)])

    @property
    def vectors(self) -> np.ndarray:
        """(N, D) float32 vectors in `ids` order."""
        if self.delta is None:
            return self.main.vectors
        return np.concatenate([self.main.vectors, self.delta.vectors])

    @property
    def ef(self) -> int:
        return self.main.ef if isinstance(self.main, HnswIndex) else 0

    def __len__(self) -> int:
        return len(self.main) + (0 if self.delta is None else len(self.delta))

    def __contains__(self, item_id: object) -> bool:
        in_delta = self.delta is not None and item_id in self.delta.label_of
        return in_delta or item_id in self.main.label_of

    def with_items(self, ids: np.ndarray, vectors: np.ndarray) -> DeltaIndex:
        """A new DeltaIndex whose delta also holds `ids` (replacing their earlier vectors)."""
        new_ids, new_vectors = _validated(ids, vectors)
        if self.delta is not None:
            keep = ~np.isin(self.delta.ids, new_ids)
            new_ids = np.concatenate([self.delta.ids[keep].astype(str), new_ids])
            new_vectors = np.concatenate([self.delta.vectors[keep], new_vectors])
        delta = ExactIndex()
        delta.build(new_ids, new_vectors)
        return DeltaIndex(self.main, delta)

    def vector(self, item_id: str) -> np.ndarray:
        if self.delta is not None and item_id in self.delta.label_of:
            return self.delta.vector(item_id)
        return self.main.vector(item_id)

    def search(
        self, queries: np.ndarray, k: int, exclude: Sequence[Collection[str]] | None = None
    ) -> SearchResult:
        """The k best items per query over the main index and the new items, never an
        excluded one (same contract as the main index's `search`)."""
        ids, scores = self.main.search(queries, k, exclude)
        delta = self.delta
        if delta is None:
            return ids, scores
        extra_ids, extra_scores = delta.search(queries, k, exclude)
        merged_ids: list[list[str]] = []
        merged_scores: list[np.ndarray] = []
        for a, sa, b, sb in zip(ids, scores, extra_ids, extra_scores, strict=True):
            both = np.concatenate([sa, sb]).astype(np.float32)
            order = np.argsort(-both, kind="stable")[:k]
            names = [*a, *b]
            merged_ids.append([names[i] for i in order])
            merged_scores.append(both[order])
        return merged_ids, merged_scores


INDEXES: dict[str, type[ExactIndex] | type[HnswIndex]] = {"exact": ExactIndex, "hnsw": HnswIndex}


def load_index(folder: Path) -> ExactIndex | HnswIndex:
    """Load whichever index kind `folder/index.json` names (serving need not know which)."""
    kind = read_meta(folder).get("kind")
    if kind not in INDEXES:
        raise ArtifactMismatch(f"{folder / META} names kind {kind!r}; expected one of {INDEXES}")
    return INDEXES[kind].load(folder)


# ------------------------------------------------------------------------------ ef tuning


def recall_at_k(
    found: list[list[str]],
    truth: list[list[str]],
    found_scores: list[np.ndarray] | None = None,
    truth_scores: list[np.ndarray] | None = None,
    tolerance: float = 1e-5,
) -> float:
    """Mean over queries of |found ∩ truth| / |truth| (1.0 for a query with empty truth).

    With both score lists, a found item scoring at least the k-th true score (less
    `tolerance`) counts as found too: among equal scores (identical vectors) which items the
    exact index lists is arbitrary, and another of them is as good an answer.
    """
    per_query = []
    for q, (f, t) in enumerate(zip(found, truth, strict=True)):
        if not t:
            per_query.append(1.0)
            continue
        hits = len(set(f) & set(t))
        if found_scores is not None and truth_scores is not None:
            tied = int(np.sum(found_scores[q] >= truth_scores[q][-1] - tolerance))
            hits = min(len(t), max(hits, tied))
        per_query.append(hits / len(t))
    return float(np.mean(per_query)) if per_query else 1.0


def smallest_ef_reaching(recall_by_ef: dict[int, float], target_recall: float) -> int | None:
    """The smallest ef whose recall reaches the target, or None if none does."""
    return min((ef for ef, r in recall_by_ef.items() if r >= target_recall), default=None)


def tune_ef(
    index: HnswIndex,
    exact: VectorIndex,
    sample_queries: np.ndarray,
    k: int,
    target_recall: float,
    ef_grid: Sequence[int],
) -> tuple[int, dict[int, float]]:
    """Set `index.ef` to the smallest grid value whose recall@k vs exact reaches the target
    (ties with the k-th exact score count as found: `recall_at_k`).

    Every grid value is measured (the table goes into reports); if none reaches the target
    the largest is kept and a warning is logged.

    Args:
        index: built HNSW index; its ef is changed.
        exact: exact index over the same ids and vectors.
        sample_queries: (S, D) float32 queries.
        k: depth of the recall (the candidate count the index will serve).
        target_recall: mean recall@k to reach, in (0, 1].
        ef_grid: ef values to try.

    Returns:
        The chosen ef and {ef: mean recall@k}, by ascending ef.
    """
    if not ef_grid:
        raise ValueError("ef_grid is empty; give at least one ef value (index.ef_grid)")
    truth, truth_scores = exact.search(sample_queries, k)
    recall_by_ef: dict[int, float] = {}
    for ef in sorted(set(ef_grid)):
        index.ef = ef
        found, found_scores = index.search(sample_queries, k)
        recall_by_ef[ef] = recall_at_k(found, truth, found_scores, truth_scores)
    chosen = smallest_ef_reaching(recall_by_ef, target_recall)
    if chosen is None:
        chosen = max(recall_by_ef)
        log.warning(
            "no ef in the grid reaches the target recall; keeping the largest",
            target_recall=target_recall,
            ef=chosen,
            recall=recall_by_ef[chosen],
        )
    index.ef = chosen
    return chosen, recall_by_ef


def build_hnsw(
    ids: np.ndarray,
    vectors: np.ndarray,
    settings: IndexSettings,
    k: int,
    seed: int,
    num_threads: int | None = None,
) -> tuple[HnswIndex, dict[str, Any]]:
    """Build an HNSW index and tune its ef on up to 1,000 perturbed catalogue vectors.

    The queries are catalogue vectors nudged off the item (noise of norm ~0.25, renormalised),
    so they sit between items like user vectors do, and the item itself is not a free hit.

    Args:
        ids: (N,) unique item ids.
        vectors: (N, D) float32, L2-normalised rows.
        settings: M, ef_construction, target_recall and ef_grid.
        k: recall depth, the number of candidates the index will serve.
        seed: seeds the graph's levels and the query sample.
        num_threads: build and query threads; None means every core.

    Returns:
        The tuned index, and a report: ef, recall_by_ef, target_recall, reached, build_s,
        tune_s, count, dim, sample_queries.
    """
    index = HnswIndex(settings.m, settings.ef_construction, num_threads=num_threads, seed=seed)
    start = time.perf_counter()
    index.build(ids, vectors)
    build_s = time.perf_counter() - start

    exact = ExactIndex()
    exact.build(index.ids, vectors)
    queries = perturbed_sample(exact.vectors, 1000, np.random.default_rng(seed))
    start = time.perf_counter()
    ef, recall_by_ef = tune_ef(index, exact, queries, k, settings.target_recall, settings.ef_grid)
    report = {
        "ef": ef,
        "recall_by_ef": recall_by_ef,
        "target_recall": settings.target_recall,
        "reached": recall_by_ef[ef] >= settings.target_recall,
        "build_s": round(build_s, 3),
        "tune_s": round(time.perf_counter() - start, 3),
        "count": len(index),
        "nodes": index.nodes,
        "dim": int(exact.vectors.shape[1]),
        "sample_queries": len(queries),
    }
    log.info("hnsw index built", **{key: v for key, v in report.items() if key != "recall_by_ef"})
    return index, report


def perturbed_sample(
    vectors: np.ndarray, size: int, rng: np.random.Generator, noise: float = 0.25
) -> np.ndarray:
    """Up to `size` rows of `vectors` plus Gaussian noise of norm ~`noise`, L2-normalised.

    Args:
        vectors: (N, D) float32.

    Returns:
        (min(size, N), D) float32.
    """
    rows = rng.choice(len(vectors), size=min(size, len(vectors)), replace=False)
    dim = vectors.shape[1]
    sample = vectors[rows] + rng.standard_normal((len(rows), dim)) * (noise / np.sqrt(dim))
    return np.asarray(sample / np.linalg.norm(sample, axis=1, keepdims=True), dtype=np.float32)


# ------------------------------------------------------------------------------ helpers


def _shared_nodes(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N,) graph node of each row, numbered by first occurrence, and (G,) the row that
    represents each node: rows with byte-identical vectors share a node."""
    rows = np.ascontiguousarray(vectors).view(
        np.dtype((np.void, vectors.dtype.itemsize * vectors.shape[1]))
    )
    _, first, inverse = np.unique(rows.ravel(), return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[inverse.ravel()], first[order]


def _read_nodes(folder: Path, count: int, nodes: int) -> np.ndarray:
    node_of = load_npy(folder / NODES_FILE)
    if (
        node_of.shape != (count,)
        or node_of.dtype.kind not in "iu"
        or (count and (node_of.min() < 0 or node_of.max() != nodes - 1))
    ):
        raise ArtifactMismatch(
            f"{folder / NODES_FILE} holds {node_of.shape} {node_of.dtype} but {folder / META} "
            f"says {count} items on {nodes} graph nodes; rebuild the index"
        )
    return node_of


def _validated(ids: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Check build inputs; return ids as fixed-width unicode and vectors as C float32."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    # Fixed-width unicode, not object: it saves and loads with allow_pickle=False.
    ids = np.asarray(ids).astype(str)
    if vectors.ndim != 2 or vectors.shape[0] == 0 or vectors.shape[1] == 0:
        raise ValueError(f"vectors must be a non-empty (N, D) array, got shape {vectors.shape}")
    if ids.shape != (vectors.shape[0],):
        raise ValueError(
            f"ids must be (N,) with N = {vectors.shape[0]} vectors, got shape {ids.shape}"
        )
    if len(np.unique(ids)) != len(ids):
        raise ValueError("ids must be unique; deduplicate the catalogue before indexing")
    if not np.isfinite(vectors).all():
        raise ValueError("vectors contain NaN or inf; check the item tower's output")
    return ids, vectors


def _checked_query(
    index: ExactIndex | HnswIndex,
    queries: np.ndarray,
    k: int,
    exclude: Sequence[Collection[str]] | None,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Validate search inputs; return C float32 queries and per-query excluded labels."""
    if len(index) == 0:
        raise RuntimeError("the index is empty; call build() or load() first")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    dim = index.graph.dim if isinstance(index, HnswIndex) else index.vectors.shape[1]
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(
            f"queries must be (Q, {dim}), got shape {queries.shape}; "
            "wrap a single vector as vector[None, :]"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if exclude is None:
        return queries, [np.empty(0, dtype=np.int64)] * len(queries)
    if len(exclude) != len(queries):
        raise ValueError(f"exclude needs one set per query: {len(exclude)} for {len(queries)}")
    return queries, [index.labels(items) for items in exclude]


def _top_k_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """(Q, N) scores -> (Q, min(k, N)) column indices, best first (ties by lower index)."""
    n = scores.shape[1]
    if k < n:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(n), scores.shape)
    # Sort the k survivors by (score desc, index asc) so ties are deterministic.
    order = np.lexsort((part, -np.take_along_axis(scores, part, axis=1)), axis=1)
    return np.take_along_axis(part, order, axis=1)


def _fetch_depth(depth: int, n: int) -> int:
    """`depth` rounded up to a power of two, at most the catalogue size."""
    return min(n, 1 << max(0, depth - 1).bit_length())
