"""`railtower monitor`: online hit rate per model version, and auto-rollback on a drop.

The served impressions (`shown=True`, `arm="production"`) are joined with the events that
followed them exactly as the shadow report joins them (training.shadow_eval). Per model
version, its most recent `monitor.window_minutes` of served impressions (back from its own
last one) give its online hit rate@slots with a session-resampled interval.

The rule, on the point estimates (the intervals are reported, not used, so a drop that is
real but inside a wide interval is still acted on once the samples are large):

1. the promoted model is the one the production pointer names; the previous model is the
   one below it on the production stack of `history.jsonl` (what a rollback restores);
2. both need at least `monitor.min_impressions` matured impressions in their windows (an
   impression has matured once the events cover its whole horizon), else nothing happens;
3. relative drop = (previous - promoted) / previous; more than `monitor.max_relative_drop`
   (default 0.03) calls `railtower.production.rollback`, which moves the pointer back and
   records it. A previous hit rate of 0 gives no drop to measure: nothing happens.

The two windows are different periods (before and after the promotion), so traffic that
changed meanwhile moves both; the guard against noise is the sample floor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from railtower.errors import ArtifactMismatch
from railtower.logs import get_logger
from railtower.manifest import Manifest
from railtower.production import RollbackRefused, pointer_path, production_stack, rollback
from railtower.schemas import Impression
from railtower.settings import Settings
from training.evaluate import Interval
from training.shadow_eval import (
    PRODUCTION_ARM,
    SessionTimelines,
    epoch_s,
    score_impressions,
    session_ci,
)

log = get_logger(__name__)


@dataclass
class VersionWindow:
    """One model version's served impressions in its window and their online hit rate."""

    version: str
    impressions: int
    sessions: int
    window_start: str | None
    window_end: str | None
    hit_rate: Interval


@dataclass
class MonitorDecision:
    dataset: str
    promoted: str | None
    previous: str | None
    # "rollback", "rollback refused", "would roll back (dry run)", "keep", "no decision"
    action: str
    reason: str
    relative_drop: float | None = None
    windows: list[VersionWindow] = field(default_factory=list)
    immature: int = 0

    @property
    def rolls_back(self) -> bool:
        return self.action == "rollback"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def to_markdown(self) -> str:
        lines = [
            f"## Online monitor ({self.dataset}): {self.action.upper()}",
            "",
            f"- promoted: {self.promoted or 'none'}; previous: {self.previous or 'none'}",
            f"- {self.reason}",
        ]
        if self.relative_drop is not None:
            lines.append(f"- relative drop of the hit rate: {self.relative_drop:+.2%}")
        if self.immature:
            lines.append(f"- {self.immature:,} served impressions left out: horizon not over yet")
        if self.windows:
            lines += [
                "",
                "| version | impressions | sessions | window | hit rate [95% CI] |",
                "|---|---|---|---|---|",
            ]
            for w in self.windows:
                iv = w.hit_rate
                lines.append(
                    f"| {w.version} | {w.impressions:,} | {w.sessions:,} | "
                    f"{w.window_start} .. {w.window_end} | "
                    f"{iv.mean:.4f} [{iv.low:.4f}, {iv.high:.4f}] |"
                )
        return "\n".join(lines) + "\n"


def _version_of(folder: Path, fallback: str) -> str:
    """The model version a bundle's impressions carry (its manifest's), else its name."""
    try:
        return Manifest.load(folder, verify=False).version
    except (ArtifactMismatch, OSError, ValueError):
        return fallback


def promoted_and_previous(pointer: Path, artifacts_dir: Path) -> tuple[str | None, str | None]:
    """(promoted version, the version it replaced), from the pointer and the production
    stack that `railtower.production.production_stack` replays from `history.jsonl` (the same
    stack `rollback` pops, so the model compared against is the one a rollback restores)."""
    if not pointer.is_symlink() or not pointer.exists():
        return None, None
    current = pointer.resolve()
    stack = production_stack(pointer, artifacts_dir)
    previous = None
    if len(stack) >= 2 and stack[-1].resolve() == current:
        previous = _version_of(stack[-2], stack[-2].name)
    return _version_of(current, current.name), previous


