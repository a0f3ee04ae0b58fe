"""`railtower shadow-replay`: held-out sessions through the real service, production and a
challenger side by side, then the shadow report on what they would have shown.

The held-out (test-split) sessions are walked event by event in time order. At each event:

1. the event is appended to the session state in a real Redis (`SessionStore`, the one the
   refresh consumer writes), so the service reads the session as it stood at that moment;
2. `RailService.serve` answers `homepage_hero` (and `pdp_fbt` for the item just touched)
   with the production bundle; its observer, the real `serving.shadow.ShadowRunner` with
   every session sampled, logs the served impression and computes the challenger's rail
   for the same request (another rails bundle, `arm="challenger:<version>"`, or the
   production model under a candidate rule set, `arm="rules:<name>"`), `shown=False`, the
   same `request_id`. The replay waits for the runner after each event (`drain`), so the
   next event never races the shadow arm;
3. the runner stamps impressions with the wall clock; the replay re-stamps `served_at` with
   the event's own time (the log is historical) and writes the impressions as JSONL, the
   impressions topic's bytes.

Then `training.shadow_eval` joins them with the events that followed. Stage budgets are
lifted for the replay: it measures the models, not how loaded this machine was (a ranker
over its budget would serve the fused order and make the result depend on the load).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from devstack.local_services import LocalServer, free_port, redis_server
from railtower.datasets import load_dataset
from railtower.errors import RailtowerError
from railtower.logs import get_logger
from railtower.schemas import Impression, encode
from railtower.settings import Settings, load_dataset_spec
from ranking.rule_set import RuleSet, load_rule_set
from serving.api_models import RailRequest
from serving.impressions import MemoryImpressionSink
from serving.metrics import Metrics
from serving.rail_service import LoadedRails, load_rails
from serving.service import RailService
from serving.shadow import ShadowRunner
from state.session_store import SessionStore
from towers.session_features import HistoryEvent
from training.shadow_eval import ShadowRun, run_shadow_report
from training.split import split_events

log = get_logger(__name__)

REPLAY_RAILS = ("homepage_hero", "pdp_fbt")
_LIFTED_BUDGETS = {"redis_ms": 2000.0, "user_vector_ms": 5000.0, "ranker_ms": 5000.0}


@dataclass
class ReplayResult:
    impressions_path: Path
    impressions: int
    requests: int
    skipped: dict[str, int]
    degraded: int
    shadow: ShadowRun | None
    # the ShadowRunner's own live counters (per arm: shadowed, skipped, differ share)
    runner: dict[str, object]


def held_out_sessions(
    settings: Settings,
    dataset: str,
    sessions: int,
    after: pd.Timestamp | None = None,
    later_window: bool = False,
    arrivals_per_minute: float = 0.0,
) -> pd.DataFrame:
    """The test split's events of the first `sessions` sessions (by start; 0 = all) with at
    least two events (one event has nothing after it to evaluate), in time order.

    Args:
        after: instead of the test split, the sessions that end after this time (a
            later-window bundle's cut: everything it was not fitted on, as the later-window
            protocol scores it).
        later_window: instead, the later-window protocol's own sessions
            (`training.later_window.split_later`): on data with a clock the sessions after
            its cut, on data without one (Amazon-M2) its seeded session hash.
        arrivals_per_minute: data without a clock has every session start at one synthetic
            instant; a replay walks time, so each session is given a start instead
            (`with_arrivals`). Required for such data, ignored otherwise.
    """
    data = load_dataset(load_dataset_spec(dataset, settings), settings)
    if data.events is None:
        raise RailtowerError(f"data set {dataset!r} has no events to replay")
    if later_window:
        from training.later_window import later_events  # noqa: PLC0415 - the protocol's cut

        test = later_events(data, settings)
    elif not data.has_time:
        raise RailtowerError(
            f"data set {dataset!r} has no clock: replay its later window (later_window) with "
            "synthesised session starts (arrivals_per_minute)"
        )
    elif after is None:
        test = split_events(data.events, data.has_time, settings.split, settings.seed).test
    else:
        ends = data.events.groupby("session_id")["event_time"].transform("max")
        test = data.events[ends > after]
    sizes = test.groupby("session_id")["event_id"].transform("size")
    test = test[sizes >= 2]
    if not data.has_time:
        test = with_arrivals(test, arrivals_per_minute, settings.seed)
    starts = test.groupby("session_id")["event_time"].min().sort_values(kind="stable")
    chosen = starts.index if sessions <= 0 else starts.index[:sessions]
    picked = test[test["session_id"].isin(set(chosen))]
    return picked.sort_values(["event_time", "session_id", "position"], kind="stable")


def with_arrivals(events: pd.DataFrame, per_minute: float, seed: int) -> pd.DataFrame:
    """Clockless sessions (every one starting at the same synthetic instant, its events one
    synthetic second apart) given starts: a seeded order, one session every 60 / per_minute
    seconds, each keeping its own spacing. A traffic model, stated as such wherever a
    replay on it is reported."""
    if per_minute <= 0:
        raise RailtowerError("sessions without a clock need arrivals_per_minute > 0 to replay")
    names = events["session_id"].unique()
    order = np.random.default_rng(seed).permutation(len(names))
    offset = pd.Series(pd.to_timedelta(order * 60.0 / per_minute, unit="s"), index=names)
    first = events.groupby("session_id")["event_time"].transform("min")
    start = events["event_time"].min()
    moved = start + events["session_id"].map(offset) + (events["event_time"] - first)
    return events.assign(event_time=moved.to_numpy())


def _context(event: pd.Series) -> str | None:
    # the one context value the towers read, with training's precedence
    for column in ("device", "locale", "country"):
        value = event.get(column)
        if value is not None and not pd.isna(value):
            return str(value)
    return None


def with_lifted_budgets(settings: Settings) -> Settings:
    """`settings` with the stage budgets lifted: a replay measures the models, not the load."""
    serving = settings.serving.model_copy(
        update={"budgets": settings.serving.budgets.model_copy(update=_LIFTED_BUDGETS)}
    )
    return settings.model_copy(update={"serving": serving})


@dataclass
class WalkedEvents:
    """What `replay_events` logged: impressions re-stamped with their events' times."""

    impressions: list[Impression]
    requests: int
    degraded: int
    skipped: dict[str, int]
    runner: dict[str, object]


