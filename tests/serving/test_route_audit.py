"""Route audit: every route of the real app is either public for a stated reason or guarded.

The routes are enumerated from the app itself (`app.routes`, cross-checked against the
OpenAPI schema), with every router included: admin (serving/admin.py), the canary
(serving/canary_routes.py), shadow (serving/shadow_routes.py, mounted when shadow traffic
is on) and the console (serving/console.py). A route added later is audited without
touching this file: if it mutates (POST/PUT/PATCH/DELETE) or lives under /v1/admin it must
refuse a request without the admin key, and any other route must be in PUBLIC with its
reason, or the test fails.

For each guarded route: no key and a wrong key answer 401/403, no configured key answers
503 (admin off, never open), and the right key gets past the guard. Empty or short keys
never reach a running app: settings validation refuses them.
"""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient
from starlette.routing import BaseRoute, Mount

from railtower.errors import ConfigError
from railtower.settings import ShadowSettings, load_settings
from serving.app import create_app
from serving.impressions import MemoryImpressionSink
from serving.metrics import Metrics
from serving.service import RailService
from serving.shadow import ShadowRunner

KEY = "a" * 16 + "-audit-key-" + "z" * 16
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
ADMIN_PREFIX = "/v1/admin"

# (method, path) -> why anyone may call it without the admin key.
PUBLIC: dict[tuple[str, str], str] = {
    ("POST", "/v1/rails/{rail}"): "the storefront's rail request (rate-limited, body-capped)",
    ("GET", "/healthz"): "liveness probe; says only 'ok'",
    ("GET", "/readyz"): "readiness probe for the load balancer; model version, no data",
    ("GET", "/metrics"): "Prometheus scrape; counters and latencies, no shopper data",
    ("GET", "/openapi.json"): "the API schema clients and fuzzers read",
    ("GET", "/docs"): "Swagger UI over the schema",
    ("GET", "/docs/oauth2-redirect"): "Swagger UI's helper page",
    ("GET", "/redoc"): "ReDoc over the schema",
    ("GET", "/console"): "the console's static page; its data calls carry the key",
    ("GET", "/v1/console/features"): "which console panels this deployment has",
    ("GET", "/v1/console/items"): "catalogue search: titles, categories, prices, stock",
    ("GET", "/v1/console/items/{item_id}/image"): "catalogue product photos",
}
# Reads outside /v1/admin that expose shopper or merchandising state: guarded like admin.
GUARDED_READS: dict[tuple[str, str], str] = {
    ("GET", "/v1/console/sessions"): "recent sessions and what they were shown",
    ("GET", "/v1/console/rules/current"): "the rule set in force, before it is public",
    ("GET", "/v1/console/zero-impressions"): "catalogue items never shown (merchandising)",
}


def _settings(tmp_path, key: str | None):
    return load_settings(
        artifacts_dir=tmp_path / "artifacts",
        serving={"triton_url": None},
        security={"admin_api_key": key},
        log_level="WARNING",
    )


def _app(tmp_path, key: str | None):
    """The real app, shadow routes mounted, around a service with no model or stores: the
    guard must answer before anything that would need them."""
    settings = _settings(tmp_path, key)
    service = RailService(settings, None, None, None, Metrics())
    service.observer = ShadowRunner(
        ShadowSettings(share=0.0), MemoryImpressionSink(Metrics()), Metrics()
    )
    return create_app(settings, service)


def routes(app) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    """Every (method, path) the app answers; HEAD is GET's twin and audited with it."""
    out: set[tuple[str, str]] = set()
    for path, route in _flat(app.routes):
        out |= {(m, path) for m in getattr(route, "methods", None) or () if m != "HEAD"}
    return sorted(out)


def _flat(entries, prefix: str = ""):  # type: ignore[no-untyped-def]
    """(full path, route) of every route, into included routers and mounts.

    FastAPI >= 0.16x keeps an included router as one `_IncludedRouter` entry whose
    `effective_route_contexts()` yields its routes with the prefix applied; older versions
    copy the routes into `app.routes`. Both are read here, so no router is missed.
    """
    for entry in entries:
        if hasattr(entry, "effective_route_contexts"):
            for context in entry.effective_route_contexts():
                yield prefix + context.path, context.starlette_route or context.original_route
        elif isinstance(entry, Mount):
            yield from _flat(entry.routes, prefix + entry.path)
        elif isinstance(entry, BaseRoute) and hasattr(entry, "path"):
            yield prefix + entry.path, entry


def guarded(method: str, path: str) -> bool:
    """Must refuse a request without the key: a mutation (except the public rail request,
    the one mutating route PUBLIC may hold), anything under /v1/admin, a guarded read."""
    if (method, path) in PUBLIC and not path.startswith(ADMIN_PREFIX):
        return False
    return method in MUTATING or path.startswith(ADMIN_PREFIX) or (method, path) in GUARDED_READS


