"""API replicas: several API processes over one real Redis answer the same rails.

`railtower serve` with serving.workers = 2 (two uvicorn workers sharing the port), and two
API processes behind Debian's nginx on loopback. Every replica loads the same trained
bundle and reads the same frozen session state from Redis; the rails each computes must
carry the same model version and the same items (the exploration slot is on, Thompson
sampling, seeded by the request and the state, so it must agree too). A uvicorn worker is
told apart by /healthz's X-Railtower-Pid header on the same connection; an nginx upstream
by the X-Railtower-Upstream header nginx adds. A server that cannot start fails the test.
"""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

from devstack.local_services import (
    LocalServer,
    ServiceError,
    api_command,
    api_worker_pids,
    free_port,
    nginx_config,
    nginx_proxy,
    redis_server,
)
from state.session_store import SessionStore
from towers.session_features import HistoryEvent

SESSION = [("1005115", "view"), ("1004767", "view"), ("1005105", "cart")]
RAILS = [
    ("homepage_hero", {"session_id": "frozen", "slots": 8}),
    ("pdp_fbt", {"session_id": "frozen", "item_id": "1004767", "slots": 8}),
    ("cart_upsell", {"session_id": "frozen", "cart": ["1005105"], "slots": 8}),
]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    port = free_port()
    server = redis_server(port, tmp_path_factory.mktemp("redis")).start()
    url = f"redis://127.0.0.1:{port}/0"
    store = SessionStore(url, 2.0, 50, 3600, 3600)
    store.append_events(
        "frozen",
        [
            (f"frozen-{k}", HistoryEvent(item, kind, 1569890000.0 + 60 * k), "desktop")
            for k, (item, kind) in enumerate(SESSION)
        ],
    )
    yield url
    server.stop()


@pytest.fixture(scope="module")
def api_env(trained_rees46, redis_url) -> dict[str, str]:
    settings, bundle = trained_rees46
    return {
        "RAILTOWER_SERVING__BUNDLE": str(bundle),
        "RAILTOWER_ARTIFACTS_DIR": str(settings.artifacts_dir),
        "RAILTOWER_REPORTS_DIR": str(settings.reports_dir),
        "RAILTOWER_SERVING__REDIS_URL": redis_url,
        "RAILTOWER_SERVING__TRITON_URL": "",
        "RAILTOWER_SERVING__TRITON_REPOSITORY": str(settings.serving.triton_repository),
        # budgets far above any stage: a budget that trips would change the items, and
        # these tests assert what replicas answer, never how fast
        "RAILTOWER_SERVING__BUDGETS__REDIS_MS": "2000",
        "RAILTOWER_SERVING__BUDGETS__USER_VECTOR_MS": "5000",
        "RAILTOWER_SERVING__BUDGETS__RANKER_MS": "5000",
        "RAILTOWER_SERVING__BUDGETS__ADMISSION_MS": "5000",
        "RAILTOWER_RANKING__EXPLORATION__SLOT": "2",
        "RAILTOWER_RANKING__EXPLORATION__POLICY": "thompson",
        "RAILTOWER_LOG_LEVEL": "WARNING",
        # behind nginx the shopper is the X-Real-IP nginx sets, not nginx's own address
        "RAILTOWER_SECURITY__TRUSTED_PROXY_HEADER": "X-Real-IP",
        # load test: one client is many shoppers (up to 300 probes of every rail from this
        # one test); the per-client rate limit (on by default) is off
        "RAILTOWER_SECURITY__RATE_LIMIT_PER_S": "0",
    }


Answer = tuple[str, tuple[str, ...]]  # (model_version, item ids)
Answers = dict[str, set[Answer]]  # every distinct answer one replica gave, per rail


def _ask(client: httpx.Client, rail: str, body: dict) -> tuple[httpx.Response, Answer]:
    reply = client.post(f"/v1/rails/{rail}", json=body)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    assert data["reasons"] == [], data["reasons"]  # a degraded answer would differ
    return reply, (data["model_version"], tuple(i["item_id"] for i in data["items"]))


def _assert_same_answers(by_replica: dict[str, Answers]) -> None:
    assert len(by_replica) == 2, f"answers from {sorted(by_replica)}; expected two replicas"
    for rail, _ in RAILS:
        assert all(replica[rail] for replica in by_replica.values()), f"{rail}: not from both"
        answers = set().union(*(replica[rail] for replica in by_replica.values()))
        assert len(answers) == 1, f"{rail}: replicas answered differently: {answers}"
        ((version, items),) = answers
        assert version == "api-rees46-rails"
        assert len(items) == 8 == len(set(items))


def test_api_command_adds_workers_only_above_one():
    assert "--workers" not in api_command(8000)
    command = api_command(8000, workers=3)
    assert command[command.index("--workers") + 1] == "3"
    with pytest.raises(ServiceError, match="at least 1"):
        api_command(8000, workers=0)


