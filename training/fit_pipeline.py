"""Fit the ranking pipeline of one data set, and score it stage by stage in the harness.

The re-ranker must learn from requests its retrievers have not seen, or co-visitation and
the towers look prescient in training and the ranker over-trusts them. So the fit window
is cut in two:

    retrieval window  -> fit towers, co-visitation, session-kNN, popularity, item stats
    ranker window     -> requests + what followed -> LightGBM lambdarank (early stopped)

For the test split the ranker window is the validation split; for the validation split it
is the newest share of train. Afterwards the cheap sources and the item statistics are
refitted on the whole fit window (what the nightly job does); the towers are not (one
training per data set), so they are a window staler than the baselines beside them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from railtower.datasets import Dataset
from railtower.logs import get_logger
from railtower.manifest import DataWindow
from railtower.settings import Settings
from ranking.baselines import BASELINES
from ranking.business_features import ItemStats, build_features
from ranking.item_attributes import ItemAttributes
from ranking.rails import STAGES, RailPipeline, ranked_ids
from ranking.rails_bundle import write_rails_bundle
from ranking.retriever import CandidateSource, Catalogue
from ranking.rules import load_rule_set
from training.evaluate import TaskResult, per_case_metrics, score_ranked
from training.metrics import bootstrap_ci
from training.ranker import RankerFit, fit_ranker, graded_labels
from training.records import (  # cases_fingerprint: re-exported, it used to live here
    cases_fingerprint,  # noqa: F401
    evaluation_record,
    held_out_of_split,
)
from training.split import Split, SplitName, holdout
from training.tasks import EvalCase, build_cases

log = get_logger(__name__)

# Row names in the report, one per stage after the tower source on its own.
STAGE_ROWS = {
    "candidates": "fused_candidates",
    "ranker": "+ranker",
    "mmr": "+ranker+mmr",
    "rules": "+ranker+mmr+rules",
}


@dataclass
class FittedPipeline:
    pipeline: RailPipeline
    rankers: dict[str, RankerFit] = field(default_factory=dict)
    windows: dict[str, int] = field(default_factory=dict)


def ranker_windows(
    split: Split, target: SplitName, has_time: bool, share: float, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(retrieval window, ranker window, whole fit window) for scoring on `target`."""
    if target == "test":
        return split.train, split.validation, split.fit_events("test")
    early, late = holdout(split.train, has_time, share, seed)
    return early, late, split.train


def fit_pipeline(
    dataset: Dataset,
    split: Split,
    settings: Settings,
    target: SplitName,
    towers: Callable[[], CandidateSource] | None = None,
) -> FittedPipeline:
    """Fit sources, item statistics and one ranker per rail on the split's fit window."""
    spec = dataset.spec
    retrieval, ranker_events, whole = ranker_windows(
        split, target, dataset.has_time, settings.split.validation_share, settings.seed
    )
    catalogue = Catalogue(dataset.items)
    basket = spec.session_kind == "basket"
    sources: dict[str, CandidateSource] = {}
    for name in settings.ranking.sources:
        if name == "two_tower":
            if towers is not None:
                sources[name] = towers().fit(retrieval, catalogue)  # type: ignore[assignment]
        else:
            sources[name] = BASELINES[name](settings, basket).fit(retrieval, catalogue)  # type: ignore[assignment]

    def item_stats(events: pd.DataFrame) -> ItemStats:
        return ItemStats.fit(
            events,
            dataset.items,
            catalogue,
            settings.ranking,
            settings.event_weights,
            settings.towers.price_bands,
            spec.strong_event_types,
        )

    rules = settings.ranking.rules_path
    pipeline = RailPipeline(
        sources=sources,
        stats=item_stats(retrieval),
        attributes=ItemAttributes.from_frame(dataset.items, settings.towers.price_bands),
        settings=settings.ranking,
        depth=settings.ranking.pool_size,
        slots=settings.evaluation.slots,
        rule_set=None if rules is None else load_rule_set(rules),
    )
    fitted = FittedPipeline(
        pipeline,
        windows={
            "retrieval_events": len(retrieval),
            "ranker_events": len(ranker_events),
            "fit_events": len(whole),
        },
    )
    ranker = settings.ranking.ranker
    request_settings = settings.evaluation.model_copy(
        update={"max_sessions_per_task": ranker.max_sessions}
    )
    for rail in spec.rails:
        started = time.perf_counter()
        cases = build_cases(rail, ranker_events, spec, request_settings, settings.seed + 1)
        if len(cases) > ranker.max_requests:
            rng = np.random.default_rng(settings.seed)
            keep = np.sort(rng.choice(len(cases), ranker.max_requests, replace=False))
            cases = [cases[i] for i in keep]
        queries = [c.query for c in cases]
        table = pipeline.candidate_table(queries)
        features = build_features(table, queries, pipeline.stats)
        labels = graded_labels(table, [c.followed for c in cases], ranker.label_grades)
        fit = fit_ranker(
            features,
            labels,
            table,
            [c.session_id for c in cases],
            ranker,
            settings.evaluation.slots,
            settings.seed,
        )
        fitted.rankers[rail] = fit
        if fit.booster is not None:
            pipeline.rankers[rail] = fit.booster
        log.info(
            "ranker fitted",
            dataset=spec.name,
            rail=rail,
            requests=len(cases),
            rows=len(table.frame),
            trained=fit.booster is not None,
            seconds=round(time.perf_counter() - started, 1),
        )
    # Serve from the freshest window: refit what is cheap to refit.
    for name, source in sources.items():
        if name != "two_tower":
            source.fit(whole, catalogue)
    pipeline.stats = item_stats(whole)
    return fitted


