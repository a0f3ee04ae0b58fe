"""What a valid request gets when something unforeseen breaks: a rail, never a 5xx; and a
background loop that keeps failing makes the process unready instead of silently stale."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from serving.api_models import RailRequest
from serving.app import Watchers, create_app
from serving.metrics import Metrics
from serving.rail_service import load_rails
from serving.service import RailService

PAGE = "1005115"  # a REES46 phone


@pytest.fixture(scope="module")
def service(trained_rees46):  # type: ignore[no-untyped-def]
    settings, bundle = trained_rees46
    service = RailService(settings, None, None, None, Metrics())
    service.loaded = load_rails(bundle, settings)
    return service


def _broken(*args, **kwargs):  # type: ignore[no-untyped-def]  # noqa: ARG001
    raise KeyError("malformed session state")


@pytest.mark.parametrize("rail", ["homepage_hero", "pdp_fbt", "cart_upsell"])
def test_an_unforeseen_error_serves_popular_items_not_a_5xx(service, monkeypatch, rail):
    monkeypatch.setattr(service, "_snapshot", _broken)
    request = RailRequest(
        session_id="s-broken",
        item_id=PAGE if rail == "pdp_fbt" else None,
        cart=[PAGE] if rail == "cart_upsell" else [],
        exclude=["1004767"],
        slots=10,
    )
    before = service.metrics.errors.labels(kind="request")._value.get()
    answer = service.serve(rail, request)
    items = [i.item_id for i in answer.items]
    assert answer.served_by == "fallback" and len(items) == 10
    assert "1004767" not in items  # the request's exclusions still hold
    if rail != "homepage_hero":
        assert PAGE not in items  # so do the product on the page and the cart
    assert any("request failed (KeyError)" in r for r in answer.reasons)
    assert service.metrics.errors.labels(kind="request")._value.get() == before + 1


def test_even_broken_rules_leave_plain_popular_items(service, monkeypatch):
    monkeypatch.setattr(service, "_snapshot", _broken)
    monkeypatch.setattr(service.loaded.pipeline, "explain_rules", _broken)
    answer = service.serve("homepage_hero", RailRequest(session_id="s-worse", slots=6))
    assert answer.served_by == "fallback" and len(answer.items) == 6


def test_bad_input_is_still_a_4xx(service, trained_rees46):
    app = create_app(trained_rees46[0], service)
    with TestClient(app) as client:
        response = client.post("/v1/rails/pdp_fbt", json={"session_id": "s"})
    assert response.status_code == 422 and "item_id" in response.text


def test_a_failing_background_loop_survives_and_turns_readiness_off(service, trained_rees46):
    import threading

    stop, calls = threading.Event(), {"n": 0}

    def flaky() -> None:
        calls["n"] += 1
        if calls["n"] <= 8:
            raise RuntimeError("catalogue stream unreadable")

    def wait_for(n: int) -> None:
        deadline = time.monotonic() + 10
        while calls["n"] < n and time.monotonic() < deadline:
            time.sleep(0.02)

    watchers = Watchers(stop, Metrics())
    watchers.start("catalogue-watch", 0.05, flaky)
    wait_for(6)  # five failed passes, more than three intervals without a completed one
    assert "catalogue-watch" in watchers.stale(0.0)
    wait_for(10)
    stop.set()
    assert calls["n"] >= 10  # the loop outlived its failures
    assert not watchers.stale(5.0)  # and recovered once a pass completed
    # the API says so: a loop that keeps failing makes /readyz 503 with the reason
    settings = trained_rees46[0].model_copy(
        update={"serving": trained_rees46[0].serving.model_copy(update={"watch_stale_s": 0.01})}
    )
    original = service.sync_catalogue
    service.sync_catalogue = _broken  # type: ignore[method-assign]
    try:
        with TestClient(create_app(settings, service)) as client:
            time.sleep(3.5)  # three 1 s catalogue intervals without a completed pass
            response = client.get("/readyz")
    finally:
        service.sync_catalogue = original  # type: ignore[method-assign]
    assert response.status_code == 503 and "catalogue-watch" in response.json()["why"]