def test_nginx_config_balances_the_api_ports_on_loopback(tmp_path):
    text = nginx_config(9000, [9001, 9002], tmp_path)
    assert "listen 127.0.0.1:9000;" in text and "daemon off;" in text
    assert "server 127.0.0.1:9001;" in text and "server 127.0.0.1:9002;" in text
    assert f"pid {tmp_path / 'nginx.pid'};" in text  # nothing written outside the workdir
    # the API learns who the shopper is: nginx overwrites any X-Real-IP the client sent
    assert "proxy_set_header X-Real-IP $remote_addr;" in text
    assert "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;" in text
    with pytest.raises(ServiceError, match="at least one API port"):
        nginx_config(9000, [], tmp_path)


@pytest.mark.integration
def test_shoppers_behind_nginx_get_their_own_rate_limit_buckets(tmp_path):
    """Real nginx in front of an API process with no model (its rails answer 503, after the
    rate limit). Shoppers connect from their own loopback addresses, nginx from 127.0.0.1
    (the one trusted proxy): each shopper has its own bucket, and an X-Real-IP a shopper
    sends cannot take another's. Without the proxy header every shopper would be nginx."""
    api_port, proxy = free_port(), free_port()
    env = {
        "RAILTOWER_ARTIFACTS_DIR": str(tmp_path / "artifacts"),  # no bundle: no model
        "RAILTOWER_SERVING__REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",  # nothing there
        "RAILTOWER_SERVING__TRITON_URL": "",
        "RAILTOWER_SECURITY__TRUSTED_PROXY_HEADER": "X-Real-IP",
        "RAILTOWER_SECURITY__RATE_LIMIT_PER_S": "0.001",
        "RAILTOWER_SECURITY__RATE_LIMIT_BURST": "1",
        "RAILTOWER_LOG_LEVEL": "WARNING",
    }
    servers = [LocalServer("api", api_command(api_port), api_port, tmp_path, env, 180).start()]
    try:
        servers.append(nginx_proxy(proxy, [api_port], tmp_path / "nginx").start())

        def ask(shopper: str, headers: dict[str, str] | None = None) -> httpx.Response:
            transport = httpx.HTTPTransport(local_address=shopper)
            with httpx.Client(transport=transport, timeout=30) as client:
                url = f"http://127.0.0.1:{proxy}/v1/rails/homepage_hero"
                return client.post(url, json={"session_id": "s"}, headers=headers)

        ann, bob, eve = ask("127.0.0.2"), ask("127.0.0.3"), ask("127.0.0.4")
        ann_again = ask("127.0.0.2")
        eve_renamed = ask("127.0.0.4", {"X-Real-IP": "127.0.0.5"})
    finally:
        for server in reversed(servers):
            server.stop()
    assert [ann.status_code, bob.status_code, eve.status_code] == [503, 503, 503]
    assert ann_again.status_code == 429 and "client 127.0.0.2:" in ann_again.json()["error"]
    assert eve_renamed.status_code == 429 and "client 127.0.0.4:" in eve_renamed.json()["error"]


@pytest.mark.integration
def test_two_uvicorn_workers_serve_the_same_rails(api_env, tmp_path):
    port = free_port()
    railtower = Path(sys.executable).parent / "railtower"
    env = {**api_env, "RAILTOWER_SERVING__WORKERS": "2", "RAILTOWER_SERVING__PORT": str(port)}
    server = LocalServer("serve", [str(railtower), "serve"], port, tmp_path, env, 180).start()
    base = f"http://127.0.0.1:{port}"
    try:
        pids = api_worker_pids(base, 2, timeout_s=240)
        assert server.process is not None and server.process.pid not in pids  # forked workers
        by_pid: dict[str, Answers] = {}
        for _ in range(300):  # the kernel picks the worker per connection: probe until both
            with httpx.Client(base_url=base, timeout=30) as client:  # one connection
                pid = client.get("/healthz").headers["X-Railtower-Pid"]
                answers = by_pid.setdefault(pid, {rail: set() for rail, _ in RAILS})
                for rail, body in RAILS:  # the same connection: the same worker
                    answers[rail].add(_ask(client, rail, body)[1])
            if len(by_pid) == 2:
                break
    finally:
        server.stop()
    assert set(by_pid) == {str(p) for p in pids}
    _assert_same_answers(by_pid)


@pytest.mark.integration
def test_two_api_processes_behind_nginx_serve_the_same_rails(api_env, tmp_path):
    ports = [free_port(), free_port()]
    servers = [
        LocalServer(f"api-{n}", api_command(p), p, tmp_path, api_env, 180).start()
        for n, p in enumerate(ports)
    ]
    proxy = free_port()
    try:
        servers.append(nginx_proxy(proxy, ports, tmp_path / "nginx").start())
        base = f"http://127.0.0.1:{proxy}"
        api_worker_pids(base, 2, timeout_s=240)  # both upstreams have loaded the model
        by_upstream: dict[str, Answers] = {}
        with httpx.Client(base_url=base, timeout=30) as client:
            for _ in range(4):  # round robin per request: each rail reaches both, in turn
                for rail, body in RAILS:
                    reply, answer = _ask(client, rail, body)
                    upstream = reply.headers["X-Railtower-Upstream"]
                    answers = by_upstream.setdefault(upstream, {r: set() for r, _ in RAILS})
                    answers[rail].add(answer)
    finally:
        for server in reversed(servers):
            server.stop()
    assert set(by_upstream) == {f"127.0.0.1:{p}" for p in ports}
    _assert_same_answers(by_upstream)
