"""Shadow traffic and impression logging.

Unit tests run the trained REES46 model in-process (no Redis, no Triton) with the memory
sink; the integration test starts a real Kafka-protocol broker (tansu) and a real Redis and
reads the impressions back from the topic. A server that cannot start fails the test.
"""

from __future__ import annotations

import gc
import threading
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime

import orjson
import pytest
import redis
from fastapi.testclient import TestClient
from kafka import KafkaAdminClient, KafkaConsumer
from pydantic import SecretStr

from devstack.local_services import free_port, kafka_broker, redis_server
from railtower.schemas import Impression, decode_impression
from railtower.settings import ShadowSettings
from ranking.rule_set import load_rule_set
from serving.api_models import RailRequest
from serving.app import create_app
from serving.impressions import ImpressionCounts, MemoryImpressionSink, items_without_impressions
from serving.metrics import Metrics
from serving.rail_service import load_rails
from serving.service import RailService
from serving.shadow import ShadowRunner, in_shadow
from streaming.topics import ensure_topics

PAGE = "1005115"  # a REES46 phone with co-cart neighbours
KEY = "shadow-test-admin-key-0123456789"
ADMIN = {"X-API-Key": KEY}


@pytest.fixture(scope="module")
def service(trained_rees46):
    settings, bundle = trained_rees46
    service = RailService(settings, None, None, None, Metrics())
    assert service.load(bundle)
    return service


@pytest.fixture
def shadowed(service):
    """Attach runners to the shared service and take them off again after the test."""
    runners: list[ShadowRunner] = []

    def attach(runner: ShadowRunner, start: bool = True) -> ShadowRunner:
        runners.append(runner.start() if start else runner)
        service.observer = runner
        return runner

    yield attach
    service.observer = None
    for runner in runners:
        runner.close()


def _block_first(item_id: str, rail: str = "pdp_fbt"):  # type: ignore[no-untyped-def]
    text = orjson.dumps(
        {
            "name": "no-first",
            "version": "1",
            "rails": [rail],
            "rules": [{"kind": "block", "item_id": item_id}],
        }
    ).decode()
    return load_rule_set(text)


def _by_request(impressions: list[Impression]) -> dict[str, dict[str, Impression]]:
    grouped: dict[str, dict[str, Impression]] = defaultdict(dict)
    for impression in impressions:
        grouped[impression.request_id][impression.arm] = impression
    return grouped


def test_every_served_request_logs_its_impression(service, shadowed):
    sink = MemoryImpressionSink(Metrics())
    shadowed(ShadowRunner(ShadowSettings(share=0.0), sink, service.metrics))
    answers = [
        service.serve("homepage_hero", RailRequest(session_id="u1", slots=6)),
        service.serve("pdp_fbt", RailRequest(session_id="u2", item_id=PAGE)),
        service.serve("cart_upsell", RailRequest(session_id="u3", cart=[PAGE], user_id="c9")),
    ]
    assert sink.flush()
    logged = sink.impressions()
    assert [i.rail for i in logged] == ["homepage_hero", "pdp_fbt", "cart_upsell"]
    assert all(i.arm == "production" and i.shown for i in logged)
    assert len({i.request_id for i in logged}) == 3
    for answer, impression in zip(answers, logged, strict=True):
        assert impression.items == [s.item_id for s in answer.items]
        assert impression.session_id == answer.session_id
        assert impression.model_version == answer.model_version == "api-rees46-rails"
    assert logged[2].user_id == "c9" and len(logged[0].items) == 6


def test_shadow_sample_is_stable_per_session_and_near_the_share():
    sessions = [f"session-{n}" for n in range(20_000)]
    picked = [s for s in sessions if in_shadow(s, 0.3)]
    assert 0.28 < len(picked) / len(sessions) < 0.32
    assert all(in_shadow(s, 0.3) for s in picked)  # the same sessions on every call
    # a larger share keeps every session a smaller one had (ramping up never reshuffles)
    assert set(picked) <= {s for s in sessions if in_shadow(s, 0.5)}
    assert not any(in_shadow(s, 0.0) for s in sessions[:500])
    assert all(in_shadow(s, 1.0) for s in sessions[:500])


