"""`railtower exploration-replay`: held-out sessions through the real service with the
exploration slot on, then IPS / SNIPS values of other exploration settings on that log.

The replay is `training.shadow_replay`'s walk (real Redis, `RailService.serve`, the
impression observer), with `ranking.exploration` set to epsilon-greedy at one slot and no
shadow arm. Each served impression carries its propensities and the draw's choice-set size
and greedy item. The reward of an impression is 1 when the item in its explored slot got a
view, cart or purchase later in the session within `monitor.horizon_minutes`
(`training.shadow_eval`'s join), else 0.

Any epsilon-greedy policy over the same choice set can then be valued: its probability of
the logged item is (1 - eps) [item is greedy] + eps / |C|. The report values the logging
policy itself (weights all 1: IPS equals the plain average reward, the sanity row), an
alternative epsilon, and pure greedy (eps = 0). A different slot cannot be valued from this
log: its items were never drawn, so their propensities are unknown.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from railtower.datasets import load_dataset
from railtower.errors import RailtowerError
from railtower.logs import get_logger
from railtower.schemas import Impression, encode
from railtower.settings import Settings, load_dataset_spec
from serving.impressions import MemoryImpressionSink
from serving.metrics import Metrics
from serving.rail_service import load_rails
from serving.shadow import ShadowRunner
from training.off_policy import Estimate, LoggedSlot, TargetPolicy, ips, snips
from training.shadow_eval import PRODUCTION_ARM, SessionTimelines, epoch_s
from training.shadow_replay import held_out_sessions, replay_events, with_lifted_budgets

log = get_logger(__name__)


@dataclass(frozen=True)
class PolicyValue:
    policy: str
    epsilon: float
    ips: Estimate
    snips: Estimate


@dataclass
class ExplorationRun:
    folder: Path
    impressions: list[Impression]
    logged: list[LoggedSlot]
    on_policy_mean: float
    values: list[PolicyValue]
    outputs: dict[str, Path]


def epsilon_greedy_target(epsilon: float) -> TargetPolicy:
    """pi(action | context) of epsilon-greedy over the logged choice set; the context is
    (greedy item, choice-set size) as the impression recorded them."""

    def target(context: object, action: str) -> float:
        greedy, size = context  # type: ignore[misc]
        return (1.0 - epsilon) * float(action == greedy) + epsilon / size

    return target


def logged_slots(
    impressions: Sequence[Impression], timelines: SessionTimelines, horizon_s: float
) -> list[LoggedSlot]:
    """One LoggedSlot per shown impression whose exploration slot drew; reward = the
    explored item was viewed, carted or bought later in the session within the horizon."""
    out = []
    for imp in impressions:
        slot = imp.explored_slot
        if not imp.shown or slot is None or imp.propensities is None or slot >= len(imp.items):
            continue
        action = imp.items[slot]
        targets = timelines.targets(imp.session_id, epoch_s(imp.served_at), horizon_s)
        out.append(
            LoggedSlot(
                (imp.greedy_item, imp.choice_set_size),
                action,
                imp.propensities[slot],
                float(action in targets),
                imp.session_id,
            )
        )
    return out


def value_policies(
    logged: Sequence[LoggedSlot],
    logging_epsilon: float,
    alternative_epsilon: float,
    resamples: int,
) -> list[PolicyValue]:
    """IPS and SNIPS of the logging policy (sanity), the alternative and pure greedy."""
    rows = [
        (f"logging (eps={logging_epsilon:g})", logging_epsilon),
        (f"alternative (eps={alternative_epsilon:g})", alternative_epsilon),
        ("greedy (eps=0)", 0.0),
    ]
    values = []
    for name, eps in rows:
        target = epsilon_greedy_target(eps)
        values.append(
            PolicyValue(
                name,
                eps,
                ips(logged, target, resamples=resamples),
                snips(logged, target, resamples=resamples),
            )
        )
    return values


def run_exploration_replay(
    settings: Settings,
    dataset: str,
    production: Path,
    run_name: str,
    sessions: int = 0,
    slot: int = 11,
    epsilon: float = 0.2,
    alternative_epsilon: float = 0.05,
) -> ExplorationRun:
    """Replay held-out sessions with epsilon-greedy exploration at `slot`; write the
    impressions and the IPS / SNIPS report under reports/<run_name>/exploration/.

    Raises:
        ArtifactMismatch: the bundle is missing or altered.
        ValueError: `slot` outside the rail, or an epsilon outside [0, 1].
        RailtowerError: no impression explored (nothing to value).
    """
    if not 0 <= slot < settings.evaluation.slots:
        raise ValueError(f"slot {slot} is outside the rail's {settings.evaluation.slots} slots")
    for name, eps in (("epsilon", epsilon), ("alternative epsilon", alternative_epsilon)):
        if not 0.0 <= eps <= 1.0:
            raise ValueError(f"{name} must be within [0, 1], got {eps}")
    exploration = settings.ranking.exploration.model_copy(
        update={"slot": slot, "policy": "epsilon_greedy", "epsilon": epsilon}
    )
    ranking = settings.ranking.model_copy(update={"exploration": exploration})
    settings = with_lifted_budgets(settings.model_copy(update={"ranking": ranking}))
    served = load_rails(production, settings)
    events = held_out_sessions(settings, dataset, sessions)
    log.info(
        "exploration replay",
        production=served.version,
        slot=slot,
        epsilon=epsilon,
        sessions=int(events["session_id"].nunique()),
        events=len(events),
    )
    metrics = Metrics()
    sink = MemoryImpressionSink(metrics, keep=10**7)
    # no shadow arm: the runner only logs the served impressions
    runner = ShadowRunner(settings.shadow.model_copy(update={"workers": 1}), sink, metrics)
    walked = replay_events(settings, served, events, runner, sink, metrics, "exploration-replay")
    data = load_dataset(load_dataset_spec(dataset, settings), settings)
    timelines = SessionTimelines(data.events, settings.ranking.ranker.label_grades)  # type: ignore[arg-type]
    horizon_s = settings.monitor.horizon_minutes * 60
    production_impressions = [i for i in walked.impressions if i.arm == PRODUCTION_ARM]
    logged = logged_slots(production_impressions, timelines, horizon_s)
    if not logged:
        raise RailtowerError("no impression drew the exploration slot: nothing to value")
    values = value_policies(
        logged, epsilon, alternative_epsilon, settings.evaluation.bootstrap_samples
    )
    on_policy = float(np.mean([s.reward for s in logged]))
    folder = settings.reports_dir / run_name / "exploration"
    folder.mkdir(parents=True, exist_ok=True)
    impressions_path = folder / "impressions.jsonl"
    impressions_path.write_bytes(b"".join(encode(i) + b"\n" for i in walked.impressions))
    header = {
        "run": run_name,
        "events": dataset,
        "model_version": served.version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings_fingerprint": settings.fingerprint(),
        "slot": slot,
        "logging_epsilon": epsilon,
        "window": exploration.window,
        "horizon_minutes": settings.monitor.horizon_minutes,
        "sessions": int(events["session_id"].nunique()),
        "requests": walked.requests,
        "fallbacks": walked.degraded,
        "explored_impressions": len(logged),
        "explored_non_greedy": int(sum(s.action != s.context[0] for s in logged)),  # type: ignore[index]
        "on_policy_mean_reward": on_policy,
        "interval": f"95%, bootstrap over sessions ({settings.evaluation.bootstrap_samples})",
    }
    json_path = folder / "exploration.json"
    json_path.write_text(
        json.dumps({**header, "policies": [asdict(v) for v in values]}, indent=2) + "\n"
    )
    md_path = folder / "exploration.md"
    md_path.write_text(exploration_markdown(header, values))
    log.info("exploration report written", folder=str(folder), explored=len(logged))
    return ExplorationRun(
        folder,
        walked.impressions,
        logged,
        on_policy,
        values,
        {"json": json_path, "markdown": md_path, "impressions": impressions_path},
    )


def exploration_markdown(header: dict[str, object], values: Sequence[PolicyValue]) -> str:
    lines = [
        f"# Exploration replay — {header['run']}",
        "",
        f"Model {header['model_version']} on {header['events']}: epsilon-greedy at slot "
        f"{header['slot']} (eps {header['logging_epsilon']}, window {header['window']}), "
        f"{header['sessions']} held-out sessions, {header['explored_impressions']} explored "
        f"impressions ({header['explored_non_greedy']} not the greedy item). Reward: the "
        f"explored item was viewed, carted or bought within {header['horizon_minutes']} min. "
        f"On-policy mean reward {header['on_policy_mean_reward']:.4f}; intervals "
        f"{header['interval']}.",
        "",
        "| policy | IPS [95% CI] | SNIPS [95% CI] | effective n | max weight |",
        "|---|---|---|---|---|",
    ]
    for v in values:
        lines.append(
            f"| {v.policy} | {v.ips.value:.4f} [{v.ips.low:.4f}, {v.ips.high:.4f}] "
            f"| {v.snips.value:.4f} [{v.snips.low:.4f}, {v.snips.high:.4f}] "
            f"| {v.ips.effective_n:.0f} of {v.ips.n} | {v.ips.max_weight:.2f} |"
        )
    lines += [
        "",
        "The logging row's weights are all 1, so its IPS is the on-policy average (a check of "
        "the log, not an estimate). Rewards are counterfactual only through the shopper's "
        "real later events: a replay shopper never saw the rail.",
        "",
    ]
    return "\n".join(lines)
