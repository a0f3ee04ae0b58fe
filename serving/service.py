"""One rail request, from the parsed body to the slots: the request path, top to bottom.

    route (production or the canary's challenger, by session) -> check -> session state
    (Redis) -> pre-warmed rail? -> compute slot? -> session vector
    (Redis, Triton, in-process) -> the rail engine (candidates, re-ranker within budget,
    MMR, rules) -> exploration slot -> observer (impressions, shadow) -> explain? -> body

Each stage that is slow or down degrades the answer and says why in `reasons`; popularity
under the rules is the last fallback, and a valid request never gets a 5xx. Each request
reads `self.loaded` once, so a hot swap (serving.served_model) never mixes two models.
Exclusions live in the query (`serving.stages.build_query`), which every path reads; a
pre-warmed rail is filtered by them at serve time, and a hero rail computed under a
request's own `exclude` is not cached. One job per helper: `request_checks` (4xx),
`session_state` (Redis reads and writes), `budgets` (admission, re-ranker budget),
`stages` (query, engine, exploration), `observer` (impressions, shadow), `provenance`
(explain=true), `response` (the body and its metrics).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np

from railtower.logs import get_logger
from railtower.settings import Settings
from ranking.candidate_fusion import CandidateTable
from ranking.candidates import Candidate
from ranking.exploration import Explored, InMemoryArmStats
from ranking.retriever import Query
from serving.api_models import RailRequest, RailResponse
from serving.budgets import ComputeBudgets
from serving.metrics import Metrics
from serving.observer import ServedObserver, hand_off
from serving.prewarm import prewarm
from serving.provenance import explain_answer
from serving.rail_service import LoadedRails
from serving.request_checks import BadRequest, check_request
from serving.response import respond
from serving.served_model import ServedModel
from serving.session_state import from_cache, put_rail, put_vector, read_snapshot
from serving.stages import (
    Answer,
    StageOutput,
    Trace,
    build_query,
    explore_request,
    fallback_answer,
    last_resort,
    request_vector,
    rules_length,
    run_stages,
    young_items,
)
from serving.user_vectors import TritonUserTower
from state.session_store import SessionSnapshot, SessionStore

log = get_logger(__name__)


class RailService(ServedModel):
    """The request path over the served model (serving.served_model.ServedModel: loading,
    hot swaps, catalogue and prices) and its state stores."""

    def __init__(
        self,
        settings: Settings,
        loaded: LoadedRails | None,
        store: SessionStore | None,
        triton: TritonUserTower | None,
        metrics: Metrics,
    ) -> None:
        super().__init__(settings, loaded, store, triton, metrics)
        self.compute_budgets = ComputeBudgets(settings.serving.budgets, metrics)
        # Impression logging and shadow traffic (serving.shadow); set by serving.app.
        self.observer: ServedObserver | None = None
        # Thompson's click / impression counts per item: in memory, per process, for now
        # (nothing feeds clicks back yet, so Thompson samples from its priors alone).
        self.arm_stats = InMemoryArmStats({}, {})

    def prewarm(self, session_ids: Sequence[str], users: Mapping[str, str] | None = None) -> int:
        """The refresh consumer's path: serving.prewarm (how many rails were stored)."""
        return prewarm(self, session_ids, users)

    def serve(self, rail: str, request: RailRequest) -> RailResponse:
        # one model for the whole request, even across a hot swap: production, or the live
        # canary's challenger for the sessions its share takes (serving.canary_route)
        loaded, arm = self.route(request.session_id)
        if loaded is None:
            raise BadRequest(503, "no model loaded yet; see /readyz")
        max_slots = self.settings.serving.max_slots
        parts = check_request(rail, request, loaded, max_slots)  # bad input stays a 4xx
        trace = Trace()
        try:
            snapshot = self._snapshot(rail, request, loaded, trace)
            query = build_query(request, snapshot, parts, rail, self.settings.serving.exclusions)
            answer = self._answer(rail, request, query, snapshot, loaded, trace)
            if self.observer is not None:
                hand_off(
                    self.observer, self.metrics, rail, request, query, snapshot, loaded, answer, arm
                )
            provenance = None
            if request.explain:
                since = time.perf_counter()
                provenance = explain_answer(rail, query, loaded, answer)
                trace.lap("explain", since)
            served, items = answer.served_by, answer.items
            return respond(self.metrics, rail, request, loaded, served, items, trace, provenance)
        except BadRequest:
            raise
        except Exception as exc:  # noqa: BLE001 - a valid request always gets a rail, never a 5xx
            # anything the inner fallbacks did not foresee (malformed state in Redis, a
            # cluster error that is no RedisError, a bug in explain): popular items, counted
            log.exception("rail request failed; serving popular items", rail=rail)
            self.metrics.errors.labels(kind="request").inc()
            trace.reasons.append(f"request failed ({type(exc).__name__}): popular items")
            items = last_resort(loaded, rail, request, parts)
            return respond(self.metrics, rail, request, loaded, "fallback", items, trace)

    def _snapshot(
        self, rail: str, request: RailRequest, loaded: LoadedRails, trace: Trace
    ) -> SessionSnapshot | None:
        return read_snapshot(self.store, self.metrics, rail, request, loaded, trace)

    def _answer(
        self,
        rail: str,
        request: RailRequest,
        query: Query,
        snapshot: SessionSnapshot | None,
        loaded: LoadedRails,
        trace: Trace,
    ) -> Answer:
        if snapshot is not None and snapshot.rail is not None:
            cached = from_cache(self.metrics, rail, snapshot, request, query, loaded, trace)
            if cached is not None:
                return Answer("cache", cached[0], explored=cached[1])
        if not self.compute_budgets.admit(trace):
            return fallback_answer(loaded, rail, query, request.slots)
        try:
            output, vector = self._compute(rail, request, query, snapshot, loaded, trace)
        except Exception as exc:  # noqa: BLE001 - the rail must still answer
            log.exception("rail computation failed; serving popularity", rail=rail)
            self.metrics.errors.labels(kind="compute").inc()
            trace.reasons.append(f"computation failed ({type(exc).__name__}): popular items")
            return fallback_answer(loaded, rail, query, request.slots)
        finally:
            self.compute_budgets.release()
        explored = self.explore(rail, request, snapshot, output.slots, loaded)
        items = explored.items if explored is not None else output.slots
        # A rail computed under the request's own exclusions is that request's alone: caching
        # it would hide those items from the session's next plain request.
        if rail == "homepage_hero" and snapshot is not None and not request.exclude:
            put_rail(self.store, request, loaded, snapshot, items, trace, explored)  # type: ignore[arg-type]
        return Answer("computed", items, output.before_rules, vector, explored, output)

    def _compute(
        self,
        rail: str,
        request: RailRequest,
        query: Query,
        snapshot: SessionSnapshot | None,
        loaded: LoadedRails,
        trace: Trace,
    ) -> tuple[StageOutput, np.ndarray | None]:
        since = time.perf_counter()
        triton = self.triton if self.settings.serving.request_encoder == "triton" else None
        vector, fresh = request_vector(loaded, query, snapshot, triton, trace, self.metrics)
        if fresh:
            put_vector(self.store, request.session_id, loaded, vector, snapshot, trace)  # type: ignore[arg-type]
        trace.lap("user_vector", since)

        def rank(table: CandidateTable) -> np.ndarray:
            return self.compute_budgets.rank(loaded.pipeline, rail, table, query, trace)

        length = rules_length(
            self.settings.ranking.exploration, request.slots, loaded.pipeline.depth
        )
        output = run_stages(loaded, rail, query, request.slots, vector, rank, trace, length)
        return output, vector

    def explore(
        self,
        rail: str,
        request: RailRequest,
        snapshot: SessionSnapshot | None,
        ruled: list[Candidate],
        loaded: LoadedRails,
    ) -> Explored | None:
        """The exploration slot over the rules' output of `loaded`; None when
        `ranking.exploration` is off."""
        young = young_items(loaded, ruled)
        return explore_request(self.settings, rail, request, snapshot, ruled, self.arm_stats, young)
