"""Score an already trained rails bundle on any window of events, without retraining.

The bundle is loaded the way serving loads it (serving.rail_service.load_rails, verified),
so what is scored is what would be served. Its cases are built by the harness's own task
builders and scored by the harness's own metrics (session-bootstrap intervals), beside the
baselines refitted on the bundle's own training window (its manifest records it): a later
window then reads against the same floor the harness gave it. The promotion gate uses
`score_bundle` to re-score production on a challenger's held-out cases.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from railtower.datasets import Dataset, load_dataset
from railtower.errors import ArtifactMismatch
from railtower.logs import get_logger
from railtower.manifest import DataWindow, new_version, now_iso
from railtower.settings import (
    EvaluationSettings,
    PurchaseMemorySettings,
    Settings,
    load_dataset_spec,
)
from ranking.rails import STAGES, ranked_ids
from serving.new_items import apply_records
from serving.rail_service import LoadedRails, load_rails
from training.evaluate import DatasetResult, TaskResult, score, score_ranked
from training.fit_pipeline import STAGE_ROWS
from training.harness import baseline_models
from training.past_purchases import PastPurchases
from training.records import (
    cases_fingerprint,
    evaluation_record,
    held_out_after,
    held_out_events,
    sessions_within,
)
from training.report import write_report
from training.tasks import EvalCase, build_cases

log = get_logger(__name__)

# Canonical event columns a file may carry as they are (railtower/schemas.py).
_CANONICAL = (
    "event_id",
    "event_time",
    "event_type",
    "user_id",
    "session_id",
    "item_id",
    "price",
    "quantity",
    "device",
    "locale",
    "country",
)


@dataclass
class BundleEvaluation:
    """A bundle's scores on one window: the harness's result, the gate's record, the cases."""

    bundle: str
    result: DatasetResult
    record: dict[str, Any]
    cases: dict[str, list[EvalCase]]
    # per rail: share of cases whose every target the training window never saw
    cold_share: dict[str, float] = field(default_factory=dict)
    folder: Path | None = None
    outputs: dict[str, Path] = field(default_factory=dict)


def load_events(events: str | Path | Dataset, dataset: str, settings: Settings) -> Dataset:
    """The events to score on: a Dataset, a data set name, or a canonical Parquet/CSV file.

    A file is read through the mapping of `dataset` (the bundle's own), with its events
    mapping replaced by the identity over the canonical columns the file has, so validation
    and the catalogue join are the ones every data set gets.

    Raises:
        SchemaError: the file does not fit the canonical event schema.
    """
    if isinstance(events, Dataset):
        return events
    path = Path(events)
    if path.suffix not in (".parquet", ".csv"):
        return load_dataset(str(events), settings)
    spec = load_dataset_spec(dataset, settings)
    if spec.events is None:
        raise ValueError(f"data set {dataset} has no events mapping to read {path} against")
    import pyarrow.parquet as pq  # noqa: PLC0415 - only a file needs its header read

    columns = (
        pq.read_schema(path).names
        if path.suffix == ".parquet"
        else pd.read_csv(path, nrows=0).columns.tolist()
    )
    identity = {c: c for c in _CANONICAL if c in columns}
    mapping = spec.events.model_copy(
        update={"path": str(path.resolve()), "columns": identity, "event_type_map": {}}
    )
    return load_dataset(spec.model_copy(update={"events": mapping}), settings)


def training_window(loaded: LoadedRails) -> DataWindow:
    """The data window the bundle was fitted on (its manifest's record)."""
    windows = loaded.rails.manifest.data
    if not windows:
        raise ArtifactMismatch(f"{loaded.rails.folder} records no data window in its manifest")
    return windows[0]


def rebuild_cases(
    dataset: Dataset, held_out: Mapping[str, Any], memory: PurchaseMemorySettings
) -> dict[str, list[EvalCase]]:
    """The cases of every rail the data set supports on the held-out sessions `held_out`
    names, sampled as the harness samples them (its evaluation settings and seed), each
    with its user's earlier purchases as `memory` keeps them."""
    if dataset.events is None:
        raise ValueError(f"{dataset.name} has no events: there is nothing to evaluate on")
    events = held_out_events(dataset.events, dataset.has_time, held_out)
    evaluation = EvaluationSettings.model_validate(held_out["evaluation"])
    past = PastPurchases.of(dataset, memory)
    return {
        rail: cases
        for rail in dataset.spec.rails
        if (cases := build_cases(rail, events, dataset.spec, evaluation, held_out["seed"], past))
    }


