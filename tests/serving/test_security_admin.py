"""Admin key, rate limit, body limit, the admin routes (rules, promote, rollback, deletion).

Unit tests use small apps and a clock of their own; the rules-publishing tests serve the
session's trained REES46 model; the `integration` tests start a real Redis (and fail, never
skip, if it cannot start).
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from fastapi import Depends, FastAPI, Request
from fastapi.testclient import TestClient
from pydantic import BaseModel, SecretStr

from devstack.local_services import free_port, redis_server
from railtower.settings import load_settings
from serving.admin import PublishedRules, rule_errors
from serving.app import create_app
from serving.metrics import Metrics
from serving.security import (
    BodyLimitMiddleware,
    ClientIdentity,
    RateLimitMiddleware,
    TokenBuckets,
    require_admin,
)
from serving.service import RailService
from state.price_store import POINTS_KEY, PricePoint, PriceStore, price_points_ttl_s
from state.session_store import SessionStore
from tests.training.test_promotion import _bundle, record
from towers.session_features import HistoryEvent

KEY = "k" * 32
ADMIN = {"X-API-Key": KEY}
SESSION = [("1005115", "view"), ("1004767", "view"), ("1005105", "cart")]


def _settings(tmp_path, **security):
    return load_settings(
        artifacts_dir=tmp_path / "artifacts",
        serving={"triton_url": None},
        security={"admin_api_key": KEY, **security},
        log_level="WARNING",
    )


def _no_model_app(settings, peer: str = "testclient") -> TestClient:
    """The real app around a service with no model (enough for guards and validation);
    `peer` is the address the requests come from."""
    service = RailService(settings, None, None, None, Metrics())
    return TestClient(create_app(settings, service), client=(peer, 50000))


def _rules(*rules, name="test", version="1") -> str:
    return json.dumps({"name": name, "version": version, "rules": list(rules)}, indent=2)


# ------------------------------------------------------------------------------ token bucket


def test_token_bucket_allows_the_burst_then_refills_with_the_clock():
    now = [100.0]
    buckets = TokenBuckets(2.0, 3, 100, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)  # one token every 0.5 s
    assert buckets.take("b") == 0.0  # another client has its own bucket
    now[0] += 0.5
    assert buckets.take("a") == 0.0
    assert buckets.take("a") > 0
    now[0] += 60  # refills up to the burst, not beyond
    assert [buckets.take("a") for _ in range(4)][-1] > 0


def test_token_bucket_table_is_bounded_least_recently_seen_first():
    buckets = TokenBuckets(1.0, 1, 3, clock=lambda: 0.0)
    for client in ("a", "b", "c"):
        buckets.take(client)
    buckets.take("a")  # a is now the most recently seen (and empty)
    buckets.take("d")  # evicts b
    assert len(buckets) == 3
    assert buckets.take("a") > 0  # a was kept: still empty
    assert buckets.take("b") == 0.0  # b was forgotten: a full bucket again


def test_token_bucket_refuses_settings_that_mean_no_limiter():
    with pytest.raises(ValueError, match="rate_per_s > 0"):
        TokenBuckets(0.0, 5, 10)


class Body(BaseModel):
    text: str


def _guarded_app(buckets: TokenBuckets | None, max_bytes: int, metrics: Metrics) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/rails/{rail}")
    async def rail(rail: str, request: Request) -> dict[str, int]:
        return {"bytes": len(await request.body())}

    @app.post("/parsed")
    async def parsed(body: Body) -> dict[str, int]:
        return {"chars": len(body.text)}

    if buckets is not None:
        app.add_middleware(RateLimitMiddleware, buckets=buckets, metrics=metrics)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_bytes, metrics=metrics)
    return app


def test_rate_limit_answers_429_with_retry_after_and_counts_it():
    now, metrics = [0.0], Metrics()
    buckets = TokenBuckets(0.5, 2, 100, clock=lambda: now[0])
    app = _guarded_app(buckets, 1024, metrics)
    client = TestClient(app, client=("198.51.100.1", 1000))
    codes = [client.post("/v1/rails/homepage_hero", content=b"{}").status_code for _ in range(2)]
    refused = client.post("/v1/rails/homepage_hero", content=b"{}")
    assert codes == [200, 200] and refused.status_code == 429
    assert refused.headers["Retry-After"] == "2"  # 1 token at 0.5/s
    assert "rate limit exceeded for client 198.51.100.1" in refused.json()["error"]
    assert "security.rate_limit_per_s" in refused.json()["error"]
    # another address has its own bucket
    other = TestClient(app, client=("198.51.100.2", 1000))
    assert other.post("/v1/rails/homepage_hero", content=b"{}").status_code == 200
    assert client.post("/parsed", json={"text": "x"}).status_code == 200  # not rate limited
    now[0] += 2.0
    assert client.post("/v1/rails/homepage_hero", content=b"{}").status_code == 200
    assert metrics.errors.labels(kind="rate_limited")._value.get() == 1


def _buckets_of(client: TestClient) -> TokenBuckets:
    """The token buckets of the real app's rate limiter (it has none: StopIteration)."""
    app = client.app
    return next(m.kwargs["buckets"] for m in app.user_middleware if m.cls is RateLimitMiddleware)  # type: ignore[attr-defined]


