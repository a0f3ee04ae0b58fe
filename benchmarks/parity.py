"""Parity figures against the real services: served towers and rails vs the evaluator's.

Usage:
    python benchmarks/parity.py --bundle artifacts/<run>-rees46-rails
    python benchmarks/parity.py            # the production bundle of serving.dataset
    python benchmarks/parity.py --quick    # fewer cases: checks that it works

The bundle must have towers, and its Triton version must be in `serving.triton_repository`
(the export step writes it there). On loopback, with the servers this script starts and
stops (Redis, Triton, the API under uvicorn as its own process), on the evaluator's own
held-out cases (training/parity.py, shared with tests/serving/test_parity.py):

1. user tower: Triton's session vectors vs the in-process TorchScript encoder (max abs diff);
2. item side: the bundle's item vectors and the HNSW graph's vs a fresh item-tower encoding
   (only the user tower is hosted on Triton);
3. rails: the top-12 served over HTTP (session prefix in Redis) vs the evaluator's
   `RailPipeline.run(..., stages=("rules",))`, per rail; and, as the peer figure, the
   evaluator's own top-12 with Triton's vectors vs with its in-process ones, which isolates
   what encoder float noise alone would change.

Budgets are set far above any stage (nothing degrades) and exploration must be off.
Writes `reports/benchmarks/parity.json` and `parity.md`.
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

from benchmarks.report import write_report
from devstack.local_services import (
    LocalServer,
    api_command,
    free_port,
    redis_server,
    triton_server,
)
from railtower.datasets import load_dataset
from railtower.settings import load_settings
from serving.app import production_pointer
from serving.rail_service import LoadedRails, load_rails
from serving.user_vectors import TritonUserTower, VectorTowerSource
from state.session_store import SessionStore
from training.parity import (
    TOLERANCE,
    held_out_cases,
    item_tower_parity,
    load_sessions,
    offline_top,
    rail_parity,
    user_tower_parity,
)

# Far above any stage on a busy machine: a degraded answer would not be the evaluator's.
BUDGETS = {"redis_ms": 5000, "user_vector_ms": 10000, "ranker_ms": 10000, "admission_ms": 10000}


def encoder_noise_share(loaded: LoadedRails, rail: str, queries, vectors, slots: int) -> float:  # type: ignore[no-untyped-def]
    """Share of queries whose offline top-`slots` is the same with Triton's vectors as with
    the in-process encoder's: the most that float noise alone could change."""
    sources = dict(loaded.pipeline.sources)
    sources["two_tower"] = VectorTowerSource(loaded.towers, vectors)  # type: ignore[arg-type]
    own = offline_top(loaded.pipeline, rail, queries, slots)
    remote = offline_top(loaded.pipeline, rail, queries, slots, sources)
    return sum(a == b for a, b in zip(own, remote, strict=True)) / max(len(queries), 1)


def start_stack(bundle: Path, settings, work: Path) -> tuple[list[LocalServer], str, str, str]:  # type: ignore[no-untyped-def]
    """Redis, Triton and the API (uvicorn) on free loopback ports; (servers, urls...)."""
    started: list[LocalServer] = []
    redis_port, grpc, api_port = free_port(), free_port(), free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    started.append(redis_server(redis_port, work).start())
    repository = settings.serving.triton_repository
    started.append(triton_server(repository, grpc, free_port(), work).start())
    env = {
        "RAILTOWER_SERVING__BUNDLE": str(bundle),
        "RAILTOWER_SERVING__REDIS_URL": redis_url,
        "RAILTOWER_SERVING__TRITON_URL": f"127.0.0.1:{grpc}",
        "RAILTOWER_SERVING__REQUEST_ENCODER": "triton",  # the Triton path is what it proves
        "RAILTOWER_LOG_LEVEL": "WARNING",
        # load test: one client is many shoppers (every held-out case, one after another);
        # the per-client rate limit (on by default) is off
        "RAILTOWER_SECURITY__RATE_LIMIT_PER_S": "0",
        **{f"RAILTOWER_SERVING__BUDGETS__{k.upper()}": str(v) for k, v in BUDGETS.items()},
    }
    started.append(LocalServer("api", api_command(api_port), api_port, work, env, 180).start())
    return started, redis_url, f"127.0.0.1:{grpc}", f"http://127.0.0.1:{api_port}"


