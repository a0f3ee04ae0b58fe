"""Pre-warming: the refresh consumer's path to a cached homepage rail for every session an
event touched, so the API then answers those sessions from Redis.

One encoder call and one pass of the rail engine for the whole micro-batch instead of a
request per session; the same stages, rules, exploration draw and markers as a request, so a
cached rail is what the API would have computed for that state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from ranking.engine import compute
from ranking.retriever import CandidateSource
from serving.api_models import RailRequest
from serving.rail_cache import rail_payload
from serving.stages import build_query, rules_length
from serving.user_vectors import VectorTowerSource, encode_sessions
from state.session_store import WarmState
from towers.session_features import history_of

if TYPE_CHECKING:  # the service calls this module; only its type is needed here
    from serving.rail_service import LoadedRails
    from serving.service import RailService
    from state.session_store import SessionStore


def prewarm(
    service: RailService, session_ids: Sequence[str], users: Mapping[str, str] | None = None
) -> int:
    """Recompute and store the session vector and homepage rail of many sessions at once.

    The streaming consumer's path: one encoder call and one pipeline pass for the whole
    micro-batch instead of a request per session; the same stages, rules and markers as
    `serve`, so the API then answers these sessions from the cache. `users` names the
    user of a session, whose purchases across sessions the rail then excludes (a request
    filters a cached rail by its own user's purchases anyway). Returns how many rails
    were stored. Raises redis.RedisError if Redis is down (nothing is committed).
    """
    users, store = users or {}, service.store
    if store is None or not session_ids:
        return 0
    # each session under the model that serves it: a live canary's sessions are warmed by
    # the challenger, under its version's keys, where its requests look
    groups: dict[int, tuple[LoadedRails, list[str]]] = {}
    for session_id in session_ids:
        loaded, _ = service.route(session_id)
        if loaded is not None:
            groups.setdefault(id(loaded), (loaded, []))[1].append(session_id)
    return sum(_prewarm(service, store, loaded, ids, users) for loaded, ids in groups.values())


def _prewarm(
    service: RailService,
    store: SessionStore,
    loaded: LoadedRails,
    session_ids: Sequence[str],
    users: Mapping[str, str],
) -> int:
    """`prewarm` for the sessions one model serves."""
    pipeline, slots = loaded.pipeline, service.settings.evaluation.slots
    snapshots = store.snapshots(session_ids, loaded.version, None, users)
    exclusions = service.settings.serving.exclusions
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
        histories = [history_of(q.session_items, q.session_types, q.session_times) for q in queries]
        vectors, _, degraded = encode_sessions(
            loaded.towers,
            histories,
            [q.context for q in queries],
            service.triton,
            loaded.towers.triton_version,
        )
        if degraded:
            service.metrics.fallbacks.labels(reason="triton").inc()
        sources["two_tower"] = VectorTowerSource(loaded.towers, vectors)
    length = rules_length(service.settings.ranking.exploration, slots, pipeline.depth)
    done = compute(pipeline, "homepage_hero", queries, sources=sources, slots=slots, length=length)
    warmed = []
    for n, (session_id, snap, ruled) in enumerate(
        zip(session_ids, snapshots, done.ruled, strict=True)  # type: ignore[arg-type]
    ):
        items = ruled.outcome.candidates
        # The exploration draw happens here, at warm time, seeded as the API would seed
        # it for this state; the cached rail keeps its propensities (serving.rail_cache).
        request = RailRequest(session_id=session_id, slots=slots)
        explored = service.explore("homepage_hero", request, snap, items, loaded)
        items = explored.items if explored is not None else items
        vector = None if vectors is None else vectors[n]
        payload = rail_payload(snap.marker, items, explored)
        warmed.append(WarmState(session_id, vector, snap.marker, payload))
    store.put_warm(loaded.version, "homepage_hero", warmed)  # one round trip for the batch
    return len(session_ids)