def _rail(client: TestClient, headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return client.post("/v1/rails/homepage_hero", json={"session_id": "s"}, headers=headers)


def test_the_rate_limit_is_on_by_default_per_peer_address(tmp_path):
    settings = load_settings(artifacts_dir=tmp_path, serving={"triton_url": None})
    assert (settings.security.rate_limit_per_s, settings.security.rate_limit_burst) == (50, 100)
    assert settings.security.trusted_proxy_header is None
    with _no_model_app(settings, peer="203.0.113.7") as client:
        buckets = _buckets_of(client)
        buckets.clock = lambda: 0.0  # no refill while the burst is spent
        codes = [_rail(client).status_code for _ in range(100)]
        refused = _rail(client)
    assert set(codes) == {503}  # all let through (no model is loaded)
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    error = refused.json()["error"]
    assert error.startswith("rate limit exceeded for client 203.0.113.7: 50 requests/s")
    assert "bursts of 100" in error and "security.rate_limit_burst" in error


def test_x_client_id_cannot_dodge_the_limit(tmp_path):
    settings = _settings(tmp_path, rate_limit_per_s=0.001, rate_limit_burst=1)
    with _no_model_app(settings, peer="203.0.113.5") as client:
        first = _rail(client, {"X-Client-Id": "a"})
        renamed = _rail(client, {"X-Client-Id": "b"})
    assert first.status_code == 503
    assert renamed.status_code == 429  # a new name is the same client: the same bucket
    assert "203.0.113.5" in renamed.json()["error"]


def test_shoppers_behind_a_trusted_proxy_get_their_own_buckets(tmp_path):
    settings = _settings(
        tmp_path, rate_limit_per_s=0.001, rate_limit_burst=1, trusted_proxy_header="X-Real-IP"
    )
    ann, bob = {"X-Real-IP": "198.51.100.10"}, {"X-Real-IP": "198.51.100.20"}
    with _no_model_app(settings, peer="127.0.0.1") as proxy:  # loopback: trusted by default
        codes = [_rail(proxy, ann).status_code, _rail(proxy, bob).status_code]
        again = _rail(proxy, ann)
    assert codes == [503, 503]  # each shopper's first request passes
    assert again.status_code == 429 and "client 198.51.100.10:" in again.json()["error"]


def test_a_proxy_header_from_an_untrusted_peer_is_ignored(tmp_path):
    settings = _settings(
        tmp_path, rate_limit_per_s=0.001, rate_limit_burst=1, trusted_proxy_header="X-Real-IP"
    )
    with _no_model_app(settings, peer="203.0.113.9") as client:
        first = _rail(client, {"X-Real-IP": "198.51.100.10"})
        spoofed = _rail(client, {"X-Real-IP": "198.51.100.20"})
    assert first.status_code == 503
    assert spoofed.status_code == 429 and "client 203.0.113.9:" in spoofed.json()["error"]


@pytest.mark.parametrize(
    ("peer", "header", "client"),
    [
        # right-most hop that is not a trusted proxy: the left part is the client's own say
        ("10.0.0.2", "6.6.6.6, 198.51.100.1", "198.51.100.1"),
        ("10.0.0.2", "198.51.100.1, 10.0.0.7", "198.51.100.1"),  # a chain of trusted proxies
        ("10.0.0.2", "198.51.100.1:5555", "198.51.100.1"),  # a hop with its port
        ("10.0.0.2", "[2001:db8::1]:443", "2001:db8::1"),
        ("10.0.0.2", "10.0.0.7", "10.0.0.7"),  # every hop trusted: the farthest
        ("10.0.0.2", "", "10.0.0.2"),  # empty: the peer
        ("::ffff:10.0.0.2", "198.51.100.1", "198.51.100.1"),  # dual-stack peer, IPv4 inside
        ("203.0.113.9", "198.51.100.1", "203.0.113.9"),  # untrusted peer: header ignored
        ("testclient", "198.51.100.1", "testclient"),  # not an address: never trusted
    ],
)
def test_client_identity_reads_the_forwarded_chain_from_the_right(peer, header, client):
    who = ClientIdentity("X-Forwarded-For", ["10.0.0.0/8"])
    headers = [(b"x-forwarded-for", header.encode())] if header else []
    assert who({"client": (peer, 1), "headers": headers}) == client
    # several header lines are one list, in order
    split = [(b"x-forwarded-for", b"6.6.6.6"), (b"x-forwarded-for", b"198.51.100.1")]
    assert who({"client": ("10.0.0.2", 1), "headers": split}) == "198.51.100.1"
    assert ClientIdentity()({"client": ("10.0.0.2", 1), "headers": split}) == "10.0.0.2"


@pytest.mark.parametrize(
    ("security", "says"),
    [
        ({"trusted_proxies": ["10.0.0.0/8", "nginx"]}, "'nginx' is not an IP address"),
        ({"trusted_proxy_header": "X-Real-IP: 1.2.3.4"}, "is not an HTTP header name"),
    ],
)
def test_proxy_settings_are_checked(tmp_path, security, says):
    from railtower.errors import ConfigError

    with pytest.raises(ConfigError, match=says):
        load_settings(artifacts_dir=tmp_path, security=security)


# ------------------------------------------------------------------------------ body limit


def test_body_over_the_limit_by_content_length_is_413():
    metrics = Metrics()
    client = TestClient(_guarded_app(None, 1024, metrics))
    assert client.post("/v1/rails/x", content=b"a" * 1024).json() == {"bytes": 1024}
    reply = client.post("/v1/rails/x", content=b"a" * 1025)
    assert reply.status_code == 413
    assert "1024 bytes (security.max_body_bytes)" in reply.json()["error"]
    assert "Content-Length is 1025" in reply.json()["error"]
    assert metrics.errors.labels(kind="http_413")._value.get() == 1


def test_chunked_body_over_the_limit_is_413_even_for_a_parsed_route():
    client = TestClient(_guarded_app(None, 1024, Metrics()))

    def chunks(n: int):
        for _ in range(n):
            yield b"a" * 300

    small = client.post("/v1/rails/x", content=chunks(3))
    assert small.status_code == 200 and small.json() == {"bytes": 900}
    raw = client.post("/v1/rails/x", content=chunks(5))
    assert raw.status_code == 413 and "at least" in raw.json()["error"]
    # FastAPI would turn the read error into a 400; the client must still learn why
    parsed = client.post("/parsed", content=chunks(5), headers={"Content-Type": "application/json"})
    assert parsed.status_code == 413


def test_body_limit_applies_to_the_real_app(tmp_path):
    with _no_model_app(_settings(tmp_path)) as client:
        reply = client.post("/v1/admin/rules/validate", content=b" " * 70_000, headers=ADMIN)
    assert reply.status_code == 413 and "65536" in reply.json()["error"]


def test_the_real_app_rate_limits_rails_only(tmp_path):
    settings = _settings(tmp_path, rate_limit_per_s=0.001, rate_limit_burst=1)
    with _no_model_app(settings) as client:
        first = client.post("/v1/rails/homepage_hero", json={"session_id": "s"})
        second = client.post("/v1/rails/homepage_hero", json={"session_id": "s"})
        health = [client.get("/healthz").status_code for _ in range(3)]
    assert first.status_code == 503  # allowed through: no model loaded
    assert second.status_code == 429 and int(second.headers["Retry-After"]) >= 1
    assert health == [200, 200, 200]


# ------------------------------------------------------------------------------ admin key


@pytest.mark.parametrize(
    ("key", "headers", "status", "says"),
    [
        (None, ADMIN, 503, "admin endpoints disabled: set RAILTOWER_SECURITY__ADMIN_API_KEY"),
        (KEY, {}, 401, "X-API-Key header"),
        (KEY, {"X-API-Key": "k" * 31 + "x"}, 401, "does not match"),
        (KEY, ADMIN, 200, None),
    ],
)
def test_admin_key_is_required(tmp_path, key, headers, status, says):
    settings = load_settings(artifacts_dir=tmp_path, security={"admin_api_key": key})
    with _no_model_app(settings) as client:
        reply = client.post("/v1/admin/rules/validate", content=_rules(), headers=headers)
        metrics = client.get("/metrics").text
    assert reply.status_code == status
    if says is None:
        assert reply.json()["valid"] is True
    else:
        assert says in reply.json()["error"]
        assert f'railtower_errors_total{{kind="http_{status}"}} 1.0' in metrics


def test_require_admin_works_on_any_router(tmp_path):
    app = FastAPI()
    app.state.settings = _settings(tmp_path)

    @app.get("/v1/admin/ping", dependencies=[Depends(require_admin)])
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    client = TestClient(app, raise_server_exceptions=False)
    assert client.get("/v1/admin/ping", headers=ADMIN).json() == {"ok": True}
    assert client.get("/v1/admin/ping").status_code != 200


def test_a_short_admin_key_is_refused_without_echoing_it(tmp_path):
    from railtower.errors import ConfigError

    with pytest.raises(ConfigError, match="at least 16 characters") as caught:
        load_settings(artifacts_dir=tmp_path, security={"admin_api_key": "hunter2"})
    assert "hunter2" not in str(caught.value)


# ------------------------------------------------------------------------------ rules


def test_validate_answers_200_with_a_summary(tmp_path):
    text = _rules(
        {"kind": "block", "item_id": "a"},
        {"kind": "boost", "brand": "samsung", "factor": 1.5},
        {"kind": "block", "category": "electronics"},
    )
    with _no_model_app(_settings(tmp_path)) as client:
        reply = client.post("/v1/admin/rules/validate", content=text, headers=ADMIN)
    assert reply.status_code == 200
    body = reply.json()
    assert body["valid"] is True and body["name"] == "test" and body["rules"] == 3
    assert body["kinds"] == {"block": 2, "boost": 1}


@pytest.mark.parametrize(
    ("text", "line", "field", "why"),
    [
        (_rules({"kind": "pin", "item_id": "a", "slot": 0}), 8, "rules[0].slot", "count from 1"),
        (
            _rules({"kind": "boost", "item_id": "a", "factor": 0.5}),
            8,
            "rules[0].factor",
            "greater than 1",
        ),
        (_rules({"kind": "nope", "item_id": "a"}), 6, "rules[0].kind", "unknown kind"),
        ('{"name": "x",\n  "version": 1,\n}', 3, None, "not valid JSON"),
        ("/etc/passwd", 1, None, "a rule set is a JSON object"),
    ],
)
def test_validate_and_publish_refuse_with_line_and_field(tmp_path, text, line, field, why):
    with _no_model_app(_settings(tmp_path)) as client:
        checked = client.post("/v1/admin/rules/validate", content=text, headers=ADMIN)
        published = client.post("/v1/admin/rules", content=text, headers=ADMIN)
    for reply in (checked, published):
        assert reply.status_code == 422
        body = reply.json()
        assert body["valid"] is False
        first = body["errors"][0]
        assert set(first) == {"line", "field", "why"}
        assert (first["line"], first["field"]) == (line, field), body
        assert why in first["why"]
    assert not (tmp_path / "artifacts" / "rules").exists()  # nothing published


def test_rule_errors_keep_an_unknown_wording_whole():
    from railtower.errors import RuleSetError

    errors = rule_errors(RuleSetError("x", ["something new"]))
    assert errors == [{"line": None, "field": None, "why": "something new"}]


@pytest.fixture(scope="module")
def model(trained_rees46):
    return trained_rees46


def _served(settings, bundle, store=None) -> RailService:
    service = RailService(settings, None, store, None, Metrics())
    assert service.load(bundle)
    return service


def _model_settings(model, tmp_path, **serving):
    """The trained model's settings with the admin key; a data set name of the test's own,
    so its published rules (artifacts/rules/<data set>/) are no other test's."""
    settings, bundle = model
    own = {"triton_url": None, "bundle": bundle, "dataset": f"t-{tmp_path.name}"}
    return settings.model_copy(
        update={
            "serving": settings.serving.model_copy(update={**own, **serving}),
            "security": settings.security.model_copy(update={"admin_api_key": SecretStr(KEY)}),
        }
    ), bundle


def test_publish_blocks_an_item_in_the_next_rail_and_every_process_follows(model, tmp_path):
    settings, bundle = _model_settings(model, tmp_path)
    service = _served(settings, bundle)
    ask = {"session_id": "s1", "slots": 8}
    with TestClient(create_app(settings, service)) as client:
        before = client.post("/v1/rails/pdp_fbt", json={**ask, "item_id": "1005115"}).json()
        top = before["items"][0]["item_id"]
        text = _rules({"kind": "block", "item_id": top, "note": "recall"}, name="recall")
        published = client.post("/v1/admin/rules", content=text, headers=ADMIN)
        after = client.post("/v1/rails/pdp_fbt", json={**ask, "item_id": "1005115"}).json()
        current = client.get("/v1/admin/rules", headers=ADMIN).json()
    assert published.status_code == 200, published.text
    body = published.json()
    assert body["valid"] and body["published"] and body["name"] == "recall"
    assert top not in [i["item_id"] for i in after["items"]] and len(after["items"]) == 8
    assert current["source"] == "published" and current["rule_set"]["name"] == "recall"
    assert current["published_version"] == body["published_version"]
    folder = settings.artifacts_dir / "rules" / settings.serving.dataset
    assert json.loads((folder / "published.json").read_text())["name"] == "recall"
    assert len(list((folder / "history").glob("*.json"))) == 1

    # another API process on the same artifacts: its watch loop's sync picks it up
    other = _served(settings, bundle)
    assert other.loaded.pipeline.rule_set.name != "recall"
    follower = PublishedRules.for_settings(settings, other.metrics)
    assert follower.sync(other) is True
    assert other.loaded.pipeline.rule_set.name == "recall"
    assert follower.sync(other) is False  # nothing changed since
    # a bundle loaded later (a promotion) serves the published rules too
    assert other.load(bundle) and other.loaded.pipeline.rule_set.name != "recall"
    assert follower.sync(other) is True and other.loaded.pipeline.rule_set.name == "recall"


def test_a_broken_published_file_keeps_the_last_good_rules(model, tmp_path):
    settings, bundle = _model_settings(model, tmp_path)
    service = _served(settings, bundle)
    rules = PublishedRules.for_settings(settings, service.metrics)
    rules.publish(_rules({"kind": "block", "item_id": "1005115"}, name="good"))
    assert rules.sync(service) and service.loaded.pipeline.rule_set.name == "good"
    rules.path.write_text("{broken")
    assert rules.sync(service) is False
    assert service.loaded.pipeline.rule_set.name == "good"
    assert service.metrics.errors.labels(kind="rules_load")._value.get() == 1


# ------------------------------------------------------------------------------ promote, rollback


def _values(level: float):
    rng = np.random.default_rng(5)
    return {r: np.clip(rng.uniform(0, 0.4, 300) + level, 0, 1) for r in ("homepage_hero",)}


def test_promote_and_rollback_routes(tmp_path):
    settings = _settings(tmp_path)
    artifacts = settings.artifacts_dir
    good = _bundle(artifacts / "good", record(_values(0.2)))
    _bundle(artifacts / "bad", record(_values(0.0)))
    with _no_model_app(settings) as client:
        first = client.post("/v1/admin/promote", json={"bundle": "good"}, headers=ADMIN)
        refused = client.post("/v1/admin/promote", json={"bundle": "bad"}, headers=ADMIN)
        outside = client.post("/v1/admin/promote", json={"bundle": "../x"}, headers=ADMIN)
        nothing = client.post(
            "/v1/admin/rollback", json={"dataset": "shop", "reason": "test"}, headers=ADMIN
        )
        anonymous = client.post("/v1/admin/rollback", json={"dataset": "shop", "reason": "x"})
    assert first.status_code == 200 and first.json()["promoted"] is True
    assert refused.status_code == 409
    assert refused.json()["promoted"] is False
    assert any("below production" in r for r in refused.json()["reasons"])
    assert outside.status_code == 422 and "inside artifacts_dir" in outside.json()["error"]
    assert nothing.status_code == 409 and nothing.json()["rolled_back"] is False
    assert "first production bundle" in nothing.json()["error"]
    assert anonymous.status_code == 401
    assert (artifacts / "production" / "shop").resolve() == good.resolve()

    better = _bundle(artifacts / "better", record(_values(0.3)))
    with _no_model_app(settings) as client:
        assert client.post("/v1/admin/promote", json={"bundle": str(better)}, headers=ADMIN).json()[
            "promoted"
        ]
        back = client.post(
            "/v1/admin/rollback", json={"dataset": "shop", "reason": "canary"}, headers=ADMIN
        )
    assert back.status_code == 200, back.text
    assert back.json()["rolled_back"] and back.json()["restored"] == "good"
    assert (artifacts / "production" / "shop").resolve() == good.resolve()


def test_promote_answers_422_with_the_gates_reason_and_504_past_the_timeout(tmp_path):
    settings = _settings(tmp_path)
    (settings.artifacts_dir / "unevaluated").mkdir(parents=True)
    good = _bundle(settings.artifacts_dir / "good", record(_values(0.2)))
    with _no_model_app(settings) as client:
        broken = client.post("/v1/admin/promote", json={"bundle": "unevaluated"}, headers=ADMIN)
    assert broken.status_code == 422
    assert broken.json()["error"].startswith("cannot promote unevaluated: ")
    assert "has no evaluation.json" in broken.json()["error"]
    hurried = _settings(tmp_path, admin_promote_timeout_s=0.01)
    with _no_model_app(hurried) as client:
        late = client.post("/v1/admin/promote", json={"bundle": "good"}, headers=ADMIN)
    assert late.status_code == 504 and "admin_promote_timeout_s" in late.json()["error"]
    assert not (settings.artifacts_dir / "production" / "shop").is_symlink()
    assert good.exists()


def test_deletion_routes_need_a_store(tmp_path):
    with _no_model_app(_settings(tmp_path)) as client:
        reply = client.delete("/v1/admin/users/u1", headers=ADMIN)
    assert reply.status_code == 503 and "no session store" in reply.json()["error"]


# ------------------------------------------------------------------------------ integration


@pytest.fixture
def redis_url(tmp_path):
    port = free_port()
    server = redis_server(port, tmp_path).start()  # raises (fails the test) if it cannot start
    yield f"redis://127.0.0.1:{port}/0"
    server.stop()


def _all_keys(store: SessionStore) -> list[str]:
    return sorted(k.decode() for k in store.client.scan_iter(match="*", count=1000))


def _fill(store: SessionStore, user: str | None, session: str) -> None:
    events = [
        (f"{session}-{k}", HistoryEvent(item, kind, 1569890000.0 + 60 * k), "desktop")
        for k, (item, kind) in enumerate(SESSION)
    ]
    store.append_events(session, events, [user] if user else ())
    store.put_vector(session, "v1", np.ones(4, dtype=np.float32), "3")
    store.put_rail(session, "v1", "homepage_hero", {"marker": "3", "items": []})


@pytest.mark.integration
def test_deleting_a_user_removes_every_key_of_theirs(tmp_path, redis_url):
    store = SessionStore(redis_url, 2.0, 50, 3600, 300)
    for session in ("a1", "a2"):
        _fill(store, "alice", session)
    _fill(store, "bob", "b1")
    _fill(store, None, "*")  # a guest whose session id is a glob pattern
    store.put_catalogue_update("1005115", 9.99, 0)
    assert store.user_sessions("alice") == ["a1", "a2"]
    settings = _settings(tmp_path, rate_limit_per_s=0)
    settings = settings.model_copy(
        update={"serving": settings.serving.model_copy(update={"redis_url": redis_url})}
    )
    service = RailService(settings, None, store, None, Metrics())
    with TestClient(create_app(settings, service)) as client:
        reply = client.delete("/v1/admin/users/alice", headers=ADMIN)
        again = client.delete("/v1/admin/users/alice", headers=ADMIN)
        guest = client.delete("/v1/admin/sessions/*", headers=ADMIN)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["sessions"] == 2 and sorted(body["session_ids"]) == ["a1", "a2"]
    # per session: events, seen, n, vector, rail; plus alice's session set
    assert body["keys"] == {"events": 2, "seen": 2, "n": 2, "vec": 2, "rail": 2, "user_sessions": 1}
    assert body["keys_deleted"] == 11
    assert again.json()["keys_deleted"] == 0
    keys = _all_keys(store)
    assert not [k for k in keys if "{s:a1}" in k or "{s:a2}" in k or "{u:alice}" in k]
    assert len([k for k in keys if "{s:b1}" in k]) == 5 and "rt:{u:bob}:sessions" in keys
    # "*" deleted only the session named "*", not everyone's
    assert guest.json()["keys_deleted"] == 5
    assert not [k for k in _all_keys(store) if "{s:*}" in k]
    assert len([k for k in _all_keys(store) if "{s:b1}" in k]) == 5


@pytest.mark.integration
def test_every_key_the_store_writes_has_a_ttl(redis_url):
    store = SessionStore(redis_url, 2.0, 50, 3600, 300)
    _fill(store, "carol", "c1")
    _fill(store, "carol", "c2")
    store.append_events("c1", [("c1-0", HistoryEvent("x", "view", 1.0), None)], ["carol"])
    store.put_catalogue_update("1005115", 9.99, 0)
    store.put_catalogue_update("1005115", 8.99, 3)
    keys = _all_keys(store)
    assert {"rt:{catalogue}:items", "rt:{catalogue}:version", "rt:{u:carol}:sessions"} <= set(keys)
    assert len(keys) == 13
    ttls = {k: store.client.ttl(k) for k in keys}
    assert all(ttl > 0 for ttl in ttls.values()), ttls
    assert ttls["rt:{s:c1}:rail:v1:homepage_hero"] <= 300 < ttls["rt:{s:c1}:events"]
    # the catalogue is product state: it outlives the session data by default (30 days)
    assert ttls["rt:{catalogue}:items"] > 3600 and ttls["rt:{catalogue}:version"] > 3600
    # the catalogue version only moves forward, so a process never misses a change
    version, changes = store.catalogue_changes(0)
    assert version > 0 and changes["1005115"] == {"price": 8.99, "stock": 3}
    store.put_catalogue_update("1005115", 7.99, 3)
    assert store.catalogue_changes(version)[0] > version


@pytest.mark.integration
def test_a_price_only_change_keeps_the_items_last_stock(redis_url):
    store = SessionStore(redis_url, 2.0, 50, 3600, 300)
    store.put_catalogue_update("out", 9.99, 0)
    store.put_catalogue_update("out", 8.49, None)  # a price change says nothing of stock
    store.put_catalogue_update("back", None, 0)
    store.put_catalogue_update("back", None, 4)
    _, changes = store.catalogue_changes(0)
    # a process polling (or replaying at a hot swap) after both still sees it out of stock
    assert changes["out"] == {"price": 8.49, "stock": 0}
    assert changes["back"] == {"price": None, "stock": 4}


@pytest.mark.integration
def test_the_price_stream_expires_after_the_long_window_refreshed_by_each_append(
    tmp_path, redis_url
):
    settings = _settings(tmp_path)
    store = SessionStore(redis_url, 2.0, 50, 3600, 300)
    service = RailService(settings, None, store, None, Metrics())
    assert service.prices is not None
    prices = service.prices.store
    window = round(settings.ranking.prices.long_window_h * 3600)  # 28 days by default
    assert prices.points_ttl_s == price_points_ttl_s(settings) == window
    assert prices.append([PricePoint("p1", "1005115", 1569890000.0, 9.99)]) == 1
    assert window - 5 <= store.client.ttl(POINTS_KEY) <= window
    store.client.expire(POINTS_KEY, 100)  # as if idle for most of the window
    assert prices.append([PricePoint("p1", "1005115", 1569890000.0, 9.99)]) == 0
    assert store.client.ttl(POINTS_KEY) <= 100  # a redelivered point extends nothing
    assert prices.append([PricePoint("p2", "1005115", 1569890060.0, 8.99)]) == 1
    assert store.client.ttl(POINTS_KEY) > window - 5  # a new point: a full window again
    # an idle shop's stream goes: here after one second without a new point
    short = PriceStore(store.client, 1000, seen_ttl_s=60, points_ttl_s=1)
    store.client.delete(POINTS_KEY)
    assert short.append([PricePoint("p3", "1005115", 1569890120.0, 7.99)]) == 1
    deadline = time.monotonic() + 5
    while store.client.exists(POINTS_KEY) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not store.client.exists(POINTS_KEY)


def _text_dict(reply) -> dict[str, str]:  # type: ignore[no-untyped-def]
    def text(x) -> str:  # type: ignore[no-untyped-def]
        return x.decode() if isinstance(x, bytes) else str(x)

    return {text(k): text(v) for k, v in reply.items()}


@pytest.mark.integration
def test_the_local_redis_has_maxmemory_and_evicts_nearest_expiry_first(tmp_path, redis_url):
    store = SessionStore(redis_url, 2.0, 50, 3600, 300)
    config = _text_dict(store.client.config_get("maxmemory*"))
    mb = load_settings(artifacts_dir=tmp_path).serving.redis_maxmemory_mb
    assert mb == 512
    assert config["maxmemory"] == str(mb * 1024 * 1024)
    assert config["maxmemory-policy"] == "volatile-ttl"
    assert config["maxmemory-samples"] == "10"
    port = free_port()
    unlimited = redis_server(port, tmp_path / "unlimited", maxmemory_mb=0).start()
    try:
        other = SessionStore(f"redis://127.0.0.1:{port}/0", 2.0, 50, 3600, 300)
        assert _text_dict(other.client.config_get("maxmemory")) == {"maxmemory": "0"}
    finally:
        unlimited.stop()


@pytest.mark.integration
def test_publish_invalidates_pre_warmed_rails(model, tmp_path, redis_url):
    settings, bundle = _model_settings(model, tmp_path, redis_url=redis_url)
    store = SessionStore(redis_url, 2.0, 50, 3600, 300)
    _fill(store, "dana", "d1")
    service = _served(settings, bundle, store)
    ask = {"session_id": "d1", "slots": 8}
    with TestClient(create_app(settings, service)) as client:
        computed = client.post("/v1/rails/homepage_hero", json=ask).json()
        cached = client.post("/v1/rails/homepage_hero", json=ask).json()
        blocked = cached["items"][2]["item_id"]
        text = _rules({"kind": "block", "item_id": blocked}, name="pull")
        assert client.post("/v1/admin/rules", content=text, headers=ADMIN).status_code == 200
        after = client.post("/v1/rails/homepage_hero", json=ask).json()
        again = client.post("/v1/rails/homepage_hero", json=ask).json()
    assert computed["served_by"] == "computed" and cached["served_by"] == "cache"
    assert after["served_by"] == "computed"  # the rail warmed under the old rules is not served
    assert blocked not in [i["item_id"] for i in after["items"]] and len(after["items"]) == 8
    assert again["served_by"] == "cache" and again["items"] == after["items"]
    assert all(store.client.ttl(k) > 0 for k in _all_keys(store))
