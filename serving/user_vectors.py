"""Where a session vector comes from, fastest first: Redis, Triton, the in-process tower.

Each step has a budget; a miss, a timeout or an error moves to the next step and is named
in the answer, so the rail says how it was served. Triton runs the same TorchScript session
encoder as the bundle (exported into `triton_models/`), fed the same inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ranking.ann import DeltaIndex
from ranking.bundle import TowerBundle
from ranking.candidates import Candidate, candidates_of
from ranking.retriever import Query
from serving.triton_client import TritonModelClient
from towers.session_features import SESSION_INPUT_NAMES, HistoryEvent

INPUT_NAMES = SESSION_INPUT_NAMES  # the encoder's inputs, in order (towers.session_features)
MAX_BATCH = 128  # max_batch_size in triton_models/user_tower/config.pbtxt


class TritonUserTower(TritonModelClient):
    """gRPC client of the user tower on a Triton server, with a per-call timeout."""

    def encode(self, inputs: dict[str, torch.Tensor], version: str = "") -> np.ndarray:
        """(B, D) vectors, in chunks of the model's max batch size.

        Raises tritonclient's InferenceServerException on error or timeout.
        """
        size = len(inputs["items"])
        if size > MAX_BATCH:
            return np.concatenate(
                [
                    self.encode({k: v[i : i + MAX_BATCH] for k, v in inputs.items()}, version)
                    for i in range(0, size, MAX_BATCH)
                ]
            )
        arrays = []
        for name in INPUT_NAMES:
            array = inputs[name].numpy()
            if array.ndim == 1:
                array = array[:, None]  # Triton batches along dim 0; scalars become [1]
            arrays.append((name, array, "INT64"))
        return self.infer(arrays, version)


@dataclass
class VectorResult:
    vector: np.ndarray
    source: str  # "redis" | "triton" | "in_process" | "new_item"
    degraded: list[str]


def session_vector(
    towers: TowerBundle,
    history: Sequence[HistoryEvent],
    context: str | None,
    cached: np.ndarray | None,
    triton: TritonUserTower | None,
    triton_version: str = "",
    anchor: str | None = None,
) -> VectorResult:
    """The session's vector from the first source that answers in time.

    A product page whose `anchor` was listed after the bundle was trained is the exception:
    the session tower cannot read an item it never saw (it would drop it and answer for the
    session alone), so the page's own item-tower vector asks for its neighbours instead.
    """
    degraded: list[str] = []
    listed = new_item_vector(towers, anchor)
    if listed is not None:
        return VectorResult(listed, "new_item", degraded)
    if cached is not None and cached.shape == (towers.item_vectors.shape[1],):
        return VectorResult(cached, "redis", degraded)
    vectors, source, degraded = encode_sessions(
        towers, [history], [context], triton, triton_version
    )
    return VectorResult(vectors[0], source, degraded)


def new_item_vector(towers: TowerBundle, item_id: str | None) -> np.ndarray | None:
    """The vector of an item listed after the bundle was trained (in the delta index, not
    in the tower's item table); None for any other item."""
    index = towers.index
    if item_id is None or item_id in towers.item_row or not isinstance(index, DeltaIndex):
        return None
    return index.vector(item_id) if item_id in index else None


def encode_sessions(
    towers: TowerBundle,
    histories: Sequence[Sequence[HistoryEvent]],
    contexts: Sequence[str | None],
    triton: TritonUserTower | None,
    triton_version: str = "",
) -> tuple[np.ndarray, str, list[str]]:
    """(B, D) vectors of many sessions in one call: Triton when it answers in time, else the
    bundle's in-process tower. Returns (vectors, "triton" | "in_process", degradations)."""
    degraded: list[str] = []
    inputs = towers.session_inputs(histories, contexts)
    if triton is not None:
        try:
            return triton.encode(inputs, triton_version), "triton", degraded
        except Exception as exc:  # noqa: BLE001 - Triton down or slow: degrade, never fail
            degraded.append(f"triton unavailable ({type(exc).__name__}): in-process tower")
    return towers.encode_inputs(inputs), "in_process", degraded


class VectorTowerSource:
    """The tower candidate source for requests whose session vectors are already known:
    one (D,) vector for a single request, or (Q, D), one row per query."""

    name = "two_tower"

    def __init__(self, towers: TowerBundle, vectors: np.ndarray) -> None:
        self.towers, self.vectors = towers, np.atleast_2d(vectors)

    def fit(self, events, catalogue):  # type: ignore[no-untyped-def]  # noqa: ANN001, ARG002
        return self

    def candidates(self, queries: Sequence[Query], k: int) -> list[list[Candidate]]:
        vectors = self.vectors
        if len(vectors) != len(queries):
            vectors = np.repeat(vectors[:1], len(queries), axis=0)
        ids, scores = self.towers.index.search(vectors, k, [q.exclude for q in queries])
        return [
            candidates_of(row, np.asarray(row_scores, dtype=float).tolist())
            for row, row_scores in zip(ids, scores, strict=True)
        ]

    def pair_weights(self, seeds: Sequence[str], items: Sequence[str]) -> np.ndarray:
        return self.towers.pair_weights(seeds, items)

    def recommend(self, queries: Sequence[Query], k: int) -> list[list[str]]:
        return [[c.item_id for c in row] for row in self.candidates(queries, k)]