def replay_events(
    settings: Settings,
    served: LoadedRails,
    events: pd.DataFrame,
    runner: ShadowRunner,
    sink: MemoryImpressionSink,
    metrics: Metrics,
    cache_name: str,
    rails: Sequence[str] = REPLAY_RAILS,
    prepare: Callable[[RailService], None] | None = None,
    after_event: Callable[[datetime, list[Impression]], bool] | None = None,
) -> WalkedEvents:
    """Walk `events` in order through a real Redis and `RailService.serve` (steps 1-3 of the
    module docstring) with `runner` as the observer; closes the runner and its sink.

    `prepare` sees the service before the first event (training.canary_replay routes it);
    `after_event` gets each event's time and the impressions logged so far, and stops the
    walk by returning False.

    Raises:
        ServiceError: Redis could not start.
        RailtowerError: the runner did not finish an event within 120 s.
    """
    redis: LocalServer = redis_server(free_port(), settings.cache_dir / cache_name).start()
    serving = settings.serving
    logged: list[Impression] = []
    requests, degraded, skipped = 0, 0, {"pdp_item_not_in_catalogue": 0}
    try:
        store = SessionStore(
            f"redis://127.0.0.1:{redis.port}/0", 2.0, serving.session_events, 86400, 86400
        )
        service = RailService(settings, None, store, None, metrics)
        service.loaded = served  # loaded and verified by the caller
        if prepare is not None:
            prepare(service)
        service.observer = runner.start()
        started = time.monotonic()
        for n, (_, event) in enumerate(events.iterrows(), 1):
            session = str(event["session_id"])
            history = HistoryEvent(
                str(event["item_id"]), str(event["event_type"]), event["event_time"].timestamp()
            )
            store.append_events(session, [(str(event["event_id"]), history, _context(event))])
            for rail in rails:
                if rail == "pdp_fbt" and history.item_id not in served.catalogue.index:
                    skipped["pdp_item_not_in_catalogue"] += 1
                    continue
                request = RailRequest(
                    session_id=session,
                    user_id=None if pd.isna(event.get("user_id")) else str(event["user_id"]),
                    item_id=history.item_id if rail == "pdp_fbt" else None,
                    slots=settings.evaluation.slots,
                )
                degraded += service.serve(rail, request).served_by == "fallback"
                requests += 1
            if not runner.drain(timeout_s=120) or not sink.flush(timeout_s=30):
                raise RailtowerError("the shadow runner did not finish an event within 120 s")
            # the runner stamps the wall clock; this log is historical: the event's own time
            fresh = sink.impressions(start=len(logged))
            at = event["event_time"].to_pydatetime()
            logged += [i.model_copy(update={"served_at": at}) for i in fresh]
            if after_event is not None and not after_event(at, logged):
                break
            if n % 200 == 0:
                log.info(
                    "replaying",
                    events=n,
                    of=len(events),
                    requests=requests,
                    seconds=round(time.monotonic() - started, 1),
                )
        stats = runner.report()
    finally:
        runner.close()  # closes the sink too
        redis.stop()
    return WalkedEvents(logged, requests, degraded, skipped, stats)


