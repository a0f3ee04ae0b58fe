"""The rails API under load: compute floor vs HTTP, cached vs computed, sustained load, a 5x
spike, Triton, and the issue-21 goals each is held to.

Usage:
    python benchmarks/rails_api.py --bundle artifacts/<run>-rees46-rails
    python benchmarks/rails_api.py            # the production bundle of serving.dataset

In one run, on loopback, with the servers this script starts and stops (Redis, Triton,
the API under uvicorn as its own process):

1. compute floor: each rail's stages in-process (index + ranker + MMR + rules), no HTTP,
   beside the physical floor of its parts (session encoder, one HNSW query, the ranker's
   predict on one request's candidates): what a rail cannot cost less than;
2. computed path over HTTP (pdp_fbt, never cached): p50/p95/p99 and throughput at
   increasing concurrency, closed loop;
3. sustained load: an open-loop client (Poisson arrivals, sent on schedule whatever the
   replies, at most OPEN_LOOP_IN_FLIGHT in flight) at SUSTAINED_LOAD x the highest computed
   req/s of step 2, for 2 x `--seconds`; latency counts from each request's scheduled time,
   so queueing shows (a closed loop hides it by slowing down);
4. cached path (homepage_hero): every session's rail is warmed first and confirmed (passes
   over the sessions until each answers `served_by == "cache"`, bounded by
   `--warm-seconds`), then closed-loop rows that count cache hits and misses apart, with the
   hits' own percentiles; a row under MIN_CACHE_HITS hits is marked invalid (JSON `valid`
   false and a reason, FAIL in the markdown, exit status 1);
5. a 5x spike: concurrency jumps from the base to five times it; the fallback rate (answers
   with a degraded reason) and latency before and during;
6. Triton user tower vs the in-process TorchScript encoder, batch 1 and 64;
7. the heap settle (serving.settle_heap, railtower.heap): the sustained row's open loop on
   the same app with and without it, A B A B, with each process's generation-2 collector
   pauses read from its /metrics.

The goals of issue 21 (GOALS_* constants) are evaluated from these measurements and put
first in the markdown and under "goals" in the JSON, with the commit (short hash,
"+dirty" when the tree has changes) and the command line. Writes
`reports/benchmarks/rails_api.json` and `rails_api.md`.

Closed-loop load is an asyncio aiohttp client with a fixed number of concurrent workers, each
sending its next request when the last one answers. aiohttp, not httpx: on this 2-core VM
httpx's client spent 0.7-1.2 ms of CPU per request, more than the API's cached read itself
(about 0.8 ms), so a load generator sharing the cores with the API measured itself; aiohttp
spends about 0.2 ms.

One module on purpose: one benchmark run whose steps share the servers it starts, the
sessions it warms and the report they fill.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shlex
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import numpy as np
import orjson
import torch
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.report import write_report
from devstack.local_services import (
    LocalServer,
    api_command,
    free_port,
    load_test_env,
    redis_server,
    triton_server,
)
from railtower.settings import PROJECT_ROOT, Settings, load_settings
from ranking.business_features import build_features
from ranking.retriever import Query
from serving.app import production_pointer
from serving.rail_service import load_rails
from serving.stages import Trace, in_process_vector, rules_length, run_stages
from serving.user_vectors import TritonUserTower
from state.session_store import SessionStore
from towers.session_features import HistoryEvent

# Issue 21's goals (not to be tuned to the results).
GOALS_FLOOR_P50_MS = 6.0  # compute floor p50, every rail
GOALS_COMPUTED_RPS = 120.0  # computed over HTTP: most req/s at <= GOALS_MAX_DEGRADED
GOALS_MAX_DEGRADED = 0.05
GOALS_SUSTAINED_P99_X_FLOOR = 3.0  # at SUSTAINED_LOAD: p99 / pdp_fbt compute floor p50
GOALS_SPIKE_P99_MS = 250.0  # during the 5x spike, with 0 errors, <= GOALS_MAX_DEGRADED
GOALS_CACHED_C1_P50_MS = 3.0  # cached read, concurrency 1
GOALS_CACHED_C16_P99_MS = 20.0  # cached read, concurrency 16
MIN_CACHE_HITS = 0.99  # a "cached" row under this share of cache hits is invalid

SUSTAINED_LOAD = 0.5  # of the highest computed req/s
OPEN_LOOP_IN_FLIGHT = 64


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds or [0.0]) * 1000
    return {f"p{q}": float(np.percentile(ms, q)) for q in (50, 95, 99)} | {"n": len(ms)}


def compute_floor(loaded, sessions: list[list[HistoryEvent]], repeats: int) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """In-process latency of each rail's computation for single requests: the API's own
    stages (serving.stages.run_stages: encoder, candidates, ranker, MMR, rules to the
    slots and the exploration window), without Redis or HTTP; per-stage p50 beside it."""
    settings = load_settings(log_level="WARNING")
    slots = settings.evaluation.slots
    length = rules_length(settings.ranking.exploration, slots, loaded.pipeline.depth)
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


@dataclass
class Tally:
    """What a load generator saw: latencies (all, and per `served_by`), degraded, errors."""

    latencies: list[float] = field(default_factory=list)
    by_served: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    degraded: int = 0
    errors: int = 0

    def summary(self, elapsed: float) -> dict[str, Any]:
        n = len(self.latencies)
        return {
            "requests": n,
            "throughput_rps": n / elapsed,
            **percentiles(self.latencies or [0.0]),
            "served_by": {k: len(v) for k, v in self.by_served.items()},
            "served_by_ms": {k: percentiles(v) for k, v in self.by_served.items()},
            "degraded_share": self.degraded / max(n, 1),
            "errors": self.errors,
        }


async def send(
    client: aiohttp.ClientSession,
    rail: str,
    body: dict,
    tally: Tally,
    since: float | None = None,
) -> str | None:
    """One request, counted in `tally` (latency from `since`, by default now); its
    `served_by`, or None when it failed."""
    started = time.perf_counter() if since is None else since
    try:
        payload = orjson.dumps(body)
        async with client.post(f"/v1/rails/{rail}", data=payload, headers=_JSON) as reply:
            status, raw = reply.status, await reply.read()
    except (TimeoutError, aiohttp.ClientError):
        tally.errors += 1
        return None
    latency = time.perf_counter() - started
    tally.latencies.append(latency)
    if status != 200:
        tally.errors += 1
        return None
    data = orjson.loads(raw)
    tally.by_served[data["served_by"]].append(latency)
    tally.degraded += bool(data["reasons"])
    return str(data["served_by"])


_JSON = {"content-type": "application/json"}


def _client(base: str, connections: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=10)
    return aiohttp.ClientSession(base, connector=connector, timeout=timeout)


async def closed_loop(
    base: str, bodies: list[tuple[str, dict]], concurrency: int, seconds: float
) -> dict[str, Any]:
    """`concurrency` workers sending requests back to back for `seconds`."""
    tally = Tally()
    deadline = time.perf_counter() + seconds
    async with _client(base, concurrency) as client:

        async def worker(offset: int) -> None:
            k = offset
            while time.perf_counter() < deadline:
                rail, body = bodies[k % len(bodies)]
                k += concurrency
                await send(client, rail, body, tally)

        started = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"concurrency": concurrency} | tally.summary(elapsed)


def arrivals(rate: float, seconds: float, seed: int = 0) -> np.ndarray:
    """Poisson arrival times (s from the start) at `rate` per second over `seconds`, given
    their count: round(rate x seconds) uniform times, sorted, so the offered rate is exact."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.uniform(0.0, seconds, size=max(round(rate * seconds), 1)))


