"""The canary on replayed traffic: held-out sessions walked in time order through the real
service (a real Redis, `RailService.serve` routing each session by the canary's share), the
rule of `training.canary_decision` applied every `check_minutes` of the sessions' own time,
and every move followed by the service at once, as an API process follows the state file.

    private artifacts/production/<data set> -> production bundle (promoted at the start)
    canary started at the first event's time, steps from settings.canary
    event -> Redis -> serve (production or challenger) -> impression (re-stamped)
    every check_minutes: events so far -> step_canary(now = replay clock) -> follow_canary

The walk stops once the canary is over (aborted or promoted). What it measures: the step
each decision was taken at, with both arms' sessions and hit rates and their intervals, and
how many sessions the challenger served before the decision (the blast radius of a bad
challenger). Nothing outside `root` changes: the pointer and history are a private copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from railtower.canary import CANARY_ARM, read_canary, start_canary
from railtower.logs import get_logger
from railtower.manifest import Manifest
from railtower.production import pointer_path, record_promotion, switch
from railtower.schemas import Impression
from railtower.settings import Settings
from ranking.rails_bundle import link_tower_bundle
from serving.impressions import MemoryImpressionSink
from serving.metrics import Metrics
from serving.rail_service import load_rails
from serving.service import RailService
from serving.shadow import ShadowRunner
from training.canary_decision import CanaryDecision, step_canary
from training.shadow_eval import SessionTimelines
from training.shadow_replay import held_out_sessions, replay_events, with_lifted_budgets

log = get_logger(__name__)


@dataclass
class CanaryReplay:
    """Every decision of the walk, and how it ended."""

    production: str
    challenger: str
    decisions: list[CanaryDecision] = field(default_factory=list)
    status: str = "running"
    sessions: int = 0  # sessions the walk served
    challenger_sessions: int = 0  # of those, served by the challenger at least once
    requests: int = 0
    degraded: int = 0
    # every impression the walk logged (both arms), for analyses after it
    impressions: list[Impression] = field(default_factory=list, repr=False)

    @property
    def moves(self) -> list[CanaryDecision]:
        return [d for d in self.decisions if d.action in ("advance", "promote", "abort")]

    def rows(self) -> list[dict[str, Any]]:
        """One row per decision that moved the canary, or the last one if none did."""
        shown = self.moves or self.decisions[-1:]
        out = []
        for d in shown:
            arms = {a.arm: a for a in d.arms}
            row: dict[str, Any] = {"share": d.share, "action": d.action, "minutes": d.minutes}
            for arm, name in (("production", "production"), (CANARY_ARM, "challenger")):
                figures = arms.get(arm)
                row[f"{name}_sessions"] = None if figures is None else figures.sessions
                row[f"{name}_impressions"] = None if figures is None else figures.impressions
                row[f"{name}_hit_rate"] = None if figures is None else _interval(figures.hit_rate)
            row["difference"] = None if d.difference is None else _interval(d.difference)
            row["relative_drop"] = d.relative_drop
            out.append(row)
        return out


def _interval(iv: Any) -> list[float]:
    return [float(iv.mean), float(iv.low), float(iv.high)]


def run_canary_replay(
    settings: Settings,
    dataset: str,
    production: Path,
    challenger: Path,
    root: Path,
    sessions: int = 0,
    check_minutes: float = 10.0,
    after: pd.Timestamp | None = None,
    later_window: bool = False,
    arrivals_per_minute: float = 0.0,
) -> CanaryReplay:
    """Replay held-out sessions of `dataset` with `challenger` ramped against `production`.

    Args:
        settings: `canary.*` sets the ramp and the rule; artifacts live under `root`.
        production, challenger: rails bundles (the challenger evaluated, as for a start).
        root: a private folder for the pointer, its history and Redis's files.
        sessions: the first N held-out sessions (0 = all).
        check_minutes: minutes of the sessions' own time between two decisions.
        after: replay the sessions that end after this time (the production bundle's
            cut) instead of the test split (`training.shadow_replay.held_out_sessions`).
        later_window, arrivals_per_minute: replay the later-window protocol's sessions
            instead; data without a clock gets synthesised session starts (the same
            function's arguments).
    """
    link_tower_bundle(production, settings.artifacts_dir, root / "artifacts")
    settings = with_lifted_budgets(settings).model_copy(
        update={"artifacts_dir": root / "artifacts", "cache_dir": root / "cache"}
    )
    pointer = pointer_path(settings.artifacts_dir, settings.promotion, dataset)
    switch(pointer, production)
    record_promotion(pointer, {"promote": True, "by": "canary-replay"}, production, None)
    served = load_rails(production, settings)
    events = held_out_sessions(
        settings, dataset, sessions, after, later_window, arrivals_per_minute
    )
    first = events["event_time"].min().to_pydatetime()
    start_canary(
        settings.artifacts_dir,
        settings.promotion,
        settings.canary,
        dataset,
        challenger,
        "canary replay",
        at=first,
    )
    result = CanaryReplay(served.version, Manifest.load(challenger, verify=False).version)
    frame = events.assign(event_time=pd.to_datetime(events["event_time"], utc=True))
    grades = settings.ranking.ranker.label_grades
    service_ref: list[RailService] = []
    last_check = [first]

    def prepare(service: RailService) -> None:
        service.source = pointer.resolve()
        service.follow_canary(pointer)
        service_ref.append(service)

    def after_event(at: datetime, logged: list[Impression]) -> bool:
        if (at - last_check[0]).total_seconds() < check_minutes * 60:
            return True
        last_check[0] = at
        seen = frame[frame["event_time"] <= pd.Timestamp(at)]
        timelines = SessionTimelines(seen, grades)
        decision = step_canary(settings, dataset, logged, timelines, now=at)
        result.decisions.append(decision)
        log.info(
            "canary replay decision",
            at=at.isoformat(),
            share=decision.share,
            action=decision.action,
            reason=decision.reason,
        )
        service_ref[0].follow_canary(pointer)
        state = read_canary(pointer)
        return state is not None and state.live

    metrics = Metrics()
    sink = MemoryImpressionSink(metrics, keep=10**7)
    runner = ShadowRunner(settings.shadow.model_copy(update={"share": 0.0}), sink, metrics)
    walked = replay_events(
        settings,
        served,
        events,
        runner,
        sink,
        metrics,
        "canary-replay",
        rails=("homepage_hero",),
        prepare=prepare,
        after_event=after_event,
    )
    state = read_canary(pointer)
    result.status = "none" if state is None else state.status
    result.sessions = len({i.session_id for i in walked.impressions})
    result.challenger_sessions = len(
        {i.session_id for i in walked.impressions if i.arm == CANARY_ARM}
    )
    result.requests, result.degraded = walked.requests, walked.degraded
    result.impressions = list(walked.impressions)
    return result
