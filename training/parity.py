"""Parity proofs: what is served equals what was measured, on real held-out sessions.

Three figures, shared by the test (tests/serving/test_parity.py) and the benchmark
(benchmarks/parity.py), both against real servers:

- **user tower**: the session vectors the real tritonserver computes for held-out session
  prefixes vs the bundle's in-process TorchScript encoder, fed the same inputs;
- **item side**: only the user tower is hosted on Triton, so the item vectors retrieval
  uses (the bundle's `item_vectors.npy` and the vectors the HNSW graph holds) are checked
  against a fresh in-process encoding by the bundle's item tower (`item_tower.pt`),
  featurised from the catalogue as training featurised it;
- **rails**: the top-12 the HTTP endpoint serves for a session whose prefix events sit in
  Redis vs the evaluator's `RailPipeline.run(..., stages=("rules",))` on the same case.

The cases are the evaluator's own: the held-out window the bundle's evaluation record
names, rebuilt with the harness's task builders and sampling (training.bundle_eval).
A served list that differs is re-run offline with Triton's vector in place of the
in-process one, which separates float noise flipping a near tie from a path difference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from railtower.datasets import load_dataset
from railtower.settings import Settings
from ranking.bundle import TowerBundle
from ranking.rails import RailPipeline
from ranking.retriever import Query
from serving.rail_service import LoadedRails
from serving.user_vectors import TritonUserTower, VectorTowerSource
from state.session_store import SessionStore
from towers.session_features import HistoryEvent, history_of
from training.bundle_eval import rebuild_cases
from training.drift import encode_items
from training.tasks import EvalCase

TOLERANCE = 1e-4  # max abs difference allowed between two encodings of one input
PARITY_RAILS = ("homepage_hero", "pdp_fbt")

# POST a JSON body to a path and return (status, parsed body): FastAPI's TestClient and an
# httpx client against uvicorn both fit `lambda path, body: ...`.
Post = Callable[[str, dict[str, Any]], tuple[int, dict[str, Any]]]


# ------------------------------------------------------------------ the cases


def held_out_cases(
    loaded: LoadedRails, settings: Settings, per_rail: int, seed: int = 0
) -> dict[str, list[EvalCase]]:
    """The evaluator's own cases of the bundle's held-out window, `per_rail` per rail at most.

    pdp_fbt keeps only cases with a session before the product: a request's context (the
    device) reaches the server with the session's events, so an empty session would be
    encoded without it while the evaluator has it. Cases whose product or cart holds an item
    the bundle's (point-in-time) catalogue does not list are left out: the API refuses
    those requests with a 404 naming the item, the evaluator ranks them anyway.

    Raises:
        ValueError: the bundle's evaluation record names no held-out window.
    """
    record = loaded.rails.evaluation
    if not record.get("held_out"):
        raise ValueError(
            f"{loaded.rails.folder} records no held_out window; re-evaluate it "
            "(railtower evaluate --towers) so its cases can be rebuilt"
        )
    data = load_dataset(str(record["dataset"]), settings)
    cases = rebuild_cases(data, record["held_out"], settings.serving.purchase_memory)
    rng = np.random.default_rng(seed)
    out = {}
    for rail in PARITY_RAILS:
        usable = [
            c
            for c in cases.get(rail, [])
            if (c.query.session_items or rail != "pdp_fbt")
            and all(i in loaded.catalogue.index for i in (c.query.anchor, *c.query.cart) if i)
        ]
        if len(usable) > per_rail:
            usable = [usable[i] for i in np.sort(rng.choice(len(usable), per_rail, replace=False))]
        out[rail] = usable
    return out


def case_history(query: Query) -> list[HistoryEvent]:
    """The history the session tower encodes for a query (session, then page or cart)."""
    return history_of(
        query.session_items, query.session_types, query.session_times, query.anchor, query.cart
    )


# ------------------------------------------------------------------ towers


def user_tower_parity(
    towers: TowerBundle, triton: TritonUserTower, queries: Sequence[Query]
) -> tuple[dict[str, float | int], np.ndarray]:
    """Triton's session vectors vs the in-process encoder on the same (B, L) inputs.

    The in-process side encodes the whole batch at once, as the evaluator does; Triton is
    asked twice: in chunks of its max batch, and one session per call, as a rail request
    asks it. Float sums depend on the batch shape, so the two need not be bit-identical.

    Returns:
        (figures: sessions, max / mean abs difference of both; Triton's one-at-a-time
        (B, D) vectors, the ones the served path gets).

    Raises:
        tritonclient's InferenceServerException: the server does not answer.
    """
    inputs = towers.session_inputs([case_history(q) for q in queries], [q.context for q in queries])
    local = towers.encode_inputs(inputs)
    batched = triton.encode(inputs, towers.triton_version)
    single = np.concatenate(
        [
            triton.encode({k: v[i : i + 1] for k, v in inputs.items()}, towers.triton_version)
            for i in range(len(queries))
        ]
    )
    figures = {
        "sessions": len(queries),
        "max_abs_diff": float(np.abs(batched - local).max()),
        "mean_abs_diff": float(np.abs(batched - local).mean()),
        "max_abs_diff_one_per_call": float(np.abs(single - local).max()),
        "mean_abs_diff_one_per_call": float(np.abs(single - local).mean()),
    }
    return figures, single


def item_tower_parity(
    towers: TowerBundle, catalogue: pd.DataFrame, settings: Settings, n: int, seed: int = 0
) -> dict[str, float | int]:
    """Stored item vectors (file and HNSW graph) vs a fresh item-tower encoding of `n` items.

    `catalogue` is the data set's item table (the one the towers were trained on).
    """
    known = catalogue.assign(item_id=catalogue["item_id"].astype(str))
    known = known[known["item_id"].isin(towers.item_row)].drop_duplicates("item_id")
    rng = np.random.default_rng(seed)
    rows = known.iloc[np.sort(rng.choice(len(known), min(n, len(known)), replace=False))]
    rows = rows.reset_index(drop=True)
    fresh = encode_items(towers, rows, settings)
    stored = towers.item_vectors[[towers.item_row[i] for i in rows["item_id"]]]
    graph = towers.index.vectors  # read back from hnswlib, in index id order
    graph_row = {item: i for i, item in enumerate(towers.index.ids.tolist())}
    indexed = graph[[graph_row[i] for i in rows["item_id"]]]
    return {
        "items": len(rows),
        "max_abs_diff": float(np.abs(fresh - stored).max()),
        "mean_abs_diff": float(np.abs(fresh - stored).mean()),
        "index_max_abs_diff": float(np.abs(indexed - stored).max()),
        "index_items": len(towers.item_ids),
    }


# ------------------------------------------------------------------ rails


@dataclass
class RailParity:
    """Served vs offline top-k for one rail's cases."""

    rail: str
    compared: int = 0
    identical: int = 0
    degraded: int = 0  # served answers that named a degradation reason (should be none)
    # served == the evaluator's path run for the case alone, as a request runs it (None:
    # not measured; see `rail_parity(alone=True)`)
    identical_alone: int | None = None
    vector_sources: dict[str, int] = field(default_factory=dict)
    # differing cases: session, both lists, and whether Triton's vector explains it
    differences: list[dict[str, Any]] = field(default_factory=list)

    @property
    def share_identical(self) -> float:
        return self.identical / self.compared if self.compared else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "rail": self.rail,
            "compared": self.compared,
            "identical": self.identical,
            "share_identical": self.share_identical,
            "identical_alone": self.identical_alone,
            "degraded": self.degraded,
            "vector_sources": self.vector_sources,
            "differences": self.differences,
        }