def test_full_queue_drops_the_shadow_job_and_the_rail_is_still_served(service, shadowed):
    sink = MemoryImpressionSink(Metrics())
    settings = ShadowSettings(share=1.0, queue_size=1)
    served = service.serve("pdp_fbt", RailRequest(session_id="q0", item_id=PAGE))
    rules = _block_first(served.items[0].item_id)
    # workers not started: a stalled shadow worker, so the one-job queue stays full
    runner = shadowed(ShadowRunner(settings, sink, service.metrics, rule_set=rules), start=False)
    answers = [
        service.serve("pdp_fbt", RailRequest(session_id=f"q{n}", item_id=PAGE)) for n in range(3)
    ]
    assert [[s.item_id for s in a.items] for a in answers] == [
        [s.item_id for s in served.items]
    ] * 3  # the same rail as without shadow: the drops changed nothing served
    report = runner.report()
    assert report["jobs"] == {"queued": 1, "completed": 0, "dropped": 2}
    assert report["arms"]["rules:no-first"]["dropped"] == 2
    assert sink.flush() and len(sink.impressions()) == 3  # served impressions all logged
    dropped = service.metrics.shadow_jobs.labels(outcome="dropped")._value.get()
    assert dropped >= 2


def test_rules_arm_differs_where_the_candidate_rules_block_an_item(service, shadowed):
    request = RailRequest(session_id="r1", item_id=PAGE, slots=8)
    blocked = service.serve("pdp_fbt", request).items[0].item_id
    sink = MemoryImpressionSink(Metrics())
    runner = shadowed(
        ShadowRunner(
            ShadowSettings(share=1.0), sink, service.metrics, rule_set=_block_first(blocked)
        )
    )
    served = [s.item_id for s in service.serve("pdp_fbt", request).items]
    assert runner.drain() and sink.flush()
    (arms,) = _by_request(sink.impressions()).values()  # one request, both arms
    shadow = arms["rules:no-first"]
    assert arms["production"].items == served and served[0] == blocked
    assert not shadow.shown and blocked not in shadow.items and len(shadow.items) == 8
    assert shadow.items[:7] == served[1:]  # the block is the only difference
    assert shadow.rule_set == "no-first@1"
    stats = runner.report()["arms"]["rules:no-first"]
    assert stats["shadowed"] == 1 and stats["differ_share"] == 1.0  # every slot moved up one
    assert stats["mean_overlap"] == pytest.approx(7 / 8)


def test_challenger_identical_to_production_differs_in_no_slot(trained_rees46, service, shadowed):
    settings, bundle = trained_rees46
    challenger = load_rails(bundle, settings)  # loaded and verified again: a second copy
    sink = MemoryImpressionSink(Metrics())
    runner = shadowed(
        ShadowRunner(ShadowSettings(share=1.0), sink, service.metrics, challenger=challenger)
    )
    for n in range(3):
        service.serve("pdp_fbt", RailRequest(session_id=f"c{n}", item_id=PAGE))
    service.serve("cart_upsell", RailRequest(session_id="c9", cart=[PAGE]))
    assert runner.drain() and sink.flush()
    grouped = _by_request(sink.impressions())
    assert len(grouped) == 4
    arm = f"challenger:{challenger.version}"
    for arms in grouped.values():
        assert set(arms) == {"production", arm}
        assert arms[arm].items == arms["production"].items and not arms[arm].shown
    stats = runner.report()["arms"][arm]
    assert (stats["shadowed"], stats["dropped"], stats["failed"]) == (4, 0, 0)
    assert stats["differ_share"] == 0.0 and stats["mean_overlap"] == 1.0


def test_memory_sink_dumps_jsonl_the_evaluator_decodes(service, shadowed, tmp_path):
    sink = MemoryImpressionSink(Metrics())
    shadowed(ShadowRunner(ShadowSettings(), sink, service.metrics))
    for n in range(4):
        service.serve("homepage_hero", RailRequest(session_id=f"j{n}"))
    sink.flush()
    path = tmp_path / "impressions.jsonl"
    assert sink.dump_jsonl(path) == 4
    lines = path.read_bytes().splitlines()
    assert [decode_impression(line) for line in lines] == sink.impressions()


