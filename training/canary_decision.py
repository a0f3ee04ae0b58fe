"""`railtower canary step`: judge the live canary's step on what shoppers did, then advance,
promote, abort or wait.

Both arms are served over the same hours, so unlike the online monitor (a model after its
promotion against the previous one before it) traffic that changes moves both alike. The
step's served impressions (`shown=True`, since the step began) are split by arm:
production (`arm="production"`, the version the canary started against) and the
challenger (`arm="canary"`, its version). Each impression is joined with the events of its
session that followed it (training.shadow_eval, the same join as the shadow report) and
counts once its horizon is over in the events. Per arm: hit rate@slots with a session
bootstrap interval; and the difference challenger - production with an interval from
resampling each arm's sessions (an arm's sessions are its own: the hash splits them).

The rule (`canary.*` settings), on the same step's window for both arms:

1. fewer than `min_impressions` matured impressions or `min_sessions` sessions with one in
   either arm: wait (no abort either: a handful of sessions' impressions rise and fall
   together, and their bootstrap interval is too narrow);
2. the challenger's hit rate more than `max_relative_drop` below production's (the
   customer's CTR guard) and worse beyond the `abort_ci_level` (99%) interval (its upper
   bound below 0): abort, every session back to production; also while held, the guard
   never sleeps. The abort's interval is wider than the advance's because every judgement
   is another look at the same step: at 95% an equal challenger crossed by chance at an
   interim look of REES46's replay;
3. held by an operator: no advance;
4. the step has run less than `min_minutes`: wait;
5. worse than production beyond the interval but not beyond the guard (by at most
   `max_relative_drop`, or not beyond the abort's interval): wait for the operator or more
   sessions, neither advanced nor aborted;
6. the point estimate more than `max_relative_drop` below production's, unresolved by the
   abort's interval: wait for more sessions (at REES46's 25% step a popularity list 48%
   below production had an interval crossing 0, and an earlier rule advanced it);
7. otherwise (within the guard, not worse beyond the interval) advance to the next share;
   the last step (1.0) promotes the challenger through the promotion path
   (`railtower.canary.advance_canary`).

The arms are different sessions, so a small step's point estimates move by chance: an
equal challenger 20% "below" production on a hundred sessions is noise, and aborting on
it would stop every good challenger at 5%; advancing on it would ramp a bad one. Such a
step waits, and the sessions it gathers tighten the interval until it aborts or advances;
the sample floors (`min_impressions`, `min_sessions`) bound how little evidence a step may
pass or fail on.

Every advance, promotion and abort is appended to the history with these figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from railtower.canary import (
    CANARY_ARM,
    CanaryRefused,
    CanaryState,
    abort_canary,
    advance_canary,
    read_canary,
    record_judgement,
)
from railtower.logs import get_logger
from railtower.production import pointer_path
from railtower.schemas import Impression
from railtower.settings import Settings
from training.evaluate import Interval
from training.shadow_eval import (
    PRODUCTION_ARM,
    ScoredImpression,
    SessionTimelines,
    epoch_s,
    score_impressions,
    session_ci,
)

log = get_logger(__name__)


@dataclass
class ArmFigures:
    """One arm's matured served impressions in the step's window, and its hit rate."""

    arm: str
    version: str
    impressions: int
    sessions: int
    hit_rate: Interval


@dataclass
class CanaryDecision:
    dataset: str
    # "advance", "promote", "abort", "wait", "held", "no canary"; "would ..." on a dry run
    action: str
    reason: str
    challenger: str | None = None
    production: str | None = None
    share: float | None = None  # the step's share when judged
    next_share: float | None = None
    minutes: float | None = None  # how long the step had run
    arms: list[ArmFigures] = field(default_factory=list)
    difference: Interval | None = None  # challenger - production hit rate
    abort_interval: Interval | None = None  # the same at canary.abort_ci_level
    relative_drop: float | None = None
    immature: int = 0
    state: CanaryState | None = None  # the canary after the decision

    def figures(self) -> dict[str, Any]:
        """What the history records beside the move."""
        return {
            "share": self.share,
            "minutes": self.minutes,
            "relative_drop": self.relative_drop,
            "difference": None if self.difference is None else asdict(self.difference),
            "abort_interval": None if self.abort_interval is None else asdict(self.abort_interval),
            "arms": [asdict(a) for a in self.arms],
        }

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["state"] = None if self.state is None else self.state.model_dump()
        return out

    def to_markdown(self) -> str:
        lines = [f"## Canary ({self.dataset}): {self.action.upper()}", "", f"- {self.reason}"]
        if self.challenger:
            lines.append(
                f"- challenger {self.challenger} vs production {self.production}; share "
                f"{_pct(self.share)} -> {_pct(self.next_share)}; step ran "
                f"{self.minutes or 0:.0f} min"
            )
        if self.relative_drop is not None:
            lines.append(f"- relative drop of the challenger's hit rate: {self.relative_drop:+.2%}")
        if self.difference is not None:
            d = self.difference
            lines.append(f"- challenger - production: {d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}]")
        if self.immature:
            lines.append(f"- {self.immature:,} served impressions left out: horizon not over yet")
        if self.arms:
            lines += [
                "",
                "| arm | version | impressions | sessions | hit rate [95% CI] |",
                "|---|---|---|---|---|",
            ]
            for a in self.arms:
                iv = a.hit_rate
                lines.append(
                    f"| {a.arm} | {a.version} | {a.impressions:,} | {a.sessions:,} | "
                    f"{iv.mean:.4f} [{iv.low:.4f}, {iv.high:.4f}] |"
                )
        return "\n".join(lines) + "\n"


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{share:.0%}"


def step_windows(
    state: CanaryState,
    impressions: Sequence[Impression],
    timelines: SessionTimelines,
    settings: Settings,
) -> tuple[dict[str, list[ScoredImpression]], int]:
    """The step's matured served impressions per arm, and how many were left out as not
    yet matured. Production's are those of the version the canary started against."""
    since = epoch_s(state.step_started())
    versions = {PRODUCTION_ARM: state.production, CANARY_ARM: state.challenger}
    mine = [
        i
        for i in impressions
        if i.shown and versions.get(i.arm) == i.model_version and epoch_s(i.served_at) >= since
    ]
    horizon_s = settings.monitor.horizon_minutes * 60
    scored = score_impressions(mine, timelines, settings.evaluation.slots, horizon_s)
    arms: dict[str, list[ScoredImpression]] = {PRODUCTION_ARM: [], CANARY_ARM: []}
    immature = 0
    for row in scored:
        if epoch_s(row.impression.served_at) + horizon_s > timelines.last_time_s:
            immature += 1
        else:
            arms[row.impression.arm].append(row)
    return arms, immature


