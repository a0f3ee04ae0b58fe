"""The real serving stack on loopback for checks that talk to it over HTTP: Redis,
tritonserver and the API under uvicorn as its own process (settings through `RAILTOWER_…`
variables), started and stopped by PID through devstack.local_services.

Used by benchmarks/swap_under_load.py, tests/serving/test_swap_under_load.py and
tests/serving/test_api_fuzz.py. Each run serves from a private artifacts folder (the tower
bundle linked, the rails bundle copied), so what a run publishes, promotes or rolls back
never touches the project's artifacts.
"""

from __future__ import annotations

import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from devstack.local_services import (
    LocalServer,
    api_command,
    free_port,
    redis_server,
    triton_server,
)
from ranking.rails_bundle import link_tower_bundle
from serving.user_vectors import TritonUserTower


def private_artifacts(bundle: Path, source_artifacts: Path, root: Path) -> tuple[Path, Path]:
    """`root/artifacts` holding a copy of rails bundle `bundle` and a link to the tower
    bundle it names (read only, so a link is enough); returns (artifacts, the copy)."""
    artifacts = root / "artifacts"
    artifacts.mkdir(parents=True)
    link_tower_bundle(bundle, source_artifacts, artifacts)
    copy = artifacts / bundle.name
    shutil.copytree(bundle, copy)
    return artifacts, copy


@dataclass
class Stack:
    """Redis, tritonserver and the API on loopback, started and stopped by us."""

    base: str
    redis_url: str
    admin_key: str
    servers: list[LocalServer] = field(default_factory=list)

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.stop()


def start_stack(
    artifacts: Path,
    triton_repository: Path | None,
    work: Path,
    bundle: Path | None = None,
    dataset: str = "rees46",
) -> Stack:
    """Start the servers and wait until the API is ready.

    Args:
        artifacts: the API's artifacts_dir.
        triton_repository: the model repository; None: no tritonserver (no towers).
        work: logs and PID files.
        bundle: serve this bundle, fixed; None: follow the production pointer of `dataset`
            (checked every 0.5 s, so a promotion or rollback takes effect at once).

    Budgets are far above any stage: a reply must be the model's answer, not a degraded one.
    The admin key is random per stack (`Stack.admin_key`).

    Raises:
        ServiceError: a server did not start (the log tail says why).
    """
    stack = Stack("", "", secrets.token_hex(16))
    try:
        redis_port = free_port()
        stack.servers.append(redis_server(redis_port, work).start())
        stack.redis_url = f"redis://127.0.0.1:{redis_port}/0"
        env = _api_env(artifacts, stack, dataset, bundle)
        if triton_repository is not None:
            env["RAILTOWER_SERVING__TRITON_URL"] = _start_triton(stack, triton_repository, work)
            # requests encode through Triton too, so killing it is felt on the request path
            env["RAILTOWER_SERVING__REQUEST_ENCODER"] = "triton"
        api_port = free_port()
        api = LocalServer("api", api_command(api_port), api_port, work, env, 180.0)
        stack.servers.append(api.start())
        stack.base = f"http://127.0.0.1:{api_port}"
        wait_ready(stack.base, 120.0)
    except BaseException:
        stack.stop()
        raise
    return stack


def _api_env(artifacts: Path, stack: Stack, dataset: str, bundle: Path | None) -> dict[str, str]:
    env = {
        "RAILTOWER_ARTIFACTS_DIR": str(artifacts),
        "RAILTOWER_SERVING__DATASET": dataset,
        "RAILTOWER_SERVING__REDIS_URL": stack.redis_url,
        "RAILTOWER_SERVING__TRITON_URL": "",
        "RAILTOWER_SERVING__RELOAD_INTERVAL_S": "0.5",
        "RAILTOWER_SERVING__BUDGETS__REDIS_MS": "2000",
        "RAILTOWER_SERVING__BUDGETS__USER_VECTOR_MS": "5000",
        "RAILTOWER_SERVING__BUDGETS__RANKER_MS": "5000",
        "RAILTOWER_SERVING__BUDGETS__ADMISSION_MS": "5000",
        "RAILTOWER_SECURITY__ADMIN_API_KEY": stack.admin_key,
        # load test: one client is many shoppers (the swap-under-load clients and the fuzzer,
        # all from loopback); the per-client rate limit (on by default) is off
        "RAILTOWER_SECURITY__RATE_LIMIT_PER_S": "0",
        # impressions stay in the process: no broker is part of these checks
        "RAILTOWER_SHADOW__SINK": "memory",
        "RAILTOWER_LOG_LEVEL": "WARNING",
    }
    if bundle is not None:
        env["RAILTOWER_SERVING__BUNDLE"] = str(bundle)
    return env


def _start_triton(stack: Stack, repository: Path, work: Path) -> str:
    grpc = free_port()
    stack.servers.append(triton_server(repository, grpc, free_port(), work).start())
    url = f"127.0.0.1:{grpc}"
    client = TritonUserTower(url, "user_tower", 5.0)
    deadline = time.monotonic() + 90
    while not client.ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"tritonserver at {url} never served user_tower; see {work}")
        time.sleep(0.2)
    return url


def wait_ready(base: str, timeout_s: float) -> dict[str, Any]:
    """/readyz's answer once it is 200 (raises RuntimeError after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            reply = httpx.get(f"{base}/readyz", timeout=5)
            if reply.status_code == 200:
                return dict(reply.json())
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the API at {base} was not ready after {timeout_s} s")
        time.sleep(0.2)