def test_a_stalled_sink_drops_and_counts_instead_of_blocking():
    entered, release = threading.Event(), threading.Event()

    class Stalled(MemoryImpressionSink):
        def _publish(self, batch):  # type: ignore[no-untyped-def]
            entered.set()
            release.wait(10)  # a broker that stopped answering
            super()._publish(batch)

    metrics = Metrics()
    sink = Stalled(metrics, queue_size=2)
    assert sink.log(_impression("r0"))
    assert entered.wait(5)  # the sink thread now holds r0 and is stuck publishing it
    accepted = [sink.log(_impression(f"r{n}")) for n in range(1, 6)]
    assert accepted == [True, True, False, False, False]  # two fit in the buffer, at once
    dropped = metrics.impressions.labels(arm="production", outcome="dropped")._value.get()
    assert dropped == 3
    release.set()
    assert sink.flush()
    assert [i.request_id for i in sink.impressions()] == ["r0", "r1", "r2"]
    sink.close()


def test_the_memory_sink_keeps_impressions_out_of_the_cycle_collectors_walks():
    """An API process without a broker keeps up to 100,000 impressions in memory: kept as
    objects they made every full collection walk about a million more (a p99 of pauses)."""
    sink = MemoryImpressionSink(Metrics())
    sent = [_impression(f"g{n}") for n in range(200)]
    tracked = len(gc.get_objects())
    for impression in sent:
        assert sink.log(impression)
    assert sink.flush()
    assert len(gc.get_objects()) - tracked < 50  # not 200 impressions' worth of objects
    assert sink.impressions() == sent  # and they come back exactly as logged
    # a follower of the log decodes only what is new since its last read
    assert sink.impressions(start=150) == sent[150:] and sink.impressions(start=200) == []
    sink.close()


class _RecordingRedis:
    """Records the pipelines ImpressionCounts executes: (command, key, field, n) tuples."""

    def __init__(self) -> None:
        self.executed: list[list[tuple]] = []

    def pipeline(self, transaction: bool = False):  # type: ignore[no-untyped-def]
        client, queued = self, []

        class Pipe:
            def hincrby(self, key, field, n):  # type: ignore[no-untyped-def]
                queued.append(("hincrby", key, field, n))

            def expire(self, key, ttl):  # type: ignore[no-untyped-def]
                queued.append(("expire", key, ttl))

            def execute(self):  # type: ignore[no-untyped-def]
                client.executed.append(list(queued))

        return Pipe()


def test_counts_are_summed_across_batches_and_written_at_flush_or_after_a_second():
    client = _RecordingRedis()
    sink = MemoryImpressionSink(Metrics(), counts=ImpressionCounts(client, 7))  # type: ignore[arg-type]
    for n in range(3):
        assert sink.log(_impression(f"r{n}"))
        time.sleep(0.08)  # each in a batch of its own (the sink lingers 50 ms)
    assert client.executed == []  # inside the second: summed, not written
    assert sink.flush()
    (written,) = client.executed
    increments = {(c[2], c[3]) for c in written if c[0] == "hincrby"}
    assert increments == {("a", 3), ("b", 3)}  # one command per item with the batches' sum
    assert sink.log(_impression("late"))
    deadline = time.monotonic() + 5
    while len(client.executed) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)  # no flush: the idle sink writes what is pending on its own
    assert [c for c in client.executed[1] if c[0] == "hincrby"][0][3] == 1
    sink.close()


def test_zero_impression_window_is_checked_before_reading_redis():
    client = redis.Redis(port=free_port())  # never contacted: the arguments fail first
    with pytest.raises(ValueError, match="days must be at least 1"):
        items_without_impressions(client, ["a"], 0, datetime.now(UTC))
    with pytest.raises(ValueError, match="timezone-aware"):
        items_without_impressions(client, ["a"], 7, datetime(2024, 1, 1))


def test_admin_routes_start_report_and_stop_rule_shadowing(trained_rees46, service, shadowed):
    settings, _ = trained_rees46
    security = settings.security.model_copy(update={"admin_api_key": SecretStr(KEY)})
    settings = settings.model_copy(update={"security": security})
    sink = MemoryImpressionSink(Metrics())
    shadowed(ShadowRunner(ShadowSettings(share=0.0), sink, service.metrics))
    bad = {"name": "x", "version": "1", "rules": [{"kind": "boost", "brand": "a", "factor": 0.5}]}
    rules = "/v1/admin/shadow/rules"
    with TestClient(create_app(settings, service), headers=ADMIN) as client:
        no_key = client.get("/v1/admin/shadow/report", headers={"X-API-Key": ""})
        invalid = client.post(rules, json=bad)
        a_path = client.post(rules, content=b"configs/rules/example.json")
        started = client.post(
            f"{rules}?share=1",
            content=orjson.dumps(
                {"name": "bf", "version": "2", "rules": [{"kind": "block", "item_id": PAGE}]}
            ),
        )
        client.post("/v1/rails/homepage_hero", json={"session_id": "a1"})
        service.observer.drain()
        report = client.get("/v1/admin/shadow/report").json()
        stopped = client.delete(rules)
        again = client.delete(rules)
    assert no_key.status_code == 401 and "X-API-Key" in no_key.json()["error"]
    assert invalid.status_code == 422
    assert any("factor" in p and p.startswith("line ") for p in invalid.json()["problems"])
    assert a_path.status_code == 422 and "JSON" in a_path.json()["error"]
    assert started.status_code == 200 and started.json()["arm"] == "rules:bf"
    assert report["share"] == 1.0 and report["arms"]["rules:bf"]["shadowed"] == 1
    assert stopped.json() == {"stopped": "rules:bf"} and again.status_code == 404


