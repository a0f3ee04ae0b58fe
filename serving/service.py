"""One rail request, from the parsed body to the slots: the online path in one place.

    session state (Redis) -> pre-warmed rail? -> session vector (Redis, Triton, in-process)
    -> fused candidates -> re-ranker (within budget, else fused order) -> MMR -> rules
    -> hand-off to the observer (impression log and shadow arms, serving/shadow.py)

Every stage that is slow or down degrades the answer and says why in `reasons`; nothing
blocks the rail. Popularity under the rules is the last fallback. The served model can be
swapped while requests run (serving.served_model): each request reads `self.loaded` once
and uses that model only. The stages after the session vector are the rail engine's
(`ranking.engine.compute`, through `serving.stages.run_stages`), the one composition the
pre-warming, the shadow arms and the evaluator use too.

Exclusions (the request's `exclude`, purchased items, blocks, out of stock) hold on every
path: they live in the query (`serving.stages.build_query`), which the computed path, the
fallback and the consumer's pre-warming all read, and a pre-warmed rail is filtered by them
at serve time (recomputed when too few slots remain). A hero rail computed under a request's
own `exclude` is not cached. With `explain=true` every slot carries its provenance
(`serving.provenance`).
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import redis

from railtower.logs import get_logger
from railtower.settings import RAILS, Settings
from ranking.candidate_fusion import CandidateTable
from ranking.candidates import Candidate
from ranking.engine import fallback
from ranking.exploration import Explored, InMemoryArmStats
from ranking.rail_inputs import RAIL_INPUTS, rail_parts, rail_query
from ranking.rails import RuledSlots
from ranking.retriever import Query
from ranking.rules import explain_rules
from serving.api_models import Provenance, RailItem, RailRequest, RailResponse, ServedBy
from serving.metrics import Metrics
from serving.prewarm import prewarm
from serving.provenance import Origin, explain_slots
from serving.rail_cache import cached_rail, rail_payload
from serving.rail_service import LoadedRails
from serving.served_model import CatalogueWatcher, ServedModel
from serving.stages import (
    StageOutput,
    Trace,
    build_query,
    exploration_rng,
    explore_slot,
    query_history,
    rules_length,
    run_stages,
)
from serving.user_vectors import TritonUserTower, session_vector
from state.session_store import SessionSnapshot, SessionStore

log = get_logger(__name__)


class BadRequest(Exception):
    """A request the API answers with a 4xx: `status` and a message naming the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class ServedRequest:
    """What the served path computed for one request: the hand-off to impression logging
    and the shadow arms, which reuse it instead of reading Redis again."""

    rail: str
    request: RailRequest
    loaded: LoadedRails
    snapshot: SessionSnapshot | None
    query: Query
    served_by: ServedBy
    items: list[Candidate]
    # the list the rules stage read (MMR output) when the rail was computed, else None
    before_rules: list[Candidate] | None
    # the production session vector the rail used; None when cached or without towers
    vector: np.ndarray | None
    # the exploration slot's draw (ranking.exploration) when it filled a slot of this rail
    explored: Explored | None = None


class ServedObserver(CatalogueWatcher, Protocol):
    """Sees every served request after its answer is computed (serving.shadow.ShadowRunner).

    `observe` runs on the request thread: it must only hand work off, never compute.
    """

    def observe(self, served: ServedRequest) -> None: ...


