"""The evaluation record a rails bundle carries, and how to rebuild the cases it names.

One place for the record's shape (the promotion gate's input): the harness writes it when
it fits a bundle (training.fit_pipeline), the bundle evaluator when it re-scores a trained
bundle on another window (training.bundle_eval). The record also says which held-out
sessions its cases came from (`held_out`), so the gate can rebuild exactly those cases
later and score another bundle on them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
import pandas as pd

from railtower.settings import Settings, SplitSettings
from training.evaluate import TaskResult
from training.split import Split, SplitName, split_events
from training.tasks import EvalCase


def cases_fingerprint(cases: list[EvalCase]) -> str:
    """Identifies the held-out cases: two evaluations compare only on identical cases."""
    digest = hashlib.sha256()
    for c in cases:
        parts = [
            c.session_id,
            sorted(c.targets),
            list(c.query.session_items),
            c.query.anchor,
            list(c.query.cart),
        ]
        if c.query.past_purchases:  # only where it is known, so older records still match
            parts.append(list(c.query.past_purchases))
        digest.update(orjson.dumps(parts))
    return digest.hexdigest()[:16]


def evaluation_record(
    dataset: str,
    split: str,
    window: Mapping[str, Any],
    cases: Mapping[str, list[EvalCase]],
    tasks: Sequence[TaskResult],
    settings: Settings,
    catalogue_size: int,
    held_out: Mapping[str, Any] | None = None,
    baselines: Sequence[TaskResult] = (),
) -> dict[str, Any]:
    """The record of one bundle's scores on `cases` (per rail: fingerprint, sessions, and
    per model NDCG@slots, coverage@slots and the per-case NDCG the gate pairs on).

    `baselines` are the baselines scored on the same cases (fitted on the same window):
    their rows sit beside the bundle's and `baselines` names them, so the gate can refuse
    a rail that loses to one.
    """
    slots = settings.evaluation.slots
    tasks = [*tasks, *baselines]
    record: dict[str, Any] = {
        "dataset": dataset,
        "split": split,
        "window": dict(window),
        "rails": {
            rail: {
                "fingerprint": cases_fingerprint(rail_cases),
                "coverage_ceiling": min(1.0, len(rail_cases) * slots / catalogue_size),
                "sessions": [c.session_id for c in rail_cases],
                "baselines": sorted({t.model for t in baselines if t.rail == rail}),
                "models": {
                    t.model: {
                        "ndcg": t.metrics[f"ndcg@{slots}"].mean,
                        "coverage": t.coverage,
                        "per_case_ndcg": t.per_case_ndcg,
                    }
                    for t in tasks
                    if t.rail == rail
                },
            }
            for rail, rail_cases in cases.items()
        },
    }
    if held_out is not None:
        record["held_out"] = dict(held_out)
    return record


def held_out_of_split(split: Split, target: SplitName, settings: Settings) -> dict[str, Any]:
    """What rebuilds the harness's held-out events of `target` from the same data.

    A time split's held-out sessions are those ending in [from, before) among the sessions of
    the data it split (start and end of its events: the nightly window keeps sessions whole,
    so that span selects the same sessions again). A hash split is re-run with its settings.
    Case sampling depends on the evaluation settings and the seed, so both are kept.
    """
    common = {
        "split": target,
        "seed": settings.seed,
        "evaluation": settings.evaluation.model_dump(mode="json"),
    }
    if split.kind != "time":
        return {**common, "kind": split.kind, "split_settings": settings.split.model_dump()}
    everything = [f["event_time"] for f in (split.train, split.validation, split.test) if len(f)]
    lower = split.validation_cut if target == "validation" else split.test_cut
    upper = split.test_cut if target == "validation" else None
    return {
        **common,
        "kind": "time",
        "sessions_end_from": str(lower),
        "sessions_end_before": None if upper is None else str(upper),
        "sessions_start_from": str(min(t.min() for t in everything)),
        "sessions_end_by": str(max(t.max() for t in everything)),
    }


def held_out_after(end: str, settings: Settings) -> dict[str, Any]:
    """Every whole session that ends after `end` (a bundle's training window): unseen data."""
    after = pd.Timestamp(end) + pd.Timedelta(1, "ns")
    return {
        "split": "after_training",
        "seed": settings.seed,
        "evaluation": settings.evaluation.model_dump(mode="json"),
        "kind": "time",
        "sessions_end_from": str(after),
        "sessions_end_before": None,
        "sessions_start_from": None,
        "sessions_end_by": None,
    }


def held_out_events(
    events: pd.DataFrame, has_time: bool, held_out: Mapping[str, Any]
) -> pd.DataFrame:
    """The events of the whole sessions `held_out` names (see held_out_of_split).

    Raises:
        ValueError: the record needs a clock the data has not, or names an unknown kind.
    """
    kind = held_out.get("kind")
    if kind == "session_hash":
        split = split_events(
            events,
            False,
            SplitSettings.model_validate(held_out["split_settings"]),
            held_out["seed"],
        )
        return split.eval_events(held_out["split"])
    if kind != "time":
        raise ValueError(f"held_out kind {kind!r} is unknown (expected 'time' or 'session_hash')")
    if not has_time:
        raise ValueError("the held-out window is a time window but these events have no clock")
    sessions = events.groupby("session_id")["event_time"].agg(["min", "max"])
    keep = pd.Series(True, index=sessions.index)

    def bound(key: str) -> pd.Timestamp | None:
        value = held_out.get(key)
        return None if value is None else pd.Timestamp(value)

    if (lower := bound("sessions_end_from")) is not None:
        keep &= sessions["max"] >= lower
    if (upper := bound("sessions_end_before")) is not None:
        keep &= sessions["max"] < upper
    if (start := bound("sessions_start_from")) is not None:
        keep &= sessions["min"] >= start
    if (end := bound("sessions_end_by")) is not None:
        keep &= sessions["max"] <= end
    chosen = set(sessions.index[keep])
    return events[events["session_id"].isin(chosen)].reset_index(drop=True)


def sessions_within(events: pd.DataFrame, start: str | None, end: str | None) -> pd.DataFrame:
    """Whole sessions lying inside [start, end]: a bundle's training events from its window.

    The harness trains on whole sessions, so its fit window is exactly the sessions that
    start at or after its first event and end at or before its last.
    """
    sessions = events.groupby("session_id")["event_time"].agg(["min", "max"])
    keep = pd.Series(True, index=sessions.index)
    if start is not None:
        keep &= sessions["min"] >= pd.Timestamp(start)
    if end is not None:
        keep &= sessions["max"] <= pd.Timestamp(end)
    chosen = set(sessions.index[keep])
    return events[events["session_id"].isin(chosen)].reset_index(drop=True)
