"""Session state, user vectors and pre-warmed rails in Redis.

Keys (a session's keys share the hash tag `{s:<session>}`, so on Redis Cluster they live in
one slot and one pipeline reads them together):

    rt:{s:<session>}:events                      list of the last N events (JSON), newest last
    rt:{s:<session>}:seen                        set of event ids already applied (idempotence)
    rt:{s:<session>}:n                           events applied so far: the state's version
    rt:{s:<session>}:vec:<model version>         hash {marker, vector (float32 bytes)}
    rt:{s:<session>}:rail:<model version>:<rail> pre-warmed rail (JSON with its marker), TTL

Vectors and rails carry the model version in their key, so a promotion never serves a
vector or rail computed by another model, and the marker (the event count they were
computed from), so a session that moved on never gets a stale one. Appending is one Lua
script: an event is marked seen and appended atomically, so a crash between the two can
neither lose it nor apply it twice. Every call has a socket timeout (the stage budget): a
slow or absent Redis raises quickly and the caller degrades.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import orjson
import redis

from towers.session_features import HistoryEvent

# KEYS: events, seen, n. ARGV: max events, ttl, then (event id, payload) pairs.
_APPEND = """
local added = 0
for i = 3, #ARGV, 2 do
  if redis.call('SADD', KEYS[2], ARGV[i]) == 1 then
    redis.call('RPUSH', KEYS[1], ARGV[i + 1])
    added = added + 1
  end
end
if added > 0 then
  redis.call('LTRIM', KEYS[1], -tonumber(ARGV[1]), -1)
  redis.call('INCRBY', KEYS[3], added)
end
for k = 1, 3 do redis.call('EXPIRE', KEYS[k], tonumber(ARGV[2])) end
return added
"""


@dataclass(frozen=True)
class SessionSnapshot:
    """Everything a rail request reads from Redis, in one round trip.

    `vector` and `rail` are None unless they were computed from this very state (`marker`).
    """

    events: list[HistoryEvent]
    context: str | None
    marker: str
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
        self._append = self.client.register_script(_APPEND)

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
        pipe.get(self._key(session_id, "n"))
        pipe.hgetall(self._key(session_id, "vec", version))
        if rail is not None:
            pipe.get(self._key(session_id, "rail", version, rail))
        raw_events, raw_n, raw_vector, *raw_rail = pipe.execute()
        marker = (raw_n or b"0").decode()
        events, context = [], None
        for raw in raw_events:
            event = orjson.loads(raw)
            events.append(HistoryEvent(event["item_id"], event["event_type"], event["time_s"]))
            context = event.get("context") or context
        vector = None
        if raw_vector.get(b"marker", b"").decode() == marker and b"vector" in raw_vector:
            vector = np.frombuffer(raw_vector[b"vector"], dtype=np.float32)
        cached = orjson.loads(raw_rail[0]) if raw_rail and raw_rail[0] is not None else None
        if cached is not None and cached.get("marker") != marker:
            cached = None
        return SessionSnapshot(events, context, marker, vector, cached)

    def append_events(
        self, session_id: str, events: Sequence[tuple[str, HistoryEvent, str | None]]
    ) -> int:
        """Append (event_id, event, context) triples not applied before; return how many were new.

        Idempotent by event id and atomic: a redelivered event changes nothing.
        """
        if not events:
            return 0
        args: list[object] = [self.max_events, self.state_ttl_s]
        for event_id, event, context in events:
            payload = {"item_id": event.item_id, "event_type": event.event_type}
            payload.update(time_s=event.time_s, context=context)
            args += [event_id, orjson.dumps(payload)]
        keys = [self._key(session_id, part) for part in ("events", "seen", "n")]
        return int(self._append(keys=keys, args=args))

    def put_vector(self, session_id: str, version: str, vector: np.ndarray, marker: str) -> None:
        key = self._key(session_id, "vec", version)
        blob = np.asarray(vector, dtype=np.float32).tobytes()
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(key, mapping={"marker": marker, "vector": blob})
        pipe.expire(key, self.state_ttl_s)
        pipe.execute()

    def put_rail(
        self, session_id: str, version: str, rail: str, payload: dict[str, object]
    ) -> None:
        """Store a pre-warmed rail; `payload` carries the marker of the state it came from."""
        key = self._key(session_id, "rail", version, rail)
        self.client.set(key, orjson.dumps(payload), ex=self.rail_ttl_s)

    # Catalogue changes (price, stock) shared by the consumer (writes) and every API process
    # (polls): one hash of the latest state per item and a version counter.
    _CATALOGUE, _CATALOGUE_VERSION = "rt:catalogue", "rt:catalogue:version"

    def put_catalogue_update(self, item_id: str, price: float | None, stock: int | None) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self._CATALOGUE, item_id, orjson.dumps({"price": price, "stock": stock}))
        pipe.incr(self._CATALOGUE_VERSION)
        pipe.execute()

    def catalogue_changes(self, since: int) -> tuple[int, dict[str, dict[str, object]]]:
        """(current version, every item's latest change) if the version moved past `since`."""
        version = int(self.client.get(self._CATALOGUE_VERSION) or 0)
        if version == since:
            return version, {}
        raw = self.client.hgetall(self._CATALOGUE)
        return version, {k.decode(): orjson.loads(v) for k, v in raw.items()}

    def drop_rails(self, session_id: str, version: str, rails: Sequence[str]) -> None:
        """Invalidate pre-warmed rails (their session changed, or an item went out of stock)."""
        self.client.delete(*(self._key(session_id, "rail", version, r) for r in rails))

    def delete_session(self, session_id: str) -> int:
        """Remove everything stored for a session; returns the number of keys deleted."""
        keys = list(self.client.scan_iter(match=self._key(session_id, "*")))
        return int(self.client.delete(*keys)) if keys else 0
