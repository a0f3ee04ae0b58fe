"""The API's request thread pool (serving.request_threads): the shipped size against anyio's
default of 40, on the same app, interleaved.

Usage:
    python benchmarks/request_threads.py --bundle artifacts/<run>-rees46-rails

Starts Redis and one API process per pool size (uvicorn, the shipped settings otherwise, no
Triton: single requests are encoded in process), seeds synthetic sessions, warms every
session's homepage rail, then runs rounds A B A B...: per round and arm, cached homepage
reads at concurrency 16, computed pdp_fbt rails at concurrency 16 and 20 (the rails API
benchmark's 5x spike), and an open loop at `--rate`. The first round warms the computed
path and is reported but left out of the medians. Writes
`reports/benchmarks/request_threads.json` and `.md`.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.rails_api import (
    closed_loop,
    command_line,
    git_revision,
    open_loop,
    pdp_bodies,
    synthetic_sessions,
    warm_cache,
)
from benchmarks.report import write_report
from devstack.local_services import (
    LocalServer,
    api_command,
    free_port,
    load_test_env,
    redis_server,
)
from railtower.settings import load_settings
from serving.rail_service import load_rails
from state.session_store import SessionStore

# what each round measures in closed loop: (name, rail bodies, concurrency)
STEPS = (("cached c16", "hero", 16), ("computed c16", "pdp", 16), ("computed c20", "pdp", 20))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--threads", type=int, nargs="+", default=None, help="default: shipped, 40")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="per closed-loop step")
    parser.add_argument("--rate", type=float, default=88.0, help="open-loop pdp_fbt req/s")
    return parser.parse_args()


def start_apis(
    bundle: Path, threads: list[int], work: Path
) -> tuple[list[LocalServer], dict[int, str], str]:
    """Redis and one API per pool size; returns the servers, each API's base URL, Redis's."""
    redis_port = free_port()
    servers = [redis_server(redis_port, work).start()]
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    env = load_test_env(bundle, redis_url, serving__prewarm_ttl_s=3600)
    bases = {}
    for n in threads:
        port = free_port()
        api_env = env | {"RAILTOWER_SERVING__REQUEST_THREADS": str(n)}
        servers.append(LocalServer(f"api-{n}", api_command(port), port, work, api_env, 120).start())
        bases[n] = f"http://127.0.0.1:{port}"
    for base in bases.values():
        while httpx.get(f"{base}/readyz", timeout=5).status_code != 200:
            time.sleep(0.5)
    return servers, bases, redis_url


def one_round(base: str, bodies: dict[str, list], args: argparse.Namespace) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for name, rail, concurrency in STEPS:
        measured = asyncio.run(closed_loop(base, bodies[rail], concurrency, args.seconds))
        row[name] = {k: measured[k] for k in ("throughput_rps", "p50", "p99", "degraded_share")}
    measured = asyncio.run(open_loop(base, bodies["pdp"], args.rate, 1.5 * args.seconds))
    row["open loop"] = {k: measured[k] for k in ("achieved_rps", "p50", "p99", "degraded_share")}
    return row


def summary(rounds: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per step, the median over the rounds after the first (the warm-up)."""
    kept = rounds[1:] or rounds
    return {
        step: {k: float(np.median([r[step][k] for r in kept])) for k in kept[0][step]}
        for step in kept[0]
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Request thread pool ({result['bundle']})",
        "",
        f"Commit `{result['commit']}`; command `{result['command']}`. Medians over rounds "
        f"2..{result['rounds']} (round 1 warms the computed path); rounds interleaved A B A B.",
        "",
        "| threads | step | req/s | p50 ms | p99 ms | degraded |",
        "|---|---|---|---|---|---|",
    ]
    for threads, steps in result["summary"].items():
        for step, m in steps.items():
            rps = m.get("throughput_rps", m.get("achieved_rps", 0.0))
            lines.append(
                f"| {threads} | {step} | {rps:.0f} | {m['p50']:.1f} | {m['p99']:.1f} "
                f"| {m['degraded_share']:.1%} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    settings = load_settings(log_level="WARNING")
    bundle = args.bundle.resolve()
    threads = args.threads or [settings.serving.request_threads, 40]
    sessions = synthetic_sessions(load_rails(bundle, settings), 300)
    bodies = {
        "pdp": pdp_bodies(sessions),
        "hero": [("homepage_hero", {"session_id": f"b{n}"}) for n in range(len(sessions))],
    }
    servers, bases, redis_url = start_apis(bundle, threads, settings.cache_dir / "bench-threads")
    rounds: dict[int, list[dict[str, Any]]] = {n: [] for n in threads}
    try:
        store = SessionStore(redis_url, 2.0, 50, 3600, 3600)
        for n, history in enumerate(sessions):
            store.append_events(f"b{n}", [(f"b{n}-{k}", e, None) for k, e in enumerate(history)])
        for base in bases.values():
            asyncio.run(warm_cache(base, bodies["hero"], 20.0))
        for _ in range(args.rounds):
            for n, base in bases.items():
                rounds[n].append(one_round(base, bodies, args))
    finally:
        for server in reversed(servers):
            server.stop()
    result = {
        "bundle": bundle.name,
        "commit": git_revision(),
        "command": command_line(),
        "rounds": args.rounds,
        "raw": {str(n): r for n, r in rounds.items()},
        "summary": {str(n): summary(r) for n, r in rounds.items()},
    }
    write_report("request_threads", result, markdown(result))


if __name__ == "__main__":
    main()
