"""Does shadow traffic slow the served path? Served latency with shadow share 0 vs 1.0.

Usage:
    python -m benchmarks.shadow --bundle A-rails --challenger B-rails [--artifacts DIR]
    python -m benchmarks.shadow --train        # trains two small REES46 bundles first

In one run, on loopback, with the servers this script starts and stops (Redis, a
Kafka-protocol broker, the API under uvicorn as its own process):

1. the API with `shadow.share: 0`: every request logs its served impression to Kafka and
   counts its items in Redis, nothing is shadowed;
2. the same API with `shadow.share: 1.0` and the challenger bundle: every request also
   queues a shadow job, which the worker thread (lowered priority, in the same process)
   computes with the challenger's own in-process tower.

Each phase runs the closed-loop load generator of `benchmarks/rails_api.py` on pdp_fbt
(never cached, so every request runs every stage) at each concurrency; the shadow phase
ends with the API's `/v1/admin/shadow/report` (jobs completed and dropped). Writes
`reports/benchmarks/shadow.json` and `shadow.md` with p99(shadow on) / p99(off).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.rails_api import _head, _row, closed_loop, synthetic_sessions
from benchmarks.report import write_report
from devstack.local_services import (
    LocalServer,
    api_command,
    free_port,
    kafka_broker,
    redis_server,
)
from railtower.settings import PROJECT_ROOT, load_settings
from serving.rail_service import load_rails
from state.session_store import SessionStore

WORK = PROJECT_ROOT / ".cache" / "railtower" / "bench-shadow"
# the API process this script starts gets this admin key (the shadow report is an admin route)
ADMIN_KEY = "bench-shadow-" + os.urandom(8).hex()


def train_bundles(root: Path) -> tuple[Path, Path]:
    """Two small REES46 rails bundles (two tower epochs each, different seeds) under `root`."""
    from training.harness import run_evaluation  # training only when asked for

    bundles = []
    for run, seed in (("shadowa", 20191001), ("shadowb", 7)):
        folder = root / "artifacts" / f"{run}-rees46-rails"
        if not folder.exists():
            settings = load_settings(
                artifacts_dir=root / "artifacts",
                reports_dir=root / "reports",
                seed=seed,
                evaluation={"bootstrap_samples": 100, "max_sessions_per_task": 300},
                training={"max_epochs": 2},
                ranking={"mmr_lambda_grid": [0.85, 1.0]},
                serving={"triton_repository": root / "triton_models"},
                log_level="WARNING",
            )
            run_evaluation(settings, ["rees46"], run_name=run, towers=True)
        bundles.append(folder)
    return bundles[0], bundles[1]


def phase(
    name: str, env: dict[str, str], bodies: list[tuple[str, dict]], args: argparse.Namespace
) -> dict[str, Any]:
    """Start the API with `env`, load it at each concurrency, read the shadow report, stop."""
    port = free_port()
    command = api_command(port)
    api = LocalServer(f"api-{name}", command, port, WORK, env, 180).start()
    base = f"http://127.0.0.1:{port}"
    try:
        while httpx.get(f"{base}/readyz", timeout=5).status_code != 200:
            time.sleep(0.5)
        asyncio.run(closed_loop(base, bodies, 2, 3.0))  # warm-up, not measured
        before = _report(base)
        loads = [asyncio.run(closed_loop(base, bodies, c, args.seconds)) for c in args.concurrency]
        during = _report(base)
    finally:
        api.stop()
    return {"load": loads, "report_before": before, "report_after": during}


def _report(base: str) -> dict[str, Any]:
    reply = httpx.get(f"{base}/v1/admin/shadow/report", headers={"X-API-Key": ADMIN_KEY}, timeout=5)
    reply.raise_for_status()
    return dict(reply.json())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="production rails bundle")
    parser.add_argument("--challenger", type=Path, help="challenger rails bundle")
    parser.add_argument("--artifacts", type=Path, help="artifacts_dir the bundles live in")
    parser.add_argument("--train", action="store_true", help="train two small bundles first")
    parser.add_argument("--seconds", type=float, default=8.0, help="per load step")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--sessions", type=int, default=200)
    args = parser.parse_args()
    if args.train:
        args.bundle, args.challenger = train_bundles(WORK)
        args.artifacts = WORK / "artifacts"
    if args.bundle is None or args.challenger is None:
        parser.error("pass --bundle and --challenger, or --train")
    artifacts = (args.artifacts or args.bundle.resolve().parent).resolve()
    settings = load_settings(artifacts_dir=artifacts, log_level="WARNING")
    loaded = load_rails(args.bundle, settings)
    sessions = synthetic_sessions(loaded, args.sessions)
    started: list[LocalServer] = []
    result: dict[str, Any] = {
        "bundle": loaded.version,
        "challenger": load_rails(args.challenger, settings).version,
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        },
        "rail": "pdp_fbt",
        "seconds_per_step": args.seconds,
    }
    try:
        redis_port, kafka_port = free_port(), free_port()
        started.append(redis_server(redis_port, WORK).start())
        started.append(kafka_broker(kafka_port, WORK).start())
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        store = SessionStore(redis_url, 2.0, 50, 3600, 3600)
        for n, history in enumerate(sessions):
            store.append_events(f"b{n}", [(f"b{n}-{k}", e, None) for k, e in enumerate(history)])
        bodies = [
            ("pdp_fbt", {"session_id": f"b{n}", "item_id": h[-1].item_id})
            for n, h in enumerate(sessions)
        ]
        env = {
            "RAILTOWER_ARTIFACTS_DIR": str(artifacts),
            "RAILTOWER_SERVING__BUNDLE": str(args.bundle.resolve()),
            "RAILTOWER_SERVING__REDIS_URL": redis_url,
            "RAILTOWER_SERVING__TRITON_URL": "",
            "RAILTOWER_STREAMING__BOOTSTRAP_SERVERS": f"127.0.0.1:{kafka_port}",
            "RAILTOWER_SHADOW__SINK": "kafka",
            "RAILTOWER_LOG_LEVEL": "WARNING",
            "RAILTOWER_SECURITY__ADMIN_API_KEY": ADMIN_KEY,
            # load test: one client is many shoppers; the per-client rate limit
            # (on by default) is off
            "RAILTOWER_SECURITY__RATE_LIMIT_PER_S": "0",
        }
        result["off"] = phase("off", env | {"RAILTOWER_SHADOW__SHARE": "0"}, bodies, args)
        on = env | {
            "RAILTOWER_SHADOW__SHARE": "1.0",
            "RAILTOWER_SHADOW__CHALLENGER_BUNDLE": str(args.challenger.resolve()),
        }
        result["on"] = phase("on", on, bodies, args)
    finally:
        for server in reversed(started):
            server.stop()
    write_report("shadow", result, markdown(result))


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# Shadow traffic benchmark ({r['bundle']} served, {r['challenger']} shadowed, "
        f"{r['machine']['cpus']} CPUs, {r['rail']}, {r['seconds_per_step']:.0f} s per step)",
        "",
    ]
    lines += _head(
        ["concurrency", "shadow", "req/s", "p50 ms", "p95 ms", "p99 ms", "p99 on / off", "errors"]
    )
    for off, on in zip(r["off"]["load"], r["on"]["load"], strict=True):
        for label, row in (("off (share 0)", off), ("on (share 1.0)", on)):
            ratio = f"{on['p99'] / off['p99']:.2f}" if label.startswith("on") else ""
            lines.append(
                _row(
                    [
                        row["concurrency"],
                        label,
                        f"{row['throughput_rps']:.0f}",
                        f"{row['p50']:.1f}",
                        f"{row['p95']:.1f}",
                        f"{row['p99']:.1f}",
                        ratio,
                        row["errors"],
                    ]
                )
            )
    before, after = r["on"]["report_before"]["jobs"], r["on"]["report_after"]["jobs"]
    jobs = {k: after[k] - before.get(k, 0) for k in after}
    arm = next(iter(r["on"]["report_after"]["arms"].values()), {})
    lines += [""] + _head(["shadow jobs (measured steps)", "queued", "completed", "dropped"])
    lines.append(_row(["challenger", jobs["queued"], jobs["completed"], jobs["dropped"]]))
    if arm.get("differ_share") is not None:
        lines += [
            "",
            f"Challenger vs production: {arm['differ_share']:.1%} of slots differ, mean "
            f"overlap {arm['mean_overlap']:.1%} ({arm['shadowed']} requests).",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
