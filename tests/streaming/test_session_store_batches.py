"""The session store's batched calls (the consumer's step) against the one-session calls, on
a real Redis: the same results, the same keys, the same expiries."""

from __future__ import annotations

import numpy as np
import pytest

from devstack.local_services import free_port, redis_server
from state.session_store import SessionStore, WarmState
from towers.session_features import HistoryEvent

T0 = 1569890000.0


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    port = free_port()
    server = redis_server(port, tmp_path_factory.mktemp("redis")).start()  # raises: fails
    yield f"redis://127.0.0.1:{port}/0"
    server.stop()


def _events(session: str, count: int, start: int = 0) -> list:
    return [
        (f"{session}-{k}", HistoryEvent(f"i{k}", "purchase" if k == 2 else "view", T0 + k), "web")
        for k in range(start, start + count)
    ]


def _store(url: str, database: int = 0) -> SessionStore:
    """A store on an empty Redis database of its own."""
    store = SessionStore(url.replace("/0", f"/{database}"), 2.0, 50, 3600, 300, 86400)
    store.client.flushdb()
    return store


def test_append_many_matches_one_session_at_a_time_and_stays_idempotent(redis_url):
    store = _store(redis_url)
    batch = {
        "s1": (_events("s1", 3), ["u1"]),
        "s2": (_events("s2", 2), []),
        "s3": ([], []),  # a session with nothing to append answers 0, touches nothing
    }
    assert store.append_many(batch) == {"s1": 3, "s2": 2, "s3": 0}
    # a redelivered batch with one new event per session adds exactly those
    again = {s: (events + _events(s, 1, start=10), users) for s, (events, users) in batch.items()}
    assert store.append_many(again) == {"s1": 1, "s2": 1, "s3": 1}
    one = _store(redis_url, 1)
    for session, (events, users) in again.items():
        one.append_events(session, events, users)
    for session in batch:
        batched, single = store.snapshot(session, "v", None), one.snapshot(session, "v", None)
        assert batched.events == single.events and batched.marker == single.marker
    assert store.user_sessions("u1") == ["s1"]
    assert store.snapshot("s1", "v", None, "u1").purchased == {"i2": T0 + 2}


def test_snapshots_read_each_session_as_snapshot_does(redis_url):
    store = _store(redis_url)
    store.append_many({"s1": (_events("s1", 3), ["u1"]), "s2": (_events("s2", 1), [])})
    store.put_vector("s1", "v", np.ones(4, np.float32), "3")
    store.put_rail("s2", "v", "homepage_hero", {"marker": "1", "items": ["a"]})
    users = {"s1": "u1", "s2": None}
    for rail in (None, "homepage_hero"):
        batched = store.snapshots(["s1", "s2", "missing"], "v", rail, users)
        single = [store.snapshot(s, "v", rail, users.get(s)) for s in ("s1", "s2", "missing")]
        for b, s in zip(batched, single, strict=True):
            assert (b.events, b.context, b.marker, b.rail, b.purchased) == (
                s.events,
                s.context,
                s.marker,
                s.rail,
                s.purchased,
            )
            assert (b.vector is None) == (s.vector is None)
    assert batched[0].vector is not None and batched[1].rail == {"marker": "1", "items": ["a"]}


def test_put_warm_writes_vectors_and_rails_with_their_expiries(redis_url):
    store = _store(redis_url)
    store.append_many({"s1": (_events("s1", 2), []), "s2": (_events("s2", 1), [])})
    warmed = [
        WarmState("s1", np.full(4, 0.5, np.float32), "2", {"marker": "2", "items": ["a"]}),
        WarmState("s2", None, "1", {"marker": "1", "items": ["b"]}),  # a model without towers
    ]
    store.put_warm("v", "homepage_hero", warmed)
    s1, s2 = store.snapshots(["s1", "s2"], "v", "homepage_hero")
    assert np.allclose(s1.vector, 0.5) and s1.rail == {"marker": "2", "items": ["a"]}
    assert s2.vector is None and s2.rail == {"marker": "1", "items": ["b"]}
    assert 0 < store.client.ttl("rt:{s:s1}:vec:v") <= 3600
    assert 0 < store.client.ttl("rt:{s:s1}:rail:v:homepage_hero") <= 300
    assert not store.client.exists("rt:{s:s2}:vec:v")


def buy(session: str, item: str, t: float) -> tuple[str, HistoryEvent, None]:
    return f"{session}-{item}", HistoryEvent(item, "purchase", T0 + t), None


def test_the_order_memory_keeps_each_sessions_purchases_once_and_the_newest_n(redis_url):
    store = _store(redis_url, 3)
    store.max_orders = 4
    store.append_events("s1", [buy("s1", "a", 1), buy("s1", "b", 2)], ["u1"])
    store.append_events("s1", [buy("s1", "a", 1)], ["u1"])  # a redelivery adds nothing
    store.append_events("s2", [buy("s2", "a", 5), buy("s2", "c", 6)], ["u1"])
    now = store.snapshot("s3", "v", None, "u1")  # a new session sees both earlier ones
    assert now.orders == ("a", "b", "a", "c")
    assert now.purchased == {"a": T0 + 5, "b": T0 + 2, "c": T0 + 6}
    # the session's own purchases count for the exclusion, not as an earlier purchase
    assert store.snapshot("s2", "v", None, "u1").orders == ("a", "b")
    store.append_events("s4", [buy("s4", "d", 9)], ["u1"])  # a fifth entry: the oldest goes
    assert store.snapshot("s5", "v", None, "u1").orders == ("b", "a", "c", "d")
    assert store.snapshot("s5", "v", None, None).orders == ()  # a guest reads none
    assert store.delete_user("u1").keys.get("user_purchases") == 1
    assert store.snapshot("s5", "v", None, "u1").orders == ()