def _impression(request_id: str) -> Impression:
    return Impression(
        impression_id=uuid.uuid4().hex,
        request_id=request_id,
        served_at=datetime.now(UTC),
        session_id="s",
        rail="homepage_hero",
        arm="production",
        shown=True,
        model_version="v",
        items=["a", "b"],
    )


# ------------------------------------------------------------------------ integration


@pytest.mark.integration
def test_impressions_reach_the_topic_and_the_redis_counts(trained_rees46, tmp_path):
    settings, bundle = trained_rees46
    kafka_port, redis_port = free_port(), free_port()
    broker = kafka_broker(kafka_port, tmp_path / "kafka").start()  # fails the test if it can't
    store = redis_server(redis_port, tmp_path / "redis").start()
    try:
        streaming = settings.streaming.model_copy(
            update={
                "bootstrap_servers": f"127.0.0.1:{kafka_port}",
                "impressions_topic": "imp-shadow-test",
                "partitions": 2,
            }
        )
        ensure_topics(streaming)
        admin = KafkaAdminClient(bootstrap_servers=streaming.bootstrap_servers)
        assert "imp-shadow-test" in admin.list_topics()
        admin.close()
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        serving = settings.serving.model_copy(
            update={"bundle": bundle, "redis_url": redis_url, "triton_url": None}
        )
        shadow = ShadowSettings(share=1.0, challenger_bundle=bundle, sink="kafka", linger_ms=5)
        settings = settings.model_copy(
            update={"serving": serving, "streaming": streaming, "shadow": shadow}
        )
        app = create_app(settings)
        service = app.state.service
        with TestClient(app) as client:
            answers = [
                client.post(
                    "/v1/rails/pdp_fbt", json={"session_id": f"k{n}", "item_id": PAGE}
                ).json()
                for n in range(3)
            ]
            assert service.observer.drain()
        # leaving the client closed the runner: every impression is flushed to the broker
        consumer = KafkaConsumer(
            "imp-shadow-test",
            bootstrap_servers=streaming.bootstrap_servers,
            auto_offset_reset="earliest",
            group_id="shadow-test",
        )
        records, deadline = [], time.monotonic() + 60
        while len(records) < 6 and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                records += batch
        consumer.close()
        impressions = [decode_impression(r.value) for r in records]
        assert all(
            r.key == i.session_id.encode() for r, i in zip(records, impressions, strict=True)
        )
        grouped = _by_request(impressions)
        arm = "challenger:api-rees46-rails"
        assert len(grouped) == 3 and all(set(a) == {"production", arm} for a in grouped.values())
        served = {a["production"].session_id: a["production"].items for a in grouped.values()}
        assert served == {a["session_id"]: [i["item_id"] for i in a["items"]] for a in answers}

        client_redis = redis.Redis.from_url(redis_url)
        shown = {item for items in served.values() for item in items}
        catalogue = [str(i) for i in service.loaded.catalogue.ids]
        unseen = items_without_impressions(client_redis, catalogue, 7, datetime.now(UTC))
        assert set(unseen) == set(catalogue) - shown  # shadow items never count as shown
        today = datetime.now(UTC).strftime("%Y%m%d")
        first = served["k0"][0]
        # shown once per request; the challenger showed the same items, and does not count
        assert int(client_redis.hget(f"rt:imp:{today}", first)) == 3
        assert client_redis.ttl(f"rt:imp:{today}") > 86400
    finally:
        store.stop()
        broker.stop()