async def open_loop(
    base: str,
    bodies: list[tuple[str, dict]],
    rate: float,
    seconds: float,
    max_in_flight: int = OPEN_LOOP_IN_FLIGHT,
) -> dict[str, Any]:
    """Requests sent on a Poisson schedule at `rate`/s whatever the replies; latency counts
    from the scheduled time. An arrival finding `max_in_flight` requests unanswered is not
    sent (`not_sent`): the client's bound, reported, not hidden."""
    tally, lags, tasks = Tally(), [], []
    in_flight = not_sent = 0
    async with _client(base, max_in_flight) as client:

        async def one(k: int, due: float) -> None:
            nonlocal in_flight
            try:
                await send(client, *bodies[k % len(bodies)], tally, since=due)
            finally:
                in_flight -= 1

        started = time.perf_counter()
        for k, at in enumerate(arrivals(rate, seconds)):
            due = started + float(at)
            await asyncio.sleep(max(due - time.perf_counter(), 0.0))
            lags.append(time.perf_counter() - due)
            if in_flight >= max_in_flight:
                not_sent += 1
                continue
            in_flight += 1
            tasks.append(asyncio.create_task(one(k, due)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
    row = tally.summary(elapsed)
    return {
        "offered_rps": rate,
        "seconds": seconds,
        "max_in_flight": max_in_flight,
        "sent": len(tasks),
        "not_sent": not_sent,
        "achieved_rps": row.pop("throughput_rps"),
        "send_lag_p99_ms": percentiles(lags)["p99"],
    } | row


async def warm_cache(
    base: str, bodies: list[tuple[str, dict]], seconds: float, concurrency: int = 4
) -> dict[str, Any]:
    """Passes over `bodies` (cacheable requests) until each has answered from the cache once
    (`served_by == "cache"`) or `seconds` ran out: the first pass computes and stores the
    rails, the next confirms them."""
    pending, passes = list(range(len(bodies))), 0
    started = time.perf_counter()
    deadline = started + seconds
    gate = asyncio.Semaphore(concurrency)
    async with _client(base, concurrency) as client:

        async def one(k: int) -> str | None:
            async with gate:
                if time.perf_counter() > deadline:
                    return None
                return await send(client, *bodies[k], Tally())

        while pending and time.perf_counter() < deadline:
            passes += 1
            served = await asyncio.gather(*(one(k) for k in pending))
            pending = [k for k, s in zip(pending, served, strict=True) if s != "cache"]
    return {
        "sessions": len(bodies),
        "confirmed": len(bodies) - len(pending),
        "passes": passes,
        "seconds": time.perf_counter() - started,
    }


def cache_check(row: dict[str, Any], min_share: float = MIN_CACHE_HITS) -> dict[str, Any]:
    """Cache hits and misses of a "cached" row (misses: any other `served_by`, and errors),
    its hits' latency, and whether it measured the cache: >= `min_share` hits."""
    served = row.get("served_by", {})
    hits = served.get("cache", 0)
    total = sum(served.values()) + row.get("errors", 0)
    share = hits / total if total else 0.0
    out = {
        "cache_hits": hits,
        "cache_misses": total - hits,
        "cache_hit_share": share,
        "cache_hit_ms": row.get("served_by_ms", {}).get("cache"),
        "valid": total > 0 and share >= min_share,
    }
    if not out["valid"]:
        out["reason"] = (
            f"{share:.1%} cache hits ({hits} of {total}, misses {dict(served)}), "
            f"under the {min_share:.0%} a cached row needs"
        )
    return out


def _goal(
    name: str, measured: float | None, unit: str, target: str, passed: bool | None, note: str = ""
) -> dict[str, Any]:
    out = {"goal": name, "measured": measured, "unit": unit, "target": target, "passed": passed}
    return out | ({"note": note} if note else {})


def _row_at(rows: list[dict[str, Any]], concurrency: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["concurrency"] == concurrency), None)


def _cached_goal(
    rows: list[dict[str, Any]], concurrency: int, stat: str, limit: float
) -> dict[str, Any]:
    """A cached-read goal: `stat` over all the row's requests, passing only in a valid row
    (>= MIN_CACHE_HITS cache hits)."""
    name = f"cached read (>= {MIN_CACHE_HITS:.0%} hits), concurrency {concurrency}, {stat}"
    row = _row_at(rows, concurrency)
    if row is None:
        return _goal(name, None, "ms", f"<= {limit:g} ms", None, "not run")
    valid = cache_check(row)["valid"]
    note = "" if valid else "row invalid: " + cache_check(row)["reason"]
    return _goal(name, row[stat], "ms", f"<= {limit:g} ms", valid and row[stat] <= limit, note)


def spike_goals(spike: dict[str, Any]) -> list[dict[str, Any]]:
    """The 5x spike: no errors, <= GOALS_MAX_DEGRADED degraded, p99 <= GOALS_SPIKE_P99_MS."""
    during = spike["during"]
    name = f"5x spike ({spike['before']['concurrency']} -> {during['concurrency']} clients)"
    return [
        _goal(f"{name}: errors", during["errors"], "count", "0", during["errors"] == 0),
        _goal(
            f"{name}: degraded",
            during["degraded_share"],
            "share",
            f"<= {GOALS_MAX_DEGRADED:.0%}",
            during["degraded_share"] <= GOALS_MAX_DEGRADED,
        ),
        _goal(
            f"{name}: p99",
            during["p99"],
            "ms",
            f"<= {GOALS_SPIKE_P99_MS:g} ms",
            during["p99"] <= GOALS_SPIKE_P99_MS,
        ),
    ]


def evaluate_goals(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 21's goals against a run's result `r`: one entry per measurable condition,
    `passed` None where the run did not measure it."""
    goals = [
        _goal(
            f"compute floor p50, {rail}",
            v["p50"],
            "ms",
            f"<= {GOALS_FLOOR_P50_MS:g} ms",
            v["p50"] <= GOALS_FLOOR_P50_MS,
        )
        for rail, v in r["compute_floor_ms"].items()
    ]
    within = [
        row["throughput_rps"]
        for row in r["computed"]
        if row["degraded_share"] <= GOALS_MAX_DEGRADED
    ]
    best = max(within, default=0.0)
    goals.append(
        _goal(
            f"computed over HTTP: most req/s at <= {GOALS_MAX_DEGRADED:.0%} degraded",
            best,
            "req/s",
            f">= {GOALS_COMPUTED_RPS:g} req/s",
            best >= GOALS_COMPUTED_RPS,
        )
    )
    if "sustained" in r:
        ratio = r["sustained"]["p99"] / r["compute_floor_ms"]["pdp_fbt"]["p50"]
        goals.append(
            _goal(
                f"{SUSTAINED_LOAD:.0%} load (open loop): p99 / compute floor p50, pdp_fbt",
                ratio,
                "x",
                f"<= {GOALS_SUSTAINED_P99_X_FLOOR:g}x",
                ratio <= GOALS_SUSTAINED_P99_X_FLOOR,
            )
        )
    if "spike" in r:
        goals += spike_goals(r["spike"])
    cached = r.get("cached", [])
    goals.append(_cached_goal(cached, 1, "p50", GOALS_CACHED_C1_P50_MS))
    goals.append(_cached_goal(cached, 16, "p99", GOALS_CACHED_C16_P99_MS))
    return goals


def git_revision(root: Path = PROJECT_ROOT) -> str:
    """The short commit of `root`, with "+dirty" when its tree has changes; "unknown"
    outside a git checkout."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def command_line() -> str:
    return shlex.join(["python", *sys.argv])


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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--seconds", type=float, default=8.0, help="per load step")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--sessions", type=int, default=300)
    parser.add_argument(
        "--warm-seconds", type=float, default=60.0, help="bound on warming the cached rail"
    )
    return parser.parse_args()


def rail_ttl_s(settings: Settings, args: argparse.Namespace) -> int:
    """The pre-warmed rails' TTL for the API: the configured one, unless it is shorter than
    warming plus the cached rows (with a margin), which it would expire under."""
    needed = int(2 * (args.warm_seconds + len(args.concurrency) * args.seconds)) + 60
    return max(settings.serving.prewarm_ttl_s, needed)


@dataclass
class Stack:
    """What `stack` started: the API (shipped settings), the same app on uvicorn's h11
    parser, the same app without the heap settle, Redis, and a Triton client."""

    api: str
    api_h11: str
    api_unsettled: str
    redis_url: str
    triton: TritonUserTower | None


@contextlib.contextmanager
def stack(settings: Settings, bundle: Path, has_towers: bool, ttl_s: int) -> Iterator[Stack]:
    """Redis, Triton (when the bundle has towers) and the API processes of `Stack`, on
    loopback; stops them all on exit."""
    work = settings.cache_dir / "bench-api"
    started: list[LocalServer] = []
    try:
        redis_port, grpc, api_port = free_port(), free_port(), free_port()
        started.append(redis_server(redis_port, work).start())
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        env = load_test_env(bundle, redis_url, serving__prewarm_ttl_s=ttl_s)
        triton = None
        if has_towers:
            started.append(
                triton_server(settings.serving.triton_repository, grpc, free_port(), work).start()
            )
            triton = TritonUserTower(f"127.0.0.1:{grpc}", "user_tower", 5.0)
            while not triton.ready():
                time.sleep(0.2)
            env["RAILTOWER_SERVING__TRITON_URL"] = f"127.0.0.1:{grpc}"
        started.append(LocalServer("api", api_command(api_port), api_port, work, env, 120).start())
        # the same app on uvicorn's h11 parser beside it, for the parser comparison
        h11_port = free_port()
        h11 = api_command(h11_port, http="h11")
        started.append(LocalServer("api-h11", h11, h11_port, work, env, 120).start())
        # and once more without the heap settle, for its comparison
        loose_port = free_port()
        loose_env = env | {"RAILTOWER_SERVING__SETTLE_HEAP": "false"}
        loose = LocalServer(
            "api-unsettled", api_command(loose_port), loose_port, work, loose_env, 120
        )
        started.append(loose.start())
        bases = [f"http://127.0.0.1:{port}" for port in (api_port, h11_port, loose_port)]
        for base in bases:
            while httpx.get(f"{base}/readyz", timeout=5).status_code != 200:
                time.sleep(0.5)
        yield Stack(bases[0], bases[1], bases[2], redis_url, triton)
    finally:
        for server in reversed(started):
            server.stop()


@dataclass
class SingleApi:
    """What `single_api` started: one API process (shipped settings, sessions encoded in
    process, no rate limit), its base URL, and the Redis it reads."""

    server: LocalServer
    base: str
    redis_url: str


@contextlib.contextmanager
def single_api(
    bundle: Path, work: Path, sessions: list[list[HistoryEvent]], prefix: str
) -> Iterator[SingleApi]:
    """Redis and one API process on loopback serving `bundle`, with `sessions` seeded in
    Redis as "<prefix><n>"; stops both on exit (the profiling and client benchmarks)."""
    started: list[LocalServer] = []
    try:
        redis_port, api_port = free_port(), free_port()
        started.append(redis_server(redis_port, work).start())
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        env = {
            "RAILTOWER_SERVING__BUNDLE": str(bundle),
            "RAILTOWER_SERVING__REDIS_URL": redis_url,
            "RAILTOWER_SERVING__TRITON_URL": "",
            "RAILTOWER_SECURITY__RATE_LIMIT_PER_S": "0",  # one client is many shoppers
            "RAILTOWER_LOG_LEVEL": "WARNING",
        }
        api = LocalServer("api", api_command(api_port), api_port, work, env, 120).start()
        started.append(api)
        base = f"http://127.0.0.1:{api_port}"
        while httpx.get(f"{base}/readyz", timeout=5).status_code != 200:
            time.sleep(0.5)
        store = SessionStore(redis_url, 2.0, 50, 3600, 3600)
        for n, history in enumerate(sessions):
            session = f"{prefix}{n}"
            store.append_events(
                session, [(f"{session}-{k}", e, None) for k, e in enumerate(history)]
            )
        yield SingleApi(api, base, redis_url)
    finally:
        for server in reversed(started):
            server.stop()


def cached_row(
    base: str, bodies: list[tuple[str, dict]], concurrency: int, seconds: float
) -> dict[str, Any]:
    """A closed-loop row on the cached rail, with its cache hits and misses apart."""
    row = asyncio.run(closed_loop(base, bodies, concurrency, seconds))
    return row | cache_check(row)


def pdp_bodies(sessions: list[list[HistoryEvent]]) -> list[tuple[str, dict]]:
    """A pdp_fbt request per seeded session ("b<n>"), its newest item as the page."""
    return [
        ("pdp_fbt", {"session_id": f"b{n}", "item_id": h[-1].item_id})
        for n, h in enumerate(sessions)
    ]


def measure_http(
    base: str, sessions: list[list[HistoryEvent]], args: argparse.Namespace
) -> dict[str, Any]:
    """The HTTP rows: computed, sustained (open loop), cached (after warming), spike."""
    pdp = pdp_bodies(sessions)
    hero = [("homepage_hero", {"session_id": f"b{n}"}) for n in range(len(sessions))]
    out: dict[str, Any] = {
        "computed": [asyncio.run(closed_loop(base, pdp, c, args.seconds)) for c in args.concurrency]
    }
    rate = SUSTAINED_LOAD * max(row["throughput_rps"] for row in out["computed"])
    out["sustained"] = asyncio.run(open_loop(base, pdp, rate, 2 * args.seconds))
    # warmed right before the cached rows: nothing between appends events (which would
    # move the session's marker) and the rails' TTL outlasts them (rail_ttl_s)
    out["cache_warming"] = asyncio.run(warm_cache(base, hero, args.warm_seconds))
    out["cached"] = [cached_row(base, hero, c, args.seconds) for c in args.concurrency]
    low = args.concurrency[min(1, len(args.concurrency) - 1)]
    out["spike"] = {
        "before": asyncio.run(closed_loop(base, pdp, low, args.seconds)),
        "during": asyncio.run(closed_loop(base, pdp, 5 * low, args.seconds)),
    }
    return out


def gen2_pauses(base: str) -> dict[str, float]:
    """The API process's generation-2 collector runs so far, read from its /metrics
    (serving.metrics.GcPauseCollector): count, seconds in all, the longest."""
    wanted = {
        "railtower_gc_pauses": "runs",
        "railtower_gc_pause_seconds": "seconds",
        "railtower_gc_pause_longest_seconds": "longest_s",
    }
    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=5).text):
        for sample in family.samples:
            if family.name in wanted and sample.labels.get("generation") == "2":
                out[wanted[family.name]] = sample.value
    return out