def difference_intervals(
    challenger: Sequence[ScoredImpression],
    production: Sequence[ScoredImpression],
    settings: Settings,
    levels: Sequence[float],
) -> list[Interval]:
    """Challenger minus production hit rate at each confidence of `levels`, resampling each
    arm's sessions on its own (one set of resamples for every level)."""
    rng = np.random.default_rng(settings.seed)
    samples = settings.evaluation.bootstrap_samples
    draws = [_session_resamples(rows, samples, rng) for rows in (challenger, production)]
    diff = draws[0] - draws[1]
    mean = _hit_rate(challenger) - _hit_rate(production)
    out = []
    for level in levels:
        alpha = (1 - level) / 2
        low, high = np.quantile(diff, [alpha, 1 - alpha])
        out.append(Interval(float(mean), float(low), float(high)))
    return out


def _hit_rate(rows: Sequence[ScoredImpression]) -> float:
    return float(np.mean([r.hit for r in rows]))


def _session_resamples(
    rows: Sequence[ScoredImpression], samples: int, rng: np.random.Generator
) -> np.ndarray:
    """The arm's hit rate over `samples` resamples of its sessions (with replacement)."""
    sessions = np.array([r.impression.session_id for r in rows])
    _, index = np.unique(sessions, return_inverse=True)
    hits = np.bincount(index, weights=[r.hit for r in rows])
    counts = np.bincount(index).astype(float)
    picks = rng.integers(0, len(hits), size=(samples, len(hits)))
    return hits[picks].sum(axis=1) / counts[picks].sum(axis=1)  # type: ignore[no-any-return]


def step_canary(
    settings: Settings,
    dataset: str,
    impressions: Sequence[Impression],
    timelines: SessionTimelines,
    dry_run: bool = False,
    now: datetime | None = None,
) -> CanaryDecision:
    """Judge the live canary's step and move it (see the module docstring for the rule);
    a judgement that moves nothing (wait, held) is recorded in the history too, with its
    figures, unless `dry_run`.

    Args:
        now: the clock the step's minutes are counted on (a replay's); default the newest
            event in `timelines`, the latest time the impressions can be judged at.
    """
    decision = _judge(settings, dataset, impressions, timelines, dry_run, now)
    if not dry_run and decision.action in ("wait", "held"):
        record_judgement(
            settings.artifacts_dir,
            settings.promotion,
            dataset,
            decision.action,
            decision.reason,
            decision.figures(),
            now,
        )
    return decision