def run_shadow_replay(
    settings: Settings,
    dataset: str,
    production: Path,
    output: Path,
    challenger: Path | None = None,
    challenger_rules: Path | None = None,
    sessions: int = 0,
    run_name: str | None = None,
) -> ReplayResult:
    """Replay held-out sessions through production and a challenger; write the impressions
    (JSONL at `output`) and, with `run_name`, the shadow report under reports/<run>/shadow/.

    Raises:
        ArtifactMismatch: a bundle is missing or altered.
        ServiceError: Redis could not start.
        ValueError: no challenger, or a challenger identical to production.
    """
    if (challenger is None) == (challenger_rules is None):
        raise ValueError("give exactly one challenger: a rails bundle or a rule set (JSON)")
    settings = with_lifted_budgets(settings)
    served = load_rails(production, settings)
    rival = None if challenger is None else load_rails(challenger, settings)
    rule_set: RuleSet | None = None if challenger_rules is None else load_rule_set(challenger_rules)
    if rival is not None and rival.version == served.version:
        raise ValueError(
            f"the challenger {challenger} is the production model ({served.version}); "
            "shadow a bundle trained differently"
        )
    events = held_out_sessions(settings, dataset, sessions)
    log.info(
        "shadow replay",
        production=served.version,
        challenger=rival.version if rival else f"rules:{rule_set.name}",  # type: ignore[union-attr]
        sessions=int(events["session_id"].nunique()),
        events=len(events),
    )
    metrics = Metrics()
    sink = MemoryImpressionSink(metrics, keep=10**7)
    # every session shadowed; one worker, drained after each event: a synchronous shadow
    shadow_settings = settings.shadow.model_copy(update={"share": 1.0, "workers": 1})
    runner = ShadowRunner(shadow_settings, sink, metrics, challenger=rival, rule_set=rule_set)
    walked = replay_events(settings, served, events, runner, sink, metrics, "shadow-replay")
    logged, stats = walked.impressions, walked.runner
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(b"".join(encode(i) + b"\n" for i in logged))
    log.info("impressions written", path=str(output), impressions=len(logged), shadow=stats)
    report = None
    if run_name is not None:
        data = load_dataset(load_dataset_spec(dataset, settings), settings)
        report = run_shadow_report(
            settings,
            logged,
            data.events,  # type: ignore[arg-type]
            len(data.items),
            settings.monitor.horizon_minutes,
            run_name,
            events_source=dataset,
        )
    return ReplayResult(
        output, len(logged), walked.requests, walked.skipped, walked.degraded, report, stats
    )