def compare_heap_settle(
    settled: str,
    unsettled: str,
    sessions: list[list[HistoryEvent]],
    rate: float,
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """The sustained open loop (pdp_fbt at `rate`) on the same app with the heap settled
    at load (the shipped default) and without, interleaved A B A B so drift of a shared
    machine falls on both: per arm the rounds' median p50 and p99, their worst p99, and the
    generation-2 collector runs during the rounds with their time and the longest."""
    pdp = pdp_bodies(sessions)
    arms = {"settled": settled, "not settled": unsettled}
    before = {arm: gen2_pauses(base) for arm, base in arms.items()}
    rounds: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    for _ in range(2):
        for arm, base in arms.items():
            rounds[arm].append(asyncio.run(open_loop(base, pdp, rate, 2 * args.seconds)))
    rows = []
    for arm, base in arms.items():
        after, measured = gen2_pauses(base), rounds[arm]
        rows.append(
            {
                "arm": arm,
                "offered_rps": rate,
                "p50_ms": float(np.median([r["p50"] for r in measured])),
                "p99_ms": float(np.median([r["p99"] for r in measured])),
                "worst_p99_ms": float(max(r["p99"] for r in measured)),
                "degraded": float(np.mean([r["degraded_share"] for r in measured])),
                "errors": int(sum(r["errors"] for r in measured)),
                "gen2_runs": int(after["runs"] - before[arm]["runs"]),
                "gen2_seconds": after["seconds"] - before[arm]["seconds"],
                "gen2_longest_ms": 1000 * after["longest_s"],
            }
        )
    return rows


def compare_parsers(
    httptools_base: str, h11_base: str, sessions: list[list[HistoryEvent]], seconds: float
) -> list[dict[str, Any]]:
    """Computed pdp_fbt rails on the same app behind each HTTP parser, interleaved (A B A B)
    so that drift of a shared machine falls on both: per parser and concurrency, the mean
    of the two rounds' throughput and the rounds' median p50 and p99."""
    pdp = pdp_bodies(sessions)
    rows = []
    for concurrency in (1, 16):
        rounds: dict[str, list[dict[str, Any]]] = {"httptools": [], "h11": []}
        for _ in range(2):
            for parser, base in (("httptools", httptools_base), ("h11", h11_base)):
                row = asyncio.run(closed_loop(base, pdp, concurrency, seconds))
                rounds[parser].append(row)
        for parser, measured in rounds.items():
            rows.append(
                {
                    "parser": parser,
                    "concurrency": concurrency,
                    "throughput_rps": float(np.mean([r["throughput_rps"] for r in measured])),
                    "p50_ms": float(np.median([r["p50"] for r in measured])),
                    "p99_ms": float(np.median([r["p99"] for r in measured])),
                    "degraded": float(np.mean([r["degraded_share"] for r in measured])),
                }
            )
    return rows


def main() -> None:
    args = parse_args()
    settings = load_settings(log_level="WARNING")
    bundle = (args.bundle or production_pointer(settings)).resolve()
    loaded = load_rails(bundle, settings)
    if settings.serving.torch_threads:  # the compute floor runs as an API process would
        torch.set_num_threads(settings.serving.torch_threads)
    sessions = synthetic_sessions(loaded, args.sessions)
    ttl_s = rail_ttl_s(settings, args)
    result: dict[str, Any] = {
        "bundle": loaded.version,
        "commit": git_revision(),
        "command": command_line(),
        "rail_ttl_s": ttl_s,
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        },
    }
    towers = loaded.towers is not None
    with stack(settings, bundle, towers, ttl_s) as started:
        store = SessionStore(started.redis_url, 2.0, 50, 3600, 3600)
        for n, history in enumerate(sessions):
            store.append_events(f"b{n}", [(f"b{n}-{k}", e, None) for k, e in enumerate(history)])
        result["compute_floor_ms"] = compute_floor(loaded, sessions, 200)
        result["physical_floor_ms"] = physical_floor(loaded, sessions, 200)
        result |= measure_http(started.api, sessions, args)
        result["heap_settle"] = compare_heap_settle(
            started.api, started.api_unsettled, sessions, result["sustained"]["offered_rps"], args
        )
        result["parsers"] = compare_parsers(started.api, started.api_h11, sessions, args.seconds)
        if started.triton is not None:
            result["triton_ms"] = triton_vs_in_process(loaded, started.triton, 200)
    result["goals"] = evaluate_goals(result)
    write_report("rails_api", result, markdown(result))
    invalid = [row["concurrency"] for row in result["cached"] if not row["valid"]]
    if invalid:
        print(f"FAIL: cached rows at concurrency {invalid} are not >= {MIN_CACHE_HITS:.0%} hits")
        sys.exit(1)


