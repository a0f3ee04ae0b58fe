"""The live canary, measured: a ramp under load on the real stack, and the rule on replayed
held-out sessions with a worse and an equal challenger.

Usage:
    python benchmarks/canary.py --bundle artifacts/<run>-rees46-rails
    python benchmarks/canary.py            # the production bundle of serving.dataset
    python benchmarks/canary.py --quick    # short phases, to check that it works

1. Ramp under load (benchmarks/canary_harness.py): Redis, tritonserver and the API (uvicorn,
   its own process) on loopback, a private copy of the bundle promoted as production, a
   challenger derived from it (a pin rule set: answers that differ), `--clients` closed-loop
   clients; the canary started and advanced through `canary.steps` with the admin routes,
   `--phase-s` of load after each move. Per step: replies, failed, the challenger's share
   of sessions, p50/p99; and the proof: every reply is one of the two versions, equals its
   offline answer, and is the arm its session's hash gives at that share.
2. Replays (training/canary_replay.py): the held-out sessions walked in time order through
   the service and a real Redis, the rule (training/canary_decision.py) applied every
   `--check-minutes` of the sessions' own time. Challengers: `popularity` (a rule set
   pinning the most popular items to every slot: worse by construction) and `equal` (the
   same answers under another version). Per decision that moved the canary: the share,
   both arms' sessions and hit rates with intervals, the difference, the action.
   The replay judges what followed an impression over `--horizon-minutes` (REES46's
   held-out window is about 35 minutes, too short for the default 30-minute horizon).

Writes `reports/benchmarks/canary.json` and `canary.md`.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

if __package__ in (None, ""):  # run as a script: the project root holds `benchmarks`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.canary_bundles import derive_challengers
from benchmarks.canary_harness import CanaryVerdict, run_canary, verify_canary
from benchmarks.live_stack import start_stack
from benchmarks.report import write_report
from benchmarks.swap_harness import build_probes, prepare_bundles, references, seed_sessions
from railtower.manifest import Manifest
from railtower.settings import Settings, load_settings
from serving.app import production_pointer
from serving.rail_service import load_rails
from training.canary_balance import production_rows, salt_trials
from training.canary_replay import CanaryReplay, run_canary_replay
from training.shadow_eval import PRODUCTION_ARM, SessionTimelines
from training.shadow_replay import held_out_sessions


def ramp_under_load(
    settings: Settings, bundle: Path, clients: int, phase_s: float, sessions: int
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="canary-bench-") as tmp:
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
            steps = list(settings.canary.steps)
            run = run_canary(stack, bundles, probes, clients, phase_s, steps, settings.canary.salt)
        finally:
            stack.stop()
    verdict = verify_canary(run, probes, refs, bundles.old_version, bundles.new_version)
    return {
        "production": bundles.old_version,
        "challenger": bundles.new_version,
        "triton": towers,
        "clients": clients,
        "phase_s": phase_s,
        "sessions": sessions,
        "distinct_requests": len(probes),
        "steps": [{"share": s.share, "apply_ms": (s.applied - s.called) * 1000} for s in run.steps],
        "per_step": verdict.per_step,
        "proof": _proof(verdict),
    }


def _proof(verdict: CanaryVerdict) -> dict[str, int]:
    return {
        "replies": verdict.replies,
        "failed": len(verdict.failed),
        "unknown_version": len(verdict.unknown_version),
        "mismatched_offline": len(verdict.mismatched),
        "misrouted": len(verdict.misrouted),
        "checked_routes": verdict.checked_routes,
    }


def replays(
    settings: Settings,
    bundle: Path,
    dataset: str,
    check_minutes: float,
    horizon: float,
    salts: int,
    window: dict[str, Any],
) -> dict[str, Any]:
    """The popularity and equal replays and the A/A analysis on the sessions `window`
    names (`training.shadow_replay.held_out_sessions`'s keywords)."""
    local = settings.model_copy(
        update={"monitor": settings.monitor.model_copy(update={"horizon_minutes": horizon})}
    )
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="canary-replay-") as tmp:
        root = Path(tmp)
        challengers = derive_challengers(bundle, root / "bundles", local)
        for name, challenger in (
            ("popularity", challengers.popularity),
            ("equal", challengers.equal),
        ):
            result = run_canary_replay(
                local, dataset, bundle, challenger, root / name, 0, check_minutes, **window
            )
            out[name] = _replay(result)
            if name == "equal":
                out["aa"] = aa_rate(local, dataset, result, salts, check_minutes, window)
    return out


