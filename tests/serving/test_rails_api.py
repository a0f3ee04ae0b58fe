"""The rails API against a real Redis and a real tritonserver that these tests start and stop.

The model is trained here (REES46, two tower epochs, the full ranking pipeline), exported
to a temporary Triton repository, and served from its bundles. A server that cannot start
fails the test: nothing here is skipped.
"""

from __future__ import annotations

import gc
import time

import numpy as np
import pytest
from anyio import to_thread
from fastapi.testclient import TestClient

from devstack.local_services import LocalServer, free_port, redis_server, triton_server
from serving.app import create_app
from serving.metrics import Metrics
from serving.service import RailService
from serving.user_vectors import TritonUserTower
from state.session_store import SessionStore
from towers.session_features import HistoryEvent

SESSION = [("1005115", "view"), ("1004767", "view"), ("1005105", "cart")]


@pytest.fixture(scope="module")
def trained(trained_rees46):
    return trained_rees46


def _start(server: LocalServer) -> LocalServer:
    return server.start()  # raises ServiceError (fails the test) if it cannot start


@pytest.fixture(scope="module")
def triton(trained, tmp_path_factory):
    settings, _ = trained
    grpc = free_port()
    work = tmp_path_factory.mktemp("triton")
    server = _start(triton_server(settings.serving.triton_repository, grpc, free_port(), work))
    client = TritonUserTower(f"127.0.0.1:{grpc}", "user_tower", 5.0)
    deadline = time.monotonic() + 60
    while not client.ready() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.ready(), (work / "triton.log").read_text()[-2000:]
    yield server, f"127.0.0.1:{grpc}"
    server.stop()


@pytest.fixture
def redis_url(tmp_path):
    port = free_port()
    server = _start(redis_server(port, tmp_path))
    yield server, f"redis://127.0.0.1:{port}/0"
    server.stop()


def _client(
    trained, redis_url: str, triton_url: str | None, ranker_ms: float | None = None
) -> tuple[TestClient, RailService]:
    settings, bundle = trained
    serving = settings.serving.model_copy(
        update={
            "bundle": bundle,
            "redis_url": redis_url,
            "triton_url": triton_url,
            # the Triton request path is what these tests prove (in_process is the default)
            "request_encoder": "triton",
        }
    )
    if ranker_ms is not None:
        budgets = serving.budgets.model_copy(update={"ranker_ms": ranker_ms})
        serving = serving.model_copy(update={"budgets": budgets})
    settings = settings.model_copy(update={"serving": serving})
    app = create_app(settings)
    return TestClient(app), app.state.service


def _seed(service: RailService, session_id: str = "s1") -> None:
    events = [
        (f"{session_id}-{k}", HistoryEvent(item, kind, 1569890000.0 + 60 * k), "desktop")
        for k, (item, kind) in enumerate(SESSION)
    ]
    service.store.append_events(session_id, events)


def test_hero_is_computed_with_triton_then_served_pre_warmed(trained, triton, redis_url):
    client, service = _client(trained, redis_url[1], triton[1])
    _seed(service)
    with client:
        first = client.post("/v1/rails/homepage_hero", json={"session_id": "s1", "slots": 8})
        second = client.post("/v1/rails/homepage_hero", json={"session_id": "s1", "slots": 8})
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["served_by"] == "computed" and body["vector_source"] == "triton", body["reasons"]
    assert body["reasons"] == [] and body["model_version"] == "api-rees46-rails"
    ids = [i["item_id"] for i in body["items"]]
    assert len(ids) == 8 == len(set(ids))
    assert not set(ids) & {item for item, _ in SESSION}  # discovery: nothing already seen
    assert second.json()["served_by"] == "cache"
    assert [i["item_id"] for i in second.json()["items"]] == ids


def test_a_new_event_invalidates_the_pre_warmed_rail(trained, triton, redis_url):
    client, service = _client(trained, redis_url[1], triton[1])
    _seed(service, "s2")
    with client:
        client.post("/v1/rails/homepage_hero", json={"session_id": "s2"})
        service.store.append_events(
            "s2", [("s2-new", HistoryEvent("4804056", "view", 1569890500.0), None)]
        )
        after = client.post("/v1/rails/homepage_hero", json={"session_id": "s2"}).json()
    assert after["served_by"] == "computed"
    assert "4804056" not in [i["item_id"] for i in after["items"]]