def wait_ready(triton: TritonUserTower, version: str, base: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not triton.ready(version):
        if time.monotonic() > deadline:
            raise RuntimeError(f"Triton never served user_tower version {version!r}")
        time.sleep(0.2)
    while httpx.get(f"{base}/readyz", timeout=5).status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the API at {base} never became ready")
        time.sleep(0.5)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    settings = load_settings(log_level="WARNING", serving={"budgets": BUDGETS})
    if settings.ranking.exploration.slot is not None:
        raise SystemExit("exploration is on (ranking.exploration.slot): parity needs it off")
    bundle = (args.bundle or production_pointer(settings)).resolve()
    loaded = load_rails(bundle, settings)
    if loaded.towers is None:
        raise SystemExit(f"{bundle} has no towers: train one with `railtower evaluate --towers`")
    per_rail, n_items = (60, 100) if args.quick else (args.cases, args.items)
    # the towers see every case (cheap); the rails' HTTP + one-at-a-time runs see fewer
    n_rail = 40 if args.quick else args.rail_cases
    cases = held_out_cases(loaded, settings, per_rail)
    catalogue = load_dataset(str(loaded.rails.evaluation["dataset"]), settings).items
    result: dict[str, Any] = {
        "bundle": loaded.version,
        "tolerance": TOLERANCE,
        "quick": args.quick,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "platform": platform.platform(),
        "item_side": item_tower_parity(loaded.towers, catalogue, settings, n_items),
        "user_tower": {},
        "rails": {},
    }
    started, redis_url, grpc, base = start_stack(bundle, settings, settings.cache_dir / "parity")
    try:
        triton = TritonUserTower(grpc, settings.serving.triton_model, 30.0)
        wait_ready(triton, loaded.towers.triton_version, base)
        store = SessionStore.from_settings(
            settings.serving.model_copy(update={"redis_url": redis_url}), timeout_s=5.0
        )
        slots = settings.evaluation.slots
        with httpx.Client(base_url=base, timeout=60) as client:

            def post(path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
                reply = client.post(path, json=body)
                return reply.status_code, reply.json()

            for rail, rail_cases in cases.items():
                queries = [c.query for c in rail_cases]
                figures, vectors = user_tower_parity(loaded.towers, triton, queries)
                result["user_tower"][rail] = figures
                served, vectors = rail_cases[:n_rail], vectors[:n_rail]
                load_sessions(store, rail, served)
                parity = rail_parity(loaded, rail, served, post, vectors, slots, alone=True)
                result["rails"][rail] = {
                    **parity.as_dict(),
                    "offline_triton_vs_in_process_identical": encoder_noise_share(
                        loaded, rail, queries[:n_rail], vectors, slots
                    ),
                }
    finally:
        for server in reversed(started):
            server.stop()
    return result


def _row(cells: list[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown(r: dict[str, Any]) -> str:
    lines = [f"# Parity ({r['bundle']}, tolerance {r['tolerance']:g})", ""]
    lines += [_row(["tower", "inputs", "max abs diff", "mean abs diff"]), "|---|---|---|---|"]
    for rail, u in r["user_tower"].items():
        for label, suffix in (("batched", ""), ("one per call", "_one_per_call")):
            lines.append(
                _row(
                    [
                        f"user: Triton ({label}) vs in-process, {rail} sessions",
                        u["sessions"],
                        f"{u['max_abs_diff' + suffix]:.2e}",
                        f"{u['mean_abs_diff' + suffix]:.2e}",
                    ]
                )
            )
    i = r["item_side"]
    lines.append(
        _row(
            [
                "item (stored vs fresh item tower)",
                f"{i['items']} items",
                f"{i['max_abs_diff']:.2e}",
                f"{i['mean_abs_diff']:.2e}",
            ]
        )
    )
    lines.append(
        _row(["HNSW graph vs stored vectors", f"{i['items']} items", i["index_max_abs_diff"], ""])
    )
    lines += [
        "",
        _row(
            [
                "rail",
                "sessions",
                "HTTP = evaluator (batched, the harness)",
                "HTTP = evaluator (one case at a time, as a request)",
                "degraded",
                "vector source",
                "peer: evaluator batched, Triton vs in-process vectors",
            ]
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for rail, p in r["rails"].items():
        lines.append(
            _row(
                [
                    rail,
                    p["compared"],
                    f"{p['identical']} ({p['share_identical']:.1%})",
                    f"{p['identical_alone']} ({p['identical_alone'] / p['compared']:.1%})",
                    p["degraded"],
                    ", ".join(f"{k} {v}" for k, v in p["vector_sources"].items()),
                    f"{p['offline_triton_vs_in_process_identical']:.1%}",
                ]
            )
        )
    differing = [d for p in r["rails"].values() for d in p["differences"]]
    if differing:
        lines += ["", "Differing cases (served vs the batched evaluator):", ""]
        lines += [
            f"- {d['rail']} case {d['case']} (prefix {d['prefix']}): first differs at slot "
            f"{d['first_difference'] + 1}, score gap there {d.get('score_gap_at_difference')}; "
            f"same when scored alone: {d['same_when_scored_alone']}; with the served vector "
            f"alone: {d.get('same_with_served_vector_alone')}"
            for d in differing
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--cases", type=int, default=300, help="held-out cases per rail (towers)")
    parser.add_argument("--rail-cases", type=int, default=220, help="of those, served over HTTP")
    parser.add_argument("--items", type=int, default=400, help="items re-encoded")
    parser.add_argument(
        "--quick", action="store_true", help="60 cases per rail (40 served), 100 items"
    )
    args = parser.parse_args()
    result = measure(args)
    write_report("parity", result, markdown(result))


if __name__ == "__main__":
    main()
