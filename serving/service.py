"""One rail request, from the parsed body to the slots: the online path in one place.

    session state (Redis) -> pre-warmed rail? -> session vector (Redis, Triton, in-process)
    -> fused candidates -> re-ranker (within budget, else fused order) -> MMR -> rules
    -> hand-off to the observer (impression log and shadow arms, serving/shadow.py)

Every stage that is slow or down degrades the answer and says why in `reasons`; nothing
blocks the rail. Popularity under the rules is the last fallback. The served model can be
swapped while requests run: each request reads `self.loaded` once and uses that model only.
The stages after the session vector live in `serving.stages`, shared with the shadow arms.

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
from pathlib import Path
from typing import Protocol

import numpy as np
import redis

from railtower.errors import ArtifactMismatch
from railtower.logs import get_logger
from railtower.settings import RAILS, Settings
from ranking.candidate_fusion import CandidateTable
from ranking.candidates import Candidate
from ranking.engine import compute, fallback
from ranking.exploration import Explored, InMemoryArmStats
from ranking.rail_inputs import RAIL_INPUTS, rail_parts, rail_query
from ranking.rails import RuledSlots
from ranking.retriever import CandidateSource, Query
from ranking.rules import explain_rules, ineligible
from serving.api_models import Provenance, RailItem, RailRequest, RailResponse, ServedBy
from serving.metrics import Metrics
from serving.price_store import PriceFollower, PriceStore, price_points_ttl_s
from serving.provenance import Origin, explain_slots
from serving.rail_service import LoadedRails, load_rails
from serving.session_store import SessionSnapshot, SessionStore
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
from serving.user_vectors import (
    TritonUserTower,
    VectorTowerSource,
    encode_sessions,
    session_vector,
)
from towers.session_features import HistoryEvent, history_of

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


class ServedObserver(Protocol):
    """Sees every served request after its answer is computed (serving.shadow.ShadowRunner).

    `observe` runs on the request thread: it must only hand work off, never compute.
    """

    def observe(self, served: ServedRequest) -> None: ...

    def catalogue_changed(self, item_id: str, price: float | None, stock: int | None) -> None: ...


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


class RailService:
    """The served model, its state stores, and the request path over them."""

    def __init__(
        self,
        settings: Settings,
        loaded: LoadedRails | None,
        store: SessionStore | None,
        triton: TritonUserTower | None,
        metrics: Metrics,
    ) -> None:
        self.settings, self.loaded, self.store, self.triton = settings, loaded, store, triton
        self.metrics = metrics
        self.budgets = settings.serving.budgets
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="ranker")
        self._ranker_jobs = 0  # submitted to the pool and not finished (ranker_queue)
        self._ranker_jobs_lock = threading.Lock()
        self._swap_lock = threading.Lock()
        self.source: Path | None = None
        self._catalogue_version = 0
        # Price observations the consumer published (serving.price_store): deals and the
        # re-ranker's price-history features follow them.
        self.prices = (
            None
            if store is None
            else PriceFollower(
                PriceStore(
                    store.client,
                    settings.serving.price_points_max,
                    settings.serving.state_ttl_s,
                    price_points_ttl_s(settings),
                )
            )
        )
        # Impression logging and shadow traffic (serving.shadow); set by serving.app.
        self.observer: ServedObserver | None = None
        # Thompson's click / impression counts per item: in memory, per process, for now
        # (nothing feeds clicks back yet, so Thompson samples from its priors alone).
        self.arm_stats = InMemoryArmStats({}, {})

    # ------------------------------------------------------------------ model lifecycle

    @property
    def ready(self) -> bool:
        """Ready when a model (index, rankers, rules) is loaded."""
        return self.loaded is not None

    def load(self, folder: Path) -> bool:
        """Load `folder` and swap it in; on failure keep serving the last good model.

        Returns True when the new model is now served.
        """
        with self._swap_lock:
            try:
                fresh = load_rails(folder, self.settings)
            except (ArtifactMismatch, OSError, ValueError) as exc:
                self.metrics.errors.labels(kind="bundle_load").inc()
                log.error(
                    "bundle not loaded; keeping the current model",
                    folder=str(folder),
                    error=str(exc),
                    serving=None if self.loaded is None else self.loaded.version,
                )
                return False
            _warm_up(fresh, self.triton)
            # the stock and prices this process has applied hold for the new model too: an
            # item out of stock must not come back because the bundle changed
            self._carry_catalogue(fresh)
            self.loaded, self.source = fresh, folder.resolve()
            self.metrics.model_info.info({"version": fresh.version})
            log.info("serving model", version=fresh.version, folder=str(folder))
            return True

    def reload_if_moved(self, pointer: Path) -> bool:
        """Hot-swap when the production pointer now names another bundle."""
        if not pointer.exists() or pointer.resolve() == self.source:
            return False
        return self.load(pointer)

    def _carry_catalogue(self, fresh: LoadedRails) -> None:
        """Apply every published price/stock change to a model about to be swapped in; if
        Redis cannot say, the next catalogue sync replays them all (version reset)."""
        if self.store is None:
            return
        try:
            version, changes = self.store.catalogue_changes(-1)
        except redis.RedisError:
            self._catalogue_version = -1
            return
        for item_id, change in changes.items():
            _apply_change(fresh, item_id, change.get("price"), change.get("stock"))  # type: ignore[arg-type]
        self._catalogue_version = version

    def apply_catalogue_change(self, item_id: str, price: float | None, stock: int | None) -> bool:
        """Apply a price/stock change to the served model's item attributes.

        Returns False for an item the model does not know (it cannot be recommended anyway).
        """
        if self.observer is not None:  # a shadowed challenger must see the same stock
            self.observer.catalogue_changed(item_id, price, stock)
        loaded = self.loaded
        return loaded is not None and _apply_change(loaded, item_id, price, stock)

    def sync_catalogue(self) -> int:
        """Pull the catalogue changes other processes published to Redis; return how many."""
        if self.store is None:
            return 0
        try:
            version, changes = self.store.catalogue_changes(self._catalogue_version)
            if self.prices is not None:
                self.prices.sync(self.loaded)
        except redis.RedisError:
            return 0  # Redis down: keep the attributes we have
        for item_id, change in changes.items():
            self.apply_catalogue_change(item_id, change.get("price"), change.get("stock"))  # type: ignore[arg-type]
        self._catalogue_version = version
        return len(changes)

    def prewarm(self, session_ids: Sequence[str], users: Mapping[str, str] | None = None) -> int:
        """Recompute and store the session vector and homepage rail of many sessions at once.

        The streaming consumer's path: one encoder call and one pipeline pass for the whole
        micro-batch instead of a request per session; the same stages, rules and markers as
        `serve`, so the API then answers these sessions from the cache. `users` names the
        user of a session, whose purchases across sessions the rail then excludes (a request
        filters a cached rail by its own user's purchases anyway). Returns how many rails
        were stored. Raises redis.RedisError if Redis is down (nothing is committed).
        """
        users = users or {}
        loaded, store = self.loaded, self.store
        if loaded is None or store is None or not session_ids:
            return 0
        pipeline, slots = loaded.pipeline, self.settings.evaluation.slots
        snapshots = [store.snapshot(s, loaded.version, None, users.get(s)) for s in session_ids]
        exclusions = self.settings.serving.exclusions
        queries = [
            build_query(
                RailRequest(session_id=s, user_id=users.get(s), slots=slots),
                snap,
                (None, ()),
                "homepage_hero",
                exclusions,
            )
            for s, snap in zip(session_ids, snapshots, strict=True)
        ]
        sources: dict[str, CandidateSource] = dict(pipeline.sources)
        vectors = None
        if loaded.towers is not None:
            histories = [
                history_of(q.session_items, q.session_types, q.session_times) for q in queries
            ]
            vectors, _, degraded = encode_sessions(
                loaded.towers,
                histories,
                [q.context for q in queries],
                self.triton,
                loaded.towers.triton_version,
            )
            if degraded:
                self.metrics.fallbacks.labels(reason="triton").inc()
            sources["two_tower"] = VectorTowerSource(loaded.towers, vectors)
        length = rules_length(self.settings.ranking.exploration, slots)
        done = compute(
            pipeline, "homepage_hero", queries, sources=sources, slots=slots, length=length
        )
        for n, (session_id, snap, ruled) in enumerate(
            zip(session_ids, snapshots, done.ruled, strict=True)  # type: ignore[arg-type]
        ):
            items = ruled.outcome.candidates
            # The exploration draw happens here, at warm time, seeded as the API would seed
            # it for this state; the cached rail keeps its propensities (see _from_cache).
            request = RailRequest(session_id=session_id, slots=slots)
            explored = self._explore("homepage_hero", request, snap, items)
            items = explored.items if explored is not None else items
            if vectors is not None:
                store.put_vector(session_id, loaded.version, vectors[n], snap.marker)
            payload = _rail_payload(snap.marker, items, explored)
            store.put_rail(session_id, loaded.version, "homepage_hero", payload)
        return len(session_ids)

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
        try:
            output, vector = self._compute(rail, request, query, snapshot, loaded, trace)
        except Exception as exc:  # noqa: BLE001 - the rail must still answer
            log.exception("rail computation failed; serving popularity", rail=rail)
            self.metrics.errors.labels(kind="compute").inc()
            trace.reasons.append(f"computation failed ({type(exc).__name__}): popular items")
            ruled = fallback(loaded.pipeline, rail, query, request.slots)
            return _Answer("fallback", ruled.outcome.candidates, ruled=ruled)
        explored = self._explore(rail, request, snapshot, output.slots)
        items = explored.items if explored is not None else output.slots
        # A rail computed under the request's own exclusions is that request's alone: caching
        # it would hide those items from the session's next plain request.
        if rail == "homepage_hero" and snapshot is not None and not request.exclude:
            self._write_cache(request, loaded, snapshot, items, trace, explored)
        return _Answer("computed", items, output.before_rules, vector, explored, output)

    def _explore(
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
        """The pre-warmed rail, and its exploration draw when it was warmed with one.

        The exploration slot is drawn when the rail is computed (request or warm time) and
        the draw is stored with the rail, so a cached answer shows exactly what the stored
        propensities describe. A cached rail that explored and lost an item since (out of
        stock, blocked, excluded by the request) is recomputed instead: the slots would
        shift under the logged propensity. So is one left with fewer items than slots.
        """
        payload = snapshot.rail or {}  # the store returns it only if computed from this state
        stored = payload.get("items", [])
        # What the query excludes now, or went out of stock or got blocked since the rail was
        # warmed, leaves it at once: the same judgement as the rules stage, without re-ranking.
        pipeline = loaded.pipeline
        removed = ineligible(
            [i["item_id"] for i in stored],  # type: ignore[union-attr]
            pipeline.rules,
            pipeline.attributes,
            rail,
            pipeline.request_time(query),
            query.exclude,
        )
        items = [i for i in stored if i["item_id"] not in removed]  # type: ignore[union-attr]
        if len(items) < request.slots:
            return None
        explored = _stored_exploration(payload, request.slots)
        if "exploration" in payload and (len(items) < len(stored) or explored is None):  # type: ignore[arg-type]
            return None
        self.metrics.cache_hits.inc()
        trace.vector_source = "cache"
        top = [Candidate(i["item_id"], float(i["score"])) for i in items[: request.slots]]
        if explored is not None:
            explored = Explored(
                top, explored.slot, explored.choice_set, explored.chosen, explored.probabilities
            )
        return top, explored

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
                self.triton,
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
        fused = table.frame["fused"].to_numpy(dtype=float)
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
        payload = _rail_payload(snapshot.marker, items, explored)
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


def _rail_payload(
    marker: str, items: Sequence[Candidate], explored: Explored | None
) -> dict[str, object]:
    """The cached rail: its items and, when the exploration slot drew, that draw."""
    payload: dict[str, object] = {
        "marker": marker,
        "items": [{"item_id": c.item_id, "score": c.score} for c in items],
    }
    if explored is not None and explored.slot is not None:
        payload["exploration"] = {
            "slot": explored.slot,
            "choice_set": explored.choice_set,
            "probabilities": [explored.probabilities[i] for i in explored.choice_set],
        }
    return payload


def _stored_exploration(payload: dict[str, object], slots: int) -> Explored | None:
    """The exploration draw stored with a cached rail (its items are set by the caller); None
    when the rail was warmed without one or for a different number of slots."""
    stored = payload.get("exploration")
    if not isinstance(stored, dict):
        return None
    items = payload.get("items", [])
    slot = int(stored["slot"])
    if slot >= slots or len(items) != slots:  # type: ignore[arg-type]
        return None  # warmed for another slot count: the draw was over another cut
    choice = [str(i) for i in stored["choice_set"]]
    chosen = str(items[slot]["item_id"])  # type: ignore[index]
    probabilities = dict(zip(choice, map(float, stored["probabilities"]), strict=True))
    return Explored([], slot, choice, chosen, probabilities)


def _warm_up(loaded: LoadedRails, triton: TritonUserTower | None) -> None:
    """Run each rail once before the model takes traffic: the first LightGBM, TorchScript and
    Triton calls are several times slower than the rest, and no shopper should pay for them."""
    item = str(loaded.catalogue.ids[0])
    if triton is not None and loaded.towers is not None:
        inputs = loaded.towers.session_inputs([[HistoryEvent(item, "view", 0.0)]], [None])
        try:
            triton.encode(inputs, loaded.towers.triton_version)
        except Exception:  # noqa: BLE001 - Triton may come up later; requests fall back meanwhile
            log.warning("triton not answering at load; requests use the in-process tower")
    for rail in RAILS:
        anchor, cart = rail_parts(rail, item, [item] if RAIL_INPUTS[rail].cart else [])
        session = () if anchor or cart else (item,)
        query = rail_query(anchor, cart, session, ("view",) * len(session))
        compute(loaded.pipeline, rail, [query])


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


def _apply_change(
    loaded: LoadedRails, item_id: str, price: float | None, stock: int | None
) -> bool:
    """A price/stock change on one model's item attributes and the price its ranker reads;
    False for an item the model does not know (it cannot be recommended anyway)."""
    if item_id not in loaded.pipeline.attributes:
        return False
    loaded.pipeline.attributes.update(item_id, stock=stock, price=price)
    if price is not None:
        # the re-ranker's price features read the item statistics: keep them current too
        stats = loaded.pipeline.stats
        stats.price[stats.row[item_id]] = price
    return True
