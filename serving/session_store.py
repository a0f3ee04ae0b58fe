"""Session state, user vectors and pre-warmed rails in Redis.

Keys (a session's keys share the hash tag `{s:<session>}`, so on Redis Cluster they live in
one slot and one pipeline reads them together):

    rt:{s:<session>}:events                      list of the last N events (JSON), newest last
    rt:{s:<session>}:seen                        set of event ids already applied (idempotence)
    rt:{s:<session>}:vec:<model version>         float32 session vector
    rt:{s:<session>}:rail:<model version>:<rail> pre-warmed rail (JSON), with a short TTL

Vectors and rails carry the model version in their key, so a promotion never serves a
vector or rail computed by another model. Every call has a socket timeout (the stage
budget): a slow or absent Redis raises quickly and the caller degrades.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import orjson
import redis

from towers.session_features import HistoryEvent


@dataclass(frozen=True)
class SessionSnapshot:
    """Everything a rail request reads from Redis, in one round trip."""

    events: list[HistoryEvent]
    context: str | None
    vector: np.ndarray | None
    rail: dict[str, object] | None


class SessionStore:
    """Redis-backed session state shared by the API (reads) and the consumer (writes)."""

    def __init__(
        self, url: str, timeout_s: float, max_events: int, state_ttl_s: int, rail_ttl_s: int
    ) -> None:
        self.client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self.max_events, self.state_ttl_s, self.rail_ttl_s = max_events, state_ttl_s, rail_ttl_s

    @staticmethod
    def _key(session_id: str, *parts: str) -> str:
        return ":".join(("rt", f"{{s:{session_id}}}", *parts))

    def ping(self) -> bool:
        return bool(self.client.ping())

    def snapshot(self, session_id: str, version: str, rail: str | None) -> SessionSnapshot:
        """The session's events, its vector and (for `rail`) its pre-warmed rail.

        Raises:
            redis.RedisError: Redis is down or slower than the timeout.
        """
        pipe = self.client.pipeline(transaction=False)
        pipe.lrange(self._key(session_id, "events"), 0, -1)
        pipe.get(self._key(session_id, "vec", version))
        if rail is not None:
            pipe.get(self._key(session_id, "rail", version, rail))
        raw_events, raw_vector, *raw_rail = pipe.execute()
        events, context = [], None
        for raw in raw_events:
            event = orjson.loads(raw)
            events.append(HistoryEvent(event["item_id"], event["event_type"], event["time_s"]))
            context = event.get("context") or context
        vector = None if raw_vector is None else np.frombuffer(raw_vector, dtype=np.float32)
        cached = orjson.loads(raw_rail[0]) if raw_rail and raw_rail[0] is not None else None
        return SessionSnapshot(events, context, vector, cached)

    def append_events(
        self, session_id: str, events: Sequence[tuple[str, HistoryEvent, str | None]]
    ) -> int:
        """Append (event_id, event, context) triples not applied before; return how many were new.

        Idempotent by event id: a redelivered event changes nothing.
        """
        seen_key, events_key = self._key(session_id, "seen"), self._key(session_id, "events")
        pipe = self.client.pipeline(transaction=False)
        for event_id, _, _ in events:
            pipe.sadd(seen_key, event_id)
        fresh = [e for e, added in zip(events, pipe.execute(), strict=True) if added]
        if not fresh:
            return 0
        pipe = self.client.pipeline(transaction=True)
        for _, event, context in fresh:
            payload = {"item_id": event.item_id, "event_type": event.event_type}
            payload.update(time_s=event.time_s, context=context)
            pipe.rpush(events_key, orjson.dumps(payload))
        pipe.ltrim(events_key, -self.max_events, -1)
        for key in (events_key, seen_key):
            pipe.expire(key, self.state_ttl_s)
        pipe.execute()
        return len(fresh)

    def put_vector(self, session_id: str, version: str, vector: np.ndarray) -> None:
        key = self._key(session_id, "vec", version)
        self.client.set(key, np.asarray(vector, dtype=np.float32).tobytes(), ex=self.state_ttl_s)

    def put_rail(
        self, session_id: str, version: str, rail: str, payload: dict[str, object]
    ) -> None:
        key = self._key(session_id, "rail", version, rail)
        self.client.set(key, orjson.dumps(payload), ex=self.rail_ttl_s)

    def drop_rails(self, session_id: str, version: str, rails: Sequence[str]) -> None:
        """Invalidate pre-warmed rails (their session changed, or an item went out of stock)."""
        self.client.delete(*(self._key(session_id, "rail", version, r) for r in rails))

    def delete_session(self, session_id: str) -> int:
        """Remove everything stored for a session; returns the number of keys deleted."""
        keys = list(self.client.scan_iter(match=self._key(session_id, "*")))
        return int(self.client.delete(*keys)) if keys else 0
