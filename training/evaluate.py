"""The evaluation harness: every model, every rail a data set supports, the same metrics.

Models are fitted on events before the cut and rank the *full catalogue* for each held-out
case; nothing is scored against sampled negatives. Each metric carries a bootstrap interval
that resamples sessions, so an improvement inside the interval reads as no improvement.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np

from railtower.datasets import Dataset
from railtower.logs import get_logger
from railtower.settings import RailName, Settings
from ranking.retriever import Catalogue, Retriever
from training.metrics import (
    bootstrap_ci,
    coverage_at,
    intra_list_diversity,
    ndcg_at,
    recall_at,
    reciprocal_rank,
)
from training.past_purchases import PastPurchases
from training.point_in_time import catalogue_at
from training.split import Split, SplitName, split_events
from training.tasks import EvalCase, build_cases

log = get_logger(__name__)

LENGTH_BUCKETS: tuple[tuple[str, int, int], ...] = (
    ("1", 1, 1),
    ("2", 2, 2),
    ("3-4", 3, 4),
    ("5-8", 5, 8),
    ("9+", 9, 10**9),
)


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float


@dataclass
class TaskResult:
    dataset: str
    rail: str
    model: str
    cases: int
    sessions: int
    metrics: dict[str, Interval]
    coverage: float
    by_length: dict[str, dict[str, float]]
    seconds: float
    # cases whose every target was never seen in the training events: where ID-based
    # models cannot score and only content can
    cold_cases: int = 0
    cold: dict[str, Interval] = field(default_factory=dict)
    # the complement: cases with a target seen in training. Where the catalogue lists only
    # items that got events in the log (REES46, UCI), "never seen in training" betrays a
    # future item; the warm slice is the comparison that artefact cannot flatter.
    warm: dict[str, Interval] = field(default_factory=dict)
    # cases none of whose targets is in the (point-in-time) catalogue ranked: a miss for
    # every model, reported apart so that no model is blamed or credited for them
    unknown_cases: int = 0
    # one NDCG@slots per case, in case order: the promotion gate's paired comparison
    per_case_ndcg: list[float] = field(default_factory=list, repr=False)


@dataclass
class DatasetResult:
    dataset: str
    split: dict[str, object]
    validation: list[dict[str, object]]
    tasks: list[TaskResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    # the ranking pipeline's own report: windows, ranker fits, the MMR trade-off per rail
    pipeline: dict[str, object] = field(default_factory=dict)


def metric_names(settings: Settings) -> list[str]:
    e = settings.evaluation
    return [
        f"recall@{e.slots}",
        f"recall@{e.candidates}",
        f"ndcg@{e.slots}",
        f"mrr@{e.mrr_depth}",
        f"diversity@{e.slots}",
    ]


class StagedModel(Protocol):
    """A model scored stage by stage (the ranking pipeline): it fits on the split itself,
    because its re-ranker learns from a window its retrievers have not seen."""

    def __call__(
        self,
        split: Split,
        cases: Mapping[str, list[EvalCase]],
        warm: set[str],
        baselines: Sequence[TaskResult],
    ) -> tuple[list[TaskResult], dict[str, object]]: ...


def evaluate_dataset(
    dataset: Dataset,
    settings: Settings,
    models: Mapping[str, Callable[[], Retriever]],
    target: SplitName = "test",
    staged: StagedModel | None = None,
) -> DatasetResult:
    """Fit each model on the split's training events and score it on every supported rail;
    then the staged model (the ranking pipeline), whose rows follow the baselines'."""
    if dataset.events is None or not dataset.spec.rails:
        result = DatasetResult(dataset.name, {}, [r.as_dict() for r in dataset.reports])
        result.skipped.append("catalogue only (no events): no rail to evaluate on it")
        return result
    split = split_events(dataset.events, dataset.has_time, settings.split, settings.seed)
    result = DatasetResult(dataset.name, split.summary(), [r.as_dict() for r in dataset.reports])
    past = PastPurchases.of(dataset, settings.serving.purchase_memory)
    cases = {
        rail: _cases(rail, split, dataset, settings, target, past) for rail in dataset.spec.rails
    }
    for rail, rail_cases in cases.items():
        if not rail_cases:
            result.skipped.append(f"{rail}: no held-out case in the {target} split")
    fit_events = split.fit_events(target)
    warm = set(fit_events["item_id"])
    catalogue = Catalogue(
        catalogue_at(
            dataset.items,
            fit_events,
            dataset.has_time,
            settings.evaluation.point_in_time_catalogue,
        )
    )
    result.split["catalogue"] = {"listed": len(dataset.items), "known_at_cut": len(catalogue)}
    for name, make in models.items():
        started = time.perf_counter()
        model = make().fit(fit_events, catalogue)
        fit_s = time.perf_counter() - started
        for rail, rail_cases in cases.items():
            if rail_cases:
                task = score(model, name, rail, rail_cases, catalogue, settings, dataset.name, warm)
                task.seconds += fit_s
                result.tasks.append(task)
                log.info(
                    "scored",
                    dataset=dataset.name,
                    rail=rail,
                    model=name,
                    cases=task.cases,
                    **{k: round(v.mean, 4) for k, v in task.metrics.items()},
                )
    if staged is not None:
        baselines = list(result.tasks)
        tasks, report = staged(split, {r: c for r, c in cases.items() if c}, warm, baselines)
        result.tasks.extend(tasks)
        result.pipeline = report
    return result