def session_key(rail: str, n: int) -> str:
    return f"parity-{rail}-{n}"


def load_sessions(store: SessionStore, rail: str, cases: Sequence[EvalCase]) -> None:
    """Write each case's session prefix into Redis under its own session id, and its user's
    earlier purchases (under a user of its own) through the consumer's append path, one
    earlier session per purchase, oldest first, long before any exclusion window."""
    for n, case in enumerate(cases):
        q = case.query
        sid = session_key(rail, n)
        events = [
            (f"{sid}-{k}", HistoryEvent(item, kind, time_s), q.context)
            for k, (item, kind, time_s) in enumerate(
                zip(q.session_items, q.session_types, q.session_times, strict=True)
            )
        ]
        store.append_events(sid, events)
        earlier = {
            f"{sid}-bought-{j}": (
                [(f"{sid}-bought-{j}", HistoryEvent(item, "purchase", j + 1.0), None)],
                [sid],
            )
            for j, item in enumerate(q.past_purchases)
        }
        if earlier:
            store.append_many(earlier)


def request_body(rail: str, n: int, case: EvalCase, slots: int) -> dict[str, Any]:
    body: dict[str, Any] = {"session_id": session_key(rail, n), "slots": slots}
    if case.query.anchor is not None:
        body["item_id"] = case.query.anchor
    if case.query.past_purchases:  # the user `load_sessions` gave the purchases to
        body["user_id"] = session_key(rail, n)
    return body


