"""API replicas: 1 uvicorn worker vs 2 workers vs 2 API processes behind nginx, same load.

Usage:
    python -m benchmarks.api_replicas --bundle artifacts/<run>-rees46-rails [--artifacts DIR]
    python -m benchmarks.api_replicas            # the production bundle of serving.dataset
    python -m benchmarks.api_replicas --quick    # short rows: checks the script works

In one run, with one real Redis this script starts and stops, and the same seeded sessions:

1. one API process, 1 uvicorn worker;
2. one API process, 2 uvicorn workers sharing the port (serving.workers = 2);
3. two API processes of 1 worker on their own ports behind Debian's nginx on loopback
   (skipped, and said so, when nginx is not installed).

Each replica loads the bundle itself and reads session state from the same Redis. The
request mix is the computed path only, pdp_fbt and cart_upsell alternating for the same
sessions: those rails are never cached, so every configuration does the same work per
request (a pre-warmed homepage rail is a Redis read; see rails_api.py). Session vectors are
encoded in process (no Triton), so the API is the only thing scaled. The load generator is
rails_api's closed loop; throughput and p50/p99 per concurrency, ratios vs 1 worker.
Writes `reports/benchmarks/api_replicas.json` and `.md`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from benchmarks.rails_api import _head, _row, closed_loop, synthetic_sessions
from benchmarks.report import write_report
from devstack.local_services import (
    LocalServer,
    ServiceError,
    api_command,
    api_worker_pids,
    free_port,
    nginx_proxy,
    redis_server,
)
from railtower.settings import load_settings
from serving.app import production_pointer
from serving.rail_service import load_rails
from state.session_store import SessionStore

CONFIGS = ("1 worker", "2 workers", "2 processes + nginx")


def request_mix(sessions: list) -> list[tuple[str, dict]]:  # type: ignore[type-arg]
    """pdp_fbt and cart_upsell for every session, alternating (both always computed)."""
    bodies: list[tuple[str, dict]] = []
    for n, history in enumerate(sessions):
        bodies.append(("pdp_fbt", {"session_id": f"r{n}", "item_id": history[-1].item_id}))
        bodies.append(("cart_upsell", {"session_id": f"r{n}", "cart": [history[0].item_id]}))
    return bodies


def start_config(name: str, env: dict[str, str], work: Path) -> tuple[list[LocalServer], str, int]:
    """Start one configuration; (servers, base URL, replicas expected)."""
    if name == "1 worker":
        port = free_port()
        return [_api("api-1w", port, 1, env, work)], f"http://127.0.0.1:{port}", 1
    if name == "2 workers":
        port = free_port()
        return [_api("api-2w", port, 2, env, work)], f"http://127.0.0.1:{port}", 2
    ports = [free_port(), free_port()]
    servers = [_api(f"api-p{n}", p, 1, env, work) for n, p in enumerate(ports)]
    try:
        proxy = free_port()
        servers.append(nginx_proxy(proxy, ports, work / "nginx").start())
    except ServiceError:
        for server in servers:
            server.stop()
        raise
    return servers, f"http://127.0.0.1:{proxy}", 2


def _api(name: str, port: int, workers: int, env: dict[str, str], work: Path) -> LocalServer:
    return LocalServer(name, api_command(port, workers=workers), port, work, env, 180).start()


def replicas_seen(base: str, requests: int) -> dict[str, int]:
    """Which replica answered each of `requests` fresh-connection /healthz probes."""
    seen: Counter[str] = Counter()
    for _ in range(requests):
        with httpx.Client(base_url=base, timeout=5) as client:
            seen[client.get("/healthz").headers["X-Railtower-Pid"]] += 1
    return dict(seen)


def cpu_seconds(groups: list[int]) -> float:
    """CPU seconds (user + system) used so far by every process in these process groups
    (LocalServer starts each server as its own group: uvicorn workers, nginx workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for proc in Path("/proc").iterdir():
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # not a process, or it ended while being read
        if int(fields[2]) in groups:  # fields after the name: state, ppid, pgrp, ...
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def measured_row(
    base: str, bodies: list[tuple[str, dict]], concurrency: int, seconds: float, groups: list[int]
) -> dict[str, Any]:
    """One closed-loop row, with the cores the servers and this load generator used."""
    servers, own = cpu_seconds(groups), time.process_time()
    started = time.perf_counter()
    row = asyncio.run(closed_loop(base, bodies, concurrency, seconds))
    elapsed = time.perf_counter() - started
    row["rails_per_s"] = row["throughput_rps"]  # the name scripts/capacity_model.py reads
    row["server_cores"] = (cpu_seconds(groups) - servers) / elapsed
    row["loadgen_cores"] = (time.process_time() - own) / elapsed
    return row


def run_config(name: str, env: dict[str, str], work: Path, bodies: list, args) -> dict[str, Any]:  # type: ignore[no-untyped-def, type-arg]
    servers, base, replicas = start_config(name, env, work)
    try:
        pids = api_worker_pids(base, replicas)
        asyncio.run(closed_loop(base, bodies, 2 * replicas, args.warmup))  # not measured
        groups = [args.redis_pid] + [server.process.pid for server in servers]  # type: ignore[union-attr]
        rows = [measured_row(base, bodies, c, args.seconds, groups) for c in args.concurrency]
        spread = replicas_seen(base, 40)
    finally:
        for server in reversed(servers):
            server.stop()
    return {"config": name, "replicas": len(pids), "healthz_by_pid": spread, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None, help="a rails bundle")
    parser.add_argument("--artifacts", type=Path, help="artifacts_dir its tower bundle is in")
    parser.add_argument("--seconds", type=float, default=10.0, help="per load row")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--sessions", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="2 s rows: checks it works")
    args = parser.parse_args()
    args.warmup = 3.0
    if args.quick:
        args.seconds, args.concurrency, args.sessions, args.warmup = 2.0, [4], 60, 1.0
    settings = load_settings(log_level="WARNING")
    bundle = (args.bundle or production_pointer(settings)).resolve()
    artifacts = (args.artifacts or bundle.parent).resolve()
    settings = load_settings(artifacts_dir=artifacts, log_level="WARNING")
    loaded = load_rails(bundle, settings)
    sessions = synthetic_sessions(loaded, args.sessions)
    bodies = request_mix(sessions)
    work = settings.cache_dir / "bench-api-replicas"
    redis_port = free_port()
    redis = redis_server(redis_port, work).start()
    args.redis_pid = redis.process.pid  # type: ignore[union-attr]
    env = {
        "RAILTOWER_SERVING__BUNDLE": str(bundle),
        "RAILTOWER_ARTIFACTS_DIR": str(artifacts),
        "RAILTOWER_SERVING__REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "RAILTOWER_SERVING__TRITON_URL": "",
        "RAILTOWER_LOG_LEVEL": "WARNING",
        # behind nginx the shopper is the X-Real-IP nginx sets, not nginx's own address
        "RAILTOWER_SECURITY__TRUSTED_PROXY_HEADER": "X-Real-IP",
        # load test: one client is many shoppers; the per-client rate limit
        # (on by default) is off
        "RAILTOWER_SECURITY__RATE_LIMIT_PER_S": "0",
    }
    result: dict[str, Any] = {
        "bundle": loaded.version,
        "quick": args.quick,
        "seconds_per_row": args.seconds,
        "mix": "pdp_fbt + cart_upsell, computed, in-process session encoder",
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        },
        "configs": [],
        "skipped": {},
    }
    del loaded  # the replicas load their own copy; this one only drew the sessions
    try:
        store = SessionStore(env["RAILTOWER_SERVING__REDIS_URL"], 2.0, 50, 3600, 3600)
        for n, history in enumerate(sessions):
            store.append_events(f"r{n}", [(f"r{n}-{k}", e, None) for k, e in enumerate(history)])
        for name in CONFIGS:
            try:
                result["configs"].append(run_config(name, env, work, bodies, args))
            except ServiceError as exc:
                if name != CONFIGS[-1]:
                    raise  # the workers are the point; only the nginx option may be missing
                result["skipped"][name] = str(exc)
    finally:
        redis.stop()
    write_report("api_replicas", result, markdown(result))