def staged_evaluation(
    dataset: Dataset,
    settings: Settings,
    target: SplitName,
    towers: Callable[[], CandidateSource] | None = None,
    bundle: Path | None = None,
) -> Callable[
    [Split, Mapping[str, list[EvalCase]], set[str]], tuple[list[TaskResult], dict[str, object]]
]:
    """The harness hook (training.evaluate.StagedModel) that fits and scores the pipeline.

    With `bundle`, the fitted rankers, item statistics and rule set are written there as a
    rails bundle together with the evaluation they earned (the promotion gate's input).
    """

    def run(
        split: Split, cases: Mapping[str, list[EvalCase]], warm: set[str]
    ) -> tuple[list[TaskResult], dict[str, object]]:
        started = time.perf_counter()
        fitted = fit_pipeline(dataset, split, settings, target, towers)
        fit_s = time.perf_counter() - started
        catalogue = Catalogue(dataset.items)
        tasks: list[TaskResult] = []
        sweeps: dict[str, list[dict[str, float]]] = {}
        recalls: dict[str, dict[str, dict[str, float]]] = {}
        for rail, rail_cases in cases.items():
            queries = [c.query for c in rail_cases]
            started = time.perf_counter()
            staged = fitted.pipeline.run(rail, queries)
            seconds = time.perf_counter() - started
            recalls[rail] = pool_recall(fitted.pipeline, queries, rail_cases, settings)
            rows: dict[str, list[list[str]]] = {}
            if "two_tower" in fitted.pipeline.sources:
                tower = fitted.pipeline.sources["two_tower"]
                rows["two_tower"] = tower.recommend(queries, settings.evaluation.candidates)
            for stage in STAGES:
                rows[STAGE_ROWS[stage]] = ranked_ids(staged, stage)
            for name, ranked in rows.items():
                task = score_ranked(
                    ranked, name, rail, rail_cases, catalogue, settings, dataset.name, warm
                )
                task.seconds = seconds + fit_s
                tasks.append(task)
                log.info(
                    "scored",
                    dataset=dataset.name,
                    rail=rail,
                    model=name,
                    cases=task.cases,
                    **{k: round(v.mean, 4) for k, v in task.metrics.items()},
                )
            sweeps[rail] = mmr_sweep(
                fitted.pipeline, staged["ranker"], rail_cases, catalogue, settings
            )
        report = {
            "windows": fitted.windows,
            "sources": list(fitted.pipeline.sources),
            "rankers": {rail: fit.summary() for rail, fit in fitted.rankers.items()},
            "mmr_lambda": settings.ranking.mmr_lambda,
            "mmr_sweep": sweeps,
            "pool_recall": recalls,
            "rule_set": None
            if fitted.pipeline.rule_set is None
            else f"{fitted.pipeline.rule_set.name} {fitted.pipeline.rule_set.version}",
            "fit_seconds": round(fit_s, 1),
        }
        if bundle is not None:
            _write_bundle(bundle, fitted, tasks, cases, split, dataset, settings, target)
            report["bundle"] = str(bundle)
        return tasks, report

    return run