def offline_top(
    pipeline: RailPipeline,
    rail: str,
    queries: Sequence[Query],
    slots: int,
    sources: dict[str, Any] | None = None,
) -> list[list[str]]:
    """The evaluator's path: every stage to the rules, cut to the rail's slots."""
    rows = pipeline.run(rail, queries, stages=("rules",), sources=sources)["rules"]
    return [[c.item_id for c in row[:slots]] for row in rows]


def rail_parity(
    loaded: LoadedRails,
    rail: str,
    cases: Sequence[EvalCase],
    post: Post,
    triton_vectors: np.ndarray | None,
    slots: int = 12,
    alone: bool = False,
) -> RailParity:
    """Serve every case over HTTP (its prefix already in Redis: `load_sessions`) and compare
    with the evaluator's top-`slots` for the same query.

    Args:
        triton_vectors: (len(cases), D) Triton vectors of these cases, one per call as the
            served path asks (`user_tower_parity`), used only to explain a difference
            (None: differences are left unexplained).
        alone: also score every case on its own (a batch of one, as a request is) and count
            the served lists equal to that.
    """
    result = RailParity(rail)
    queries = [c.query for c in cases]
    expected = offline_top(loaded.pipeline, rail, queries, slots)
    for n, case in enumerate(cases):
        status, body = post(f"/v1/rails/{rail}", request_body(rail, n, case, slots))
        if status != 200:
            raise AssertionError(f"{rail} case {n} answered {status}: {body}")
        served = [i["item_id"] for i in body["items"]]
        source = str(body.get("vector_source"))
        result.vector_sources[source] = result.vector_sources.get(source, 0) + 1
        if alone:
            single = offline_top(loaded.pipeline, rail, [case.query], slots)[0]
            result.identical_alone = (result.identical_alone or 0) + (single == served)
        result.degraded += bool(body.get("reasons"))
        result.compared += 1
        if served == expected[n]:
            result.identical += 1
            continue
        result.differences.append(
            _difference(loaded, rail, n, case, served, expected[n], triton_vectors, slots, body)
        )
    return result


def _difference(  # noqa: PLR0913 - one record of everything that explains a differing case
    loaded: LoadedRails,
    rail: str,
    n: int,
    case: EvalCase,
    served: list[str],
    expected: list[str],
    triton_vectors: np.ndarray | None,
    slots: int,
    body: dict[str, Any],
) -> dict[str, Any]:
    first = next(
        (i for i, (a, b) in enumerate(zip(served, expected, strict=False)) if a != b),
        min(len(served), len(expected)),
    )
    record: dict[str, Any] = {
        "rail": rail,
        "case": n,
        "session_id": case.session_id,
        "prefix": len(case.query.session_items),
        "first_difference": first,
        "served": served,
        "offline": expected,
        "reasons": body.get("reasons", []),
        "vector_source": body.get("vector_source"),
    }
    # The evaluator scores its cases in batches, a request is a batch of one. The same case
    # scored alone, with the in-process vector and then with the vector Triton served:
    # equal to what was served means the HTTP path is the evaluator's path, and the batch
    # (or the encoder's floats) made the difference.
    row = loaded.pipeline.run(rail, [case.query], stages=("rules",))["rules"][0]
    record["same_when_scored_alone"] = [c.item_id for c in row[:slots]] == served
    # How near the tie was: the rules' scores are the ranker's, by rank (MMR keeps them
    # positional), so 0.0 means the re-ranker tied the two items at that position.
    scores = {c.item_id: c.score for c in row}
    if first < min(len(served), len(expected)) and {served[first], expected[first]} <= set(scores):
        record["score_gap_at_difference"] = scores[expected[first]] - scores[served[first]]
    if triton_vectors is not None and loaded.towers is not None:
        sources = dict(loaded.pipeline.sources)
        sources["two_tower"] = VectorTowerSource(loaded.towers, triton_vectors[n])
        again = offline_top(loaded.pipeline, rail, [case.query], slots, sources)[0]
        record["same_with_served_vector_alone"] = again == served
    return record