def version_windows(
    impressions: Sequence[Impression],
    timelines: SessionTimelines,
    settings: Settings,
    versions: Sequence[str],
) -> tuple[list[VersionWindow], int]:
    """Each version's served, matured impressions in its own latest window; and how many
    served impressions were left out as not yet matured."""
    horizon_s = settings.monitor.horizon_minutes * 60
    served = [i for i in impressions if i.shown and i.arm == PRODUCTION_ARM]
    scored = score_impressions(served, timelines, settings.evaluation.slots, horizon_s)
    times = np.array([epoch_s(r.impression.served_at) for r in scored])
    matured = times + horizon_s <= timelines.last_time_s
    windows = []
    for version in versions:
        mine = np.array([r.impression.model_version == version for r in scored], dtype=bool)
        mine &= matured
        if not mine.any():
            windows.append(VersionWindow(version, 0, 0, None, None, Interval(*(np.nan,) * 3)))
            continue
        end = times[mine].max()
        inside = mine & (times > end - settings.monitor.window_minutes * 60)
        rows = [r for r, keep in zip(scored, inside, strict=True) if keep]
        sessions = [r.impression.session_id for r in rows]
        served_at = sorted(r.impression.served_at for r in rows)
        windows.append(
            VersionWindow(
                version,
                len(rows),
                len(set(sessions)),
                served_at[0].isoformat(timespec="seconds"),
                served_at[-1].isoformat(timespec="seconds"),
                session_ci([r.hit for r in rows], sessions, settings),
            )
        )
    return windows, int((~matured).sum())


def check_and_rollback(
    settings: Settings,
    dataset: str,
    impressions: Sequence[Impression],
    timelines: SessionTimelines,
    dry_run: bool = False,
) -> MonitorDecision:
    """Compare the promoted model's online hit rate with the previous one's; roll back on a
    drop beyond `monitor.max_relative_drop` (see the module docstring for the rule)."""
    cfg = settings.monitor
    pointer = pointer_path(settings.artifacts_dir, settings.promotion, dataset)
    promoted, previous = promoted_and_previous(pointer, settings.artifacts_dir)
    decision = MonitorDecision(dataset, promoted, previous, "no decision", "")
    if promoted is None:
        decision.reason = f"no production pointer at {pointer}: nothing to monitor"
        return decision
    if previous is None:
        decision.reason = "no previous model in history.jsonl: nothing to roll back to"
        return decision
    windows, decision.immature = version_windows(
        impressions, timelines, settings, [promoted, previous]
    )
    decision.windows = windows
    now, before = windows
    if min(now.impressions, before.impressions) < cfg.min_impressions:
        decision.reason = (
            f"too few matured impressions to decide ({promoted}: {now.impressions:,}, "
            f"{previous}: {before.impressions:,}; monitor.min_impressions = "
            f"{cfg.min_impressions:,})"
        )
        return decision
    if before.hit_rate.mean <= 0:
        decision.reason = "the previous model's hit rate is 0: no relative drop to measure"
        return decision
    drop = (before.hit_rate.mean - now.hit_rate.mean) / before.hit_rate.mean
    decision.relative_drop = drop
    summary = (
        f"hit rate@{settings.evaluation.slots} {now.hit_rate.mean:.4f} vs "
        f"{before.hit_rate.mean:.4f} ({drop:+.2%} relative drop; threshold "
        f"{cfg.max_relative_drop:.0%})"
    )
    if drop <= cfg.max_relative_drop:
        decision.action, decision.reason = "keep", f"{promoted} holds: {summary}"
        return decision
    reason = f"online monitor: {promoted} below {previous}: {summary}"
    if dry_run:
        decision.action, decision.reason = "would roll back (dry run)", reason
        return decision
    try:  # moves the pointer back and records it in history.jsonl
        rollback(settings.artifacts_dir, settings.promotion, dataset, reason)
    except RollbackRefused as exc:
        decision.action, decision.reason = "rollback refused", f"{reason}; refused: {exc}"
        log.error("rollback refused", dataset=dataset, why=str(exc))
        return decision
    decision.action, decision.reason = "rollback", reason
    log.warning("rolled back", dataset=dataset, promoted=promoted, previous=previous, drop=drop)
    return decision