def _write_bundle(
    folder: Path,
    fitted: FittedPipeline,
    tasks: list[TaskResult],
    cases: Mapping[str, list[EvalCase]],
    split: Split,
    dataset: Dataset,
    settings: Settings,
    target: SplitName,
) -> None:
    # One record shape for every writer (training.records); `held_out` lets the gate
    # rebuild these cases later and score another bundle on them.
    evaluation = evaluation_record(
        dataset.name,
        target,
        split.summary(),
        cases,
        tasks,
        settings,
        len(dataset.items),
        held_out_of_split(split, target, settings),
    )
    tower = fitted.pipeline.sources.get("two_tower")
    tower_bundle = getattr(getattr(tower, "bundle", None), "version", None)
    events = split.fit_events(target)
    window = DataWindow(
        dataset=dataset.name,
        files={},
        events=len(events),
        start=str(events["event_time"].min()) if dataset.has_time else None,
        end=str(events["event_time"].max()) if dataset.has_time else None,
    )
    write_rails_bundle(
        folder,
        folder.name,
        fitted.pipeline.rankers,
        fitted.pipeline.stats,
        fitted.pipeline.rule_set,
        settings.ranking,
        tower_bundle,
        evaluation,
        window,
        settings.fingerprint(),
        fitted.pipeline.sources,
        dataset.items,
        dataset.spec.session_kind,
    )


def mmr_sweep(
    pipeline: RailPipeline,
    ranked: list[list],  # type: ignore[type-arg]
    cases: list[EvalCase],
    catalogue: Catalogue,
    settings: Settings,
) -> list[dict[str, float]]:
    """NDCG@slots and intra-list diversity@slots of the re-ranked lists under each λ."""
    slots = settings.evaluation.slots
    out = []
    for lam in settings.ranking.mmr_lambda_grid:
        lists = [[c.item_id for c in pipeline.diversify(row, lam)[:slots]] for row in ranked]
        metrics = per_case_metrics(lists, cases, catalogue, settings)
        ndcg = np.asarray(metrics[f"ndcg@{slots}"], dtype=float)
        diversity = np.asarray(metrics[f"diversity@{slots}"], dtype=float)
        sessions = np.array([c.session_id for c in cases])
        low, high = bootstrap_ci(ndcg, sessions, 200, settings.evaluation.ci_level, settings.seed)[
            1:
        ]
        out.append(
            {
                "lambda": lam,
                "ndcg": float(np.nanmean(ndcg)),
                "ndcg_low": float(low),
                "ndcg_high": float(high),
                "diversity": float(np.nanmean(diversity))
                if np.isfinite(diversity).any()
                else float("nan"),
            }
        )
    return out


def pool_recall(
    pipeline: RailPipeline,
    queries: list,
    cases: list[EvalCase],
    settings: Settings,  # type: ignore[type-arg]
) -> dict[str, dict[str, float]]:
    """Recall of each source's whole candidate list and of the fused pool, with intervals.

    The retrieval stage earns its keep when the pool recalls more than any source alone;
    the re-ranker can only surface what the pool holds.
    """
    per_source = {
        name: [
            [c.item_id for c in row]
            for row in source.candidates(queries, settings.ranking.per_source)
        ]
        for name, source in pipeline.sources.items()
    }
    per_source["pool"] = pipeline.candidate_table(queries).item_lists()
    sessions = np.array([c.session_id for c in cases])
    out = {}
    for name, lists in per_source.items():
        hits = np.array(
            [
                len(set(items) & c.targets) / len(c.targets)
                for items, c in zip(lists, cases, strict=True)
            ]
        )
        mean, low, high = bootstrap_ci(
            hits, sessions, 200, settings.evaluation.ci_level, settings.seed
        )
        size = float(np.mean([len(items) for items in lists])) if lists else 0.0
        out[name] = {"recall": mean, "low": low, "high": high, "mean_size": size}
    return out