def test_triton_vectors_match_the_in_process_tower(trained, triton):
    from serving.rail_service import load_rails

    settings, bundle = trained
    loaded = load_rails(bundle, settings)
    towers = loaded.towers
    history = [[HistoryEvent(i, "view", 1569890000.0 + 60 * k) for k, (i, _) in enumerate(SESSION)]]
    inputs = towers.session_inputs(history * 5, ["desktop", None, "mobile", None, None])
    remote = TritonUserTower(triton[1], "user_tower", 5.0).encode(inputs, towers.triton_version)
    np.testing.assert_allclose(remote, towers.encode_inputs(inputs), atol=1e-5)


def test_pdp_and_cart_never_return_what_the_request_excludes(trained, triton, redis_url):
    client, service = _client(trained, redis_url[1], triton[1])
    _seed(service)
    with client:
        client.post("/v1/rails/homepage_hero", json={"session_id": "s1"})  # stores the vector
        pdp = client.post(
            "/v1/rails/pdp_fbt", json={"session_id": "s1", "item_id": "1005115", "slots": 10}
        ).json()
        cart = client.post(
            "/v1/rails/cart_upsell",
            json={"session_id": "s1", "cart": ["1005105", "4804056"], "slots": 10},
        ).json()
    assert len(pdp["items"]) == 10 and "1005115" not in [i["item_id"] for i in pdp["items"]]
    # the stored vector is the session's alone; the page's product makes its own
    assert pdp["vector_source"] == "triton" and cart["vector_source"] == "triton"
    assert len(cart["items"]) == 10
    assert not {"1005105", "4804056"} & {i["item_id"] for i in cart["items"]}


@pytest.mark.parametrize(
    ("rail", "body", "status", "says"),
    [
        ("nope", {"session_id": "s"}, 404, "unknown rail 'nope'"),
        ("pdp_fbt", {"session_id": "s"}, 422, "pdp_fbt needs item_id"),
        ("pdp_fbt", {"session_id": "s", "item_id": "no-such"}, 404, "not in the catalogue"),
        ("cart_upsell", {"session_id": "s"}, 422, "non-empty cart"),
        ("cart_upsell", {"session_id": "s", "cart": ["x1"]}, 404, "cart items not in"),
        ("homepage_hero", {"session_id": "", "slots": 0}, 422, "session_id"),
        ("homepage_hero", {"session_id": "s", "slots": 0}, 422, "slots"),
        ("homepage_hero", {"session_id": "s", "colour": "red"}, 422, "colour"),
    ],
)
def test_bad_requests_get_a_4xx_that_says_why(trained, redis_url, rail, body, status, says):
    client, _ = _client(trained, redis_url[1], None)
    with client:
        reply = client.post(f"/v1/rails/{rail}", json=body)
    assert reply.status_code == status
    assert says in reply.json()["error"]


def test_redis_stopped_mid_test_still_serves_with_a_marker(trained, triton, redis_url):
    server, url = redis_url
    client, service = _client(trained, url, triton[1])
    _seed(service)
    with client:
        assert client.post("/v1/rails/homepage_hero", json={"session_id": "s1"}).status_code == 200
        server.stop()
        reply = client.post("/v1/rails/homepage_hero", json={"session_id": "s1", "slots": 12})
        metrics = client.get("/metrics").text
    body = reply.json()
    assert reply.status_code == 200 and len(body["items"]) == 12
    assert any(r.startswith("redis unavailable") for r in body["reasons"])
    assert 'railtower_fallbacks_total{reason="redis"} 1.0' in metrics


def test_triton_stopped_falls_back_to_the_in_process_tower(trained, redis_url, tmp_path):
    settings, _ = trained
    grpc = free_port()
    own = _start(triton_server(settings.serving.triton_repository, grpc, free_port(), tmp_path))
    client, service = _client(trained, redis_url[1], f"127.0.0.1:{grpc}")
    _seed(service)
    try:
        deadline = time.monotonic() + 60
        while not service.triton.ready() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        own.stop()
    with client:
        reply = client.post("/v1/rails/pdp_fbt", json={"session_id": "s1", "item_id": "1005115"})
    body = reply.json()
    assert reply.status_code == 200 and len(body["items"]) == 12
    assert body["vector_source"] == "in_process"
    assert any(r.startswith("triton unavailable") for r in body["reasons"])


def test_a_broken_bundle_keeps_the_last_good_model_serving(trained, redis_url, tmp_path):
    client, service = _client(trained, redis_url[1], None)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{}")
    with client:
        assert service.load(broken) is False
        reply = client.post("/v1/rails/homepage_hero", json={"session_id": "s9"})
        metrics = client.get("/metrics").text
        ready = client.get("/readyz").json()
    assert reply.status_code == 200 and reply.json()["model_version"] == "api-rees46-rails"
    assert ready["ready"] and ready["rankers"] and ready["index"]
    assert 'railtower_errors_total{kind="bundle_load"} 1.0' in metrics


