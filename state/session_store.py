"""Session state, user vectors and pre-warmed rails in Redis.

Keys (a session's keys share the hash tag `{s:<session>}`, so on Redis Cluster they live in
one slot and one pipeline reads them together):

    rt:{s:<session>}:events                      list of the last N events (JSON), newest last
    rt:{s:<session>}:seen                        set of event ids already applied (idempotence)
    rt:{s:<session>}:n                           events applied so far: the state's version
    rt:{s:<session>}:vec:<model version>         hash {marker, vector (float32 bytes)}
    rt:{s:<session>}:rail:<model version>:<rail> pre-warmed rail (JSON with its marker), TTL
    rt:{u:<user>}:sessions                       set of the user's session ids (deletion)
    rt:{u:<user>}:orders                         sorted set [session, item] -> purchase time:
                                                 the user's order memory (buy-again source,
                                                 purchased-items exclusion), newest N kept
    rt:{catalogue}:items, rt:{catalogue}:version latest record per item (price, stock, margin,
                                                retired, a new item's listing), change version

Every key has a TTL: session state, vectors and the user's session set live `state_ttl_s`
after their last write (user data always expires), pre-warmed rails `rail_ttl_s`, the
catalogue `catalogue_ttl_s` (days: an item out of stock stays out through a quiet day,
also for a process that starts and replays the hash then).

Vectors and rails carry the model version in their key, so a promotion never serves a
vector or rail computed by another model, and the marker (the event count they were
computed from), so a session that moved on never gets a stale one. Once a published rule
set is in force (`rules_epoch`, set by serving.published_rules.PublishedRules), the marker
also names it ("<count>@<epoch>"): a rail warmed under other rules is not served, while
vectors, which no rule changes, keep the count alone. Appending is one Lua script: an event
is marked seen and appended atomically, so a crash between the two can neither lose it nor
apply it twice. Every call has a socket timeout (the stage budget): a slow or absent Redis
raises quickly and the caller degrades.

The same code runs on one Redis or on Redis Cluster (`serving.redis_mode`; the client comes
from state/redis_client.py, which says what holds on a cluster). Only one thing differs:
a cluster pipeline cannot carry a script, so there `append_events` writes the user's set
and runs the script in two round trips instead of one.

One module on purpose: the key layout above and the reads and writes over it are one
contract with the consumer and every API process; prices live in state.price_store.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from railtower.settings import ServingSettings
from state.redis_client import RedisClient, connect, connect_url, is_cluster
from towers.session_features import HistoryEvent

# (event id, event, context): one event as `append_events` takes it
AppendedEvent = tuple[str, HistoryEvent, str | None]

# what `_key(session, "events")` writes, read back by `scan_sessions`
_SESSION_OF_KEY = re.compile(rb"^rt:\{s:(.+)\}:events$")

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

# KEYS: catalogue hash, version. ARGV: item id, payload, ttl. The version is a millisecond
# clock that only moves forward: both keys expire, and a counter restarting at 1 after
# expiry could equal the version an API process last saw and hide a change from it.
# The payload is merged into the item's record: a field it leaves null keeps its last value,
# so a price-only message after "stock 0" cannot bring the item back on a process that polls
# (or replays the hash at a hot swap) after both.
_CATALOGUE_UPDATE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
if now <= last then now = last + 1 end
local record = cjson.decode(ARGV[2])
local before = redis.call('HGET', KEYS[1], ARGV[1])
if before then
  for field, value in pairs(cjson.decode(before)) do
    if record[field] == nil or record[field] == cjson.null then record[field] = value end
  end
end
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(record))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
redis.call('SET', KEYS[2], string.format('%d', now), 'EX', tonumber(ARGV[3]))
return now
"""

# Characters SCAN's MATCH treats as a pattern: an id containing one must match only itself
# (a session id "*" must never delete every session).
_GLOB = str.maketrans({c: "\\" + c for c in "\\*?[]"})


