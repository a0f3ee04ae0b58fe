"""The stages of one rail computation once the request is parsed: shared by the served path
(serving.service) and the shadow arms (serving.shadow), so a shadow arm is computed exactly
as it would have been served.

    build_query -> session vector -> run_stages: fused candidates -> re-ranker -> MMR -> rules

`build_query` is the one place a request's exclusions are decided (the product on the page,
the cart, the items already seen, the request's `exclude` list, and the items purchased
within `serving.exclusions.purchased_window_h`): the served, pre-warmed, fallback and shadow
paths all read `Query.exclude`, so no path can show what another would hide.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from railtower.logs import get_logger
from railtower.settings import ExclusionSettings, ExplorationSettings, Settings
from ranking.candidate_fusion import CandidateTable
from ranking.candidates import Candidate
from ranking.engine import compute, fallback
from ranking.exploration import ArmStats, Explored, explore
from ranking.new_item_placement import unknown_items
from ranking.rail_inputs import rail_query
from ranking.rails import RuledSlots
from ranking.retriever import CandidateSource, Query
from serving.api_models import RailRequest, ServedBy
from serving.metrics import Metrics
from serving.rail_service import LoadedRails
from serving.user_vectors import TritonUserTower, VectorTowerSource, session_vector
from state.session_store import SessionSnapshot
from towers.session_features import HistoryEvent, history_of

log = get_logger(__name__)


@dataclass
class Trace:
    """Per-stage timings and degradation reasons of one rail computation."""

    started: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    vector_source: str = "none"

    def lap(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        self.timings[stage] = round((now - since) * 1000, 3)
        return now


@dataclass(frozen=True)
class StageOutput:
    slots: list[Candidate]
    before_rules: list[Candidate]  # MMR's order, the rules stage's input
    # What per-slot provenance reads (serving.provenance); kept by reference, built on demand.
    table: CandidateTable | None = None  # the fused candidates, fused order
    ranked: list[Candidate] | None = None  # the re-ranker's order
    ruled: RuledSlots | None = None  # the rules' effects and popular fill


@dataclass
class Answer:
    """What the request path answers one request with, and what explain=true, impression
    logging and the shadow arms read of it."""

    served_by: ServedBy
    items: list[Candidate]
    before_rules: list[Candidate] | None = None
    vector: np.ndarray | None = None
    explored: Explored | None = None
    # what explain=true reads: the stages' output (computed) or the rules' (fallback)
    output: StageOutput | None = None
    ruled: RuledSlots | None = None


Ranker = Callable[[CandidateTable], np.ndarray]


def build_query(
    request: RailRequest,
    snapshot: SessionSnapshot | None,
    parts: tuple[str | None, tuple[str, ...]],
    rail: str,
    exclusions: ExclusionSettings,
) -> Query:
    """The pipeline's query for a request: its session from the snapshot, its anchor or
    cart, what it must never return, and the user's earlier purchases (the order memory).

    Args:
        parts: (anchor, cart) as validated by the service.
        rail, exclusions: items the session purchased within `exclusions`' window are
            excluded on the rails it names (required: every path decides the same way).
    """
    anchor, cart = parts
    events = snapshot.events if snapshot is not None else []
    items = tuple(e.item_id for e in events)
    context = request.context.key() if request.context else None
    if context is None and snapshot is not None:
        context = snapshot.context
    purchased = snapshot.purchased if snapshot is not None else {}
    return rail_query(
        anchor,
        cart,
        items,
        [e.event_type for e in events],
        [e.time_s for e in events],
        context,
        also_exclude=[*request.exclude, *purchased_items(events, purchased, rail, exclusions)],
        past_purchases=snapshot.orders if snapshot is not None else (),
    )


def purchased_items(
    events: Sequence[HistoryEvent],
    user_purchases: Mapping[str, float],
    rail: str,
    exclusions: ExclusionSettings,
) -> frozenset[str]:
    """Items the shopper purchased within the window, on the rails configured for it: in
    this session's events, and in the user's purchases across sessions (item -> time, kept
    by the consumer when the request names the user; state.session_store).

    The window ends at the session's newest event, the clock the rules are judged by
    (RailPipeline.request_time), so a replayed session is treated as it was live; a session
    with no events yet is judged at the wall clock.
    """
    window_h = exclusions.purchased_window_h
    if window_h is None or rail not in exclusions.rails:
        return frozenset()
    now = max((e.time_s for e in events), default=time.time())
    since = now - window_h * 3600.0
    in_session = {e.item_id for e in events if e.event_type == "purchase" and e.time_s >= since}
    return frozenset(in_session | {i for i, t in user_purchases.items() if t >= since})


def query_history(query: Query) -> list[HistoryEvent]:
    """The history the session tower encodes for `query` (the session, then page or cart)."""
    return history_of(
        query.session_items, query.session_types, query.session_times, query.anchor, query.cart
    )


def in_process_vector(loaded: LoadedRails, query: Query) -> np.ndarray | None:
    """The session vector from the bundle's own TorchScript tower: no Redis, no Triton (the
    shadow arms' way, so shadow traffic never loads a shared service)."""
    if loaded.towers is None:
        return None
    history = query_history(query)
    return session_vector(
        loaded.towers, history, query.context, None, None, anchor=query.anchor
    ).vector