@pytest.mark.parametrize("settle", [True, False])
def test_a_loaded_model_is_out_of_the_cycle_collectors_walks(trained, redis_url, settle):
    """serving.settle_heap (railtower.heap): the served model's objects are frozen at load,
    so the collector's full passes under load never walk them."""
    settings, bundle = trained
    gc.unfreeze()
    serving = settings.serving.model_copy(
        update={"bundle": bundle, "redis_url": redis_url[1], "settle_heap": settle}
    )
    service = RailService(
        settings.model_copy(update={"serving": serving}), None, None, None, Metrics()
    )
    try:
        assert service.load(bundle)
        walked = any(o is service.loaded for o in gc.get_objects())
        assert walked is not settle
        assert (gc.get_freeze_count() > 0) is settle
    finally:
        gc.unfreeze()


def test_the_request_pool_has_the_configured_threads(trained, redis_url):
    """serving.request_threads sizes the pool rail requests run in (anyio's default 40)."""
    settings, bundle = trained
    serving = settings.serving.model_copy(
        update={
            "bundle": bundle,
            "redis_url": redis_url[1],
            "triton_url": None,
            "request_threads": 3,
        }
    )
    with TestClient(create_app(settings.model_copy(update={"serving": serving}))) as client:
        pool = client.portal.call(to_thread.current_default_thread_limiter)
        assert client.post("/v1/rails/homepage_hero", json={"session_id": "t1"}).status_code == 200
    assert pool.total_tokens == 3


def test_service_without_a_model_is_not_ready(trained):
    settings, _ = trained
    service = RailService(settings, None, None, None, Metrics())
    with TestClient(create_app(settings, service)) as client:
        assert client.get("/readyz").status_code == 503
        assert client.get("/healthz").json() == {"status": "ok"}
        reply = client.post("/v1/rails/homepage_hero", json={"session_id": "s"})
    assert reply.status_code == 503


def test_session_store_is_idempotent_by_event_id(redis_url):
    store = SessionStore(redis_url[1], 1.0, 3, 60, 60)
    event = HistoryEvent("a", "view", 1.0)
    assert store.append_events("s", [("e1", event, None), ("e2", event, None)]) == 2
    assert store.append_events("s", [("e1", event, None)]) == 0  # redelivered: no change
    store.append_events(
        "s", [(f"e{k}", HistoryEvent(f"i{k}", "view", k), None) for k in range(3, 7)]
    )
    snapshot = store.snapshot("s", "v1", None)
    assert [e.item_id for e in snapshot.events] == ["i4", "i5", "i6"]  # the last N only
    assert store.delete_session("s") >= 2
    assert store.snapshot("s", "v1", None).events == []


def test_a_session_without_events_leaves_no_state_in_redis(trained, redis_url):
    """Any session id may ask for a rail; only sessions the consumer has events for get a
    vector or a cached rail, so made-up ids cannot grow Redis."""
    client, service = _client(trained, redis_url[1], None)
    with client:
        for n in range(5):
            reply = client.post("/v1/rails/homepage_hero", json={"session_id": f"anon-{n}"})
            assert reply.status_code == 200 and len(reply.json()["items"]) == 12
        _seed(service, "known")
        assert (
            client.post("/v1/rails/homepage_hero", json={"session_id": "known"}).status_code == 200
        )
    keys = [k.decode() for k in service.store.client.scan_iter("*")]
    assert not [k for k in keys if "anon-" in k]
    assert [k for k in keys if "{s:known}" in k and ":rail:" in k]  # a real session is cached


def test_session_state_survives_a_redis_crash(tmp_path):
    """The project's Redis writes an append-only file every second: SIGKILLed and started
    again, it still has the sessions written more than a second before the crash."""
    port = free_port()
    server = _start(redis_server(port, tmp_path))
    try:
        store = SessionStore(f"redis://127.0.0.1:{port}/0", 2.0, 50, 3600, 3600)
        for s in range(50):
            events = [(f"c{s}-{k}", HistoryEvent(f"i{k}", "view", 1.0 + k), None) for k in range(3)]
            store.append_events(f"crash-{s}", events)
        time.sleep(2.5)  # past the once-a-second fsync
        server.kill()
        _start(server)
        restored = SessionStore(f"redis://127.0.0.1:{port}/0", 2.0, 50, 3600, 3600)
        assert all(len(restored.snapshot(f"crash-{s}", "v", None).events) == 3 for s in range(50))
        # and what was applied is still marked applied: a redelivery adds nothing
        again = [(f"c0-{k}", HistoryEvent(f"i{k}", "view", 1.0 + k), None) for k in range(3)]
        assert restored.append_events("crash-0", again) == 0
    finally:
        server.stop()
