"""What the load generator itself costs: httpx's and aiohttp's async clients against one API.

Usage:
    python benchmarks/load_client.py --bundle artifacts/<run>-rees46-rails

On a 2-core machine the load generator shares the cores with the API it measures, so a
client that spends more CPU per request than the API's own answer measures itself. This
starts Redis and one API process (shipped settings, sessions encoded in-process), warms
the homepage rails of synthetic sessions so every answer is a cache read (the cheapest
answer the API gives, where the client's share is largest), then runs closed loops with
each client, alternating A B A B, and reads the CPU time of both processes around each
round (/proc): client and API CPU per request beside throughput and latency. Writes
`reports/benchmarks/load_client.json` and `load_client.md`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

from benchmarks.rails_api import (
    _client,
    _head,
    _row,
    command_line,
    git_revision,
    single_api,
    synthetic_sessions,
    warm_cache,
)
from benchmarks.report import write_report
from railtower.settings import load_settings
from serving.app import production_pointer
from serving.rail_service import load_rails

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


async def closed_loop(
    client_kind: str, base: str, bodies: list[tuple[str, dict]], concurrency: int, seconds: float
) -> list[float]:
    """Latencies (s) of `concurrency` workers sending back to back with one client kind."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker(offset: int, send) -> None:  # type: ignore[no-untyped-def]
        k = offset
        while time.perf_counter() < deadline:
            rail, body = bodies[k % len(bodies)]
            k += concurrency
            started = time.perf_counter()
            await send(f"/v1/rails/{rail}", body)
            latencies.append(time.perf_counter() - started)

    if client_kind == "httpx":
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=base, timeout=10, limits=limits) as client:

            async def send_httpx(path: str, body: dict) -> None:
                (await client.post(path, json=body)).json()

            await asyncio.gather(*(worker(i, send_httpx) for i in range(concurrency)))
    else:
        async with _client(base, concurrency) as session:

            async def send_aiohttp(path: str, body: dict) -> None:
                headers = {"content-type": "application/json"}
                async with session.post(path, data=orjson.dumps(body), headers=headers) as r:
                    orjson.loads(await r.read())

            await asyncio.gather(*(worker(i, send_aiohttp) for i in range(concurrency)))
    return latencies


def measure(
    client_kind: str, api_pid: int, base: str, bodies: list, concurrency: int, seconds: float
) -> dict[str, Any]:
    me = os.getpid()
    mine, theirs = cpu_seconds(me), cpu_seconds(api_pid)
    latencies = asyncio.run(closed_loop(client_kind, base, bodies, concurrency, seconds))
    n = max(len(latencies), 1)
    ms = np.asarray(latencies or [0.0]) * 1000
    return {
        "client": client_kind,
        "concurrency": concurrency,
        "requests": len(latencies),
        "rps": len(latencies) / seconds,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "client_cpu_ms_per_request": (cpu_seconds(me) - mine) / n * 1000,
        "api_cpu_ms_per_request": (cpu_seconds(api_pid) - theirs) / n * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--seconds", type=float, default=6.0, help="per round")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()
    settings = load_settings(log_level="WARNING")
    bundle = (args.bundle or production_pointer(settings)).resolve()
    loaded = load_rails(bundle, settings)
    sessions = synthetic_sessions(loaded, 300)
    work = settings.cache_dir / "bench-load-client"
    rows: list[dict[str, Any]] = []
    with single_api(bundle, work, sessions, "c") as api:
        bodies = [("homepage_hero", {"session_id": f"c{n}"}) for n in range(len(sessions))]
        warmed = asyncio.run(warm_cache(api.base, bodies, 60.0))
        if warmed["confirmed"] < len(bodies):
            raise RuntimeError(f"only {warmed['confirmed']} of {len(bodies)} rails warmed")
        for concurrency in args.concurrency:
            for kind in ("httpx", "aiohttp", "httpx", "aiohttp"):
                row = measure(
                    kind, api.server.process.pid, api.base, bodies, concurrency, args.seconds
                )
                rows.append(row)
                print(row, flush=True)
    result = {
        "bundle": loaded.version,
        "cpus": os.cpu_count(),
        "commit": git_revision(),
        "command": command_line(),
        "rows": rows,
    }
    write_report("load_client", result, markdown(result))


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# The load generator's own cost ({r['bundle']}, {r['cpus']} CPUs)",
        "",
        f"Commit `{r['commit']}`; command `{r['command']}`. Cached homepage_hero reads "
        "(every answer from the cache), closed loop, rounds alternating A B A B.",
        "",
        *_head(
            [
                "client",
                "concurrency",
                "req/s",
                "p50 ms",
                "p99 ms",
                "client CPU ms/req",
                "API CPU ms/req",
            ]
        ),
    ]
    for row in r["rows"]:
        lines.append(
            _row(
                [
                    row["client"],
                    row["concurrency"],
                    f"{row['rps']:.0f}",
                    f"{row['p50_ms']:.2f}",
                    f"{row['p99_ms']:.1f}",
                    f"{row['client_cpu_ms_per_request']:.3f}",
                    f"{row['api_cpu_ms_per_request']:.3f}",
                ]
            )
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
