"""What one request reads from Redis and writes back (`state.session_store`): the session
snapshot, the pre-warmed rail read back through `serving.rail_cache`, the session vector
and the computed hero rail.

Redis being down degrades the answer (a reason on the trace, a counted fallback), never
fails it. A session with no events leaves nothing behind (no vector, no cached rail), so
made-up session ids cannot grow Redis.
"""

from __future__ import annotations

import time

import numpy as np
import redis

from ranking.candidates import Candidate
from ranking.exploration import Explored
from ranking.retriever import Query
from serving.api_models import RailRequest
from serving.metrics import Metrics
from serving.rail_cache import cached_rail, rail_payload
from serving.rail_service import LoadedRails
from serving.stages import Trace
from state.session_store import SessionSnapshot, SessionStore


def read_snapshot(
    store: SessionStore | None,
    metrics: Metrics,
    rail: str,
    request: RailRequest,
    loaded: LoadedRails,
    trace: Trace,
) -> SessionSnapshot | None:
    """The session's events, vector and (homepage hero only) pre-warmed rail in one round
    trip; None without a store or with Redis down (counted, with the reason)."""
    if store is None:
        trace.reasons.append("no session store configured: request data only")
        return None
    since = time.perf_counter()
    try:
        cached = rail if rail == "homepage_hero" else None
        return store.snapshot(request.session_id, loaded.version, cached, request.user_id)
    except redis.RedisError as exc:
        metrics.fallbacks.labels(reason="redis").inc()
        trace.reasons.append(f"redis unavailable ({type(exc).__name__}): no session state")
        return None
    finally:
        trace.lap("redis", since)


def from_cache(
    metrics: Metrics,
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
        metrics.cache_hits.inc()
        trace.vector_source = "cache"
    return cached


def put_vector(
    store: SessionStore,
    session_id: str,
    loaded: LoadedRails,
    vector: np.ndarray,
    snapshot: SessionSnapshot,
    trace: Trace,
) -> None:
    """Store the session vector this request encoded, for the session's next request."""
    if not snapshot.events:
        return  # no state for a session with no events: any session id would grow Redis
    try:
        store.put_vector(session_id, loaded.version, vector, snapshot.marker)
    except redis.RedisError:
        trace.reasons.append("redis unavailable: session vector not cached")


def put_rail(
    store: SessionStore,
    request: RailRequest,
    loaded: LoadedRails,
    snapshot: SessionSnapshot,
    items: list[Candidate],
    trace: Trace,
    explored: Explored | None = None,
) -> None:
    """Store the homepage hero rail this request computed, with its exploration draw."""
    if not snapshot.events:
        return  # as for the vector: an unknown session id leaves nothing behind
    payload = rail_payload(snapshot.marker, items, explored)
    try:
        store.put_rail(request.session_id, loaded.version, "homepage_hero", payload)
    except redis.RedisError:
        trace.reasons.append("redis unavailable: rail not cached")