def request_vector(
    loaded: LoadedRails,
    query: Query,
    snapshot: SessionSnapshot | None,
    triton: TritonUserTower | None,
    trace: Trace,
    metrics: Metrics,
) -> tuple[np.ndarray | None, bool]:
    """The session vector a computed rail reads (None without towers): Redis, Triton or the
    in-process tower (serving.user_vectors), with its source and any degradation in
    `trace`. Also says whether it is new and should be stored: the stored vector encodes
    the session alone, and a product page or a cart adds to the history, so those rails
    encode their own and never store it."""
    if loaded.towers is None:
        return None, False
    session_only = query.anchor is None and not query.cart
    cached = snapshot.vector if snapshot is not None and session_only else None
    history = query_history(query)
    result = session_vector(
        loaded.towers,
        history,
        query.context,
        cached,
        triton,
        loaded.towers.triton_version,
        query.anchor,
    )
    trace.reasons += result.degraded
    trace.vector_source = result.source
    if result.degraded:
        metrics.fallbacks.labels(reason="triton").inc()
    fresh = session_only and result.source != "redis" and snapshot is not None
    return result.vector, fresh


def run_stages(
    loaded: LoadedRails,
    rail: str,
    query: Query,
    slots: int,
    vector: np.ndarray | None,
    rank: Ranker,
    trace: Trace,
    length: int | None = None,
) -> StageOutput:
    """The engine's stages (ranking.engine.compute) for one request whose vector is known.

    Args:
        vector: (D,) session vector for the tower source; None keeps the pipeline's own.
        rank: the re-ranker call, table -> (rows,) scores (the served path's has a budget).
        trace: receives the per-stage timings.
        length: how many ruled items to return (default `slots`); the exploration slot asks
            for more, its choice set below the cut (see `rules_length`).
    """
    pipeline = loaded.pipeline
    sources: dict[str, CandidateSource] = dict(pipeline.sources)
    if loaded.towers is not None and vector is not None:
        sources["two_tower"] = VectorTowerSource(loaded.towers, vector)
    done = compute(
        pipeline,
        rail,
        [query],
        sources=sources,
        rank=lambda table, _queries: rank(table),
        slots=slots,
        length=length or slots,
        timings=trace.timings,
    )
    ruled = done.ruled[0]  # type: ignore[index]
    return StageOutput(
        ruled.outcome.candidates,
        done.diversified[0],  # type: ignore[index]
        done.table,
        done.ranked[0],  # type: ignore[index]
        ruled,
    )


def fallback_answer(loaded: LoadedRails, rail: str, query: Query, slots: int) -> Answer:
    """Popular items under the rules for `query` (no vector, no re-ranker): the answer when
    the process is over capacity or the computation failed."""
    ruled = fallback(loaded.pipeline, rail, query, slots)
    return Answer("fallback", ruled.outcome.candidates, ruled=ruled)


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


# ------------------------------------------------------------------ the exploration slot


def rules_length(settings: ExplorationSettings, slots: int, depth: int) -> int:
    """How many ruled items a rail computes: its slots, plus the exploration window when the
    slot is on and within the rail (the choice set must obey the rules too), or the whole
    pool of `depth` when young items have a share (the re-ranker puts them far below)."""
    if settings.slot is None or settings.slot >= slots:
        return slots
    if settings.young_share > 0:
        return max(depth, slots + settings.window)
    return slots + settings.window


def young_items(loaded: LoadedRails, ruled: Sequence[Candidate]) -> frozenset[str]:
    """The ruled items listed since `loaded` was trained: no statistics row (serving.new_items)."""
    return unknown_items((c.item_id for c in ruled), loaded.pipeline.stats.row)


def exploration_rng(
    seed: int, rail: str, request: RailRequest, marker: str | None
) -> np.random.Generator:
    """The bandit's generator for one request, seeded by what the request is (rail, session,
    the session state's marker, page item, cart): a replay draws the same, and a pre-warmed
    rail draws what the API would have for the same state. The randomness the propensity
    refers to is over requests, which a hash spreads uniformly."""
    key = "\x1f".join(
        [str(seed), rail, request.session_id, marker or "", request.item_id or "", *request.cart]
    )
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def explore_slot(
    settings: ExplorationSettings,
    ruled: Sequence[Candidate],
    slots: int,
    rng: np.random.Generator,
    stats: ArmStats | None = None,
    young: frozenset[str] = frozenset(),
) -> Explored | None:
    """The exploration slot over the rules' output (None when it is off): `ruled` is already
    free of blocked, excluded and out-of-stock items, so whatever the bandit picks obeys
    every rule. Returns the top `slots` with the slot filled, and its propensities."""
    if settings.slot is None:
        return None
    return explore(ruled, slots, settings, rng, stats, young=young)


def explore_request(
    settings: Settings,
    rail: str,
    request: RailRequest,
    snapshot: SessionSnapshot | None,
    ruled: Sequence[Candidate],
    stats: ArmStats | None = None,
    young: frozenset[str] = frozenset(),
) -> Explored | None:
    """The exploration slot of one request (or pre-warmed session) over the rules' output,
    drawn with the generator its rail, session state and page or cart seed; None when
    `ranking.exploration` is off. `young`: the items listed since the model was trained."""
    exploration = settings.ranking.exploration
    if exploration.slot is None:
        return None
    marker = snapshot.marker if snapshot is not None else None
    rng = exploration_rng(settings.seed, rail, request, marker)
    return explore_slot(exploration, ruled, request.slots, rng, stats, young)
