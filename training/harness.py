"""`railtower evaluate`: load data sets, score baselines (and later models), write a report."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from railtower.datasets import load_dataset
from railtower.logs import get_logger
from railtower.manifest import (
    DataWindow,
    Manifest,
    library_versions,
    new_version,
    now_iso,
    sha256_of,
)
from railtower.settings import Settings, load_dataset_spec
from ranking.baselines import BASELINES
from ranking.retriever import Retriever
from training.evaluate import DatasetResult, evaluate_dataset
from training.fit_pipeline import staged_evaluation
from training.report import write_report
from training.split import SplitName
from training.tower_model import tower_factory

log = get_logger(__name__)


@dataclass
class EvaluationRun:
    folder: Path
    results: list[DatasetResult]
    outputs: dict[str, Path]


def baseline_models(settings: Settings, basket: bool) -> dict[str, Callable[[], Retriever]]:
    unknown = set(settings.evaluation.baselines) - set(BASELINES)
    if unknown:
        raise ValueError(f"unknown baselines {sorted(unknown)}; known: {sorted(BASELINES)}")
    return {
        name: (lambda name=name: BASELINES[name](settings, basket))  # type: ignore[misc]
        for name in settings.evaluation.baselines
    }


def run_evaluation(
    settings: Settings,
    datasets: list[str] | None = None,
    target: SplitName = "test",
    run_name: str | None = None,
    towers: bool = False,
) -> EvaluationRun:
    """Evaluate the baselines (and, with `towers`, the two-tower model) on each data set.

    Args:
        datasets: names of configs/datasets/*.yaml (default: settings.datasets).
        target: "test" for the reported numbers, "validation" for tuning.
        run_name: folder name under reports/ (default: a timestamped version).
        towers: also train the towers on each data set's retrieval window, export a bundle
            to artifacts/<run>-<data set>/, and make it a candidate source of the pipeline
            (its own row is scored from that bundle).

    Every data set with rails also gets the ranking pipeline's rows (fused candidates,
    re-ranker, MMR, rules; see training.fit_pipeline).
    """
    run = run_name or new_version("eval")
    folder = settings.reports_dir / run
    folder.mkdir(parents=True, exist_ok=True)
    results, windows = [], []
    for name in datasets or settings.datasets:
        spec = load_dataset_spec(name, settings)
        dataset = load_dataset(spec, settings)
        models = baseline_models(settings, spec.session_kind == "basket")
        towers_of = (
            tower_factory(settings, spec, dataset.items, f"{run}-{spec.name}") if towers else None
        )
        staged = (
            staged_evaluation(
                dataset,
                settings,
                target,
                towers_of,
                settings.artifacts_dir / f"{run}-{spec.name}-rails",
            )
            if dataset.events is not None and spec.rails
            else None
        )
        results.append(evaluate_dataset(dataset, settings, models, target, staged))
        windows.append(_window(dataset, settings))
    header = {
        "run": run,
        "split": target,
        "created_at": now_iso(),
        "settings_fingerprint": settings.fingerprint(),
    }
    outputs = write_report(folder, results, settings, header)
    Manifest(
        kind="evaluation",
        version=run,
        created_at=header["created_at"],
        git_commit=None,
        settings_fingerprint=settings.fingerprint(),
        data=windows,
        metrics={"tasks": len([t for r in results for t in r.tasks])},
        libraries=library_versions(),
    ).write(folder)
    latest = settings.reports_dir / "latest"
    latest.unlink(missing_ok=True)
    latest.symlink_to(folder.name)
    log.info("report written", folder=str(folder))
    return EvaluationRun(folder, results, outputs)


def _window(dataset, settings: Settings) -> DataWindow:  # type: ignore[no-untyped-def]
    spec = dataset.spec
    files = {}
    for mapping in (spec.events, spec.items):
        if mapping is not None:
            path = spec.path(settings, mapping.path)
            files[str(path)] = sha256_of(path)
    events = dataset.events
    timed = events is not None and dataset.has_time
    return DataWindow(
        dataset=spec.name,
        files=files,
        events=None if events is None else len(events),
        start=str(events["event_time"].min()) if timed else None,
        end=str(events["event_time"].max()) if timed else None,
    )