def _cases(
    rail: RailName,
    split: Split,
    dataset: Dataset,
    settings: Settings,
    target: SplitName,
    past: PastPurchases,
) -> list[EvalCase]:
    return build_cases(
        rail, split.eval_events(target), dataset.spec, settings.evaluation, settings.seed, past
    )


def score(
    model: Retriever,
    name: str,
    rail: str,
    cases: list[EvalCase],
    catalogue: Catalogue,
    settings: Settings,
    dataset: str,
    warm_items: set[str] | None = None,
) -> TaskResult:
    """Let `model` rank the full catalogue for every case, then :func:`score_ranked`."""
    started = time.perf_counter()
    ranked = model.recommend([c.query for c in cases], settings.evaluation.candidates)
    task = score_ranked(ranked, name, rail, cases, catalogue, settings, dataset, warm_items)
    task.seconds = time.perf_counter() - started
    return task


def score_ranked(
    ranked: list[list[str]],
    name: str,
    rail: str,
    cases: list[EvalCase],
    catalogue: Catalogue,
    settings: Settings,
    dataset: str,
    warm_items: set[str] | None = None,
) -> TaskResult:
    """Aggregate the metrics of ranked lists (one per case) with session-bootstrap intervals.

    With `warm_items` (the items of the training events), the cold slice is scored too.
    """
    e = settings.evaluation
    # A model must never return what the rail excludes; filtering here keeps one buggy
    # model from scoring on items a shopper would never be shown.
    ranked = [
        [i for i in r if i not in c.query.exclude][: e.candidates]
        for r, c in zip(ranked, cases, strict=True)
    ]
    per_case = per_case_metrics(ranked, cases, catalogue, settings)
    sessions = np.array([c.session_id for c in cases])
    metrics = _intervals(per_case, sessions, settings)
    cold_mask = np.array([warm_items is not None and not (c.targets & warm_items) for c in cases])

    def slice_of(mask: np.ndarray) -> dict[str, Interval]:
        if not mask.any():
            return {}
        return _intervals(
            {m: np.asarray(v)[mask] for m, v in per_case.items()}, sessions[mask], settings
        )

    unknown = sum(1 for c in cases if not any(t in catalogue.index for t in c.targets))
    cold = slice_of(cold_mask)
    warm = slice_of(~cold_mask) if warm_items is not None else {}
    lengths = np.array([c.length for c in cases])
    ndcg = np.asarray(per_case[f"ndcg@{e.slots}"])
    by_length = {
        label: {"ndcg": float(ndcg[mask].mean()), "cases": int(mask.sum())}
        for label, lo, hi in LENGTH_BUCKETS
        if (mask := (lengths >= lo) & (lengths <= hi)).any()
    }
    return TaskResult(
        dataset=dataset,
        rail=rail,
        model=name,
        cases=len(cases),
        sessions=len(set(sessions.tolist())),
        metrics=metrics,
        coverage=coverage_at(ranked, len(catalogue), e.slots),
        by_length=by_length,
        seconds=0.0,
        cold_cases=int(cold_mask.sum()),
        unknown_cases=unknown,
        cold=cold,
        warm=warm,
        per_case_ndcg=ndcg.tolist(),
    )


def _intervals(
    per_case: Mapping[str, Sequence[float] | np.ndarray], sessions: np.ndarray, settings: Settings
) -> dict[str, Interval]:
    e = settings.evaluation
    return {
        metric: Interval(
            *bootstrap_ci(
                np.asarray(values, dtype=float),
                sessions,
                e.bootstrap_samples,
                e.ci_level,
                settings.seed,
            )
        )
        for metric, values in per_case.items()
    }


def per_case_metrics(
    ranked: list[list[str]], cases: list[EvalCase], catalogue: Catalogue, settings: Settings
) -> dict[str, list[float]]:
    """Each metric of `metric_names`, one value per case (NaN where it does not apply)."""
    e = settings.evaluation
    rows = []
    for items, case in zip(ranked, cases, strict=True):
        targets = set(case.targets)
        diversity = intra_list_diversity(items, catalogue.category_of, e.slots)
        rows.append(
            (
                recall_at(items, targets, e.slots),
                recall_at(items, targets, e.candidates),
                ndcg_at(items, targets, e.slots),
                reciprocal_rank(items, targets, e.mrr_depth),
                float("nan") if diversity is None else diversity,
            )
        )
    columns = list(zip(*rows, strict=True)) if rows else [()] * 5
    return {name: list(col) for name, col in zip(metric_names(settings), columns, strict=True)}


def as_dict(result: DatasetResult) -> dict[str, object]:
    return asdict(result)
