"""What `explain=true` costs: per rail, HTTP latency with explain off vs on, in the same run.

Usage:
    python benchmarks/explain_cost.py --bundle artifacts/<run>-rees46-rails
    python benchmarks/explain_cost.py --quick      # a few requests, to check it works

Starts a real Redis and the API under uvicorn (its own process, in-process session encoder:
Triton's cost is the same with or without the flag), seeds sessions of the bundle's popular
items, and sends, one at a time, pairs of identical requests that differ only in `explain`
(the order within a pair alternates, so a busy machine weighs on both arms alike). The hero
rail is measured twice: computed (each arm on its own copy of a session, whose first request
computes it) and from the pre-warmed cache (the same sessions again). Reports client p50 /
p99 per rail and arm, the ratio, and the response size. Writes
`reports/benchmarks/explain_cost.json` and `explain_cost.md`.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.rails_api import percentiles, synthetic_sessions
from benchmarks.report import write_report
from devstack.local_services import (
    LocalServer,
    api_command,
    free_port,
    load_test_env,
    redis_server,
)
from railtower.settings import load_settings
from serving.app import production_pointer
from serving.rail_service import load_rails
from state.session_store import SessionStore
from towers.session_features import HistoryEvent

RAILS = ("homepage_hero", "homepage_hero (cached)", "pdp_fbt", "cart_upsell", "deals_for_you")


BENCH_KEY = "explain-cost-benchmark-key-0123456789"


def request_for(rail: str, n: int, history: list[HistoryEvent], explain: bool) -> tuple[str, dict]:
    """(route rail, body) of request `n`; each hero arm reads its own copy of the session."""
    if rail.startswith("homepage_hero"):
        return "homepage_hero", {"session_id": f"{'e' if explain else 'p'}{n}", "explain": explain}
    body: dict[str, object] = {"session_id": f"p{n}", "explain": explain}
    if rail == "pdp_fbt":
        body["item_id"] = history[-1].item_id
    elif rail == "cart_upsell":
        body["cart"] = [history[-1].item_id]
    return rail, body


def measure(client: httpx.Client, histories: list[list[HistoryEvent]]) -> dict[str, Any]:
    """Per rail and arm: client latency, server total, response bytes, served_by counts."""
    out: dict[str, Any] = {}
    for rail in RAILS:
        arms: dict[str, dict[str, list]] = {
            arm: {"client": [], "server": [], "bytes": [], "served_by": []} for arm in ("off", "on")
        }
        for n, history in enumerate(histories):
            order = (False, True) if n % 2 == 0 else (True, False)
            for explain in order:
                route, body = request_for(rail, n, history, explain)
                started = time.perf_counter()
                reply = client.post(f"/v1/rails/{route}", json=body)
                elapsed = time.perf_counter() - started
                reply.raise_for_status()
                data = reply.json()
                arm = arms["on" if explain else "off"]
                arm["client"].append(elapsed)
                arm["server"].append(data["timings_ms"]["total"] / 1000)
                arm["bytes"].append(len(reply.content))
                arm["served_by"].append(data["served_by"])
        out[rail] = {
            arm: {
                "client_ms": percentiles(v["client"]),
                "server_ms": percentiles(v["server"]),
                "bytes_p50": float(np.median(v["bytes"])),
                "served_by": {s: v["served_by"].count(s) for s in set(v["served_by"])},
            }
            for arm, v in arms.items()
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--sessions", type=int, default=300, help="requests per rail and arm")
    parser.add_argument("--quick", action="store_true", help="20 sessions: check it works")
    args = parser.parse_args()
    n = 20 if args.quick else args.sessions
    settings = load_settings(log_level="WARNING")
    bundle = (args.bundle or production_pointer(settings)).resolve()
    loaded = load_rails(bundle, settings)
    histories = synthetic_sessions(loaded, n, carts=True)
    work = settings.cache_dir / "bench-explain"
    started: list[LocalServer] = []
    result: dict[str, Any] = {
        "bundle": loaded.version,
        "towers": loaded.towers is not None,
        "quick": args.quick,
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        },
    }
    try:
        redis_port, api_port = free_port(), free_port()
        started.append(redis_server(redis_port, work).start())
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        # explain=true is for operators: the benchmark sends the admin key it sets here
        env = load_test_env(bundle, redis_url, shadow__share=0, security__admin_api_key=BENCH_KEY)
        started.append(LocalServer("api", api_command(api_port), api_port, work, env, 120).start())
        base = f"http://127.0.0.1:{api_port}"
        store = SessionStore(redis_url, 2.0, 50, 3600, 3600)
        for k, history in enumerate(histories):
            for prefix in ("p", "e"):
                events = [(f"{prefix}{k}-{j}", e, None) for j, e in enumerate(history)]
                store.append_events(f"{prefix}{k}", events)
        with httpx.Client(base_url=base, timeout=30, headers={"X-API-Key": BENCH_KEY}) as client:
            while client.get("/readyz").status_code != 200:
                time.sleep(0.5)
            warm = histories[: min(10, n)]
            for rail in RAILS[2:]:  # first calls of each code path, off the record
                for k, h in enumerate(warm):
                    route, body = request_for(rail, k, h, True)
                    client.post(f"/v1/rails/{route}", json=body)
            result["rails"] = measure(client, histories)
    finally:
        for server in reversed(started):
            server.stop()
    write_report("explain_cost", result, markdown(result))


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# explain=true cost ({r['bundle']}, {r['machine']['cpus']} CPUs"
        f"{', quick' if r['quick'] else ''})",
        "",
        "| rail | served by | p50 off ms | p50 on ms | p50 ratio | p99 off ms | p99 on ms "
        "| p99 ratio | server p50 ratio | bytes off | bytes on |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rail, arms in r["rails"].items():
        off, on = arms["off"], arms["on"]
        c_off, c_on = off["client_ms"], on["client_ms"]
        served = "/".join(sorted(set(off["served_by"]) | set(on["served_by"])))
        lines.append(
            f"| {rail} | {served} | {c_off['p50']:.1f} | {c_on['p50']:.1f} "
            f"| {c_on['p50'] / c_off['p50']:.2f}x | {c_off['p99']:.1f} | {c_on['p99']:.1f} "
            f"| {c_on['p99'] / c_off['p99']:.2f}x "
            f"| {on['server_ms']['p50'] / off['server_ms']['p50']:.2f}x "
            f"| {off['bytes_p50']:.0f} | {on['bytes_p50']:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