@dataclass(frozen=True)
class Deletion:
    """What a deletion removed: the sessions it covered, the keys found by kind (events,
    seen, n, vec, rail, user_sessions) and how many were deleted (fewer when some expired
    between the scan and the delete)."""

    sessions: list[str]
    keys: dict[str, int] = field(default_factory=dict)
    deleted: int = 0


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
    # the user's purchases across sessions (item -> last purchase time), when asked for
    purchased: dict[str, float] = field(default_factory=dict)
    # the user's purchases in other sessions, one per (session, item), oldest first: what
    # the buy-again source reads (Query.past_purchases)
    orders: tuple[str, ...] = ()


@dataclass(frozen=True)
class WarmState:
    """One session's pre-warmed state for `SessionStore.put_warm`: its vector (None when the
    model has no towers) with the marker it was computed from, and the rail's payload
    (which carries its own marker)."""

    session_id: str
    vector: np.ndarray | None
    vector_marker: str
    rail: dict[str, object]


class SessionStore:
    """Redis-backed session state shared by the API (reads) and the consumer (writes).

    Args:
        client: a single Redis URL, or a client from `state.redis_client.connect` (one
            Redis or a cluster); `SessionStore.from_settings` builds it as configured.
        timeout_s: socket timeout of a URL's client (the request's Redis budget).
        purchase_ttl_s: keep each user's purchases (across sessions) this long after the
            last one, for the buy-again source and the purchased-items exclusion; None =
            keep none.
        max_orders: the most (session, item) purchases kept per user, newest first.
    """

    def __init__(
        self,
        client: str | RedisClient,
        timeout_s: float,
        max_events: int,
        state_ttl_s: int,
        rail_ttl_s: int,
        purchase_ttl_s: int | None = None,
        catalogue_ttl_s: int = 30 * 86400,
        max_orders: int = 500,
    ) -> None:
        self.client = connect_url(client, timeout_s) if isinstance(client, str) else client
        self.purchase_ttl_s, self.catalogue_ttl_s = purchase_ttl_s, catalogue_ttl_s
        self.max_orders = max_orders
        self.cluster = is_cluster(self.client)
        self.max_events, self.state_ttl_s, self.rail_ttl_s = max_events, state_ttl_s, rail_ttl_s
        self._append = self.client.register_script(_APPEND)
        self._catalogue_update = self.client.register_script(_CATALOGUE_UPDATE)
        # The published rule set in force in this process (None = the bundle's own rules);
        # it becomes part of the rail marker, see the module docstring.
        self.rules_epoch: str | None = None

    @classmethod
    def from_settings(
        cls, serving: ServingSettings, timeout_s: float | None = None
    ) -> SessionStore:
        """The store `serving` configures: one Redis or a cluster, the Redis stage budget as
        socket timeout unless `timeout_s` (tools that load state, not answer requests)."""
        timeout_s = serving.budgets.redis_ms / 1000 if timeout_s is None else timeout_s
        client = connect(serving, timeout_s)
        window_h = serving.exclusions.purchased_window_h
        memory = serving.purchase_memory
        # purchases are remembered as long as the order memory or the exclusion looks back
        kept_s = [
            *([] if memory.days is None else [memory.days * 86400]),
            *([] if window_h is None else [window_h * 3600]),
        ]
        purchase_ttl_s = math.ceil(max(kept_s)) if kept_s else None
        return cls(
            client,
            timeout_s,
            serving.session_events,
            serving.state_ttl_s,
            serving.prewarm_ttl_s,
            purchase_ttl_s,
            serving.catalogue_ttl_s,
            memory.max_entries,
        )

    @staticmethod
    def _key(session_id: str, *parts: str) -> str:
        return ":".join(("rt", f"{{s:{session_id}}}", *parts))

    @staticmethod
    def _user_key(user_id: str) -> str:
        return f"rt:{{u:{user_id}}}:sessions"

    @staticmethod
    def _orders_key(user_id: str) -> str:
        return f"rt:{{u:{user_id}}}:orders"

    def ping(self) -> bool:
        return bool(self.client.ping())

    def scan_sessions(self, max_keys: int) -> list[tuple[str, list[HistoryEvent]]]:
        """Up to `max_keys` sessions with events, found by SCAN (never KEYS, so a large store
        stays responsive), each with its events. Raises redis.RedisError if Redis is down."""
        keys = []
        for key in self.client.scan_iter(match=self._key("*", "events"), count=500):
            keys.append(key)
            if len(keys) >= max_keys:
                break
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.lrange(key, 0, -1)
        found = []
        for key, raw_events in zip(keys, pipe.execute(), strict=True):
            match = _SESSION_OF_KEY.match(key)
            if match is None or not raw_events:
                continue
            events = [orjson.loads(raw) for raw in raw_events]
            history = [HistoryEvent(e["item_id"], e["event_type"], e["time_s"]) for e in events]
            found.append((match.group(1).decode(), history))
        return found

    def snapshot(
        self, session_id: str, version: str, rail: str | None, user_id: str | None = None
    ) -> SessionSnapshot:
        """The session's events, its vector, (for `rail`) its pre-warmed rail and (for
        `user_id`, when purchase memory is on) the user's purchases across sessions.

        One pipelined round trip on one Redis; on a cluster the user's purchases live in
        the user's slot, so they cost a second node's reply in the same pipeline.

        Raises:
            redis.RedisError: Redis is down or slower than the timeout.
        """
        return self.snapshots([session_id], version, rail, {session_id: user_id})[0]

    def snapshots(
        self,
        session_ids: Sequence[str],
        version: str,
        rail: str | None,
        users: Mapping[str, str | None] | None = None,
    ) -> list[SessionSnapshot]:
        """`snapshot` of many sessions in one pipelined round trip (the consumer's batch: a
        round trip per session cost it as much as a rail's ranking). `users` names the user
        of a session, whose purchases it then reads.

        Raises:
            redis.RedisError: Redis is down or slower than the timeout.
        """
        users = users or {}
        pipe = self.client.pipeline(transaction=False)
        shapes = [self._queue_snapshot(pipe, s, version, rail, users.get(s)) for s in session_ids]
        replies = iter(pipe.execute())
        return [
            self._read_snapshot(replies, rail, session_id if purchases else None)
            for session_id, purchases in zip(session_ids, shapes, strict=True)
        ]

    def _queue_snapshot(
        self, pipe: Any, session_id: str, version: str, rail: str | None, user_id: str | None
    ) -> bool:
        """Queue one session's snapshot reads on `pipe`; returns whether it reads purchases."""
        pipe.lrange(self._key(session_id, "events"), 0, -1)
        pipe.get(self._key(session_id, "n"))
        pipe.hgetall(self._key(session_id, "vec", version))
        if rail is not None:
            pipe.get(self._key(session_id, "rail", version, rail))
        with_purchases = bool(user_id) and self.purchase_ttl_s is not None
        if with_purchases:
            pipe.zrange(self._orders_key(user_id), 0, -1, withscores=True)  # type: ignore[arg-type]
        return with_purchases

    def _read_snapshot(
        self, replies: Iterator[Any], rail: str | None, orders_of: str | None
    ) -> SessionSnapshot:
        """One session's snapshot from the next replies `_queue_snapshot` queued (with the
        user's orders when `orders_of` names the session)."""
        raw_events, raw_n, raw_vector = next(replies), next(replies), next(replies)
        raw_rail = next(replies) if rail is not None else None
        raw_orders = next(replies) if orders_of is not None else []
        count = (raw_n or b"0").decode()
        marker = count if self.rules_epoch is None else f"{count}@{self.rules_epoch}"
        events, context = [], None
        for raw in raw_events:
            event = orjson.loads(raw)
            events.append(HistoryEvent(event["item_id"], event["event_type"], event["time_s"]))
            context = event.get("context") or context
        vector = None
        if raw_vector.get(b"marker", b"").decode() == count and b"vector" in raw_vector:
            vector = np.frombuffer(raw_vector[b"vector"], dtype=np.float32)
        cached = orjson.loads(raw_rail) if raw_rail is not None else None
        if cached is not None and cached.get("marker") != marker:
            cached = None
        purchased, orders = _orders(raw_orders, orders_of)
        return SessionSnapshot(events, context, marker, vector, cached, purchased, orders)

    def append_events(
        self,
        session_id: str,
        events: Sequence[tuple[str, HistoryEvent, str | None]],
        user_ids: Iterable[str] = (),
    ) -> int:
        """Append (event_id, event, context) triples not applied before; return how many were new.

        Idempotent by event id and atomic: a redelivered event changes nothing.

        Args:
            session_id: the session the events belong to.
            events: (event id, event, context) triples, oldest first.
            user_ids: the user ids these events carry (usually one; none for guests): the
                session joins each user's session set, so `delete_user` finds it.

        The user's set lives in the user's hash slot, so it cannot join the session's script
        on Redis Cluster; it is written first (in the same round trip on one Redis, just
        before on a cluster) and always (SADD is idempotent), so whenever a session's data
        exists its user can reach it, including after a crash between the two and the
        redelivery that follows.
        """
        return self.append_many({session_id: (events, user_ids)})[session_id]

    def append_many(
        self,
        sessions: Mapping[str, tuple[Sequence[AppendedEvent], Iterable[str]]],
    ) -> dict[str, int]:
        """`append_events` for many sessions (session -> (events, user ids)): one pipelined
        round trip on one Redis, in the order given; session -> how many events were new.

        A round trip per session cost the consumer's batch more than its Redis work. Each
        session's script is still atomic on its own; on a cluster (no scripts in a pipeline)
        the sessions go one at a time.
        """
        if self.cluster:
            return {s: self._append_one(s, *appended) for s, appended in sessions.items()}
        pipe = self.client.pipeline(transaction=False)
        scripts: dict[str, int] = {}
        for session_id, (events, user_ids) in sessions.items():
            if events:
                keys, args = self._queue_append(pipe, session_id, events, user_ids)
                self._append(keys=keys, args=args, client=pipe)
                scripts[session_id] = len(pipe) - 1
        replies = pipe.execute() if len(pipe) else []
        return {s: int(replies[scripts[s]]) if s in scripts else 0 for s in sessions}

    def _append_one(
        self,
        session_id: str,
        events: Sequence[tuple[str, HistoryEvent, str | None]],
        user_ids: Iterable[str],
    ) -> int:
        """One session's append on a cluster: the user's sets, then the script."""
        if not events:
            return 0
        pipe = self.client.pipeline(transaction=False)
        keys, args = self._queue_append(pipe, session_id, events, user_ids)
        if len(pipe):
            pipe.execute()
        return int(self._append(keys=keys, args=args))

    def _queue_append(
        self,
        pipe: Any,
        session_id: str,
        events: Sequence[tuple[str, HistoryEvent, str | None]],
        user_ids: Iterable[str],
    ) -> tuple[list[str], list[object]]:
        """Queue the user-set writes of one session's append on `pipe`; returns the script's
        keys and arguments."""
        args: list[object] = [self.max_events, self.state_ttl_s]
        for event_id, event, context in events:
            payload = {"item_id": event.item_id, "event_type": event.event_type}
            payload.update(time_s=event.time_s, context=context)
            args += [event_id, orjson.dumps(payload)]
        keys = [self._key(session_id, part) for part in ("events", "seen", "n")]
        purchases = self._purchases(session_id, events)
        for user_id in dict.fromkeys(u for u in user_ids if u):
            pipe.sadd(self._user_key(user_id), session_id)
            pipe.expire(self._user_key(user_id), self.state_ttl_s)
            if purchases:  # GT: a redelivered older purchase never moves the time back
                key = self._orders_key(user_id)
                pipe.zadd(key, purchases, gt=True)
                pipe.zremrangebyrank(key, 0, -self.max_orders - 1)  # the newest N stay
                pipe.expire(key, self.purchase_ttl_s)
        return keys, args

    def _purchases(
        self, session_id: str, events: Sequence[tuple[str, HistoryEvent, str | None]]
    ) -> dict[bytes, float]:
        """The order-memory member ([session, item]) -> latest purchase time of each item
        purchased among `events` (empty when purchase memory is off)."""
        if self.purchase_ttl_s is None:
            return {}
        latest: dict[str, float] = {}
        for _, event, _ in events:
            if event.event_type == "purchase":
                latest[event.item_id] = max(event.time_s, latest.get(event.item_id, event.time_s))
        return {orjson.dumps([session_id, item]): t for item, t in latest.items()}

    def applied_event_ids(self, session_id: str) -> set[str]:
        """The ids of every event applied to this session so far (its idempotence set)."""
        return {_text(x) for x in self.client.smembers(self._key(session_id, "seen"))}

    def user_sessions(self, user_id: str) -> list[str]:
        """The session ids linked to `user_id` (those whose events carried it)."""
        return sorted(_text(m) for m in self.client.smembers(self._user_key(user_id)))

    def put_vector(self, session_id: str, version: str, vector: np.ndarray, marker: str) -> None:
        pipe = self.client.pipeline(transaction=True)  # never a vector without its expiry
        self._queue_vector(pipe, session_id, version, vector, marker)
        pipe.execute()

    def put_rail(
        self, session_id: str, version: str, rail: str, payload: dict[str, object]
    ) -> None:
        """Store a pre-warmed rail; `payload` carries the marker of the state it came from."""
        self._queue_rail(self.client, session_id, version, rail, payload)

    def _queue_vector(
        self, pipe: Any, session_id: str, version: str, vector: np.ndarray, marker: str
    ) -> None:
        key = self._key(session_id, "vec", version)
        blob = np.asarray(vector, dtype=np.float32).tobytes()
        pipe.hset(key, mapping={"marker": marker, "vector": blob})
        pipe.expire(key, self.state_ttl_s)

    def _queue_rail(
        self, pipe: Any, session_id: str, version: str, rail: str, payload: dict[str, object]
    ) -> None:
        key = self._key(session_id, "rail", version, rail)
        pipe.set(key, orjson.dumps(payload), ex=self.rail_ttl_s)

    def put_warm(self, version: str, rail: str, warmed: Sequence[WarmState]) -> None:
        """Store many sessions' vectors and pre-warmed rails in one pipelined round trip
        (the consumer's batch). On one Redis the batch is one MULTI/EXEC, so a vector never
        lands without its expiry; on a cluster each session's writes go on their own."""
        if self.cluster:
            for w in warmed:
                if w.vector is not None:
                    self.put_vector(w.session_id, version, w.vector, w.vector_marker)
                self.put_rail(w.session_id, version, rail, w.rail)
            return
        pipe = self.client.pipeline(transaction=True)
        for w in warmed:
            if w.vector is not None:
                self._queue_vector(pipe, w.session_id, version, w.vector, w.vector_marker)
            self._queue_rail(pipe, w.session_id, version, rail, w.rail)
        if len(pipe):
            pipe.execute()

    # Catalogue changes (price, stock) shared by the consumer (writes) and every API process
    # (polls): one hash of the latest state per item and a version counter, one hash tag so
    # the script that updates both runs on a cluster too.
    _CATALOGUE, _CATALOGUE_VERSION = "rt:{catalogue}:items", "rt:{catalogue}:version"

    def put_catalogue_update(self, item_id: str, price: float | None, stock: int | None) -> None:
        self.put_catalogue_record(item_id, {"price": price, "stock": stock})

    def put_catalogue_record(self, item_id: str, fields: Mapping[str, object]) -> None:
        """Merge `fields` into the item's catalogue record (a null field keeps its last
        value): price, stock, margin, `retired`, and a listing's content (title,
        category_path, brand, ...), which lets every process add an item its bundle lacks."""
        self.put_catalogue_records([(item_id, fields)])

    def put_catalogue_records(self, changes: Sequence[tuple[str, Mapping[str, object]]]) -> None:
        """`put_catalogue_record` for many changes, merged in the order given: one pipelined
        round trip on one Redis (a catalogue import of thousands of listings would otherwise
        cost a round trip each); on a cluster, whose pipelines carry no script, one each."""
        keys = [self._CATALOGUE, self._CATALOGUE_VERSION]
        pipe = None if self.cluster else self.client.pipeline(transaction=False)
        for item_id, fields in changes:
            args = [item_id, orjson.dumps(dict(fields)), self.catalogue_ttl_s]
            self._catalogue_update(keys=keys, args=args, client=pipe or self.client)
        if pipe is not None and len(pipe):
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
        return self.delete_sessions([session_id]).deleted

    def delete_sessions(self, session_ids: Sequence[str]) -> Deletion:
        """Remove every key of these sessions (events, seen set, count, vectors, rails).

        One SCAN of the keyspace whatever the number of sessions (vectors and rails carry
        model versions, so their names cannot be listed in advance); on a cluster it visits
        every master and the DELs go per slot (state/redis_client.py). Events that arrive
        after the scan create new state: stop the sender first for a lasting deletion.
        """
        prefixes = {self._key(s, ""): s for s in dict.fromkeys(session_ids)}
        if len(prefixes) == 1:  # one session: let Redis filter by its exact prefix
            match = next(iter(prefixes)).translate(_GLOB) + "*"
        else:
            match = "rt:{s:*"
        found: list[str] = []
        kinds: Counter[str] = Counter()
        for raw in self.client.scan_iter(match=match, count=1000):
            key = _text(raw)
            prefix = _prefix_in(key, prefixes)
            if prefix is not None:
                found.append(key)
                kinds[key[len(prefix) :].split(":", 1)[0]] += 1
        deleted = 0
        for start in range(0, len(found), 500):  # bounded DEL commands
            deleted += int(self.client.delete(*found[start : start + 500]))
        return Deletion(list(prefixes.values()), dict(kinds), deleted)

    def delete_user(self, user_id: str) -> Deletion:
        """Remove a user's state: every linked session's keys, then the link set itself.

        The set goes last, so a deletion interrupted half-way can simply be run again.
        """
        sessions = self.user_sessions(user_id)
        deletion = self.delete_sessions(sessions) if sessions else Deletion([])
        purchases = int(self.client.delete(self._orders_key(user_id)))
        removed = int(self.client.delete(self._user_key(user_id)))
        keys = dict(deletion.keys)
        if purchases:
            keys["user_purchases"] = purchases
        if removed:
            keys["user_sessions"] = removed
        return Deletion(deletion.sessions, keys, deletion.deleted + purchases + removed)


def _orders(
    raw: Sequence[tuple[bytes, float]], session_id: str | None
) -> tuple[dict[str, float], tuple[str, ...]]:
    """(item -> last purchase time over every session, the items purchased in sessions other
    than `session_id` oldest first) from the order memory's (member, time) pairs, which
    Redis returns oldest first."""
    purchased: dict[str, float] = {}
    earlier: list[str] = []
    for member, t in raw:
        session, item = orjson.loads(member)
        purchased[item] = max(float(t), purchased.get(item, float(t)))
        if session != session_id:
            earlier.append(item)
    return purchased, tuple(earlier)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _prefix_in(key: str, prefixes: dict[str, str]) -> str | None:
    """The prefix of `prefixes` that `key` starts with (a session key is '<prefix><kind>...').

    Each '}:' in the key is a place a session's prefix could end (a session id may itself
    contain '}:'), so each is tried; no quadratic scan over the prefixes.
    """
    end = key.find("}:")
    while end != -1:
        if key[: end + 2] in prefixes:
            return key[: end + 2]
        end = key.find("}:", end + 1)
    return None