def _row(cells: list[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _head(names: list[str]) -> list[str]:
    return [_row(names), "|" + "---|" * len(names)]


def _measured(goal: dict[str, Any]) -> str:
    value, unit = goal["measured"], goal["unit"]
    if value is None:
        return "n/a"
    return {
        "ms": f"{value:.2f} ms",
        "req/s": f"{value:.0f} req/s",
        "x": f"{value:.1f}x",
        "share": f"{value:.1%}",
    }.get(unit, str(value))


def _verdict(passed: bool | None) -> str:
    return {True: "pass", False: "**FAIL**", None: "n/a"}[passed]


def goals_markdown(goals: list[dict[str, Any]]) -> list[str]:
    lines = ["## Goals (issue 21)", ""] + _head(["goal", "measured", "target", "result"])
    for g in goals:
        note = f" ({g['note']})" if g.get("note") else ""
        lines.append(_row([g["goal"], _measured(g) + note, g["target"], _verdict(g["passed"])]))
    return lines


def floor_markdown(r: dict[str, Any]) -> list[str]:
    floor = r["compute_floor_ms"]
    stage_names = list(next(iter(floor.values())).get("stages_p50_ms", {}))
    lines = _head(
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
    return lines


def load_markdown(r: dict[str, Any]) -> list[str]:
    """Computed and cached closed-loop rows side by side (all requests)."""
    pdp_floor = r["compute_floor_ms"]["pdp_fbt"]["p50"]
    names = ["path", "concurrency", "req/s", "p50 ms", "p95 ms", "p99 ms"]
    lines = _head([*names, "p99 / floor p50", "degraded", "errors"])
    for path in ("computed", "cached"):
        for row in r[path]:
            lines.append(
                _row(
                    [
                        path if row.get("valid", True) else f"{path} **FAIL**",
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
    return lines


def sustained_markdown(r: dict[str, Any]) -> list[str]:
    s = r["sustained"]
    ratio = s["p99"] / r["compute_floor_ms"]["pdp_fbt"]["p50"]
    lines = [
        f"Sustained load, pdp_fbt, open loop (Poisson arrivals, at most {s['max_in_flight']} "
        f"in flight, latency from the scheduled time), {s['seconds']:.0f} s at "
        f"{SUSTAINED_LOAD:.0%} of the highest computed req/s:",
        "",
    ]
    lines += _head(
        ["offered req/s", "achieved req/s", "p50 ms", "p95 ms", "p99 ms", "p99 / floor p50"]
        + ["degraded", "errors", "not sent", "send lag p99 ms"]
    )
    lines.append(
        _row(
            [
                f"{s['offered_rps']:.1f}",
                f"{s['achieved_rps']:.1f}",
                f"{s['p50']:.1f}",
                f"{s['p95']:.1f}",
                f"{s['p99']:.1f}",
                f"{ratio:.1f}x",
                f"{s['degraded_share']:.1%}",
                s["errors"],
                s["not_sent"],
                f"{s['send_lag_p99_ms']:.1f}",
            ]
        )
    )
    return lines


def cached_markdown(r: dict[str, Any]) -> list[str]:
    w = r["cache_warming"]
    lines = [
        f"Cached path, homepage_hero: warmed and confirmed {w['confirmed']} of {w['sessions']} "
        f"sessions in {w['passes']} passes ({w['seconds']:.1f} s); a row needs "
        f">= {MIN_CACHE_HITS:.0%} cache hits.",
        "",
    ]
    lines += _head(
        ["concurrency", "cache hits", "misses", "hit share", "hits p50 ms", "hits p99 ms"]
        + ["all p50 ms", "all p99 ms", "valid"]
    )
    for row in r["cached"]:
        hit = row["cache_hit_ms"] or {"p50": float("nan"), "p99": float("nan")}
        lines.append(
            _row(
                [
                    row["concurrency"],
                    row["cache_hits"],
                    row["cache_misses"],
                    f"{row['cache_hit_share']:.1%}",
                    f"{hit['p50']:.2f}",
                    f"{hit['p99']:.2f}",
                    f"{row['p50']:.2f}",
                    f"{row['p99']:.2f}",
                    "yes" if row["valid"] else f"**FAIL**: {row['reason']}",
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
    return lines


def parsers_markdown(r: dict[str, Any]) -> list[str]:
    lines = _head(
        ["HTTP parser, same app, A B A B", "concurrency", "req/s", "p50 ms", "p99 ms", "degraded"]
    )
    for row in r["parsers"]:
        lines.append(
            _row(
                [
                    row["parser"],
                    row["concurrency"],
                    f"{row['throughput_rps']:.0f}",
                    f"{row['p50_ms']:.1f}",
                    f"{row['p99_ms']:.1f}",
                    f"{row['degraded']:.1%}",
                ]
            )
        )
    return lines


def heap_markdown(r: dict[str, Any]) -> list[str]:
    lines = [
        "Heap settle (serving.settle_heap): the sustained open loop, pdp_fbt, on the same app "
        "with and without it, A B A B; collector runs of generation 2 during the rounds "
        "(the longest: since the process started, its load included):",
        "",
    ]
    lines += _head(
        ["heap", "offered req/s", "p50 ms", "p99 ms", "worst p99 ms", "degraded", "errors"]
        + ["gen-2 runs", "gen-2 time ms", "longest gen-2 ms"]
    )
    for row in r["heap_settle"]:
        lines.append(
            _row(
                [
                    row["arm"],
                    f"{row['offered_rps']:.1f}",
                    f"{row['p50_ms']:.1f}",
                    f"{row['p99_ms']:.1f}",
                    f"{row['worst_p99_ms']:.1f}",
                    f"{row['degraded']:.1%}",
                    row["errors"],
                    row["gen2_runs"],
                    f"{1000 * row['gen2_seconds']:.0f}",
                    f"{row['gen2_longest_ms']:.0f}",
                ]
            )
        )
    return lines


def spike_markdown(r: dict[str, Any]) -> list[str]:
    lines = _head(
        ["spike (pdp_fbt)", "concurrency", "req/s", "p50 ms", "p99 ms", "degraded", "errors"]
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
                    row["errors"],
                ]
            )
        )
    return lines


def triton_markdown(r: dict[str, Any]) -> list[str]:
    lines = _head(["user tower", "batch", "Triton p50 ms", "in-process p50 ms", "ratio"])
    for batch, row in r["triton_ms"].items():
        t, i = row["triton"]["p50"], row["in_process"]["p50"]
        lines.append(
            _row(["session encoder", batch.split("_")[1], f"{t:.2f}", f"{i:.2f}", f"{t / i:.1f}x"])
        )
    return lines


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# Rails API benchmark ({r['bundle']}, {r['machine']['cpus']} CPUs)",
        "",
        f"Commit `{r['commit']}`; command `{r['command']}`.",
        "",
    ]
    lines += goals_markdown(r["goals"])
    lines += ["", "## Measurements", ""] + floor_markdown(r)
    lines += [""] + load_markdown(r)
    lines += [""] + sustained_markdown(r)
    lines += [""] + cached_markdown(r)
    lines += [""] + spike_markdown(r)
    if "heap_settle" in r:
        lines += [""] + heap_markdown(r)
    lines += [""] + parsers_markdown(r)
    if "triton_ms" in r:
        lines += [""] + triton_markdown(r)
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