def _url(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "audit-x", path)


def _call(client: TestClient, method: str, path: str, headers: dict[str, str]):  # type: ignore[no-untyped-def]
    body = {"content": b"{}", "headers": {**headers, "Content-Type": "application/json"}}
    if method == "GET":
        return client.get(_url(path), headers=headers)
    return client.request(method, _url(path), **body)


@pytest.fixture(scope="module")
def app_routes(tmp_path_factory):
    app = _app(tmp_path_factory.mktemp("audit"), KEY)
    return routes(app)


def test_every_route_is_classified_and_only_the_rail_request_is_public_and_mutating(app_routes):
    unclassified = [r for r in app_routes if not guarded(*r) and r not in PUBLIC]
    assert not unclassified, (
        f"classify these routes (PUBLIC with a reason, or guard them): {unclassified}"
    )
    public_mutating = [r for r in PUBLIC if r[0] in MUTATING]
    assert public_mutating == [("POST", "/v1/rails/{rail}")]
    # the allow-lists name routes that exist: a renamed route cannot leave a stale hole
    stale = [r for r in [*PUBLIC, *GUARDED_READS] if r not in app_routes]
    assert not stale, f"allow-listed routes the app no longer has: {stale}"
    # every router was mounted: admin, canary, shadow and console routes are all audited
    for prefix in ("/v1/admin/rules", "/v1/admin/canary", "/v1/admin/shadow/", "/v1/console/"):
        assert any(path.startswith(prefix) for _, path in app_routes), prefix


def test_the_openapi_schema_lists_no_route_the_audit_missed(tmp_path, app_routes):
    schema = TestClient(_app(tmp_path, KEY)).get("/openapi.json").json()
    listed = {(m.upper(), p) for p, ops in schema["paths"].items() for m in ops}
    assert listed <= set(app_routes), listed - set(app_routes)


def unguarded(app, headers: dict[str, str], allowed: set[int]) -> dict[tuple[str, str], int]:  # type: ignore[no-untyped-def]
    """Guarded routes whose answer to `headers` is not in `allowed`: {route: status}."""
    client = TestClient(app, raise_server_exceptions=False)
    answers = {r: _call(client, *r, headers).status_code for r in routes(app) if guarded(*r)}
    assert len(answers) >= 10  # rules, promote, rollback, deletion, shadow, console reads
    return {r: s for r, s in answers.items() if s not in allowed}


@pytest.mark.parametrize(
    "headers",
    [{}, {"X-API-Key": KEY[:-1] + "!"}, {"X-API-Key": ""}],
    ids=["no-key", "wrong-key", "empty-key"],
)
def test_guarded_routes_refuse_a_request_without_the_right_key(tmp_path, headers):
    assert unguarded(_app(tmp_path, KEY), headers, {401, 403}) == {}


def test_guarded_routes_are_off_when_no_key_is_configured(tmp_path):
    app = _app(tmp_path, None)
    for headers in ({}, {"X-API-Key": KEY}):
        assert unguarded(app, headers, {503}) == {}, headers


def test_the_right_key_gets_past_the_guard(tmp_path):
    """The refusals above come from the key check: with the key, no route answers 401/403
    (it may still refuse the empty body, or a model or store this app does not have)."""
    refused = set(range(200, 600)) - {401, 403}
    assert unguarded(_app(tmp_path, KEY), {"X-API-Key": KEY}, refused) == {}


def test_the_audit_catches_a_new_route_left_open(tmp_path):
    """A route added without the guard is caught, under /v1/admin or anywhere else."""
    app = _app(tmp_path, KEY)
    app.add_api_route("/v1/admin/forgotten", lambda: {"open": True}, methods=["GET"])
    app.add_api_route("/v1/export", lambda: {"open": True}, methods=["PUT"])
    app.add_api_route("/v1/peek", lambda: {"open": True}, methods=["GET"])
    assert unguarded(app, {}, {401, 403}) == {
        ("GET", "/v1/admin/forgotten"): 200,
        ("PUT", "/v1/export"): 200,
    }
    assert [r for r in routes(app) if not guarded(*r) and r not in PUBLIC] == [("GET", "/v1/peek")]


@pytest.mark.parametrize("key", ["", "x", "k" * 15, " " * 16, "  short-key-12  "])
def test_an_empty_or_short_key_is_refused_by_settings(tmp_path, key):
    with pytest.raises(ConfigError, match="at least 16 characters"):
        _settings(tmp_path, key)


def test_an_empty_key_from_the_environment_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("RAILTOWER_SECURITY__ADMIN_API_KEY", "")
    with pytest.raises(ConfigError, match="at least 16 characters"):
        load_settings(artifacts_dir=tmp_path)