def aa_rate(
    settings: Settings,
    dataset: str,
    equal: CanaryReplay,
    salts: int,
    check_minutes: float,
    window: dict[str, Any],
) -> dict[str, Any]:
    """How often the rule aborts a challenger that serves production's answers: the equal
    replay's impressions (both arms served the same answers) as production's, split at the
    first step's share by each of `salts` salts (training.canary_balance.salt_trials), and
    judged at every look the replay makes (every `check_minutes` of the sessions' time, on
    what had matured by then), at the evaluation's 95% interval and at the abort's."""
    events = held_out_sessions(settings, dataset, 0, **window)
    frame = events.assign(event_time=pd.to_datetime(events["event_time"], utc=True))
    grades = settings.ranking.ranker.label_grades
    as_production = [i.model_copy(update={"arm": PRODUCTION_ARM}) for i in equal.impressions]
    share = settings.canary.steps[0]
    first, last = frame["event_time"].min(), frame["event_time"].max()
    looks = pd.date_range(first, last, freq=pd.Timedelta(minutes=check_minutes))[1:]
    aborted: dict[str, set[str]] = {"ci": set(), "abort": set()}
    judged, sessions, final = 0, [], []
    for at in [*looks, last]:
        timelines = SessionTimelines(frame[frame["event_time"] <= at], grades)
        served = [i for i in as_production if i.served_at <= at.to_pydatetime()]
        trials = salt_trials(settings, production_rows(served, timelines, settings), share, salts)
        if not trials:
            continue  # too few matured impressions at this look
        judged += 1
        for level, out in aborted.items():
            out.update(t.salt for t in trials if t.would_abort(settings, level))
        sessions, final = [t.sample_sessions for t in trials], trials
    return {
        "share": share,
        "salts": salts,
        "looks": judged,
        "aborted_any_look_95": len(aborted["ci"]),
        "aborted_any_look_abort_level": len(aborted["abort"]),
        "abort_ci_level": settings.canary.abort_ci_level,
        "final_below_zero": sum(t.difference.high < 0 for t in final),
        "final_above_zero": sum(t.difference.low > 0 for t in final),
        "sample_sessions": [min(sessions), max(sessions)] if sessions else None,
        "configured_salt": None if not final else asdict(final[0]),
        "configured_salt_aborted_95": settings.canary.salt in aborted["ci"],
    }


def _bundle_cut(bundle: Path) -> pd.Timestamp:
    """The end of the newest data window the bundle was fitted on."""
    windows = Manifest.load(bundle, verify=False).data
    ends = [pd.Timestamp(w.end) for w in windows if w.end]
    if not ends:
        raise SystemExit(f"{bundle}'s manifest records no data window: use --replay test-split")
    return max(ends)


def _replay(result: CanaryReplay) -> dict[str, Any]:
    return {
        "production": result.production,
        "challenger": result.challenger,
        "status": result.status,
        "sessions": result.sessions,
        "challenger_sessions": result.challenger_sessions,
        "requests": result.requests,
        "decisions": len(result.decisions),
        "last_reason": result.decisions[-1].reason if result.decisions else None,
        "rows": result.rows(),
    }


def _iv(values: list[float] | None) -> str:
    return "-" if values is None else f"{values[0]:.4f} [{values[1]:.4f}, {values[2]:.4f}]"


