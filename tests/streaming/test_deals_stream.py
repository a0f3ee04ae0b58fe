"""A price drop on the catalogue topic reaches deals_for_you over the API, through a real
Kafka-protocol broker (tansu), a real Redis and the refresh consumer.

Both servers are started here and stopped after; if either cannot start, the test fails.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import numpy as np
import pytest
from fastapi.testclient import TestClient
from kafka import KafkaProducer

from devstack.local_services import free_port, kafka_broker, redis_server
from railtower.schemas import CatalogueUpdate, Event, encode
from ranking.price_history import column
from ranking.retriever import Query
from serving.api_models import RailRequest
from serving.app import create_app
from serving.metrics import Metrics
from serving.price_follower import PriceFollower
from serving.service import RailService
from state.price_store import PricePoint, PriceStore
from state.session_store import SessionStore
from streaming.consumer import RefreshConsumer
from streaming.topics import ensure_topics

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    port = free_port()
    server = kafka_broker(port, tmp_path_factory.mktemp("kafka")).start()
    yield f"127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def stack(trained_rees46, broker, tmp_path):
    """Fresh topics, a real Redis, the consumer's service and a separate API process's."""
    settings, bundle = trained_rees46
    redis_port = free_port()
    redis = redis_server(redis_port, tmp_path).start()
    streaming = settings.streaming.model_copy(
        update={
            "bootstrap_servers": broker,
            "events_topic": "ev-deals",
            "catalogue_topic": "cat-deals",
            "dead_letter_topic": "dlq-deals",
            "group_id": "g-deals",
            "partitions": 2,
            "max_batch": 100,
        }
    )
    url = f"redis://127.0.0.1:{redis_port}/0"
    serving = settings.serving.model_copy(update={"bundle": bundle, "redis_url": url})
    settings = settings.model_copy(update={"streaming": streaming, "serving": serving})
    ensure_topics(streaming)

    def service() -> RailService:
        one = RailService(settings, None, SessionStore(url, 2.0, 50, 3600, 300), None, Metrics())
        assert one.load(bundle)
        return one

    yield settings, service(), service()
    redis.stop()


def _produce(settings, topic: str, messages) -> None:  # type: ignore[no-untyped-def]
    producer = KafkaProducer(bootstrap_servers=settings.streaming.bootstrap_servers, acks="all")
    for key, value in messages:
        producer.send(topic, key=key, value=value)
    producer.flush()
    producer.close()


def _drain(consumer: RefreshConsumer, until, timeout_s: float = 60.0) -> list:  # type: ignore[no-untyped-def]
    reports, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reports.append(consumer.step())
        if until(reports):
            return reports
    raise AssertionError(f"condition not reached in {timeout_s} s: {reports[-3:]}")


def _deals(client: TestClient, session: str) -> list[str]:
    reply = client.post("/v1/rails/deals_for_you", json={"session_id": session, "slots": 12})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["served_by"] == "computed" and len(body["items"]) == 12
    return [i["item_id"] for i in body["items"]]


def test_a_published_price_drop_appears_in_deals_for_you_over_the_api(stack):
    settings, consumer_service, api_service = stack
    stats = consumer_service.loaded.pipeline.stats
    after = datetime.fromtimestamp(stats.end_time + 60, UTC)

    with TestClient(create_app(settings, api_service)) as client:
        # REES46's 3 hours hold no deals: the rail is popular filler
        before = _deals(client, "deal-shopper")
        pipeline = api_service.loaded.pipeline
        assert pipeline.run("deals_for_you", [Query()], stages=("candidates",))["candidates"] == [
            []
        ]
        # an item the training window priced often (its own level is well known) that the
        # filler does not already show
        counts = np.bincount(stats.prices.rows, minlength=len(stats.item_ids))
        counts[[stats.row[i] for i in before]] = 0
        row = int(np.argmax(counts))
        assert counts[row] >= stats.price_settings.min_points
        item = str(stats.item_ids[row])
        level = float(stats.prices.prices[stats.prices.rows == row][-1])  # its last price
        consumer = RefreshConsumer(settings, consumer_service)
        try:
            drop = CatalogueUpdate(update_id="drop-1", item_id=item, time=after, price=level * 0.6)
            _produce(settings, settings.streaming.catalogue_topic, [(item.encode(), encode(drop))])
            # a shopper's view with a price is an observation too, idempotent by event id
            view = Event(
                event_id="v1",
                event_time=after,
                event_type="view",
                session_id="viewer",
                item_id=item,
                price=level * 0.6,
            )
            _produce(settings, settings.streaming.events_topic, [(b"viewer", encode(view))] * 2)
            reports = _drain(
                consumer,
                lambda r: (
                    sum(x.catalogue_updates for x in r) >= 1 and sum(x.records for x in r) >= 3
                ),
            )
        finally:
            consumer.close()
        assert sum(r.price_points for r in reports) == 2  # the redelivered view added nothing

        # the consumer's own process sees the deal at once
        served = consumer_service.serve("deals_for_you", RailRequest(session_id="deal-shopper"))
        assert served.items[0].item_id == item

        # the API process learns it from Redis (its catalogue watch runs every second)
        deadline, shown = time.monotonic() + 30, []
        while time.monotonic() < deadline:
            shown = _deals(client, "deal-shopper")
            if item in shown:
                break
            time.sleep(0.25)
        assert item in shown, shown
        assert shown[0] == item  # the only deal in the shop, 40% off its own level
    history = api_service.loaded.pipeline.stats.prices
    now = np.array([stats.end_time + 120])
    features = api_service.loaded.pipeline.stats.price_matrix(
        np.array([stats.row[item]]), history.request_clock(now), ranker=False
    )
    assert column(features, "price_discount_long")[0] > 0.3
    assert column(features, "price_deal_spike")[0] == 1.0


def test_the_price_stream_is_idempotent_capped_and_followed_once(trained_rees46, tmp_path):
    settings, bundle = trained_rees46
    port = free_port()
    redis = redis_server(port, tmp_path).start()
    try:
        store = SessionStore(f"redis://127.0.0.1:{port}/0", 2.0, 50, 3600, 300)
        prices = PriceStore(store.client, max_points=1000, seen_ttl_s=60)
        service = RailService(settings, None, store, None, Metrics())
        assert service.load(bundle)
        stats = service.loaded.pipeline.stats
        item = str(stats.item_ids[0])
        before = len(stats.prices)
        points = [PricePoint(f"p{k}", item, stats.end_time + k, 10.0 + k) for k in range(3)]
        assert prices.append(points) == 3
        assert prices.append(points[1:]) == 0  # redelivered: nothing twice
        cursor, entries = prices.read("0")
        assert [p for _, _, p in entries] == [10.0, 11.0, 12.0]
        assert prices.read(cursor) == (cursor, [])  # the cursor is exclusive
        follower = PriceFollower(prices)
        assert follower.sync(service.loaded) == 3
        assert follower.sync(service.loaded) == 0  # followed once
        assert len(service.loaded.pipeline.stats.prices) == before + 3
        assert service.loaded.pipeline.stats.prices.clock_s == stats.end_time + 2
        # an unknown item is kept in the stream and skipped by the model
        assert prices.append([PricePoint("p9", "not-an-item", stats.end_time, 1.0)]) == 1
        assert follower.sync(service.loaded) == 1
        assert len(service.loaded.pipeline.stats.prices) == before + 3
    finally:
        redis.stop()


def test_a_price_store_with_no_room_says_which_setting():
    with pytest.raises(ValueError, match="serving.price_points_max"):
        PriceStore(None, max_points=0, seen_ttl_s=60)  # type: ignore[arg-type]