@dataclass
class _Answer:
    served_by: ServedBy
    items: list[Candidate]
    before_rules: list[Candidate] | None = None
    vector: np.ndarray | None = None
    explored: Explored | None = None
    # what explain=true reads: the stages' output (computed) or the rules' (fallback)
    output: StageOutput | None = None
    ruled: RuledSlots | None = None


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
        self.budgets = settings.serving.budgets
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="ranker")
        self._ranker_jobs = 0  # submitted to the pool and not finished (ranker_queue)
        self._ranker_jobs_lock = threading.Lock()
        # admission: at most `compute_slots` rails computed at once (a Semaphore wakes its
        # waiters first come, first served)
        slots = self.budgets.compute_slots
        self._compute_slots = threading.Semaphore(slots) if slots else None
        # Impression logging and shadow traffic (serving.shadow); set by serving.app.
        self.observer: ServedObserver | None = None
        # Thompson's click / impression counts per item: in memory, per process, for now
        # (nothing feeds clicks back yet, so Thompson samples from its priors alone).
        self.arm_stats = InMemoryArmStats({}, {})

    def prewarm(self, session_ids: Sequence[str], users: Mapping[str, str] | None = None) -> int:
        """Store the session vector and homepage rail of many sessions at once (the refresh
        consumer's path; serving.prewarm). Returns how many rails were stored. Raises
        redis.RedisError if Redis is down (nothing is committed)."""
        return prewarm(self, session_ids, users)

    # ------------------------------------------------------------------ the request path

    def serve(self, rail: str, request: RailRequest) -> RailResponse:
        loaded = self.loaded  # one model for the whole request, even across a hot swap
        if loaded is None:
            raise BadRequest(503, "no model loaded yet; see /readyz")
        query_parts = self._validate(rail, request, loaded)  # bad input stays a 4xx
        trace = Trace()
        try:
            snapshot = self._snapshot(rail, request, loaded, trace)
            query = build_query(
                request, snapshot, query_parts, rail, self.settings.serving.exclusions
            )
            answer = self._answer(rail, request, query, snapshot, loaded, trace)
            if self.observer is not None:
                self._hand_off(rail, request, query, snapshot, loaded, answer)
            provenance = (
                self._explain(rail, query, loaded, answer, trace) if request.explain else None
            )
            return self._respond(
                rail, request, loaded, answer.served_by, answer.items, trace, provenance
            )
        except BadRequest:
            raise
        except Exception as exc:  # noqa: BLE001 - a valid request always gets a rail, never a 5xx
            # anything the inner fallbacks did not foresee (malformed state in Redis, a
            # cluster error that is no RedisError, a bug in explain): popular items, counted
            log.exception("rail request failed; serving popular items", rail=rail)
            self.metrics.errors.labels(kind="request").inc()
            trace.reasons.append(f"request failed ({type(exc).__name__}): popular items")
            items = last_resort(loaded, rail, request, query_parts)
            return self._respond(rail, request, loaded, "fallback", items, trace, None)

    def _answer(
        self,
        rail: str,
        request: RailRequest,
        query: Query,
        snapshot: SessionSnapshot | None,
        loaded: LoadedRails,
        trace: Trace,
    ) -> _Answer:
        if snapshot is not None and snapshot.rail is not None:
            cached = self._from_cache(rail, snapshot, request, query, loaded, trace)
            if cached is not None:
                return _Answer("cache", cached[0], explored=cached[1])
        if not self._admit(trace):
            ruled = fallback(loaded.pipeline, rail, query, request.slots)
            return _Answer("fallback", ruled.outcome.candidates, ruled=ruled)
        try:
            output, vector = self._compute(rail, request, query, snapshot, loaded, trace)
        except Exception as exc:  # noqa: BLE001 - the rail must still answer
            log.exception("rail computation failed; serving popularity", rail=rail)
            self.metrics.errors.labels(kind="compute").inc()
            trace.reasons.append(f"computation failed ({type(exc).__name__}): popular items")
            ruled = fallback(loaded.pipeline, rail, query, request.slots)
            return _Answer("fallback", ruled.outcome.candidates, ruled=ruled)
        finally:
            if self._compute_slots is not None:
                self._compute_slots.release()
        explored = self.explore(rail, request, snapshot, output.slots)
        items = explored.items if explored is not None else output.slots
        # A rail computed under the request's own exclusions is that request's alone: caching
        # it would hide those items from the session's next plain request.
        if rail == "homepage_hero" and snapshot is not None and not request.exclude:
            self._write_cache(request, loaded, snapshot, items, trace, explored)
        return _Answer("computed", items, output.before_rules, vector, explored, output)

    def _admit(self, trace: Trace) -> bool:
        """Wait up to `admission_ms` for a compute slot; False (counted, with the reason on
        the trace) when none freed up: the process is over capacity."""
        if self._compute_slots is None:
            return True
        since = time.perf_counter()
        admitted = self._compute_slots.acquire(timeout=self.budgets.admission_ms / 1000)
        trace.lap("admission", since)
        if not admitted:
            self.metrics.fallbacks.labels(reason="over_capacity").inc()
            trace.reasons.append(
                f"over capacity: no compute slot within {self.budgets.admission_ms:.0f} ms: "
                "popular items"
            )
        return admitted

    def explore(
        self,
        rail: str,
        request: RailRequest,
        snapshot: SessionSnapshot | None,
        ruled: list[Candidate],
    ) -> Explored | None:
        """The exploration slot over the rules' output; None when `ranking.exploration` is off."""
        settings = self.settings.ranking.exploration
        if settings.slot is None:
            return None
        marker = snapshot.marker if snapshot is not None else None
        rng = exploration_rng(self.settings.seed, rail, request, marker)
        return explore_slot(settings, ruled, request.slots, rng, self.arm_stats)

    def _hand_off(
        self,
        rail: str,
        request: RailRequest,
        query: Query,
        snapshot: SessionSnapshot | None,
        loaded: LoadedRails,
        answer: _Answer,
    ) -> None:
        served = ServedRequest(
            rail=rail,
            request=request,
            loaded=loaded,
            snapshot=snapshot,
            query=query,
            served_by=answer.served_by,
            items=answer.items,
            before_rules=answer.before_rules,
            vector=answer.vector,
            explored=answer.explored,
        )
        try:
            self.observer.observe(served)  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - logging and shadow never fail the served rail
            self.metrics.errors.labels(kind="observer").inc()
            log.exception("impression / shadow hand-off failed; the rail is still served")

    def _validate(
        self, rail: str, request: RailRequest, loaded: LoadedRails
    ) -> tuple[str | None, tuple[str, ...]]:
        if rail not in RAILS:
            raise BadRequest(404, f"unknown rail {rail!r}; rails: {', '.join(RAILS)}")
        if request.slots > self.settings.serving.max_slots:
            raise BadRequest(
                422,
                f"slots={request.slots} exceeds serving.max_slots "
                f"({self.settings.serving.max_slots})",
            )
        index = loaded.catalogue.index
        reads = RAIL_INPUTS[rail]
        if reads.page_item:
            if request.item_id is None:
                raise BadRequest(422, f"{rail} needs item_id: the product on the page")
            if request.item_id not in index:
                raise BadRequest(
                    404, f"item_id {request.item_id!r} is not in the catalogue of {loaded.version}"
                )
        if reads.cart and not request.cart:
            raise BadRequest(422, f"{rail} needs a non-empty cart (item ids)")
        unknown = [i for i in request.cart if i not in index]
        if unknown:
            raise BadRequest(
                404, f"cart items not in the catalogue of {loaded.version}: {unknown[:10]}"
            )
        return rail_parts(rail, request.item_id, request.cart)

    def _snapshot(
        self, rail: str, request: RailRequest, loaded: LoadedRails, trace: Trace
    ) -> SessionSnapshot | None:
        if self.store is None:
            trace.reasons.append("no session store configured: request data only")
            return None
        since = time.perf_counter()
        try:
            cached_rail = rail if rail == "homepage_hero" else None
            return self.store.snapshot(
                request.session_id, loaded.version, cached_rail, request.user_id
            )
        except redis.RedisError as exc:
            self.metrics.fallbacks.labels(reason="redis").inc()
            trace.reasons.append(f"redis unavailable ({type(exc).__name__}): no session state")
            return None
        finally:
            trace.lap("redis", since)

    def _from_cache(
        self,
        rail: str,
        snapshot: SessionSnapshot,
        request: RailRequest,
        query: Query,
        loaded: LoadedRails,
        trace: Trace,
    ) -> tuple[list[Candidate], Explored | None] | None:
        """The pre-warmed rail still valid for this request (serving.rail_cache), counted."""
        cached = cached_rail(snapshot.rail or {}, loaded.pipeline, rail, query, request.slots)
        if cached is not None:
            self.metrics.cache_hits.inc()
            trace.vector_source = "cache"
        return cached

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
        vector = None
        if loaded.towers is not None:
            # The stored vector encodes the session alone: a product page or a cart adds to
            # the history, so those rails encode their own (and do not store it).
            session_only = query.anchor is None and not query.cart
            cached = snapshot.vector if snapshot is not None and session_only else None
            result = session_vector(
                loaded.towers,
                query_history(query),
                query.context,
                cached,
                self.triton if self.settings.serving.request_encoder == "triton" else None,
                loaded.towers.triton_version,
            )
            trace.reasons += result.degraded
            trace.vector_source = result.source
            if result.degraded:
                self.metrics.fallbacks.labels(reason="triton").inc()
            vector = result.vector
            if session_only and result.source != "redis" and snapshot is not None:
                self._put_vector(request.session_id, loaded, result.vector, snapshot, trace)
        trace.lap("user_vector", since)

        def rank(table: CandidateTable) -> np.ndarray:
            return self._rank_within_budget(rail, table, query, loaded, trace)

        length = rules_length(self.settings.ranking.exploration, request.slots)
        output = run_stages(loaded, rail, query, request.slots, vector, rank, trace, length)
        return output, vector

    def _rank_within_budget(
        self, rail: str, table: CandidateTable, query: Query, loaded: LoadedRails, trace: Trace
    ):  # type: ignore[no-untyped-def]
        fused = table["fused"].astype(float)
        bound = self.budgets.ranker_queue
        with self._ranker_jobs_lock:
            busy = bool(bound) and self._ranker_jobs >= bound
            if not busy:
                self._ranker_jobs += 1
        if busy:
            # Shed at once: queueing behind `bound` jobs would miss the budget and leave one
            # more job for the requests after this one (the backlog a spike used to leave).
            self.metrics.fallbacks.labels(reason="ranker_busy").inc()
            trace.reasons.append(f"re-ranker busy ({bound} jobs in hand): fused order")
            return fused
        future = self._pool.submit(loaded.pipeline.ranker_scores, rail, table, [query])
        future.add_done_callback(self._ranker_job_done)
        try:
            return future.result(timeout=self.budgets.ranker_ms / 1000)
        except concurrent.futures.TimeoutError:
            future.cancel()  # not started yet: nobody waits for it any more, drop it
            self.metrics.fallbacks.labels(reason="ranker_budget").inc()
            trace.reasons.append(
                f"re-ranker over its {self.budgets.ranker_ms:.0f} ms budget: fused order"
            )
            return fused

    def _ranker_job_done(self, _future: concurrent.futures.Future) -> None:  # type: ignore[type-arg]
        with self._ranker_jobs_lock:
            self._ranker_jobs -= 1

    def _put_vector(  # type: ignore[no-untyped-def]
        self, session_id: str, loaded: LoadedRails, vector, snapshot: SessionSnapshot, trace: Trace
    ) -> None:
        if not snapshot.events:
            return  # no state for a session with no events: any session id would grow Redis
        try:
            self.store.put_vector(session_id, loaded.version, vector, snapshot.marker)  # type: ignore[union-attr]
        except redis.RedisError:
            trace.reasons.append("redis unavailable: session vector not cached")

    def _write_cache(
        self,
        request: RailRequest,
        loaded: LoadedRails,
        snapshot: SessionSnapshot,
        items: list[Candidate],
        trace: Trace,
        explored: Explored | None = None,
    ) -> None:
        if not snapshot.events:
            return  # as for the vector: an unknown session id leaves nothing behind
        payload = rail_payload(snapshot.marker, items, explored)
        try:
            self.store.put_rail(request.session_id, loaded.version, "homepage_hero", payload)  # type: ignore[union-attr]
        except redis.RedisError:
            trace.reasons.append("redis unavailable: rail not cached")

    def _explain(
        self, rail: str, query: Query, loaded: LoadedRails, answer: _Answer, trace: Trace
    ) -> list[Provenance]:
        """Per-slot provenance of the answer (explain=true only; see serving.provenance)."""
        since = time.perf_counter()
        output = answer.output
        if output is not None and output.ruled is not None:
            origin = Origin(
                "candidates",
                output.ruled.outcome.effects,
                output.ruled.filled,
                output.table,
                output.ranked,
                output.before_rules,
                answer.explored,
            )
        elif answer.ruled is not None:
            origin = Origin("fallback", answer.ruled.outcome.effects, answer.ruled.filled)
        else:
            origin = self._cache_origin(rail, query, loaded, answer)
        provenance = explain_slots(loaded, query, answer.items, origin)
        trace.lap("explain", since)
        return provenance

    def _cache_origin(
        self, rail: str, query: Query, loaded: LoadedRails, answer: _Answer
    ) -> Origin:
        """What a cached rail can truthfully say: the effects of the rules in force now (the
        marker names the rule set, so they are those it was warmed under), no stage ranks."""
        pipeline = loaded.pipeline
        rules = pipeline.rules
        now = pipeline.request_time(query)
        n = len(answer.items)
        outcome = explain_rules(answer.items, rules, pipeline.attributes, rail, n, now)
        note = (
            "served from the pre-warmed rail computed for this session state; "
            "its candidate, re-ranker and MMR ranks were not stored"
        )
        return Origin("cache", outcome.effects, explored=answer.explored, note=note)

    def _respond(
        self,
        rail: str,
        request: RailRequest,
        loaded: LoadedRails,
        served: ServedBy,
        items: list[Candidate],
        trace: Trace,
        provenance: list[Provenance] | None = None,
    ) -> RailResponse:
        attributes = loaded.pipeline.attributes
        titles = loaded.titles
        total = time.perf_counter() - trace.started
        trace.timings["total"] = round(total * 1000, 3)
        self.metrics.requests.labels(rail=rail, served_by=served).observe(total)
        for stage, ms in trace.timings.items():
            if stage != "total":
                self.metrics.stages.labels(stage=stage).observe(ms / 1000)
        rail_items = [
            RailItem(
                item_id=c.item_id,
                score=c.score,
                title=titles.get(c.item_id),
                category=getattr(attributes.get(c.item_id), "category_path", None),
            )
            for c in items
        ]
        for item, explained in zip(rail_items, provenance or [], strict=False):
            item.provenance = explained  # set only here: unset, the route omits the key
        return RailResponse(
            rail=rail,
            session_id=request.session_id,
            model_version=loaded.version,
            served_by=served,
            reasons=trace.reasons,
            vector_source=trace.vector_source,
            items=rail_items,
            timings_ms=trace.timings,
        )


def last_resort(
    loaded: LoadedRails,
    rail: str,
    request: RailRequest,
    parts: tuple[str | None, tuple[str, ...]],
) -> list[Candidate]:
    """Popular items under the rules, built from the request alone (no session state): what
    a valid request gets when its own path failed. It still never returns the product on
    the page, the cart or the request's exclusions."""
    anchor, cart = parts
    # stricter than a computed rail: with no session to go on, the cart is excluded too
    query = rail_query(anchor, cart, also_exclude=[*request.exclude, *cart])
    exclude = query.exclude
    try:
        return fallback(loaded.pipeline, rail, query, request.slots).outcome.candidates
    except Exception:  # noqa: BLE001 - the rules themselves failed: plain popularity
        log.exception("rules failed on the last-resort rail; plain popular items", rail=rail)
        stats = loaded.pipeline.stats
        order = stats.item_ids[np.argsort(-stats.popularity, kind="stable")].tolist()
        items = [i for i in order if i not in exclude][: request.slots]
        return [Candidate(item, -float(k)) for k, item in enumerate(items)]
