"""Redis memory per session state, vector and pre-warmed rail; snapshot round trip, one
Redis vs Redis Cluster.

Usage:
    python -m benchmarks.redis_memory             # 10,000 sessions (a few minutes)
    python -m benchmarks.redis_memory --quick     # 300 sessions: checks that it works

Writes, through the serving code (state/session_store.py), N sessions whose contents are
real REES46 data: events at the configured `serving.session_events` (item ids, event types
and times cycled from real sessions, 16-hex event ids, UUID session ids, a device context),
a float32 vector at `towers.dim` under a realistic model version, a pre-warmed homepage rail
of `evaluation.slots` items as serving.service stores it, and each session's user set.
Each kind is written in its own phase and measured by the growth of `INFO memory`
used_memory (what Redis holds, allocator overhead included), with `MEMORY USAGE` of sampled
keys beside it. The same is done on a three-master cluster (used_memory summed over the
masters: cluster mode keeps every key in a per-slot index, which costs bytes per key). A
replica per master doubles the total; the figures are per copy.

Then the read the API does per request (`SessionStore.snapshot`: events, count, vector and
rail in one pipelined round trip) is timed on both, one client, sequentially, on loopback.

Writes `reports/benchmarks/redis_memory.json` and `redis_memory.md`.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report import write_report
from devstack.local_services import LocalServer, free_port, redis_cluster, redis_server
from railtower.datasets import load_dataset
from railtower.settings import Settings, load_settings
from ranking.candidates import Candidate
from serving.rail_cache import rail_payload  # the cached rail exactly as serving stores it
from state.redis_client import connect_url
from state.session_store import SessionStore
from towers.session_features import HistoryEvent

VERSION = "nightly-20261201T020000-rees46-rails"  # the length of a nightly run's version
EventTriple = tuple[str, HistoryEvent, str | None]


def real_sessions(settings: Settings, n: int, length: int, seed: int = 7) -> list[dict[str, Any]]:
    """n sessions of `length` events built from REES46's own sessions (cycled to fill)."""
    events = load_dataset("rees46", settings).events.sort_values("event_time")
    groups = [g for _, g in events.groupby("session_id", sort=False)]
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        group = groups[k % len(groups)]
        rows = group.iloc[np.arange(length) % len(group)]
        start = rows["event_time"].iloc[0].timestamp()
        triples: list[EventTriple] = [
            (
                f"{rng.integers(1 << 63):016x}",
                HistoryEvent(str(item), str(kind), start + 30.0 * j),
                "desktop",
            )
            for j, (item, kind) in enumerate(zip(rows["item_id"], rows["event_type"], strict=True))
        ]
        user = group["user_id"].iloc[0]
        out.append(
            {
                "session_id": str(uuid.UUID(int=int(rng.integers(1 << 62)))),
                "events": triples,
                "user_id": None if user is None else str(user),
            }
        )
    return out


def used_memory(clients: list[Any]) -> int:
    return sum(int(c.info("memory")["used_memory"]) for c in clients)


def phase(clients: list[Any], write: Callable[[], None]) -> int:
    """Bytes used_memory grew by while `write` ran."""
    before = used_memory(clients)
    write()
    return used_memory(clients) - before


def measure_memory(
    store: SessionStore, clients: list[Any], sessions: list[dict[str, Any]], slots: int, dim: int
) -> dict[str, Any]:
    """Bytes per session for each kind of state, written phase by phase."""
    rng = np.random.default_rng(3)
    catalogue = sorted({e.item_id for s in sessions[:200] for _, e, _ in s["events"]})
    n = len(sessions)

    def events() -> None:
        for s in sessions:
            store.append_events(s["session_id"], s["events"])

    def users() -> None:
        # the newest event again: already seen, so only the user's session set grows
        for s in sessions:
            if s["user_id"]:
                store.append_events(s["session_id"], s["events"][-1:], [s["user_id"]])

    def vectors() -> None:
        for s in sessions:
            vector = rng.standard_normal(dim).astype(np.float32)
            store.put_vector(s["session_id"], VERSION, vector / np.linalg.norm(vector), "50")

    def rails() -> None:
        for s in sessions:
            items = [
                Candidate(str(rng.choice(catalogue)), float(rng.random())) for _ in range(slots)
            ]
            store.put_rail(
                s["session_id"], VERSION, "homepage_hero", rail_payload("50", items, None)
            )

    grown = {
        "session_state": phase(clients, events),
        "vector": phase(clients, vectors),
        "rail": phase(clients, rails),
        "user_set": phase(clients, users),
    }
    users_n = sum(1 for s in sessions if s["user_id"])
    per = {k: v / (users_n if k == "user_set" else n) for k, v in grown.items()}
    return {
        "sessions": n,
        "bytes_per_session": per,
        "bytes_per_session_total": sum(per.values()),
        "memory_usage_sampled": sample_keys(store, sessions[:200]),
    }


def sample_keys(store: SessionStore, sessions: list[dict[str, Any]]) -> dict[str, float]:
    """Mean `MEMORY USAGE <key> SAMPLES 0` per key kind (Redis' own per-key estimate)."""
    kinds = {
        "events": lambda s: store._key(s, "events"),
        "seen": lambda s: store._key(s, "seen"),
        "n": lambda s: store._key(s, "n"),
        "vec": lambda s: store._key(s, "vec", VERSION),
        "rail": lambda s: store._key(s, "rail", VERSION, "homepage_hero"),
    }
    out = {}
    for kind, key in kinds.items():
        sizes = [store.client.memory_usage(key(s["session_id"]), samples=0) or 0 for s in sessions]
        out[kind] = float(np.mean(sizes))
    return out