def markdown(r: dict[str, Any]) -> str:
    lines = [f"# Canary ({r['dataset']}, {r['machine']['cpus']} CPUs)", ""]
    ramp = r.get("ramp")
    if ramp:
        proof = ramp["proof"]
        lines += [
            f"## Ramp under load ({ramp['production']} -> {ramp['challenger']}; "
            f"{ramp['clients']} clients, {ramp['sessions']} sessions x 3 rails, "
            f"Triton {ramp['triton']})",
            "",
            "| step | replies | failed | challenger sessions / sessions | misrouted | p50 ms "
            "| p99 ms |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in ramp["per_step"]:
            lines.append(
                f"| {row['step']} | {row['replies']} | {row['failed']} | "
                f"{row['challenger_sessions']} / {row['sessions']} | {row['misrouted']} | "
                f"{row['p50_ms']:.1f} | {row['p99_ms']:.1f} |"
            )
        lines += [
            "",
            f"Proof: {proof['replies']} replies, {proof['failed']} failed, "
            f"{proof['unknown_version']} of an unknown version, {proof['mismatched_offline']} "
            f"differing from their version's offline answer, {proof['misrouted']} of "
            f"{proof['checked_routes']} checked on another arm than their session's hash gives.",
            "",
        ]
    for name, rep in r.get("replays", {}).items():
        if name == "aa":
            continue
        lines += [
            f"## Replay: {name} challenger ({rep['challenger']}) -> {rep['status'].upper()}",
            "",
            f"{rep['sessions']:,} sessions walked ({r.get('replay_sessions', 'test-split')}), "
            f"{rep['challenger_sessions']:,} served "
            f"by the challenger; {rep['decisions']} decisions. Last: {rep['last_reason']}",
            "",
            f"Rule: steps {r['canary']['steps']}, per arm at least "
            f"{r['canary']['min_sessions']} sessions and {r['canary']['min_impressions']} "
            f"matured impressions, {r['canary']['min_minutes']:g} minutes per step.",
            "",
            "| share | action | production sessions | production hit rate | challenger sessions "
            "| challenger hit rate | difference | relative drop |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in rep["rows"]:
            drop = row["relative_drop"]
            lines.append(
                f"| {row['share']:.0%} | {row['action']} | {row['production_sessions']} | "
                f"{_iv(row['production_hit_rate'])} | {row['challenger_sessions']} | "
                f"{_iv(row['challenger_hit_rate'])} | {_iv(row['difference'])} | "
                f"{'-' if drop is None else f'{drop:+.1%}'} |"
            )
        lines.append("")
    aa = r.get("replays", {}).get("aa")
    if aa:
        first = aa["configured_salt"]
        lines += [
            f"## A/A: the equal replay's answers split by {aa['salts']} salts at {aa['share']:.0%}",
            "",
            f"Both arms served production's answers, so every split is an A/A test, judged at "
            f"{aa['looks']} looks like the replay's. Samples of {aa['sample_sessions'][0]}-"
            f"{aa['sample_sessions'][1]} sessions at the last look.",
            "",
            "| abort needs the difference below 0 beyond | salts aborted at some look |",
            "|---|---|",
            f"| the 95% interval (the rule before canary.abort_ci_level) | "
            f"{aa['aborted_any_look_95']} of {aa['salts']} |",
            f"| the {aa['abort_ci_level']:.0%} interval (canary.abort_ci_level) | "
            f"{aa['aborted_any_look_abort_level']} of {aa['salts']} |",
            "",
            f"At the last look the 95% interval is below 0 on {aa['final_below_zero']} salts and "
            f"above on {aa['final_above_zero']} (calibrated: about 2.5% each). The configured "
            f"salt: sample - rest {_iv([first['difference'][k] for k in ('mean', 'low', 'high')])}"
            f" over {first['sample_sessions']} sessions; aborted at some look at 95%: "
            f"{aa['configured_salt_aborted_95']}.",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--dataset", default="rees46")
    parser.add_argument("--triton-repository", type=Path, default=None, help="default: config")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--phase-s", type=float, default=10.0, help="load after each move")
    parser.add_argument("--sessions", type=int, default=100, help="3 requests per session")
    parser.add_argument("--check-minutes", type=float, default=2.0)
    parser.add_argument("--horizon-minutes", type=float, default=5.0)
    parser.add_argument("--min-impressions", type=int, default=100)
    parser.add_argument("--min-minutes", type=float, default=4.0)
    parser.add_argument(
        "--min-sessions",
        type=int,
        default=25,
        help="per arm before any decision (REES46's held-out window has ~330 sessions)",
    )
    parser.add_argument(
        "--steps",
        default="0.1,0.25,0.5,1.0",
        help="shares, comma-separated: at 5%% the 330 sessions give the challenger ~16",
    )
    parser.add_argument(
        "--salts", type=int, default=200, help="A/A: first-step samples of the equal replay"
    )
    parser.add_argument(
        "--replay",
        choices=("test-split", "after-cut", "later-window"),
        default="test-split",
        help="the test split's sessions, every session that ends after the bundle's "
        "training data (a later-window bundle's cut: about twice as many on REES46), or "
        "the later-window protocol's sessions (the only choice on data without a clock)",
    )
    parser.add_argument(
        "--arrivals-per-minute",
        type=float,
        default=60.0,
        help="data without a clock (Amazon-M2): one session starts every 60/N seconds",
    )
    parser.add_argument("--skip-ramp", action="store_true")
    parser.add_argument("--skip-replays", action="store_true")
    parser.add_argument("--quick", action="store_true", help="3 s phases, 2 clients")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.phase_s, args.sessions = 2, 3.0, 40
    serving = (
        {} if args.triton_repository is None else {"triton_repository": args.triton_repository}
    )
    canary = {
        "min_impressions": args.min_impressions,
        "min_minutes": args.min_minutes,
        "min_sessions": args.min_sessions,
        "steps": [float(s) for s in args.steps.split(",")],
    }
    settings = load_settings(
        log_level="WARNING", canary=canary, **({"serving": serving} if serving else {})
    )
    bundle = (args.bundle or production_pointer(settings)).resolve()
    if not (bundle / "manifest.json").exists():
        parser.error(f"no rails bundle at {bundle}: pass --bundle, or promote one (main.sh)")
    result: dict[str, Any] = {
        "dataset": args.dataset,
        "bundle": bundle.name,
        "canary": settings.canary.model_dump(),
        "check_minutes": args.check_minutes,
        "horizon_minutes": args.horizon_minutes,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "platform": platform.platform(),
    }
    if not args.skip_ramp:
        # the API under test starts canaries with the shipped canary.* settings (its own
        # environment), so the ramp checks routing at the shipped steps
        shipped = load_settings(log_level="WARNING", **({"serving": serving} if serving else {}))
        result["ramp"] = ramp_under_load(shipped, bundle, args.clients, args.phase_s, args.sessions)
    if not args.skip_replays:
        window = {
            "after": _bundle_cut(bundle) if args.replay == "after-cut" else None,
            "later_window": args.replay == "later-window",
            "arrivals_per_minute": args.arrivals_per_minute,
        }
        result["replay_sessions"] = args.replay
        result["arrivals_per_minute"] = args.arrivals_per_minute
        result["replays"] = replays(
            settings,
            bundle,
            args.dataset,
            args.check_minutes,
            args.horizon_minutes,
            args.salts,
            window,
        )
    write_report("canary", result, markdown(result))


if __name__ == "__main__":
    main()
