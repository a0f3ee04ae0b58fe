"""Promotion under load: promote a bundle, then roll it back, while clients keep asking.

Usage:
    python benchmarks/swap_under_load.py --bundle artifacts/<run>-rees46-rails
    python benchmarks/swap_under_load.py            # the production bundle of serving.dataset
    python benchmarks/swap_under_load.py --quick    # a short run, to check that it works

Against the real stack on loopback (Redis, tritonserver, the API under uvicorn as its own
process; benchmarks/live_stack.py), served from a private artifacts folder: the bundle is
copied there and promoted, a second bundle is derived from it (the same models, a rule set
pinning one item, its own version; benchmarks/swap_harness.py), and `--clients` closed-loop
clients send homepage_hero / pdp_fbt / cart_upsell requests for `--phase-s` seconds before,
between and after `POST /v1/admin/promote` and `POST /v1/admin/rollback`.

Reported: failed requests (any non-2xx or connection error), p50/p95/p99 per phase (before,
the promote window, between, the rollback window, after; a window runs from the admin call
until 2 s after /readyz names the new version) with the windows' p99 against before's, and
the consistency proof: every reply names one of the two versions and equals that version's
offline answer for the same request. Writes `reports/benchmarks/swap_under_load.json` and
`swap_under_load.md`.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: the project root holds `benchmarks`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.live_stack import start_stack
from benchmarks.report import write_report
from benchmarks.swap_harness import (
    SETTLE_S,
    SwapRun,
    Verdict,
    build_probes,
    phase_latencies,
    prepare_bundles,
    references,
    run_swap,
    seed_sessions,
    verify,
)
from railtower.settings import Settings, load_settings
from serving.app import production_pointer
from serving.rail_service import load_rails

PHASES = ("before", "promote window", "between", "rollback window", "after")


def measure(
    settings: Settings, bundle: Path, clients: int, phase_s: float, sessions: int
) -> dict[str, Any]:
    """One promote-and-roll-back run under load; the figures as a JSON-ready dict."""
    with tempfile.TemporaryDirectory(prefix="swap-bench-") as tmp:
        root = Path(tmp)
        bundles = prepare_bundles(bundle, bundle.parent, root, settings)
        local = settings.model_copy(update={"artifacts_dir": bundles.artifacts})
        versions = {
            bundles.old_version: load_rails(bundles.old, local),
            bundles.new_version: load_rails(bundles.new, local),
        }
        probes = build_probes(versions[bundles.old_version], sessions, avoid=bundles.pin_item)
        refs = references(versions, probes)
        towers = versions[bundles.old_version].towers is not None
        repository = settings.serving.triton_repository if towers else None
        stack = start_stack(bundles.artifacts, repository, root / "work")
        try:
            seed_sessions(stack.redis_url, probes)
            run = run_swap(stack, bundles, probes, clients, phase_s)
        finally:
            stack.stop()
    verdict = verify(run, refs)
    return {
        "bundle": bundles.old_version,
        "new_bundle": bundles.new_version,
        "triton": towers,
        "clients": clients,
        "phase_s": phase_s,
        "settle_s": SETTLE_S,
        "distinct_requests": len(probes),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "platform": platform.platform(),
        "switches": _switches(run),
        "phases": phase_latencies(run),
        "proof": _proof(verdict),
        "failed_examples": [{"status": r.status, "error": r.error} for r in verdict.failed[:10]],
    }


def _switches(run: SwapRun) -> list[dict[str, Any]]:
    return [
        {
            "action": s.action,
            "to": s.to_version,
            "admin_call_ms": (s.answered - s.called) * 1000,
            "call_to_served_ms": (s.served - s.called) * 1000,
        }
        for s in run.switches
    ]


def _proof(verdict: Verdict) -> dict[str, Any]:
    return {
        "replies": verdict.replies,
        "failed": len(verdict.failed),
        "unknown_version": len(verdict.unknown_version),
        "mismatched_offline": len(verdict.mismatched),
        "stale_after_switch": len(verdict.stale),
        "degraded": verdict.degraded,
        "checked_in_windows": verdict.checked_in_windows,
        "distinguishable_requests": verdict.distinguishable_probes,
        "replies_per_version": verdict.versions,
    }


def markdown(r: dict[str, Any]) -> str:
    proof, phases = r["proof"], r["phases"]
    base = phases.get("before", {}).get("p99")
    lines = [
        f"# Promotion under load ({r['bundle']} -> {r['new_bundle']} -> back; "
        f"{r['clients']} clients, {r['machine']['cpus']} CPUs, Triton {r['triton']})",
        "",
        "| phase | replies | failed | req/s | p50 ms | p95 ms | p99 ms | p99 / before |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in PHASES:
        if name in phases:
            p = phases[name]
            ratio = f"{p['p99'] / base:.2f}x" if base else "-"
            lines.append(
                f"| {name} | {p['replies']} | {p['failed']} | {p['rps']:.1f} | {p['p50']:.1f} "
                f"| {p['p95']:.1f} | {p['p99']:.1f} | {ratio} |"
            )
    lines += ["", "| switch | admin call ms | call -> served ms |", "|---|---|---|"]
    lines += [
        f"| {s['action']} -> {s['to']} | {s['admin_call_ms']:.0f} | {s['call_to_served_ms']:.0f} |"
        for s in r["switches"]
    ]
    lines += [
        "",
        f"Consistency: {proof['replies']} replies, {proof['failed']} failed, "
        f"{proof['unknown_version']} with an unknown version, {proof['mismatched_offline']} "
        f"differing from their version's offline answer ({proof['checked_in_windows']} of them "
        f"inside a swap window), {proof['stale_after_switch']} of the old version after a "
        f"switch was served; {proof['distinguishable_requests']} of "
        f"{r['distinct_requests']} distinct requests have different answers in the two versions.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--triton-repository", type=Path, default=None, help="default: config")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--phase-s", type=float, default=20.0, help="load before/between/after")
    parser.add_argument("--sessions", type=int, default=30, help="3 requests per session")
    parser.add_argument("--quick", action="store_true", help="6 s phases, 2 clients")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.phase_s, args.sessions = 2, 6.0, 10
    # a bundle trained elsewhere (a test's) carries its Triton versions in its own repository
    serving = (
        {} if args.triton_repository is None else {"triton_repository": args.triton_repository}
    )
    settings = load_settings(log_level="WARNING", **({"serving": serving} if serving else {}))
    bundle = (args.bundle or production_pointer(settings)).resolve()
    if not (bundle / "manifest.json").exists():
        parser.error(f"no rails bundle at {bundle}: pass --bundle, or promote one (main.sh)")
    result = measure(settings, bundle, args.clients, args.phase_s, args.sessions)
    write_report("swap_under_load", result, markdown(result))


if __name__ == "__main__":
    main()