def snapshot_latency(store: SessionStore, sessions: list[dict[str, Any]], repeats: int) -> dict:
    for s in sessions[:50]:  # connections opened (one per master on a cluster)
        store.snapshot(s["session_id"], VERSION, "homepage_hero")
    times = []
    for k in range(repeats):
        session = sessions[k % len(sessions)]["session_id"]
        started = time.perf_counter()
        snap = store.snapshot(session, VERSION, "homepage_hero")
        times.append(time.perf_counter() - started)
        assert snap.vector is not None and snap.rail is not None, "a write phase went missing"
    ms = np.asarray(times) * 1000
    return {f"p{q}": float(np.percentile(ms, q)) for q in (50, 95, 99)} | {"n": len(ms)}


def run_single(args: argparse.Namespace, sessions: list, work: Path) -> dict:
    port = free_port()
    # no maxmemory: an eviction would hide what the keys cost
    server: LocalServer = redis_server(port, work / "single", maxmemory_mb=0).start()
    try:
        store = SessionStore(f"redis://127.0.0.1:{port}/0", 2.0, args.events, 86400, 300)
        result = measure_memory(store, [store.client], sessions, args.slots, args.dim)
        result["snapshot_ms"] = snapshot_latency(store, sessions, args.repeats)
        return result
    finally:
        server.stop()


def run_cluster(args: argparse.Namespace, sessions: list, work: Path) -> dict:
    cluster = redis_cluster([free_port() for _ in range(3)], work / "cluster", replicas=0)
    cluster.start()
    try:
        first, *others = cluster.startup_nodes
        client = connect_url(f"redis://{first}/0", 2.0, "cluster", others)
        store = SessionStore(client, 2.0, args.events, 86400, 300)
        masters = [connect_url(f"redis://{node}/0", 2.0) for node in cluster.startup_nodes]
        result = measure_memory(store, masters, sessions, args.slots, args.dim)
        result["snapshot_ms"] = snapshot_latency(store, sessions, args.repeats)
        result["keys_per_master"] = [int(m.dbsize()) for m in masters]
        return result
    finally:
        cluster.stop()


def main() -> None:
    settings = load_settings(log_level="WARNING")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3000, help="snapshots timed per setup")
    parser.add_argument("--quick", action="store_true", help="300 sessions, 300 snapshots")
    args = parser.parse_args()
    if args.quick:
        args.sessions, args.repeats = 300, 300
    args.events, args.dim = settings.serving.session_events, settings.towers.dim
    args.slots = settings.evaluation.slots
    sessions = real_sessions(settings, args.sessions, args.events)
    work = settings.cache_dir / "bench-redis-memory"
    result: dict[str, Any] = {
        "quick": args.quick,
        "config": {
            "sessions": args.sessions,
            "session_events": args.events,
            "vector_dim": args.dim,
            "rail_slots": args.slots,
            "model_version": VERSION,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        },
        "single": run_single(args, sessions, work),
        "cluster": run_cluster(args, sessions, work),
    }
    single, cluster = result["single"], result["cluster"]
    result["cluster_vs_single"] = {
        "snapshot_p50": cluster["snapshot_ms"]["p50"] / single["snapshot_ms"]["p50"],
        "bytes_per_session_total": (
            cluster["bytes_per_session_total"] / single["bytes_per_session_total"]
        ),
    }
    write_report("redis_memory", result, markdown(result))


def _row(cells: list[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown(r: dict[str, Any]) -> str:
    c = r["config"]
    single, cluster = r["single"], r["cluster"]
    lines = [
        f"# Redis memory and snapshot round trip ({c['sessions']:,} sessions, "
        f"{r['machine']['cpus']} CPUs)",
        "",
        f"Per session: {c['session_events']} events, a {c['vector_dim']}-d float32 vector, "
        f"a {c['rail_slots']}-slot hero rail; bytes = growth of used_memory per item "
        "(cluster: summed over 3 masters, one copy; a replica per master doubles it)."
        + (" QUICK run: not a measurement." if r["quick"] else ""),
        "",
        _row(["state", "single bytes", "cluster bytes", "cluster / single", "MEMORY USAGE"]),
        "|---|---|---|---|---|",
    ]
    sampled = single["memory_usage_sampled"]
    usage = {
        "session_state": sampled["events"] + sampled["seen"] + sampled["n"],
        "vector": sampled["vec"],
        "rail": sampled["rail"],
        "user_set": None,
    }
    for kind, a in single["bytes_per_session"].items():
        b = cluster["bytes_per_session"][kind]
        est = "" if usage[kind] is None else f"{usage[kind]:,.0f}"
        lines.append(_row([kind, f"{a:,.0f}", f"{b:,.0f}", f"{b / a:.2f}x", est]))
    total_a, total_b = single["bytes_per_session_total"], cluster["bytes_per_session_total"]
    lines.append(
        _row(["**total**", f"{total_a:,.0f}", f"{total_b:,.0f}", f"{total_b / total_a:.2f}x", ""])
    )
    lines += [
        "",
        _row(["snapshot round trip", "p50 ms", "p95 ms", "p99 ms", "n"]),
        "|---|---|---|---|---|",
    ]
    for name, part in (("single", single), ("cluster", cluster)):
        s = part["snapshot_ms"]
        lines.append(_row([name, f"{s['p50']:.3f}", f"{s['p95']:.3f}", f"{s['p99']:.3f}", s["n"]]))
    lines.append(
        _row(["cluster / single p50", f"{r['cluster_vs_single']['snapshot_p50']:.2f}x", "", "", ""])
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
