"""The canary ramped under load on the real stack: the steps moved through the admin routes
while closed-loop clients keep asking (tests/serving/test_canary_under_load.py,
benchmarks/canary_under_load.py).

The bundles are swap_harness's: production, and a challenger derived from it with a pin
rule set (its own version, answers that differ on most requests). The probes are many
sessions, so each share splits them. Proved per reply: HTTP 200; one of the two versions;
that version's offline answer for the same request; and, once a step is applied, the arm
its session's hash gives at that share (`railtower.canary.in_canary`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from benchmarks.live_stack import Stack, wait_ready
from benchmarks.swap_harness import Load, Probe, Reply, SwapBundles, _send
from railtower.canary import in_canary


@dataclass(frozen=True)
class Step:
    """One move of the canary: the admin call, and when this API applied it."""

    action: str  # start | advance
    share: float  # the challenger's share after it (1.0: promoted)
    called: float
    applied: float


@dataclass
class CanaryRun:
    replies: list[Reply]
    steps: list[Step]
    started: float
    ended: float
    salt: str


def _move(stack: Stack, action: str, payload: dict[str, Any]) -> dict[str, Any]:
    reply = httpx.post(
        f"{stack.base}/v1/admin/canary/{action}",
        json=payload,
        headers={"X-API-Key": stack.admin_key},
        timeout=300,
    )
    if reply.status_code != 200:
        raise RuntimeError(f"canary {action} answered {reply.status_code}: {reply.text[:1000]}")
    return reply.json()  # type: ignore[no-any-return]


def _wait_promoted(stack: Stack, version: str) -> None:
    deadline = time.monotonic() + 120
    while wait_ready(stack.base, 60)["model_version"] != version:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the API still does not serve {version} after the promotion")
        time.sleep(0.05)


def run_canary(
    stack: Stack,
    bundles: SwapBundles,
    probes: list[Probe],
    clients: int,
    phase_s: float,
    steps: list[float],
    salt: str,
) -> CanaryRun:
    """Load for `phase_s`, start the canary, then advance it through `steps` (the last,
    1.0, promotes), `phase_s` of load after each move. The admin route applies a move in
    this (one-worker) API before it answers; a promotion is applied once /readyz names the
    challenger."""
    with httpx.Client(base_url=stack.base, timeout=60) as http:
        for index, probe in enumerate(probes):  # warm, unrecorded
            _send(http, index, probe)
    load = Load(stack.base, probes, clients)
    started = time.perf_counter()
    load.start()
    moves: list[Step] = []
    try:
        time.sleep(phase_s)
        for n, share in enumerate(steps):
            called = time.perf_counter()
            if n == 0:
                _move(stack, "start", {"bundle": bundles.new.name, "reason": "under load"})
            else:
                _move(stack, "advance", {"reason": f"under load: step {n + 1}"})
            if share >= 1.0:
                _wait_promoted(stack, bundles.new_version)
            moves.append(Step("start" if n == 0 else "advance", share, called, time.perf_counter()))
            time.sleep(phase_s)
    finally:
        replies = load.stop()
    return CanaryRun(replies, moves, started, time.perf_counter(), salt)


@dataclass
class CanaryVerdict:
    """What the replies prove; every list holds offending replies (empty: proved)."""

    replies: int
    failed: list[Reply]
    unknown_version: list[Reply]
    mismatched: list[Reply]  # not the offline answer of the version it names
    misrouted: list[Reply]  # after a move was applied: not the arm the session's hash gives
    checked_routes: int
    per_step: list[dict[str, Any]]


def verify_canary(
    run: CanaryRun,
    probes: list[Probe],
    refs: dict[str, list[tuple[str, ...]]],
    old_version: str,
    new_version: str,
) -> CanaryVerdict:
    ok = [r for r in run.replies if r.status == 200]
    known = [r for r in ok if r.version in refs]
    misrouted, checked = [], 0
    for reply in known:
        share = _share_at(reply, run)
        if share is None:  # sent while a move was being applied: either arm is right
            continue
        session = str(probes[reply.probe].body["session_id"])
        expected = new_version if in_canary(session, share, run.salt) else old_version
        checked += 1
        if reply.version != expected:
            misrouted.append(reply)
    return CanaryVerdict(
        replies=len(run.replies),
        failed=[r for r in run.replies if r.status is None or not 200 <= r.status < 300],
        unknown_version=[r for r in ok if r.version not in refs],
        mismatched=[r for r in known if r.items != refs[str(r.version)][r.probe]],
        misrouted=misrouted,
        checked_routes=checked,
        per_step=step_table(run, probes, new_version, misrouted),
    )


def _share_at(reply: Reply, run: CanaryRun) -> float | None:
    """The share in force for the whole of `reply` (None inside a move's window)."""
    share = 0.0
    for step in run.steps:
        if reply.ended < step.called:
            return share
        if reply.started <= step.applied:
            return None
        share = step.share
    return share


def step_table(
    run: CanaryRun, probes: list[Probe], new_version: str, misrouted: list[Reply]
) -> list[dict[str, Any]]:
    """Per phase (before the canary, then after each move): requests and sessions per arm,
    failures, latency."""
    bounds = [(0.0, "production only")] + [(s.applied, f"{s.share:.0%}") for s in run.steps]
    rows = []
    for n, (since, name) in enumerate(bounds):
        until = run.steps[n].called if n < len(run.steps) else run.ended
        replies = [r for r in run.replies if since < r.started and r.ended < until]
        if not replies:
            continue
        canary = [r for r in replies if r.version == new_version]
        ms = np.asarray([(r.ended - r.started) * 1000 for r in replies])
        rows.append(
            {
                "step": name,
                "replies": len(replies),
                "failed": sum(r.status != 200 for r in replies),
                "challenger_replies": len(canary),
                "challenger_sessions": len({probes[r.probe].body["session_id"] for r in canary}),
                "sessions": len({probes[r.probe].body["session_id"] for r in replies}),
                "misrouted": sum(r in misrouted for r in replies),
                "misrouted_versions": sorted({str(r.version) for r in replies if r in misrouted}),
                "p50_ms": float(np.percentile(ms, 50)),
                "p99_ms": float(np.percentile(ms, 99)),
            }
        )
    return rows