def _judge(
    settings: Settings,
    dataset: str,
    impressions: Sequence[Impression],
    timelines: SessionTimelines,
    dry_run: bool,
    now: datetime | None,
) -> CanaryDecision:
    cfg = settings.canary
    pointer = pointer_path(settings.artifacts_dir, settings.promotion, dataset)
    state = read_canary(pointer)
    decision = CanaryDecision(dataset, "no canary", "", state=state)
    if state is None or not state.live:
        said = "none was started" if state is None else f"the last one was {state.status}"
        decision.reason = f"no live canary of {dataset} ({said})"
        return decision
    decision.challenger, decision.production = state.challenger, state.production
    decision.share, decision.next_share = state.share, state.next_share
    clock = now.timestamp() if now is not None else timelines.last_time_s
    decision.minutes = max(0.0, (clock - epoch_s(state.step_started())) / 60)
    arms, decision.immature = step_windows(state, impressions, timelines, settings)
    production, challenger = arms[PRODUCTION_ARM], arms[CANARY_ARM]
    for arm, rows, version in (
        (PRODUCTION_ARM, production, state.production),
        (CANARY_ARM, challenger, state.challenger),
    ):
        sessions = [r.impression.session_id for r in rows]
        decision.arms.append(
            ArmFigures(arm, version, len(rows), len(set(sessions)), _arm_ci(rows, settings))
        )
    if min(len(production), len(challenger)) < cfg.min_impressions:
        decision.action = "wait"
        decision.reason = (
            f"too few matured impressions this step (production {len(production):,}, "
            f"challenger {len(challenger):,}; canary.min_impressions = {cfg.min_impressions:,})"
        )
        return decision
    per_arm = [a.sessions for a in decision.arms]
    if min(per_arm) < cfg.min_sessions:
        # checked before the guard too: a few sessions' impressions can look like a
        # certain drop under the session bootstrap when the shoppers simply differ
        decision.action = "wait"
        decision.reason = (
            f"too few sessions with a matured impression this step (production "
            f"{per_arm[0]:,}, challenger {per_arm[1]:,}; canary.min_sessions = "
            f"{cfg.min_sessions:,})"
        )
        return decision
    levels = [settings.evaluation.ci_level, cfg.abort_ci_level]
    decision.difference, guard = difference_intervals(challenger, production, settings, levels)
    decision.abort_interval = guard
    base = _hit_rate(production)
    if base <= 0:
        decision.action, decision.reason = "wait", "production's hit rate is 0: nothing to compare"
        return decision
    drop = (base - _hit_rate(challenger)) / base
    decision.relative_drop = drop
    # a challenger above production reads as above, not as a negative drop
    side = f"{drop:.2%} below production" if drop >= 0 else f"{-drop:.2%} above production"
    summary = (
        f"hit rate@{settings.evaluation.slots} {_hit_rate(challenger):.4f} vs {base:.4f} "
        f"({side}; abort beyond a {cfg.max_relative_drop:.0%} drop)"
    )
    beyond_interval = decision.difference.high < 0
    if drop > cfg.max_relative_drop and guard.high < 0:
        return _move(
            settings,
            decision,
            "abort",
            f"challenger below production beyond the {cfg.abort_ci_level:.0%} interval "
            f"({guard.low:+.4f}, {guard.high:+.4f}): {summary}",
            dry_run,
            now,
        )
    if state.status == "held":
        decision.action, decision.reason = "held", f"held by an operator: {summary}"
        return decision
    if decision.minutes < cfg.min_minutes:
        decision.action = "wait"
        decision.reason = (
            f"the step has run {decision.minutes:.0f} of canary.min_minutes = "
            f"{cfg.min_minutes:.0f}: {summary}"
        )
        return decision
    if beyond_interval:
        decision.action = "wait"
        decision.reason = (
            f"worse than production beyond the interval, not beyond the guard: {summary}"
        )
        return decision
    if drop > cfg.max_relative_drop:
        # an unresolved drop larger than the guard is not evidence of a good challenger:
        # the next share would show it to more shoppers on the strength of noise alone
        decision.action = "wait"
        decision.reason = (
            f"below production by more than the guard, not yet beyond the "
            f"{cfg.abort_ci_level:.0%} interval: waiting for more sessions: {summary}"
        )
        return decision
    action = "promote" if state.next_share == 1.0 else "advance"
    return _move(settings, decision, action, f"not worse than production: {summary}", dry_run, now)


def _arm_ci(rows: Sequence[ScoredImpression], settings: Settings) -> Interval:
    if not rows:
        return Interval(float("nan"), float("nan"), float("nan"))
    return session_ci([r.hit for r in rows], [r.impression.session_id for r in rows], settings)


def _move(
    settings: Settings,
    decision: CanaryDecision,
    action: str,
    reason: str,
    dry_run: bool,
    now: datetime | None,
) -> CanaryDecision:
    decision.reason = reason
    if dry_run:
        decision.action = f"would {action} (dry run)"
        return decision
    args = (settings.artifacts_dir, settings.promotion, decision.dataset, reason)
    try:
        if action == "abort":
            decision.state = abort_canary(*args, decision.figures(), now)
        else:
            decision.state = advance_canary(*args, decision.figures(), now)
    except CanaryRefused as exc:
        decision.action, decision.reason = f"{action} refused", f"{reason}; refused: {exc}"
        log.error("canary move refused", dataset=decision.dataset, why=str(exc))
        return decision
    decision.action = action
    log.warning(
        "canary " + action, dataset=decision.dataset, challenger=decision.challenger, why=reason
    )
    return decision
