"""The rails API under load: compute floor vs HTTP, cached vs computed, a 5x spike, Triton.

Usage:
    python benchmarks/rails_api.py --bundle artifacts/<run>-rees46-rails
    python benchmarks/rails_api.py            # the production bundle of serving.dataset

In one run, on loopback, with the servers this script starts and stops (Redis, Triton,
the API under uvicorn as its own process):

1. compute floor: each rail's stages in-process (index + ranker + MMR + rules), no HTTP,
   beside the physical floor of its parts (session encoder, one HNSW query, the ranker's
   predict on one request's candidates): what a rail cannot cost less than;
2. HTTP p50/p95/p99 and throughput at increasing concurrency, computed path (pdp_fbt, never
   cached) and cached path (homepage_hero for sessions already served once);
3. a 5x spike: concurrency jumps from the base to five times it; the fallback rate (answers
   with a degraded reason) and latency before and during;
4. Triton user tower vs the in-process TorchScript encoder, batch 1 and 64.

The load generator is an asyncio httpx client with a fixed number of concurrent workers
(closed loop), each sending its next request when the last one answers. Writes
`reports/benchmarks/rails_api.json` and `rails_api.md`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import torch

from devstack.local_services import (
    LocalServer,
    api_command,
    free_port,
    redis_server,
    triton_server,
)
from railtower.settings import PROJECT_ROOT, load_settings
from ranking.business_features import build_features
from ranking.retriever import Query
from serving.app import production_pointer
from serving.rail_service import load_rails
from serving.stages import Trace, in_process_vector, rules_length, run_stages
from serving.user_vectors import TritonUserTower
from state.session_store import SessionStore
from towers.session_features import HistoryEvent

OUT = PROJECT_ROOT / "reports" / "benchmarks"


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds or [0.0]) * 1000
    return {f"p{q}": float(np.percentile(ms, q)) for q in (50, 95, 99)} | {"n": len(ms)}


def compute_floor(loaded, sessions: list[list[HistoryEvent]], repeats: int) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """In-process latency of each rail's computation for single requests: the API's own
    stages (serving.stages.run_stages: encoder, candidates, ranker, MMR, rules to the
    slots and the exploration window), without Redis or HTTP; per-stage p50 beside it."""
    settings = load_settings(log_level="WARNING")
    slots = settings.evaluation.slots
    length = rules_length(settings.ranking.exploration, slots)
    out = {}
    for rail in ("homepage_hero", "pdp_fbt", "cart_upsell"):
        times, stages = [], defaultdict(list)
        for k in range(repeats):
            history = sessions[k % len(sessions)]
            items = tuple(e.item_id for e in history)
            types = tuple(e.event_type for e in history)
            if rail == "homepage_hero":
                query = Query(items, types, exclude=frozenset(items))
            elif rail == "pdp_fbt":
                query = Query(
                    items[:-1], types[:-1], anchor=items[-1], exclude=frozenset(items[-1:])
                )
            else:
                query = Query(items, types, cart=items[-1:], exclude=frozenset(items[-1:]))
            started = time.perf_counter()
            trace = Trace()
            vector = in_process_vector(loaded, query)
            trace.lap("encoder", started)
            run_stages(
                loaded,
                rail,
                query,
                slots,
                vector,
                lambda table, rail=rail, query=query: loaded.pipeline.ranker_scores(
                    rail, table, [query]
                ),
                trace,
                length,
            )
            times.append(time.perf_counter() - started)
            for stage, ms in trace.timings.items():
                stages[stage].append(ms)
        out[rail] = percentiles(times) | {
            "stages_p50_ms": {k: float(np.median(v)) for k, v in stages.items()}
        }
    return out


def physical_floor(loaded, sessions: list[list[HistoryEvent]], repeats: int) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """p50 of the parts no rail can skip, one homepage request at a time."""
    pipeline, towers = loaded.pipeline, loaded.towers
    timings: dict[str, list[float]] = {"ranker predict (pool rows)": []}
    if towers is not None:
        timings |= {"session encoder": [], "HNSW top-120": []}
    booster = pipeline.rankers.get("homepage_hero")
    for k in range(repeats):
        history = sessions[k % len(sessions)]
        items = tuple(e.item_id for e in history)
        query = Query(items, tuple(e.event_type for e in history), exclude=frozenset(items))
        if towers is not None:
            started = time.perf_counter()
            vector = towers.encode_sessions([history], [None])
            timings["session encoder"].append(time.perf_counter() - started)
            started = time.perf_counter()
            towers.index.search(vector, 120, [query.exclude])
            timings["HNSW top-120"].append(time.perf_counter() - started)
        if booster is not None:
            table = pipeline.candidate_table([query])
            features = build_features(table, [query], pipeline.stats)
            started = time.perf_counter()
            booster.predict(features, num_threads=1)
            timings["ranker predict (pool rows)"].append(time.perf_counter() - started)
    return {name: percentiles(t) for name, t in timings.items() if t}


async def closed_loop(
    base: str, bodies: list[tuple[str, dict]], concurrency: int, seconds: float
) -> dict[str, Any]:
    """`concurrency` workers sending requests back to back for `seconds`."""
    latencies: list[float] = []
    served: dict[str, int] = {}
    degraded = errors = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=10, limits=limits) as client:

        async def worker(offset: int) -> None:
            nonlocal degraded, errors
            k = offset
            while time.perf_counter() < deadline:
                rail, body = bodies[k % len(bodies)]
                k += concurrency
                started = time.perf_counter()
                try:
                    reply = await client.post(f"/v1/rails/{rail}", json=body)
                except httpx.HTTPError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - started)
                if reply.status_code != 200:
                    errors += 1
                    continue
                data = reply.json()
                served[data["served_by"]] = served.get(data["served_by"], 0) + 1
                degraded += bool(data["reasons"])

        started = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
    n = len(latencies)
    return {
        "concurrency": concurrency,
        "requests": n,
        "throughput_rps": n / elapsed,
        **percentiles(latencies or [0.0]),
        "served_by": served,
        "degraded_share": degraded / max(n, 1),
        "errors": errors,
    }


def triton_vs_in_process(loaded, triton: TritonUserTower, repeats: int) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    towers = loaded.towers
    ids = towers.item_ids[:400]
    out = {}
    for batch in (1, 64):
        histories = [
            [HistoryEvent(str(i), "view", 60.0 * k) for k, i in enumerate(ids[j : j + 5])]
            for j in range(batch)
        ]
        inputs = towers.session_inputs(histories, [None] * batch)
        remote, local = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            triton.encode(inputs, towers.triton_version)
            remote.append(time.perf_counter() - started)
            started = time.perf_counter()
            towers.encode_inputs(inputs)
            local.append(time.perf_counter() - started)
        out[f"batch_{batch}"] = {"triton": percentiles(remote), "in_process": percentiles(local)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--seconds", type=float, default=8.0, help="per load step")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--sessions", type=int, default=300)
    args = parser.parse_args()
    settings = load_settings(log_level="WARNING")
    bundle = (args.bundle or production_pointer(settings)).resolve()
    loaded = load_rails(bundle, settings)
    if settings.serving.torch_threads:  # the compute floor runs as an API process would
        torch.set_num_threads(settings.serving.torch_threads)
    sessions = synthetic_sessions(loaded, args.sessions)
    work = settings.cache_dir / "bench-api"
    started: list[LocalServer] = []
    result: dict[str, Any] = {
        "bundle": loaded.version,
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        },
    }
    try:
        redis_port, grpc, api_port = free_port(), free_port(), free_port()
        started.append(redis_server(redis_port, work).start())
        env = {
            "RAILTOWER_SERVING__BUNDLE": str(bundle),
            "RAILTOWER_SERVING__REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "RAILTOWER_LOG_LEVEL": "WARNING",
            "RAILTOWER_SERVING__TRITON_URL": "",
            # load test: one client is many shoppers; the per-client rate limit
            # (on by default) is off
            "RAILTOWER_SECURITY__RATE_LIMIT_PER_S": "0",
        }
        triton = None
        if loaded.towers is not None:
            started.append(
                triton_server(settings.serving.triton_repository, grpc, free_port(), work).start()
            )
            triton = TritonUserTower(f"127.0.0.1:{grpc}", "user_tower", 5.0)
            while not triton.ready():
                time.sleep(0.2)
            env["RAILTOWER_SERVING__TRITON_URL"] = f"127.0.0.1:{grpc}"
        command = api_command(api_port)
        started.append(LocalServer("api", command, api_port, work, env, 120).start())
        base = f"http://127.0.0.1:{api_port}"
        while httpx.get(f"{base}/readyz", timeout=5).status_code != 200:
            time.sleep(0.5)
        store = SessionStore(env["RAILTOWER_SERVING__REDIS_URL"], 2.0, 50, 3600, 3600)
        for n, history in enumerate(sessions):
            store.append_events(f"b{n}", [(f"b{n}-{k}", e, None) for k, e in enumerate(history)])

        result["compute_floor_ms"] = compute_floor(loaded, sessions, 200)
        result["physical_floor_ms"] = physical_floor(loaded, sessions, 200)
        pdp = [
            ("pdp_fbt", {"session_id": f"b{n}", "item_id": h[-1].item_id})
            for n, h in enumerate(sessions)
        ]
        hero = [("homepage_hero", {"session_id": f"b{n}"}) for n in range(len(sessions))]
        asyncio.run(closed_loop(base, hero, 4, 4.0))  # warm every session's hero rail in Redis
        result["computed"] = [
            asyncio.run(closed_loop(base, pdp, c, args.seconds)) for c in args.concurrency
        ]
        result["cached"] = [
            asyncio.run(closed_loop(base, hero, c, args.seconds)) for c in args.concurrency
        ]
        low = args.concurrency[1]
        result["spike"] = {
            "before": asyncio.run(closed_loop(base, pdp, low, args.seconds)),
            "during": asyncio.run(closed_loop(base, pdp, 5 * low, args.seconds)),
        }
        if triton is not None:
            result["triton_ms"] = triton_vs_in_process(loaded, triton, 200)
    finally:
        for server in reversed(started):
            server.stop()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "rails_api.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    (OUT / "rails_api.md").write_text(markdown(result))
    print(markdown(result))


def _row(cells: list[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _head(names: list[str]) -> list[str]:
    return [_row(names), "|" + "---|" * len(names)]


def markdown(r: dict[str, Any]) -> str:
    floor = r["compute_floor_ms"]
    lines = [f"# Rails API benchmark ({r['bundle']}, {r['machine']['cpus']} CPUs)", ""]
    stage_names = list(next(iter(floor.values())).get("stages_p50_ms", {}))
    lines += _head(
        ["rail", "compute floor p50 ms", "p95", "p99", *[f"{s} p50" for s in stage_names]]
    )
    lines += [
        _row(
            [k, f"{v['p50']:.2f}", f"{v['p95']:.2f}", f"{v['p99']:.2f}"]
            + [f"{v['stages_p50_ms'].get(s, float('nan')):.2f}" for s in stage_names]
        )
        for k, v in floor.items()
    ]
    lines += [""] + _head(["physical floor (one request)", "p50 ms", "p95", "p99"])
    lines += [
        _row([k, f"{v['p50']:.2f}", f"{v['p95']:.2f}", f"{v['p99']:.2f}"])
        for k, v in r.get("physical_floor_ms", {}).items()
    ]
    pdp_floor = floor["pdp_fbt"]["p50"]
    lines += [""] + _head(
        [
            "path",
            "concurrency",
            "req/s",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "p99 / floor p50",
            "degraded",
            "errors",
        ]
    )
    for path in ("computed", "cached"):
        for row in r[path]:
            lines.append(
                _row(
                    [
                        path,
                        row["concurrency"],
                        f"{row['throughput_rps']:.0f}",
                        f"{row['p50']:.1f}",
                        f"{row['p95']:.1f}",
                        f"{row['p99']:.1f}",
                        f"{row['p99'] / pdp_floor:.1f}x",
                        f"{row['degraded_share']:.1%}",
                        row["errors"],
                    ]
                )
            )
    lines += [""] + _head(["concurrency", "cached p50 / computed p50", "cached / computed req/s"])
    for a, b in zip(r["computed"], r["cached"], strict=True):
        lines.append(
            _row(
                [
                    a["concurrency"],
                    f"{b['p50'] / a['p50']:.2f}",
                    f"{b['throughput_rps'] / a['throughput_rps']:.1f}x",
                ]
            )
        )
    lines += [""] + _head(
        ["spike (pdp_fbt)", "concurrency", "req/s", "p50 ms", "p99 ms", "degraded"]
    )
    for name in ("before", "during"):
        row = r["spike"][name]
        lines.append(
            _row(
                [
                    name,
                    row["concurrency"],
                    f"{row['throughput_rps']:.0f}",
                    f"{row['p50']:.1f}",
                    f"{row['p99']:.1f}",
                    f"{row['degraded_share']:.1%}",
                ]
            )
        )
    if "triton_ms" in r:
        lines += [""] + _head(
            ["user tower", "batch", "Triton p50 ms", "in-process p50 ms", "ratio"]
        )
        for batch, row in r["triton_ms"].items():
            t, i = row["triton"]["p50"], row["in_process"]["p50"]
            lines.append(
                _row(
                    [
                        "session encoder",
                        batch.split("_")[1],
                        f"{t:.2f}",
                        f"{i:.2f}",
                        f"{t / i:.1f}x",
                    ]
                )
            )
    return "\n".join(lines) + "\n"


def synthetic_sessions(loaded, n: int, carts: bool = False) -> list[list[HistoryEvent]]:  # type: ignore[no-untyped-def]
    """Sessions of 2-6 of the bundle's 2,000 most popular items (seeded): views, or with
    `carts` a view or a cart each (one in three)."""
    rng = np.random.default_rng(0)
    order = np.argsort(-loaded.pipeline.stats.popularity)[:2000]
    ids = loaded.pipeline.stats.item_ids[order]
    out = []
    for _ in range(n):
        picks = rng.choice(ids, size=int(rng.integers(2, 7)), replace=False)
        kinds = ["view"] * len(picks)
        if carts:
            kinds = rng.choice(["view", "view", "cart"], size=len(picks))
        out.append(
            [
                HistoryEvent(str(i), str(t), 1569890000.0 + 30 * k)
                for k, (i, t) in enumerate(zip(picks, kinds, strict=True))
            ]
        )
    return out


if __name__ == "__main__":
    main()