def score_bundle(
    loaded: LoadedRails,
    cases: Mapping[str, list[EvalCase]],
    settings: Settings,
    dataset: str,
    warm: set[str] | None,
    split: str = "test",
    window: Mapping[str, Any] | None = None,
    held_out: Mapping[str, Any] | None = None,
    baselines: Sequence[TaskResult] = (),
) -> tuple[list[TaskResult], dict[str, Any]]:
    """Run the loaded pipeline stage by stage on `cases`; score every stage as the harness
    does and return (task rows, evaluation record in the shape the bundle itself carries).

    Rows are named as in the harness (two_tower, fused_candidates, ..., +ranker+mmr+rules),
    so the record pairs with any bundle's record on the same cases; `baselines` scored on
    the same cases join the record as the harness's do (the gate's baseline bar).
    """
    tasks: list[TaskResult] = []
    pipeline = loaded.pipeline
    for rail, rail_cases in cases.items():
        queries = [c.query for c in rail_cases]
        staged = pipeline.run(rail, queries)
        rows: dict[str, list[list[str]]] = {}
        if "two_tower" in pipeline.sources:
            rows["two_tower"] = pipeline.sources["two_tower"].recommend(
                queries, settings.evaluation.candidates
            )
        for stage in STAGES:
            rows[STAGE_ROWS[stage]] = ranked_ids(staged, stage)
        for name, ranked in rows.items():
            tasks.append(
                score_ranked(
                    ranked, name, rail, rail_cases, loaded.catalogue, settings, dataset, warm
                )
            )
    record = evaluation_record(
        dataset,
        split,
        window or {},
        cases,
        tasks,
        settings,
        len(loaded.catalogue),
        held_out,
        baselines,
    )
    return tasks, record


def evaluate_bundle(
    rails_dir: Path,
    events: str | Path | Dataset,
    settings: Settings,
    held_out: Mapping[str, Any] | None = None,
    run_name: str | None = None,
    write: bool = True,
    baseline_events: pd.DataFrame | None = None,
    listed: pd.DataFrame | None = None,
) -> BundleEvaluation:
    """Score the rails bundle at `rails_dir` on `events`; never retrains it.

    Args:
        rails_dir: a rails bundle (artifacts/<run>-<data set>-rails), loaded and verified.
        events: a data set name, a canonical Parquet/CSV file, or a loaded Dataset.
        held_out: which sessions to score (training.records.held_out_of_split's shape); by
            default every whole session ending after the bundle's training window, i.e.
            data it never saw (for a harness bundle on its own data: its test split).
        run_name: folder under reports/ (default: a timestamped version).
        write: write results.json/md and plots under reports/<run>/ as the harness does.
        baseline_events: the events the baselines are fitted on (default: the whole
            sessions inside the bundle's training window; a window without a clock, as a
            hash split's, cannot be rebuilt from the events and must be given).
        listed: item rows (the canonical item table's columns) to list in the bundle before
            scoring, as the catalogue topic's `item_upsert` lists them in serving
            (`serving.new_items.apply_record`: attributes, category, and the item tower's
            vector in the delta index); rows the bundle already knows are skipped. The
            baselines cannot recommend them (they rank items with events) but read their
            categories from the shared catalogue, as the served model does.

    Raises:
        ArtifactMismatch: the bundle (or its tower bundle) does not verify.
        ValueError: no held-out case on any rail, or the events have no clock for a window.
    """
    # Validate: the bundle verifies and the events fit its data set's schema.
    loaded = load_rails(rails_dir, settings)
    new_items = 0 if listed is None else list_items(loaded, listed)
    dataset_name = str(loaded.rails.evaluation.get("dataset") or training_window(loaded).dataset)
    data = load_events(events, dataset_name, settings)
    if data.events is None:
        raise ValueError(f"{data.name} has no events: there is nothing to evaluate on")
    window = training_window(loaded)
    held_out = dict(held_out or held_out_after(str(window.end), settings))
    cases = rebuild_cases(data, held_out, settings.serving.purchase_memory)
    if not cases:
        raise ValueError(
            f"no held-out case on any rail of {data.name} in {held_out}: pass events that "
            f"reach past the bundle's training window (it ends {window.end})"
        )
    # Compute: baselines on the bundle's own training window, then the bundle's stages.
    fit_events = (
        sessions_within(data.events, window.start, window.end)
        if baseline_events is None
        else baseline_events
    )
    warm = set(fit_events["item_id"]) if len(fit_events) else _stats_items(loaded)
    tasks: list[TaskResult] = []
    if len(fit_events):
        for name, make in baseline_models(settings, loaded.rails.basket).items():
            model = make().fit(fit_events, loaded.catalogue)
            for rail, rail_cases in cases.items():
                tasks.append(
                    score(
                        model, name, rail, rail_cases, loaded.catalogue, settings, data.name, warm
                    )
                )
    summary = _summary(data, held_out, window, fit_events, cases)
    staged, record = score_bundle(
        loaded,
        cases,
        settings,
        data.name,
        warm,
        str(held_out["split"]),
        summary,
        held_out,
        list(tasks),
    )
    tasks += staged
    cold = {
        rail: float(np.mean([not (c.targets & warm) for c in rc])) for rail, rc in cases.items()
    }
    # Shape: the harness's DatasetResult, so its report writer and tables apply as they are.
    result = DatasetResult(
        data.name,
        {**summary, "bundle": loaded.version, "cold_share": cold, "listed_items": new_items},
        [r.as_dict() for r in data.reports],
        tasks,
    )
    evaluation = BundleEvaluation(loaded.version, result, record, cases, cold)
    if write:
        run = run_name or new_version("bundle-eval")
        folder = settings.reports_dir / run
        folder.mkdir(parents=True, exist_ok=True)
        header: dict[str, object] = {
            "run": run,
            "split": f"{held_out['split']} (bundle {loaded.version}, not retrained)",
            "created_at": now_iso(),
            "settings_fingerprint": settings.fingerprint(),
            "bundle": str(loaded.rails.folder),
            "held_out": held_out,
        }
        evaluation.folder = folder
        evaluation.outputs = write_report(folder, [result], settings, header)
        log.info("bundle evaluated", bundle=loaded.version, folder=str(folder), cold_share=cold)
    return evaluation


