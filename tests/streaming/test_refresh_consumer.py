"""The refresh consumer against a real Kafka-protocol broker (tansu) and a real Redis.

Both are started here and stopped after; if either cannot start, the tests fail.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import numpy as np
import orjson
import pandas as pd
import pytest
from kafka import KafkaConsumer, KafkaProducer
from redis import RedisError

from devstack.local_services import free_port, kafka_broker, redis_server
from railtower.schemas import (
    CatalogueUpdate,
    Event,
    ItemRetire,
    ItemUpsert,
    MalformedMessage,
    decode_event,
    encode,
)
from railtower.settings import ShadowSettings
from ranking.ann import DeltaIndex
from ranking.engine import compute
from ranking.rail_inputs import rail_query
from serving.api_models import RailRequest
from serving.impressions import MemoryImpressionSink
from serving.metrics import Metrics
from serving.new_items import NewItems
from serving.rail_service import load_rails
from serving.service import RailService
from serving.shadow import ShadowRunner
from serving.user_vectors import VectorTowerSource, session_vector
from state.session_store import SessionStore
from streaming import consumer as consumer_module
from streaming.consumer import RefreshConsumer, merge_changes
from streaming.topics import ensure_topics

T0 = datetime(2019, 10, 1, 2, 0, tzinfo=UTC)
ITEMS = ["1005115", "1004767", "1005105", "4804056", "1002544", "1004856"]


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    port = free_port()
    server = kafka_broker(port, tmp_path_factory.mktemp("kafka")).start()
    yield f"127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def stack(trained_rees46, broker, tmp_path, request):
    """Settings on fresh topics, a real Redis, and a service serving the trained model."""
    settings, bundle = trained_rees46
    redis_port = free_port()
    redis = redis_server(redis_port, tmp_path).start()
    name = request.node.name[:40].replace("[", "-").replace("]", "")
    streaming = settings.streaming.model_copy(
        update={
            "bootstrap_servers": broker,
            "events_topic": f"ev-{name}",
            "catalogue_topic": f"cat-{name}",
            "dead_letter_topic": f"dlq-{name}",
            "group_id": f"g-{name}",
            "partitions": 3,
            "max_batch": 100,
        }
    )
    settings = settings.model_copy(update={"streaming": streaming})
    ensure_topics(streaming)
    store = SessionStore(f"redis://127.0.0.1:{redis_port}/0", 2.0, 50, 3600, 300)
    service = RailService(settings, None, store, None, Metrics())
    assert service.load(bundle)
    yield settings, service, redis
    redis.stop()


def _event(n: int, session: str, item: str, kind: str = "view") -> Event:
    return Event(
        event_id=f"{session}-{n}",
        event_time=T0 + timedelta(seconds=30 * n),
        event_type=kind,
        session_id=session,
        item_id=item,
        device="mobile",
    )


def _produce(settings, messages, topic=None) -> None:  # type: ignore[no-untyped-def]
    producer = KafkaProducer(bootstrap_servers=settings.streaming.bootstrap_servers, acks="all")
    for key, value in messages:
        producer.send(topic or settings.streaming.events_topic, key=key, value=value)
    producer.flush()
    producer.close()


def _drain(consumer: RefreshConsumer, until, timeout_s: float = 60.0) -> list:  # type: ignore[no-untyped-def]
    reports, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reports.append(consumer.step())
        if until(reports):
            return reports
    raise AssertionError(f"condition not reached in {timeout_s} s: {reports[-3:]}")


def test_an_event_refreshes_the_vector_and_the_rail(stack):
    settings, service, _ = stack
    consumer = RefreshConsumer(settings, service)
    try:
        _produce(settings, [(b"s1", encode(_event(k, "s1", i))) for k, i in enumerate(ITEMS[:3])])
        reports = _drain(consumer, lambda r: sum(x.new_events for x in r) >= 3)
        version = service.loaded.version
        first = service.store.snapshot("s1", version, "homepage_hero")
        assert [e.item_id for e in first.events] == ITEMS[:3]
        assert first.vector is not None and first.rail is not None  # refreshed and pre-warmed
        assert all(0 <= f < 30 for r in reports for f in r.freshness_s)

        _produce(settings, [(b"s1", encode(_event(3, "s1", ITEMS[3])))])
        _drain(consumer, lambda r: sum(x.new_events for x in r) >= 1)
        second = service.store.snapshot("s1", version, "homepage_hero")
        assert second.marker != first.marker and second.rail is not None
        served = service.serve("homepage_hero", RailRequest(session_id="s1"))
        assert served.served_by == "cache"
        assert ITEMS[3] not in [i.item_id for i in served.items]  # just seen: not a discovery
    finally:
        consumer.close()


def test_malformed_messages_go_to_the_dead_letter_topic_with_reasons(stack):
    settings, service, _ = stack
    good = encode(_event(0, "s2", ITEMS[0]))
    bad = [
        b"{not json",
        b'{"schema_version": 2, "event_id": "x"}',
        encode(_event(1, "s2", ITEMS[1])).replace(b'"view"', b'"click"'),
        b'{"schema_version": 1, "event_id": "e9"}',
    ]
    consumer = RefreshConsumer(settings, service)
    try:
        _produce(settings, [(b"s2", m) for m in [bad[0], good, *bad[1:]]])
        reports = _drain(consumer, lambda r: sum(x.records for x in r) >= 5)
    finally:
        consumer.close()
    assert sum(r.dead_letters for r in reports) == 4
    assert sum(r.new_events for r in reports) == 1  # the good one, despite its neighbours
    dlq = KafkaConsumer(
        settings.streaming.dead_letter_topic,
        bootstrap_servers=settings.streaming.bootstrap_servers,
        auto_offset_reset="earliest",
        consumer_timeout_ms=10_000,
    )
    letters = [next(dlq) for _ in range(4)]
    dlq.close()
    reasons = [dict(m.headers)["reason"].decode() for m in letters]
    assert {m.value for m in letters} == set(bad)  # the original bytes, untouched
    assert reasons[0].startswith("not JSON")
    assert any("schema_version 2 is not supported" in r for r in reasons)
    assert any("event_type" in r for r in reasons)
    assert any("Field required" in r for r in reasons)


def test_poison_messages_go_to_the_dead_letter_topic_and_the_group_goes_on(stack, monkeypatch):
    """Decodable but absurd or unappliable messages never stop the consumer: each goes to
    the dead-letter topic with its reason, and the batch around them is applied and committed."""
    settings, service, _ = stack
    year_one = encode(_event(0, "s9", ITEMS[0])).replace(
        b'"2019-10-01T02:00:00Z"', b'"0001-01-01T00:00:00"'
    )
    assert b"0001-01-01" in year_one
    infinite = (
        b'{"schema_version": 1, "update_id": "u-inf", "item_id": "%s", '
        b'"time": "2019-10-01T02:00:00Z", "price": "inf"}' % ITEMS[1].encode()
    )
    real = consumer_module.HistoryEvent

    def unappliable(item_id, event_type, time_s):  # type: ignore[no-untyped-def]
        if item_id == "boom":
            raise OverflowError("date value out of range")
        return real(item_id, event_type, time_s)

    monkeypatch.setattr(consumer_module, "HistoryEvent", unappliable)
    good = [encode(_event(k, "s9", i)) for k, i in enumerate(ITEMS[2:4], start=1)]
    boom = encode(_event(3, "s9", "boom"))
    consumer = RefreshConsumer(settings, service)
    try:
        _produce(settings, [(b"s9", m) for m in [year_one, good[0], boom, good[1]]])
        _produce(settings, [(b"i", infinite)], settings.streaming.catalogue_topic)
        reports = _drain(consumer, lambda r: sum(x.records for x in r) >= 5)
        # committed: a fresh member of the group finds nothing left to read
        again = RefreshConsumer(settings, service)
        try:
            assert sum(again.step().records for _ in range(5)) == 0
        finally:
            again.close()
    finally:
        consumer.close()
    assert sum(r.dead_letters for r in reports) == 3
    assert sum(r.new_events for r in reports) == 2
    dlq = KafkaConsumer(
        settings.streaming.dead_letter_topic,
        bootstrap_servers=settings.streaming.bootstrap_servers,
        auto_offset_reset="earliest",
        consumer_timeout_ms=10_000,
    )
    reasons = sorted(dict(next(dlq).headers)["reason"].decode() for _ in range(3))
    dlq.close()
    assert any("not a plausible time" in r for r in reasons)
    assert any("price" in r and "finite" in r for r in reasons)
    assert any(r.startswith("cannot be applied: OverflowError") for r in reasons)


def test_a_consumer_killed_before_commit_applies_each_event_once(stack):
    """Crash after the Redis writes, before the commit: the next member re-reads the batch,
    and idempotent appends make the replay change nothing."""
    settings, service, _ = stack
    sessions = [f"k{n}" for n in range(20)]
    messages = [
        (s.encode(), encode(_event(k, s, ITEMS[(k + n) % len(ITEMS)])))
        for n, s in enumerate(sessions)
        for k in range(5)
    ]
    _produce(settings, messages)
    crashing = RefreshConsumer(settings, service)

    def crash() -> None:
        raise RuntimeError("killed before commit")

    crashing.consumer.commit = crash  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="killed"):
        _drain(crashing, lambda r: False, timeout_s=30)
    crashing.consumer.close(autocommit=False)
    crashing.dead_letters.close()

    survivor = RefreshConsumer(settings, service)
    try:
        reports = _drain(survivor, lambda r: sum(x.records for x in r) >= 100 - 0, timeout_s=60)
    finally:
        survivor.close()
    version = service.loaded.version
    applied = sum(len(service.store.snapshot(s, version, None).events) for s in sessions)
    assert applied == 100  # nothing lost, nothing twice
    assert sum(r.duplicates for r in reports) > 0  # the crashed batch really came back
    for s in sessions:
        events = service.store.snapshot(s, version, None).events
        assert [e.time_s for e in events] == sorted(e.time_s for e in events)  # in order


def test_a_consumer_killed_between_append_and_prewarm_leaves_no_rail_cold(stack):
    """Crash after the Redis append, before the pre-warm: the redelivered batch adds no event,
    and its sessions are warmed all the same."""
    settings, service, _ = stack
    sessions = [f"w{n}" for n in range(6)]
    _produce(
        settings,
        [
            (s.encode(), encode(_event(k, s, ITEMS[(k + n) % len(ITEMS)])))
            for n, s in enumerate(sessions)
            for k in range(3)
        ],
    )
    crashing = RefreshConsumer(settings, service)
    warm = service.prewarm

    def crash(sessions, *_args, **_kwargs) -> None:  # type: ignore[no-untyped-def]
        if sessions:  # an idle poll pre-warms nothing
            raise RuntimeError("killed before the pre-warm")

    service.prewarm = crash  # type: ignore[method-assign]
    try:
        with pytest.raises(RuntimeError, match="pre-warm"):
            _drain(crashing, lambda r: False, timeout_s=30)
    finally:
        service.prewarm = warm  # type: ignore[method-assign]
        crashing.consumer.close(autocommit=False)
        crashing.dead_letters.close()
    version = service.loaded.version
    appended = [s for s in sessions if service.store.snapshot(s, version, None).events]
    assert appended  # the crash came after the append

    survivor = RefreshConsumer(settings, service)
    try:
        reports = _drain(survivor, lambda r: sum(x.records for x in r) >= 18, timeout_s=60)
    finally:
        survivor.close()
    assert sum(r.duplicates for r in reports) >= 3  # the crashed batch came back
    for s in sessions:
        assert service.store.snapshot(s, version, "homepage_hero").rail is not None, s


def test_out_of_stock_leaves_cached_rails_at_once(stack):
    settings, service, _ = stack
    consumer = RefreshConsumer(settings, service)
    try:
        _produce(settings, [(b"s3", encode(_event(k, "s3", i))) for k, i in enumerate(ITEMS[:2])])
        _drain(consumer, lambda r: sum(x.new_events for x in r) >= 2)
        cached = service.serve("homepage_hero", RailRequest(session_id="s3"))
        assert cached.served_by == "cache"
        victim = cached.items[0].item_id
        update = CatalogueUpdate(update_id="u1", item_id=victim, time=T0, stock=0)
        _produce(settings, [(victim.encode(), encode(update))], settings.streaming.catalogue_topic)
        _drain(consumer, lambda r: sum(x.catalogue_updates for x in r) >= 1)
    finally:
        consumer.close()
    after = service.serve("homepage_hero", RailRequest(session_id="s3"))
    assert victim not in [i.item_id for i in after.items]
    assert len(after.items) == 12
    # another API process learns it from Redis
    other = RailService(settings, service.loaded, service.store, None, Metrics())
    other.loaded.pipeline.attributes.update(victim, stock=5)
    assert other.sync_catalogue() >= 1
    assert other.loaded.pipeline.attributes[victim].out_of_stock
    # a hot swap loads the bundle afresh: the stock it learnt holds before any sync
    swapped = RailService(settings, None, service.store, None, Metrics())
    assert swapped.load(service.source)
    assert swapped.loaded.pipeline.attributes[victim].out_of_stock
    answer = swapped.serve("homepage_hero", RailRequest(session_id="s3-after-swap"))
    assert victim not in [i.item_id for i in answer.items]


def test_redis_restarted_the_consumer_recovers_without_loss(stack, tmp_path):
    settings, service, redis = stack
    consumer = RefreshConsumer(settings, service)
    try:
        redis.stop()
        _produce(settings, [(b"s4", encode(_event(k, "s4", i))) for k, i in enumerate(ITEMS[:4])])
        deadline = time.monotonic() + 60
        failed = None
        while failed is None and time.monotonic() < deadline:
            try:
                consumer.step()  # the first polls of a new group may return nothing yet
            except RedisError as exc:
                failed = exc
        assert failed is not None, "the batch should fail while Redis is down"
        redis.start()
        consumer.rejoin()
        _drain(consumer, lambda r: sum(x.new_events for x in r) >= 4)
    finally:
        consumer.close()
    events = service.store.snapshot("s4", service.loaded.version, None).events
    assert [e.item_id for e in events] == ITEMS[:4]


def test_a_price_change_reaches_the_rankers_features(stack):
    settings, service, _ = stack
    consumer = RefreshConsumer(settings, service)
    item = ITEMS[0]
    try:
        update = CatalogueUpdate(update_id="p1", item_id=item, time=T0, price=1.5)
        _produce(settings, [(item.encode(), encode(update))], settings.streaming.catalogue_topic)
        _drain(consumer, lambda r: sum(x.catalogue_updates for x in r) >= 1)
    finally:
        consumer.close()
    stats = service.loaded.pipeline.stats
    assert stats.price[stats.row[item]] == 1.5
    assert service.loaded.pipeline.attributes[item].price == 1.5


def test_broker_restarted_the_consumer_recovers(trained_rees46, tmp_path):
    """A memory-only broker loses its topics on restart: they are recreated and the same
    consumer, after rejoining, applies what is produced next."""
    settings, bundle = trained_rees46
    port, redis_port = free_port(), free_port()
    broker = kafka_broker(port, tmp_path / "k").start()
    redis = redis_server(redis_port, tmp_path / "r").start()
    streaming = settings.streaming.model_copy(
        update={"bootstrap_servers": f"127.0.0.1:{port}", "group_id": "restart", "partitions": 2}
    )
    settings = settings.model_copy(update={"streaming": streaming})
    store = SessionStore(f"redis://127.0.0.1:{redis_port}/0", 2.0, 50, 3600, 300)
    service = RailService(settings, None, store, None, Metrics())
    assert service.load(bundle)
    try:
        ensure_topics(streaming)
        consumer = RefreshConsumer(settings, service)
        _produce(settings, [(b"s5", encode(_event(0, "s5", ITEMS[0])))])
        _drain(consumer, lambda r: sum(x.new_events for x in r) >= 1)
        broker.stop()
        broker = kafka_broker(port, tmp_path / "k2").start()
        ensure_topics(streaming)
        consumer.rejoin()
        _produce(settings, [(b"s5", encode(_event(1, "s5", ITEMS[1])))])
        _drain(consumer, lambda r: sum(x.new_events for x in r) >= 1)
        consumer.close()
        events = store.snapshot("s5", service.loaded.version, None).events
    finally:
        broker.stop()
        redis.stop()
    assert [e.item_id for e in events] == ITEMS[:2]


def test_decoding_rejects_absurd_times_and_non_finite_prices():
    event = _event(0, "s", ITEMS[0])
    naive = encode(event).replace(b"02:00:00Z", b"02:00:00")
    assert decode_event(naive).event_time == T0  # a naive time is UTC
    for raw, why in [
        (encode(event).replace(b"2019-10-01", b"0001-01-01"), "not a plausible time"),
        (encode(event).replace(b"2019-10-01", b"2999-10-01"), "not a plausible time"),
        (encode(event.model_copy(update={"price": 1.0})).replace(b"1.0", b'"nan"'), "finite"),
    ]:
        with pytest.raises(MalformedMessage, match=why):
            decode_event(raw)


def test_wire_round_trip_keeps_every_field():
    event = _event(7, "s", "i", "purchase")
    assert decode_event(encode(event)) == event


def test_a_long_broker_outage_never_ends_the_consumer(monkeypatch):
    """Rejoining fails for as long as the broker is away; the consumer keeps retrying with a
    capped backoff and resumes, instead of raising out of `run` and exiting."""
    from kafka.errors import BrokerNotAvailableError, KafkaError

    from streaming import consumer as module

    member = RefreshConsumer.__new__(RefreshConsumer)
    member.member_id = "outage-test"
    stop = threading.Event()
    calls = {"step": 0, "rejoin": 0}
    sleeps: list[float] = []

    def step():  # type: ignore[no-untyped-def]
        calls["step"] += 1
        if calls["step"] == 1:
            raise KafkaError("broker connection lost")
        stop.set()  # the consumer is back at work: end the test
        return module.BatchReport()

    def rejoin() -> None:
        calls["rejoin"] += 1
        if calls["rejoin"] <= 6:
            raise BrokerNotAvailableError()

    monkeypatch.setattr(member, "step", step, raising=False)
    monkeypatch.setattr(member, "rejoin", rejoin, raising=False)
    monkeypatch.setattr(module.time, "sleep", sleeps.append)
    member.run(stop=stop)
    assert calls == {"step": 2, "rejoin": 7}
    assert sleeps == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]  # capped, never given up


# ------------------------------------------------------------------ items listed and retired


def _with(message, **fields) -> bytes:  # type: ignore[no-untyped-def]
    data = orjson.loads(encode(message))
    data.update(fields)
    return orjson.dumps(data)


def _letters(settings, count: int) -> list:  # type: ignore[no-untyped-def]
    dlq = KafkaConsumer(
        settings.streaming.dead_letter_topic,
        bootstrap_servers=settings.streaming.bootstrap_servers,
        auto_offset_reset="earliest",
        consumer_timeout_ms=10_000,
    )
    letters = [next(dlq) for _ in range(count)]
    dlq.close()
    return letters


def test_catalogue_messages_of_every_kind_apply_and_bad_ones_reach_the_dead_letter_topic(stack):
    settings, service, _ = stack
    known, leaving = ITEMS[1], ITEMS[2]
    upsert = ItemUpsert(
        update_id="up1",
        item_id=known,
        time=T0,
        category_path="electronics > smartphone",
        brand="samsung",
        price=2.5,
        stock=7,
        margin=0.25,
    )
    retire = ItemRetire(update_id="rt1", item_id=leaving, time=T0)
    bad = [
        _with(upsert, kind="item_delete"),
        _with(upsert, title=None, category_path=None, brand=None),
        _with(retire, stock=0),
        _with(upsert, image_path="photos/a.jpg"),
    ]
    consumer = RefreshConsumer(settings, service)
    try:
        messages = [encode(upsert), bad[0], bad[1], encode(retire), bad[2], bad[3]]
        _produce(settings, [(b"k", m) for m in messages], settings.streaming.catalogue_topic)
        reports = _drain(consumer, lambda r: sum(x.records for x in r) >= 6)
    finally:
        consumer.close()
    assert sum(r.dead_letters for r in reports) == 4
    assert sum(r.catalogue_updates for r in reports) == 2
    assert sum(r.upserts for r in reports) == 1 and sum(r.retirements for r in reports) == 1
    letters = _letters(settings, 4)
    assert {m.value for m in letters} == set(bad)  # the original bytes, untouched
    reasons = " | ".join(dict(m.headers)["reason"].decode() for m in letters)
    assert "unknown catalogue message kind 'item_delete'" in reasons
    assert "an item upsert needs content" in reasons
    assert "stock: Extra inputs are not permitted" in reasons
    assert "image_path must be an absolute path" in reasons
    info = service.loaded.pipeline.attributes[known]
    assert (info.price, info.stock, info.margin, info.retired) == (2.5, 7, 0.25, False)
    assert service.loaded.pipeline.attributes[leaving].retired
    _, records = service.store.catalogue_changes(-1)
    assert records[leaving]["retired"] is True
    assert records[known]["retired"] is False and records[known]["margin"] == 0.25


def test_a_retired_item_leaves_cached_and_computed_rails_in_every_process(stack):
    settings, service, _ = stack
    # a second API process, loaded before the retirement: it learns it by polling Redis
    other = RailService(settings, None, service.store, None, Metrics())
    assert other.load(service.source)
    consumer = RefreshConsumer(settings, service)
    topic = settings.streaming.catalogue_topic
    try:
        _produce(settings, [(b"s6", encode(_event(k, "s6", i))) for k, i in enumerate(ITEMS[:2])])
        _drain(consumer, lambda r: sum(x.new_events for x in r) >= 2)
        cached = service.serve("homepage_hero", RailRequest(session_id="s6"))
        assert cached.served_by == "cache"
        victim = cached.items[0].item_id
        fresh = other.serve("homepage_hero", RailRequest(session_id="s6-other"))
        retire = ItemRetire(update_id="r1", item_id=victim, time=T0)
        _produce(settings, [(victim.encode(), encode(retire))], topic)
        reports = _drain(consumer, lambda r: sum(x.retirements for x in r) >= 1)
        assert sum(r.retirements for r in reports) == 1
        # a later stock (and price) change must not bring it back
        restock = CatalogueUpdate(update_id="r2", item_id=victim, time=T0, stock=40, price=9.0)
        _produce(settings, [(victim.encode(), encode(restock))], topic)
        _drain(consumer, lambda r: sum(x.catalogue_updates for x in r) >= 1)
    finally:
        consumer.close()
    after = service.serve("homepage_hero", RailRequest(session_id="s6"))
    assert victim not in [i.item_id for i in after.items] and len(after.items) == 12
    info = service.loaded.pipeline.attributes[victim]
    assert info.retired and info.stock == 40
    assert other.sync_catalogue() >= 1
    assert other.loaded.pipeline.attributes[victim].retired
    for process, session in ((other, "s6-other"), (other, "s6"), (service, "s6-new")):
        answer = process.serve("homepage_hero", RailRequest(session_id=session))
        assert victim not in [i.item_id for i in answer.items], session
    assert fresh.items  # the other process served before the retirement too
    # a hot swap (a fresh load) replays the record: still retired before any sync
    swapped = RailService(settings, None, service.store, None, Metrics())
    assert swapped.load(service.source)
    assert swapped.loaded.pipeline.attributes[victim].retired
    answer = swapped.serve("homepage_hero", RailRequest(session_id="s6"))
    assert victim not in [i.item_id for i in answer.items]
    # an upsert lists it again, everywhere
    relist = ItemUpsert(update_id="r3", item_id=victim, time=T0, brand="samsung", stock=3)
    consumer = RefreshConsumer(settings, service)
    try:
        _produce(settings, [(victim.encode(), encode(relist))], topic)
        _drain(consumer, lambda r: sum(x.upserts for x in r) >= 1)
    finally:
        consumer.close()
    assert not service.loaded.pipeline.attributes[victim].retired
    assert other.sync_catalogue() >= 1
    assert not other.loaded.pipeline.attributes[victim].retired
    assert other.loaded.pipeline.attributes[victim].stock == 3


def _cold_content(service, item: str) -> dict[str, object] | None:  # type: ignore[no-untyped-def]
    """The content of a catalogue item the featurizer has no id embedding for (encoded from
    content alone, as a new item is) with a category and a brand; None for any other."""
    towers, items = service.loaded.towers, service.loaded.rails.items
    if item in towers.featurizer.warm_items or item not in towers.item_row:
        return None
    row = items[items["item_id"].astype(str) == item].iloc[0].to_dict()
    if not (isinstance(row.get("category_path"), str) and isinstance(row.get("brand"), str)):
        return None
    content: dict[str, object] = {
        c: row.get(c) if isinstance(row.get(c), str) else None
        for c in ("title", "category_path", "brand")
    }
    price = row.get("price")
    content["price"] = float(price) if price is not None and pd.notna(price) else None
    return content


def _retrieved_cold_item(service):  # type: ignore[no-untyped-def]
    """(query, position, item, content): a cold catalogue item the towers' homepage_hero
    retrieval returns for a one-view session, well inside its 300 candidates."""
    retriever = service.loaded.pipeline.sources["two_tower"]
    queries = [rail_query(None, (), (i,), ("view",)) for i in ITEMS]
    for query, row in zip(queries, retriever.candidates(queries, 300), strict=True):
        for position, candidate in enumerate(row[:250]):
            content = _cold_content(service, candidate.item_id)
            if content is not None:
                return query, position, candidate.item_id, content
    raise AssertionError("no cold item with a category and brand among the tower candidates")


def test_a_new_item_is_encoded_as_export_would_and_retrieved_in_every_process(stack):
    settings, service, _ = stack
    query, position, source, content = _retrieved_cold_item(service)
    towers = service.loaded.towers
    expected = towers.item_vectors[towers.item_row[source]]
    other = RailService(settings, None, service.store, None, Metrics())
    assert other.load(service.source)  # loaded before the listing: learns it by polling
    new_id = "new-item-1"
    upsert = ItemUpsert(update_id="n1", item_id=new_id, time=T0, stock=3, **content)
    consumer = RefreshConsumer(settings, service)
    try:
        _produce(settings, [(new_id.encode(), encode(upsert))], settings.streaming.catalogue_topic)
        _drain(consumer, lambda r: sum(x.upserts for x in r) >= 1)
    finally:
        consumer.close()

    def check(process) -> np.ndarray:  # type: ignore[no-untyped-def]
        index = process.loaded.towers.index
        assert isinstance(index, DeltaIndex)
        vector = index.vector(new_id)
        # parity: what a bundle export stores for an item of the same content
        np.testing.assert_allclose(vector, expected, atol=1e-4)
        # the towers' retrieval returns it for a session vector equal to its own (its
        # content twin, the source item, excluded: the two vectors are the same)
        ids, scores = index.search(vector[None, :], 20, [{source}])
        assert ids[0][0] == new_id and abs(float(scores[0][0]) - 1.0) < 1e-3
        assert new_id not in index.search(vector[None, :], 20, [{new_id}])[0][0]
        assert process.loaded.pipeline.attributes[new_id].stock == 3
        return vector

    check(service)
    # homepage_hero's tower source returns it beside its content twin, and the whole
    # pipeline (ranker, MMR, rules) takes a candidate it has no statistics for
    pipeline = service.loaded.pipeline
    found = [c.item_id for c in pipeline.sources["two_tower"].candidates([query], 300)[0]]
    assert abs(found.index(source) - position) <= 1 and abs(found.index(new_id) - position) <= 3
    run = compute(pipeline, "homepage_hero", [query])
    assert run.ruled is not None and len(run.ruled) == 1
    # the re-ranker has no history to score it by: it stands where the towers ranked it
    # (ranking.new_item_placement), the known items in the re-ranker's order around it
    assert run.ranked is not None
    ranked = [c.item_id for c in run.ranked[0]]
    tower_rank = found.index(new_id) + 1
    assert tower_rank <= pipeline.settings.per_source and ranked.index(new_id) == tower_rank - 1
    answer = service.serve("homepage_hero", RailRequest(session_id="s7"))
    assert len(answer.items) == 12
    # the new product's own page and a cart holding it get rails (no 404): the session
    # tower cannot read the item, so the page asks for its item-tower neighbours, and its
    # content twin is the nearest (the same vector)
    page_vector = session_vector(towers, [], None, None, None, anchor=new_id)
    assert page_vector.source == "new_item"
    np.testing.assert_array_equal(page_vector.vector, towers.index.vector(new_id))
    page_query = rail_query(anchor=new_id)
    nearest = VectorTowerSource(towers, page_vector.vector).candidates([page_query], 5)[0]
    assert nearest[0].item_id == source
    page = service.serve("pdp_fbt", RailRequest(session_id="s8", item_id=new_id))
    assert len(page.items) == 12 and new_id not in {i.item_id for i in page.items}
    cart = service.serve("cart_upsell", RailRequest(session_id="s9", cart=[new_id]))
    assert len(cart.items) == 12 and new_id not in {i.item_id for i in cart.items}
    assert other.sync_catalogue() >= 1
    check(other)
    # re-applying the whole hash on the next version encodes nothing again
    index_before = other.loaded.towers.index
    encoded_before = dict(other.loaded.new_items.encoded)
    service.store.put_catalogue_update(ITEMS[0], 3.0, None)
    assert other.sync_catalogue() >= 2
    assert other.loaded.towers.index is index_before
    assert other.loaded.new_items.encoded == encoded_before
    # a hot swap loads the bundle afresh and replays the listing before serving
    swapped = RailService(settings, None, service.store, None, Metrics())
    assert swapped.load(service.source)
    check(swapped)
    # a shadow challenger, loaded after production (as the API builds it), starts from the
    # same records: the new item included
    challenger = load_rails(service.source, settings)
    runner = ShadowRunner(
        ShadowSettings(), MemoryImpressionSink(service.metrics), service.metrics, challenger
    )
    service.watch_catalogue(runner)
    try:
        assert isinstance(challenger.towers.index, DeltaIndex)
        np.testing.assert_allclose(challenger.towers.index.vector(new_id), expected, atol=1e-4)
        # retired, it leaves every model's rules' eligibility at once
        service.apply_catalogue_record(new_id, {"retired": True})
        assert service.loaded.pipeline.attributes[new_id].retired
        assert challenger.pipeline.attributes[new_id].retired
    finally:
        service.observer = None


def test_a_batch_of_listings_is_encoded_together_and_merged_as_redis_merges_it(stack, monkeypatch):
    settings, service, _ = stack
    _, _, source, content = _retrieved_cold_item(service)
    calls: list[int] = []
    encode_rows = NewItems.encode

    def counted(self, rows):  # type: ignore[no-untyped-def]
        calls.append(len(rows))
        return encode_rows(self, rows)

    monkeypatch.setattr(NewItems, "encode", counted)
    listings = [
        ItemUpsert(update_id=f"b{k}", item_id=f"bulk-{k}", time=T0, stock=k + 1, **content)
        for k in range(12)
    ]
    later = [
        CatalogueUpdate(update_id="b-price", item_id="bulk-3", time=T0, price=99.0),
        ItemRetire(update_id="b-retire", item_id="bulk-5", time=T0),
    ]
    consumer = RefreshConsumer(settings, service)
    try:
        messages = [(b"catalogue", encode(m)) for m in listings + later]  # one partition
        _produce(settings, messages, settings.streaming.catalogue_topic)
        reports = _drain(consumer, lambda r: sum(x.catalogue_updates for x in r) >= 14)
    finally:
        consumer.close()
    batches = sum(1 for r in reports if r.upserts)
    # one encoding per batch that carried listings, never one per listing
    assert len(calls) == batches and sum(calls) == 12
    attributes = service.loaded.pipeline.attributes
    assert attributes["bulk-3"].price == 99.0 and attributes["bulk-4"].stock == 5
    assert attributes["bulk-5"].retired and not attributes["bulk-6"].retired
    index = service.loaded.towers.index
    assert isinstance(index, DeltaIndex)
    twin = service.loaded.towers.item_vectors[service.loaded.towers.item_row[source]]
    # encoded from the listing's own content (bulk-3 before its price change, as encoded)
    assert all(np.allclose(index.vector(f"bulk-{k}"), twin, atol=1e-4) for k in (0, 4, 11))
    _, records = service.store.catalogue_changes(-1)
    assert records["bulk-3"]["price"] == 99.0 and records["bulk-3"]["title"] == content.get("title")
    assert records["bulk-5"]["retired"] is True and records["bulk-5"]["brand"] == content["brand"]


def test_merged_changes_keep_earlier_fields_a_later_change_leaves_null():
    changes = [
        ("a", {"price": 1.0, "stock": 5, "title": "phone", "retired": False}),
        ("b", {"price": 2.0, "stock": None}),
        ("a", {"price": None, "stock": 0}),
        ("a", {"retired": True}),
    ]
    assert merge_changes(changes) == {
        "a": {"price": 1.0, "stock": 0, "title": "phone", "retired": True},
        "b": {"price": 2.0, "stock": None},
    }


def test_a_catalogue_record_that_cannot_be_applied_is_a_dead_letter_and_the_rest_apply(
    stack, monkeypatch
):
    settings, service, _ = stack
    apply = service.apply_catalogue_records

    def refuse_one(records):  # type: ignore[no-untyped-def]
        if ITEMS[4] in records:
            raise ValueError("no such shelf")
        return apply(records)

    monkeypatch.setattr(service, "apply_catalogue_records", refuse_one)
    updates = [
        CatalogueUpdate(update_id=f"u{k}", item_id=item, time=T0, stock=k + 1)
        for k, item in enumerate(ITEMS[3:6])
    ]
    consumer = RefreshConsumer(settings, service)
    try:
        messages = [(b"catalogue", encode(u)) for u in updates]
        _produce(settings, messages, settings.streaming.catalogue_topic)
        reports = _drain(consumer, lambda r: sum(x.records for x in r) >= 3)
        # committed: the group does not read the batch again
        assert not any(r.records for r in _drain(consumer, lambda r: len(r) >= 3, 30))
    finally:
        consumer.close()
    assert sum(r.dead_letters for r in reports) == 1
    (letter,) = _letters(settings, 1)
    assert letter.value == encode(updates[1])
    assert dict(letter.headers)["reason"].decode() == "cannot be applied: ValueError: no such shelf"
    attributes = service.loaded.pipeline.attributes
    assert attributes[ITEMS[3]].stock == 1 and attributes[ITEMS[5]].stock == 3
