"""Fit the ranking pipeline of one data set, and score it stage by stage in the harness.

The re-ranker must learn from requests its retrievers have not seen, or co-visitation and
the towers look prescient in training and the ranker over-trusts them. So the fit window
is cut in two:

    retrieval window  -> fit towers, co-visitation, session-kNN, popularity, item stats
    ranker window     -> requests + what followed -> LightGBM lambdarank (early stopped)

For the test split the ranker window is the validation split; for the validation split it
is the newest share of train. The ranker also learns from earlier requests: the retrieval
window is cut into time slices, and each slice's requests get candidates and features from
the cheap sources fitted on the slices before it (`ranking.ranker.oof_chunks`; the towers
are not refitted per slice, so those rows carry no tower features). Each rail then serves
the order that wins on the ranker window's held-out sessions (`choose_order`). Afterwards
the cheap sources and the item statistics are refitted on the whole fit window (what the
nightly job does); the towers are not (one training per data set), so they are a window
staler than the baselines beside them. Every cut knows only the items known by then
(training.point_in_time). With `evaluation.refit` the judged configuration is then fitted
again with every window moved forward by one split: the bundle that serves.

One module on purpose: the window cuts, the out-of-fold ranker data, the refit and the
staged scoring must agree on the same cuts; the ranker itself (training.ranker) and the
bundle format (ranking.rails_bundle) already live apart.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from railtower.datasets import Dataset
from railtower.errors import ArtifactMismatch
from railtower.logs import get_logger
from railtower.manifest import DataWindow
from railtower.settings import (
    DatasetSpec,
    EvaluationSettings,
    RailName,
    RankerSettings,
    Settings,
)
from ranking.baselines import BASELINES
from ranking.business_features import ItemStats, build_features
from ranking.candidate_fusion import CandidateTable
from ranking.item_attributes import ItemAttributes
from ranking.rails import STAGES, RailPipeline, ranked_ids
from ranking.rails_bundle import write_rails_bundle
from ranking.retriever import CandidateSource, Catalogue
from ranking.rules import load_rule_set
from training.evaluate import TaskResult, per_case_metrics, score_ranked
from training.metrics import bootstrap_ci
from training.past_purchases import PastPurchases
from training.point_in_time import catalogue_at
from training.ranker import RankerFit, choose_order, fit_ranker, graded_labels
from training.records import (  # cases_fingerprint: re-exported, it used to live here
    cases_fingerprint,  # noqa: F401
    evaluation_record,
    held_out_of_split,
)
from training.split import Split, SplitName, holdout, session_bucket
from training.tasks import EvalCase, build_cases

log = get_logger(__name__)
# The seeded folds of earlier requests where there is no clock: a salt of their own.
_OOF_SALT = 31337

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
    # the point-in-time catalogue at the end of the fit window: what the bundle serves
    items: pd.DataFrame
    rankers: dict[str, RankerFit] = field(default_factory=dict)
    windows: dict[str, int] = field(default_factory=dict)
    # per rail: the order served and every order's NDCG on the ranker's held-out sessions
    orders: dict[str, dict[str, Any]] = field(default_factory=dict)


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
    # Point in time: the ranker learns on requests after the retrieval cut, so sources,
    # statistics and candidates know only the items known by then (training.point_in_time).
    known_then = catalogue_at(dataset.items, retrieval, dataset.has_time, _pit(settings))
    known_now = catalogue_at(dataset.items, whole, dataset.has_time, _pit(settings))
    catalogue = Catalogue(known_then)
    basket = spec.session_kind == "basket"
    sources: dict[str, CandidateSource] = {}
    for name in settings.ranking.sources:
        if name == "two_tower":
            if towers is not None:
                sources[name] = towers().fit(retrieval, catalogue)  # type: ignore[assignment]
        else:
            sources[name] = BASELINES[name](settings, basket).fit(retrieval, catalogue)  # type: ignore[assignment]

    def item_stats(events: pd.DataFrame, items: pd.DataFrame) -> ItemStats:
        return ItemStats.fit(
            events,
            items,
            Catalogue(items),
            settings.ranking,
            settings.event_weights,
            settings.towers.price_bands,
            spec.strong_event_types,
        )

    rules = settings.ranking.rules_path
    pipeline = RailPipeline(
        sources=sources,
        stats=item_stats(retrieval, known_then),
        attributes=ItemAttributes.from_frame(known_now, settings.towers.price_bands),
        settings=settings.ranking,
        depth=settings.ranking.pool_size,
        slots=settings.evaluation.slots,
        rule_set=None if rules is None else load_rule_set(rules),
    )
    fitted = FittedPipeline(
        pipeline,
        items=known_now,
        windows={
            "retrieval_events": len(retrieval),
            "ranker_events": len(ranker_events),
            "fit_events": len(whole),
            "catalogue_at_retrieval_cut": len(known_then),
            "catalogue_at_fit_cut": len(known_now),
            "catalogue_listed": len(dataset.items),
        },
    )
    ranker = settings.ranking.ranker
    request_settings = settings.evaluation.model_copy(
        update={"max_sessions_per_task": ranker.max_sessions}
    )

    # each request sees its user's purchases from sessions that ended before its own began
    past = PastPurchases.of(dataset, settings.serving.purchase_memory)

    def requests(rail: RailName, at: RailPipeline, events: pd.DataFrame, seed: int) -> Requests:
        return _requests(rail, at, events, spec, request_settings, ranker, seed, past)

    # Earlier requests, built exactly as serving builds them by sources fitted before them
    # (ranking.ranker.oof_chunks): many more groups than the ranker window alone gives.
    earlier: dict[str, list[Requests]] = {rail: [] for rail in spec.rails}
    for k, (before, chunk) in enumerate(
        _chunks(retrieval, dataset.has_time, ranker, settings.seed)
    ):
        known = catalogue_at(dataset.items, before, dataset.has_time, _pit(settings))
        at_chunk = replace(
            pipeline,
            sources={
                name: BASELINES[name](settings, basket).fit(before, Catalogue(known))  # type: ignore[misc]
                for name in sources
                if name != "two_tower"
            },
            stats=item_stats(before, known),
            rankers={},
            orders={},
        )
        for rail in spec.rails:
            earlier[rail].append(requests(rail, at_chunk, chunk, settings.seed + 2 + k))
    for rail in spec.rails:
        started = time.perf_counter()
        own = requests(rail, pipeline, ranker_events, settings.seed + 1)
        table, features, labels, sessions = _stack([*earlier[rail], own])
        fit = fit_ranker(
            features, labels, table, sessions, ranker, settings.evaluation.slots, settings.seed
        )
        fitted.rankers[rail] = fit
        if fit.booster is not None:
            pipeline.rankers[rail] = fit.booster
        if ranker.choose_order:
            # judged on the ranker window's own requests: sources as serving has them
            order, tried = choose_order(
                *own, fit.booster, list(sources), ranker, settings.evaluation.slots, settings.seed
            )
            pipeline.orders[rail] = order
            fitted.orders[rail] = {"order": order, "validation_ndcg": tried}
        log.info(
            "ranker fitted",
            dataset=spec.name,
            rail=rail,
            requests=table.queries,
            earlier_requests=table.queries - own[0].queries,
            rows=len(table),
            trained=fit.booster is not None,
            seconds=round(time.perf_counter() - started, 1),
        )
    # Serve from the freshest window: refit what is cheap to refit, over what is known now.
    for name, source in sources.items():
        if name != "two_tower":
            source.fit(whole, Catalogue(known_now))
    pipeline.stats = item_stats(whole, known_now)
    return fitted


def _pit(settings: Settings) -> bool:
    return settings.evaluation.point_in_time_catalogue


# (candidate table, features, graded labels, session id per request) of a batch of requests
Requests = tuple[CandidateTable, np.ndarray, np.ndarray, list[str]]


def _requests(
    rail: RailName,
    pipeline: RailPipeline,
    events: pd.DataFrame,
    spec: DatasetSpec,
    settings: EvaluationSettings,
    ranker: RankerSettings,
    seed: int,
    past: PastPurchases | None = None,
) -> Requests:
    """The re-ranker's training requests of `rail` from `events`, with the candidates,
    features and labels `pipeline` gives them (capped at ranker.max_requests, seeded)."""
    cases = build_cases(rail, events, spec, settings, seed, past)
    if len(cases) > ranker.max_requests:
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(len(cases), ranker.max_requests, replace=False))
        cases = [cases[i] for i in keep]
    queries = [c.query for c in cases]
    table = pipeline.candidate_table(queries)
    features = build_features(table, queries, pipeline.stats)
    labels = graded_labels(table, [c.followed for c in cases], ranker.label_grades)
    return table, features, labels, [c.session_id for c in cases]


def _stack(parts: Sequence[Requests]) -> Requests:
    """One batch of requests from several (query ids offset so they stay distinct)."""
    if len(parts) == 1:
        return parts[0]
    frames, offset = [], 0
    for table, *_ in parts:
        frames.append(table.frame.assign(query=table.frame["query"] + offset))
        offset += table.queries
    table = CandidateTable.from_frame(pd.concat(frames, ignore_index=True), offset)
    features = np.concatenate([p[1] for p in parts])
    labels = np.concatenate([p[2] for p in parts])
    return table, features, labels, [s for p in parts for s in p[3]]


def _chunks(
    retrieval: pd.DataFrame, has_time: bool, ranker: RankerSettings, seed: int
) -> Iterator[tuple[pd.DataFrame, pd.DataFrame]]:
    """(events the sources are fitted on, events whose requests they answer) per chunk.

    With a clock the retrieval window is cut into `oof_chunks + 1` slices by session end and
    each slice after the first is answered by sources fitted on every slice before it (no
    item, statistic or co-occurrence from its future). Without one, seeded session folds:
    each answered by sources fitted on the other folds.
    """
    n = ranker.oof_chunks
    if n == 0 or retrieval.empty:
        return
    if has_time:
        ends = retrieval.groupby("session_id")["event_time"].max()
        order = ends.rank(method="first").to_numpy() - 1
        slot = pd.Series((order * (n + 1) // len(ends)).astype(int), index=ends.index)
        of = retrieval["session_id"].map(slot).to_numpy()
        for k in range(1, n + 1):
            yield retrieval[of < k], retrieval[of == k]
        return
    fold = (session_bucket(retrieval["session_id"], seed + _OOF_SALT) * n).astype(int)
    for k in range(n):
        yield retrieval[fold != k], retrieval[fold == k]


# A tower source for a bundle name suffix ("" for the judged fit, "-refit" for the refit):
# each fit exports its own tower bundle.
TowerFactory = Callable[[str], CandidateSource]


def staged_evaluation(
    dataset: Dataset,
    settings: Settings,
    target: SplitName,
    towers: TowerFactory | None = None,
    bundle: Path | None = None,
) -> Callable[
    [Split, Mapping[str, list[EvalCase]], set[str], Sequence[TaskResult]],
    tuple[list[TaskResult], dict[str, object]],
]:
    """The harness hook (training.evaluate.StagedModel) that fits and scores the pipeline.

    With `bundle`, the fitted rankers, item statistics and rule set are written as a rails
    bundle together with the evaluation they earned, baselines included (the promotion
    gate's input). With `evaluation.refit` (and the test split as target) the judged fit
    goes to `<bundle>-heldout` and the same configuration refitted on the whole window,
    held-out part included, to `<bundle>`: the bundle that serves, carrying the judged
    fit's record (see :func:`refit_pipeline`).
    """

    def run(
        split: Split,
        cases: Mapping[str, list[EvalCase]],
        warm: set[str],
        baselines: Sequence[TaskResult] = (),
    ) -> tuple[list[TaskResult], dict[str, object]]:
        started = time.perf_counter()
        fitted = fit_pipeline(dataset, split, settings, target, _tower(towers, ""))
        fit_s = time.perf_counter() - started
        catalogue = Catalogue(fitted.items)
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
        report: dict[str, object] = {
            "windows": fitted.windows,
            "sources": list(fitted.pipeline.sources),
            "rankers": {rail: fit.summary() for rail, fit in fitted.rankers.items()},
            "orders": fitted.orders,
            "mmr_lambda": settings.ranking.mmr_lambda,
            "mmr_sweep": sweeps,
            "pool_recall": recalls,
            "rule_set": None
            if fitted.pipeline.rule_set is None
            else f"{fitted.pipeline.rule_set.name} {fitted.pipeline.rule_set.version}",
            "fit_seconds": round(fit_s, 1),
        }
        if bundle is None:
            return tasks, report
        record = evaluation_record(
            dataset.name,
            target,
            split.summary(),
            cases,
            tasks,
            settings,
            len(fitted.items),
            held_out_of_split(split, target, settings),
            baselines,
        )
        refit = settings.evaluation.refit and target == "test"
        judged = bundle.with_name(f"{bundle.name}-heldout") if refit else bundle
        _write_bundle(
            judged,
            fitted,
            record,
            [_window(split.fit_events(target), dataset)],
            settings,
            dataset.spec.session_kind,
        )
        report["bundle"] = str(bundle)
        if refit:
            started = time.perf_counter()
            refit_pipeline(dataset, split, settings, record, judged, bundle, towers)
            report["refit"] = {
                "judged": str(judged),
                "served": str(bundle),
                "seconds": round(time.perf_counter() - started, 1),
            }
        return tasks, report

    return run


def refit_pipeline(
    dataset: Dataset,
    split: Split,
    settings: Settings,
    record: dict[str, Any],
    judged: Path,
    folder: Path,
    towers: TowerFactory | None = None,
) -> Path:
    """Refit the judged configuration on the whole window and write it to `folder`.

    The windows move forward by one split: sources and towers learn on train + validation,
    the re-rankers on the test split's requests, and the cheap sources and item statistics
    are refitted on everything. The bundle carries the judged fit's evaluation record (the
    evidence the gate reads; the refit saw those cases) and names that fit; its manifest
    records both windows, its own first. It is verified as serving loads it before it is
    left for the gate: every rail must answer full slots on the held-out requests.

    Raises:
        ArtifactMismatch: the refit does not load or leaves a rail short of its slots.
    """
    shifted = Split(
        split.kind,
        train=split.fit_events("test"),
        validation=split.test,
        test=split.test.iloc[0:0],
        validation_cut=split.test_cut,
    )
    fitted = fit_pipeline(dataset, shifted, settings, "test", _tower(towers, "-refit"))
    judged_window = _window(split.fit_events("test"), dataset)
    whole = _window(shifted.fit_events("test"), dataset)
    refit_record = {
        **record,
        "refit": {
            "judged_bundle": judged.name,
            "judged_window": judged_window.model_dump(mode="json"),
        },
    }
    _write_bundle(
        folder, fitted, refit_record, [whole, judged_window], settings, dataset.spec.session_kind
    )
    _verify_refit(folder, record, dataset, settings)
    log.info(
        "refitted on the whole window",
        dataset=dataset.name,
        bundle=str(folder),
        events=whole.events,
        judged=judged.name,
    )
    return folder


def _verify_refit(
    folder: Path, record: Mapping[str, Any], dataset: Dataset, settings: Settings
) -> None:
    from serving.rail_service import load_rails  # noqa: PLC0415 - loads the models
    from training.bundle_eval import rebuild_cases  # noqa: PLC0415 - imports this module

    loaded = load_rails(folder, settings)
    cases = (
        rebuild_cases(dataset, record["held_out"], settings.serving.purchase_memory)
        if record.get("held_out")
        else {}
    )
    for rail, rail_cases in cases.items():
        queries = [c.query for c in rail_cases[:50]]
        served = loaded.pipeline.run(rail, queries, stages=("rules",))["rules"]
        short = [len(row) for row in served if len(row) < settings.evaluation.slots]
        if short:
            raise ArtifactMismatch(
                f"the refit {folder.name} answers {rail} with {min(short)} of "
                f"{settings.evaluation.slots} slots on held-out requests: it is not served"
            )


def _tower(towers: TowerFactory | None, suffix: str) -> Callable[[], CandidateSource] | None:
    return None if towers is None else partial(towers, suffix)


def _window(events: pd.DataFrame, dataset: Dataset) -> DataWindow:
    return DataWindow(
        dataset=dataset.name,
        files={},
        events=len(events),
        start=str(events["event_time"].min()) if dataset.has_time else None,
        end=str(events["event_time"].max()) if dataset.has_time else None,
    )


def _write_bundle(
    folder: Path,
    fitted: FittedPipeline,
    record: dict[str, Any],
    windows: list[DataWindow],
    settings: Settings,
    session_kind: str,
) -> None:
    tower = fitted.pipeline.sources.get("two_tower")
    tower_bundle = getattr(getattr(tower, "bundle", None), "version", None)
    write_rails_bundle(
        folder,
        folder.name,
        fitted.pipeline.rankers,
        fitted.pipeline.stats,
        fitted.pipeline.rule_set,
        settings.ranking,
        tower_bundle,
        record,
        windows,
        settings.fingerprint(),
        fitted.pipeline.sources,
        fitted.items,
        session_kind,
        fitted.pipeline.orders,
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