def list_items(loaded: LoadedRails, items: pd.DataFrame) -> int:
    """List every row of `items` the bundle does not know through the serving path
    (`apply_records`, one `item_upsert` each, encoded as one batch, as a catalogue sync
    does); returns how many it listed."""
    fields = [
        c for c in ("title", "category_path", "brand", "price", "image_path") if c in items.columns
    ]
    records: dict[str, Mapping[str, object]] = {}
    for row in items.itertuples(index=False):
        item_id = str(row.item_id)  # type: ignore[attr-defined]
        if item_id not in loaded.catalogue.index:
            records[item_id] = {f: _present(getattr(row, f)) for f in fields}
    listed = apply_records(loaded, records)
    log.info("items listed before scoring", bundle=loaded.version, listed=listed)
    return listed


def _present(value: object) -> object:
    """None for a missing cell (NaN, None, pd.NA), else the value as a plain Python scalar."""
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return None
    return value.item() if isinstance(value, np.generic) else value


def _stats_items(loaded: LoadedRails) -> set[str]:
    """Items the training window saw, from the bundle's item statistics (when the events
    given do not cover that window)."""
    stats = loaded.pipeline.stats
    return set(stats.item_ids[stats.popularity > 0].tolist())


def _summary(
    data: Dataset,
    held_out: Mapping[str, Any],
    window: DataWindow,
    fit_events: pd.DataFrame,
    cases: Mapping[str, list[EvalCase]],
) -> dict[str, Any]:
    events = held_out_events(data.events, data.has_time, held_out)  # type: ignore[arg-type]
    return {
        "kind": "bundle",
        "training_window": {"start": window.start, "end": window.end, "events": window.events},
        "baseline_fit_events": len(fit_events),
        "held_out": {
            "events": len(events),
            "sessions": int(events["session_id"].nunique()),
            "start": str(events["event_time"].min()) if len(events) else None,
            "end": str(events["event_time"].max()) if len(events) else None,
        },
        "fingerprints": {rail: cases_fingerprint(rc) for rail, rc in cases.items()},
    }


def rescore_on_cases_of(
    production_dir: Path,
    candidate: Mapping[str, Any],
    settings: Settings,
    events: str | Path | Dataset | None = None,
) -> dict[str, Any]:
    """Production's evaluation record on the candidate's own held-out cases (paired).

    The cases are rebuilt from the data set the candidate's record names (or `events`) and
    the `held_out` block it stores; their fingerprints must equal the recorded ones, or the
    data changed since and no paired comparison is possible.

    Raises:
        ArtifactMismatch: the candidate record cannot be rebuilt (no `held_out`, or the
            rebuilt cases differ from the recorded ones), or production does not verify.
    """
    held_out = candidate.get("held_out")
    if not held_out:
        raise ArtifactMismatch(
            "the candidate's evaluation names no held_out window, so its cases cannot be "
            "rebuilt; re-evaluate it with this version (railtower evaluate)"
        )
    dataset = str(candidate["dataset"])
    data = load_events(events if events is not None else dataset, dataset, settings)
    cases = rebuild_cases(data, held_out, settings.serving.purchase_memory)
    rails = candidate.get("rails", {})
    for rail, record in rails.items():
        rebuilt = cases_fingerprint(cases.get(rail, []))
        if rebuilt != record["fingerprint"]:
            raise ArtifactMismatch(
                f"{rail}: the candidate's cases rebuilt from {data.name} have fingerprint "
                f"{rebuilt}, its record says {record['fingerprint']}: the data or the case "
                "sampling changed since it was evaluated; re-evaluate the candidate"
            )
    loaded = load_rails(production_dir, settings)
    _, record = score_bundle(
        loaded,
        {rail: cases[rail] for rail in rails},
        settings,
        dataset,
        _stats_items(loaded),
        str(candidate.get("split", "test")),
        candidate.get("window"),
        held_out,
    )
    return record