def markdown(r: dict[str, Any]) -> str:
    cpus = r["machine"]["cpus"]
    lines = [
        f"# API replicas ({r['bundle']}, {cpus} CPUs)",
        "",
        f"{r['mix']}; closed loop, {r['seconds_per_row']:g} s per row; one Redis; ratios vs "
        "1 worker at the same concurrency, same run."
        + (" QUICK run: not a measurement." if r["quick"] else ""),
        "",
    ]
    lines += _head(
        [
            "config",
            "replicas",
            "concurrency",
            "req/s",
            "p50 ms",
            "p99 ms",
            "req/s vs 1 worker",
            "p99 vs 1 worker",
            "server + Redis cores",
            "load-gen cores",
            "degraded",
            "errors",
        ]
    )
    base = {row["concurrency"]: row for row in r["configs"][0]["rows"]}
    for config in r["configs"]:
        for row in config["rows"]:
            ref = base[row["concurrency"]]
            lines.append(
                _row(
                    [
                        config["config"],
                        config["replicas"],
                        row["concurrency"],
                        f"{row['throughput_rps']:.1f}",
                        f"{row['p50']:.1f}",
                        f"{row['p99']:.1f}",
                        f"{row['throughput_rps'] / ref['throughput_rps']:.2f}x",
                        f"{row['p99'] / ref['p99']:.2f}x",
                        f"{row['server_cores']:.2f}",
                        f"{row['loadgen_cores']:.2f}",
                        f"{row['degraded_share']:.1%}",
                        row["errors"],
                    ]
                )
            )
    for name, why in r["skipped"].items():
        lines += ["", f"{name}: skipped ({why.splitlines()[0]})"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
