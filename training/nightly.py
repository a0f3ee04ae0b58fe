"""`railtower nightly`: window -> train + evaluate -> verify -> gate -> promote, resumably.

Each run keeps `<artifacts>/<nightly.state_dir>/<run>/state.json` (written atomically)
with every completed step of every data set and its outputs. Rerunning a run skips the
steps it completed, after checking that their artifacts still exist and verify (a step
whose outputs are gone is redone). Production only changes in the last step, through
`training.promotion.promote`, whose pointer switch (railtower.production) is one rename: a
crash anywhere leaves production as it was and the run resumable. A lock file keeps two
runs from overlapping.

The default run name is derived from the data windows and the settings, so running the
job twice on the same data is the same run and does nothing the second time; a run with
another name on an already processed window reuses that run's outcome instead of
training again. With `nightly.fold_catalogue` a window includes the catalogue records in
Redis folded into its item table (training.catalogue_fold): a new listing, price or
retirement is new data. A run pins the snapshot it read (`catalogue.json` beside its
state), so resuming it folds the same records whatever the catalogue did meanwhile.

One module on purpose: the resumable job is its steps, its state file and its lock;
splitting them would scatter the resume rules a crash must obey across modules.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
import pandas as pd

from railtower.canary import read_canary, start_canary
from railtower.datasets import Dataset, load_dataset
from railtower.errors import ArtifactMismatch, RailtowerError
from railtower.logs import get_logger
from railtower.manifest import DataWindow, Manifest, library_versions, now_iso, sha256_of
from railtower.production import pointer_path
from railtower.settings import Settings, load_dataset_spec
from ranking.bundle import TowerBundle
from ranking.rails_bundle import RailsBundle, load_evaluation
from training.catalogue_fold import (
    LOGGED_IDS,
    CatalogueSnapshot,
    fold_catalogue,
    read_catalogue,
)
from training.evaluate import evaluate_dataset
from training.fit_pipeline import staged_evaluation
from training.harness import baseline_models
from training.promotion import GateDecision, RailVerdict, gated, promote
from training.report import write_report
from training.tower_model import tower_factory

log = get_logger(__name__)

STEPS = ("window", "train", "verify", "gate", "promote")
# The catalogue snapshot a run folded in, beside its state.json (see `_catalogue`).
CATALOGUE_FILE = "catalogue.json"
CATALOGUE_UNAVAILABLE = "Redis unreachable when the run read the catalogue"
EXIT_PROMOTED, EXIT_REFUSED = 0, 3


class NightlyError(RailtowerError):
    """The nightly job cannot start, resume or finish a step (the message says how to fix)."""


@dataclass
class NightlyResult:
    run: str
    state: dict[str, Any]
    report_json: Path
    report_markdown: Path

    @property
    def exit_code(self) -> int:
        """0 when every trained data set is (now) production or a live canary, 3 when any
        was refused."""
        outcomes = [d.get("outcome") for d in self.state["datasets"].values()]
        return EXIT_REFUSED if "refused" in outcomes else EXIT_PROMOTED


# ------------------------------------------------------------------ window


def select_window(
    events: pd.DataFrame, has_time: bool, days: float | None
) -> tuple[pd.DataFrame, pd.Timestamp | None]:
    """The whole sessions that start within the newest `days` of events (0/None: all).

    Sessions are kept whole (a session that started before the cut is dropped entirely),
    so every event of the window lies inside it. Without a clock there is no "newest".
    """
    if not has_time or not days:
        return events, None
    cut = events["event_time"].max() - pd.Timedelta(days=days)
    starts = events.groupby("session_id")["event_time"].transform("min")
    return events[starts >= cut].reset_index(drop=True), cut


def window_record(
    dataset: Dataset,
    events: pd.DataFrame,
    cut: pd.Timestamp | None,
    settings: Settings,
    catalogue: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What identifies the window: source file hashes, cut, span, size, the settings and,
    when the catalogue is folded in, what was folded (`fold_into`)."""
    spec = dataset.spec
    files = {
        str(spec.path(settings, m.path)): sha256_of(spec.path(settings, m.path))
        for m in (spec.events, spec.items)
        if m is not None
    }
    record: dict[str, Any] = {
        "dataset": spec.name,
        "files": files,
        "window_days": settings.nightly.window_days,
        "cut": None if cut is None else str(cut),
        "start": str(events["event_time"].min()) if dataset.has_time else None,
        "end": str(events["event_time"].max()) if dataset.has_time else None,
        "events": len(events),
        "sessions": int(events["session_id"].nunique()),
        "settings_fingerprint": settings.fingerprint(),
    }
    if catalogue is not None:
        record["catalogue"] = catalogue
    record["digest"] = hashlib.sha256(
        orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
    ).hexdigest()[:12]
    return record


# ------------------------------------------------------------------ train + evaluate


def train_and_evaluate(
    settings: Settings, dataset: Dataset, run: str, window: DataWindow
) -> dict[str, Any]:
    """Train the towers and the ranking pipeline on the window; score and export them.

    The composition of `training.harness.run_evaluation` for one already windowed data set:
    the same baselines, tower retriever, staged pipeline and report writer.
    """
    spec = dataset.spec
    folder = settings.reports_dir / run / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    rails = settings.artifacts_dir / f"{run}-{spec.name}-rails"
    towers = tower_factory(settings, spec, dataset.items, f"{run}-{spec.name}")
    staged = staged_evaluation(dataset, settings, "test", towers, rails)
    models = baseline_models(settings, spec.session_kind == "basket")
    result = evaluate_dataset(dataset, settings, models, "test", staged)
    header: dict[str, object] = {
        "run": run,
        "split": "test",
        "created_at": now_iso(),
        "settings_fingerprint": settings.fingerprint(),
    }
    write_report(folder, [result], settings, header)
    Manifest(
        kind="evaluation",
        version=f"{run}-{spec.name}",
        created_at=header["created_at"],
        git_commit=None,
        settings_fingerprint=settings.fingerprint(),
        data=[window],
        metrics={"tasks": len(result.tasks)},
        libraries=library_versions(),
    ).write(folder)
    tower = RailsBundle.load(rails).tower_bundle
    return {
        "rails_bundle": str(rails),
        "tower_bundle": None if tower is None else str(settings.artifacts_dir / tower),
        "report": str(folder),
        "ndcg": {
            t.rail: round(t.metrics[f"ndcg@{settings.evaluation.slots}"].mean, 4)
            for t in result.tasks
            if t.model == settings.promotion.stage
        },
    }


def verify_artifacts(outputs: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Prove what serving needs exists: the rails bundle, the tower bundle with its HNSW
    index, and the Triton user-tower version the bundle names (serving asks for exactly it).

    Raises:
        ArtifactMismatch: a bundle does not verify or the Triton version is missing.
    """
    rails = RailsBundle.load(Path(outputs["rails_bundle"]))
    if not (Path(outputs["report"]) / "results.json").exists():
        raise ArtifactMismatch(f"{outputs['report']}/results.json is missing")
    checked: dict[str, Any] = {"rails_bundle": rails.version, "rails": sorted(rails.rankers)}
    if outputs.get("tower_bundle") is None:
        return {**checked, "tower_bundle": None, "note": "no two_tower source: no index to serve"}
    tower = TowerBundle.load(Path(outputs["tower_bundle"]))
    model_dir = settings.serving.triton_repository / settings.serving.triton_model
    version_dir = model_dir / tower.triton_version
    named = version_dir / "bundle.txt"
    if not tower.triton_version or not named.exists() or named.read_text().strip() != tower.version:
        raise ArtifactMismatch(
            f"Triton model {model_dir} has no version {tower.triton_version or '?'} for "
            f"{tower.version} (pruned or another repository); retrain with a new --run-name"
        )
    return {
        **checked,
        "tower_bundle": tower.version,
        "hnsw_items": len(tower.item_ids),
        "hnsw_ef": tower.index.ef,
        "triton": str(version_dir),
    }


# ------------------------------------------------------------------ state and lock


@contextmanager
def run_lock(state_dir: Path, run: str | None) -> Iterator[None]:
    """An exclusive, non-blocking lock; the kernel releases it if the process dies."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / ".lock"
    with path.open("a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise NightlyError(
                f"another nightly run holds {path} ({holder}); wait for it to finish"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}, run {run or '(naming)'}, since {now_iso()}\n")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Write-then-rename: a crash mid-write leaves the previous state, never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with temporary.open("wb") as fh:
        fh.write(orjson.dumps(state, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(temporary, path)


def read_state(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        state: dict[str, Any] = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise NightlyError(f"{path} is not valid JSON ({exc}); delete it to start over") from None
    return state


def latest_unfinished(state_dir: Path) -> str:
    runs = sorted(state_dir.glob("*/state.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in runs:
        state = read_state(path)
        if state is not None and not state.get("finished"):
            return path.parent.name
    raise NightlyError(f"--resume: no unfinished run under {state_dir}; start one without --resume")


def processed_elsewhere(
    state_dir: Path, run: str, dataset: str, digest: str
) -> dict[str, Any] | None:
    """Another run's finished record of the same data window and settings, if any."""
    for path in sorted(state_dir.glob("*/state.json")):
        if path.parent.name == run:
            continue
        other = (read_state(path) or {}).get("datasets", {}).get(dataset, {})
        if other.get("window", {}).get("digest") == digest and "promote" in other.get("steps", {}):
            return {"run": path.parent.name, **other}
    return None


# ------------------------------------------------------------------ the job


def run_nightly(
    settings: Settings,
    datasets: list[str] | None = None,
    window_days: float | None = None,
    run_name: str | None = None,
    resume: bool = False,
) -> NightlyResult:
    """Run (or resume) the nightly job; see the module docstring.

    Args:
        datasets: data set names (default nightly.datasets, else settings.datasets).
        window_days: overrides nightly.window_days (a resumed run keeps its own).
        run_name: the run (default: derived from the windows and settings).
        resume: continue the newest unfinished run when no run name is given.

    Raises:
        NightlyError: locked, a resumed run's settings or data changed, or a step failed
            (the original error is chained; production is untouched).
    """
    state_dir = settings.artifacts_dir / settings.nightly.state_dir
    with run_lock(state_dir, run_name):
        if resume and run_name is None:
            run_name = latest_unfinished(state_dir)
        previous = read_state(state_dir / run_name / "state.json") if run_name else None
        if previous is not None:
            if window_days is None:
                window_days = previous["window_days"]
            datasets = datasets or list(previous["datasets"])
        if window_days is not None:
            settings = settings.model_copy(
                update={"nightly": settings.nightly.model_copy(update={"window_days": window_days})}
            )
        names = datasets or settings.nightly.datasets or settings.datasets
        catalogue = _catalogue(settings, state_dir / run_name if run_name else None)
        windows = _windows(settings, names, catalogue)
        if run_name is None:
            digest = hashlib.sha256("".join(w[1]["digest"] for w in windows.values()).encode())
            end = max((w[1]["end"] or "" for w in windows.values()), default="")[:10].replace(
                "-", ""
            )
            run_name = "-".join(p for p in ("nightly", end, digest.hexdigest()[:8]) if p)
            previous = read_state(state_dir / run_name / "state.json")
        state = previous or {
            "run": run_name,
            "created_at": now_iso(),
            "settings_fingerprint": settings.fingerprint(),
            "window_days": settings.nightly.window_days,
            "datasets": {},
            "finished": False,
        }
        if state["settings_fingerprint"] != settings.fingerprint():
            raise NightlyError(
                f"run {run_name} was started with settings {state['settings_fingerprint']}, "
                f"these are {settings.fingerprint()}; restore them or start a new --run-name"
            )
        path = state_dir / run_name / "state.json"
        _pin_catalogue(settings, state_dir / run_name, catalogue)
        log.info("nightly run", run=run_name, datasets=list(windows), resumed=previous is not None)
        for dataset, window in windows.values():
            _run_dataset(settings, run_name, dataset, window, state, path, state_dir)
        state["finished"] = True
        state["finished_at"] = now_iso()
        write_state(path, state)
        return _write_report(settings, run_name, state)


def _catalogue(settings: Settings, run_folder: Path | None) -> CatalogueSnapshot | None:
    """The catalogue snapshot this run folds in; None when the fold is off or Redis was
    unreachable.

    A run pins the snapshot it first read in its folder (`_pin_catalogue`), and resuming
    or rerunning it folds that one again: the catalogue changes by the minute (prices,
    stock), and a fresh read would change the windows' digests and refuse every resume as
    "the data changed".
    """
    if not settings.nightly.fold_catalogue:
        return None
    pinned = None if run_folder is None else read_state(run_folder / CATALOGUE_FILE)
    if pinned is None:
        return read_catalogue(settings)
    if "unavailable" in pinned:
        return None
    return CatalogueSnapshot(int(pinned["version"]), pinned["records"])


def _pin_catalogue(
    settings: Settings, run_folder: Path, catalogue: CatalogueSnapshot | None
) -> None:
    """Keep the snapshot the run folded (or that Redis was unreachable) beside its state."""
    path = run_folder / CATALOGUE_FILE
    if not settings.nightly.fold_catalogue or path.exists():
        return
    if catalogue is None:
        write_state(path, {"unavailable": CATALOGUE_UNAVAILABLE})
    else:
        write_state(path, {"version": catalogue.version, "records": dict(catalogue.records)})


def fold_into(
    dataset: Dataset, catalogue: CatalogueSnapshot | None
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The data set's item table with the catalogue folded in, and the window's
    `catalogue` entry (what was folded; it enters the window's digest, so a new listing,
    price or retirement makes a new run)."""
    if catalogue is None:
        log.warning(
            "nightly trains without the catalogue fold",
            dataset=dataset.name,
            reason=CATALOGUE_UNAVAILABLE,
        )
        return dataset.items, {"unavailable": CATALOGUE_UNAVAILABLE}
    # a record without `listed_at` was listed by the snapshot's last change at the latest;
    # that time (not the clock) keeps a resumed run's folded table identical
    folded = fold_catalogue(dataset.items, catalogue.records, catalogue.changed_at)
    counts = folded.counts()
    log.info(
        "catalogue folded",
        dataset=dataset.name,
        version=catalogue.version,
        records=len(catalogue.records),
        listed_items=list(folded.listed[:LOGGED_IDS]),
        **counts,
    )
    entry = {
        "version": catalogue.version,
        "records": len(catalogue.records),
        "digest": catalogue.digest,
        **counts,
    }
    return folded.items, entry


def _windows(
    settings: Settings, names: list[str], catalogue: CatalogueSnapshot | None
) -> dict[str, tuple[Dataset, dict[str, Any]]]:
    """Each data set's window and its record. With `nightly.fold_catalogue` the catalogue
    snapshot is folded into every data set's item table: the catalogue topic is the shop's
    one catalogue and carries no data set name, so a job that trains several data sets
    (research, not a shop) lists each new id in each of them."""
    out = {}
    for name in names:
        spec = load_dataset_spec(name, settings)
        if spec.events is None or not spec.rails:
            log.info("nightly skips a catalogue-only data set", dataset=name)
            continue
        dataset = load_dataset(spec, settings)
        if dataset.events is None:
            raise NightlyError(f"{name}: its mapping lists events but none were loaded")
        events, cut = select_window(dataset.events, dataset.has_time, settings.nightly.window_days)
        if events["session_id"].nunique() < 10:
            raise NightlyError(
                f"{name}: the newest {settings.nightly.window_days} days hold "
                f"{events['session_id'].nunique()} sessions; widen nightly.window_days"
            )
        items, entry = dataset.items, None
        if settings.nightly.fold_catalogue:
            items, entry = fold_into(dataset, catalogue)
        windowed = Dataset(dataset.spec, events, items, dataset.reports)
        out[name] = (windowed, window_record(dataset, events, cut, settings, entry))
    if not out:
        raise NightlyError(f"none of {names} has events and rails to train on")
    return out


def _run_dataset(
    settings: Settings,
    run: str,
    dataset: Dataset,
    window: dict[str, Any],
    state: dict[str, Any],
    path: Path,
    state_dir: Path,
) -> None:
    record = state["datasets"].setdefault(dataset.name, {"steps": {}})
    steps: dict[str, Any] = record["steps"]
    recorded = record.get("window")
    if recorded is not None and recorded["digest"] != window["digest"]:
        raise NightlyError(
            f"{dataset.name}: the data changed since run {run} picked its window "
            f"({recorded['digest']} vs {window['digest']}); start a new run"
        )
    record["window"] = window
    pointer = pointer_path(settings.artifacts_dir, settings.promotion, dataset.name)
    done = processed_elsewhere(state_dir, run, dataset.name, window["digest"])
    if done is not None and "train" not in steps:
        # Same data, same settings: the earlier run's decision stands; nothing to retrain.
        record.update(outcome=done.get("outcome"), reused_from=done["run"], steps=done["steps"])
        write_state(path, state)
        log.info("nightly window already processed", dataset=dataset.name, by=done["run"])
        return

    def step(
        name: str, work: Callable[[], dict[str, Any]], valid: Callable[[dict[str, Any]], bool]
    ) -> dict[str, Any]:
        if name in steps and valid(steps[name]["outputs"]):
            log.info("nightly step skipped (done)", run=run, dataset=dataset.name, step=name)
            return dict(steps[name]["outputs"])
        for later in STEPS[STEPS.index(name) :]:
            steps.pop(later, None)  # a redone step invalidates everything after it
        log.info("nightly step", run=run, dataset=dataset.name, step=name)
        started = time.perf_counter()
        try:
            outputs = work()
        except Exception as exc:
            write_state(path, state)
            log.exception("nightly step failed", run=run, dataset=dataset.name, step=name)
            raise NightlyError(
                f"nightly run {run}, {dataset.name}, step '{name}' failed: {exc}. Production "
                f"is untouched; fix the cause and rerun with --run-name {run} (or --resume)"
            ) from exc
        seconds = round(time.perf_counter() - started, 1)
        steps[name] = {"at": now_iso(), "seconds": seconds, "outputs": outputs}
        write_state(path, state)
        log.info("nightly step done", run=run, dataset=dataset.name, step=name, seconds=seconds)
        return outputs

    data_window = DataWindow(
        **{k: window[k] for k in ("dataset", "files", "events", "start", "end")}
    )
    step("window", lambda: window, lambda _: True)
    trained = step(
        "train",
        lambda: train_and_evaluate(settings, dataset, run, data_window),
        lambda out: _verifies(out, settings),
    )
    step(
        "verify",
        lambda: verify_artifacts(trained, settings),
        lambda _: _verifies(trained, settings),
    )
    candidate = Path(trained["rails_bundle"])
    step("gate", lambda: _gate(candidate, pointer, settings), lambda _: True)
    final = step("promote", lambda: _promote(candidate, pointer, settings), lambda _: True)
    record["outcome"] = (
        "promoted" if final["promote"] else "canary" if final.get("canary") else "refused"
    )
    write_state(path, state)


def _verifies(outputs: dict[str, Any], settings: Settings) -> bool:
    try:
        verify_artifacts(outputs, settings)
    except (RailtowerError, OSError, KeyError) as exc:
        log.warning("nightly outputs no longer verify; redoing the step", why=str(exc))
        return False
    return True


def _production(pointer: Path) -> Path | None:
    current = pointer.resolve() if pointer.is_symlink() else None
    return current if current is not None and current.exists() else None


def _gate(candidate: Path, pointer: Path, settings: Settings) -> dict[str, Any]:
    """The gate's verdict against the current production, without moving anything."""
    current = _production(pointer)
    if current == candidate.resolve():
        return {"promote": True, "already_production": True, "production": current.name}
    # Production evaluated on an older window is re-scored on the candidate's cases.
    decision = gated(
        load_evaluation(candidate),
        current,
        settings.promotion,
        settings.seed,
        candidate.name,
        rescore=settings,
    )
    return asdict(decision)


def _promote(candidate: Path, pointer: Path, settings: Settings) -> dict[str, Any]:
    """Promote or refuse through training.promotion (one atomic rename, history recorded).

    The gate is re-run inside `promote` against production as it is *now*, so a pointer
    moved by someone else since the gate step is never overwritten on a stale verdict.
    """
    if _production(pointer) == candidate.resolve():
        # A crash after the switch but before the state was written: already done.
        return {"promote": True, "already_production": True, "production": candidate.name}
    live = read_canary(pointer)
    if live is not None and live.live:
        if live.challenger_path == str(candidate.resolve()):
            # A crash after the canary started but before the state was written.
            return {"promote": False, "canary": live.challenger, "production": live.production}
        current = _production(pointer)
        return {
            "promote": False,
            "candidate": candidate.name,
            "production": None if current is None else current.name,
            "reasons": [
                f"a canary of {live.challenger} is {live.status} at {live.share:.0%}: the "
                "pointer is the canary's to move; let it finish (`railtower canary step`) "
                "or abort it (`railtower canary abort`), then rerun"
            ],
            "verdicts": [],
        }
    if settings.nightly.release == "canary":
        return _start_canary(candidate, pointer, settings)
    return asdict(promote(candidate, pointer, settings.promotion, settings.seed, rescore=settings))


def _start_canary(candidate: Path, pointer: Path, settings: Settings) -> dict[str, Any]:
    """The gate against production as it is now; passed, a live canary of the candidate."""
    decision = asdict(
        gated(
            load_evaluation(candidate),
            _production(pointer),
            settings.promotion,
            settings.seed,
            candidate.name,
            rescore=settings,
        )
    )
    if not decision["promote"]:
        return decision
    if _production(pointer) is None:  # no production to compare with: promote outright
        return asdict(
            promote(candidate, pointer, settings.promotion, settings.seed, rescore=settings)
        )
    state = start_canary(
        settings.artifacts_dir,
        settings.promotion,
        settings.canary,
        pointer.name,
        candidate,
        "nightly: passed the gate",
    )
    return {**decision, "promote": False, "canary": state.challenger}


# ------------------------------------------------------------------ report


def decision_markdown(outputs: dict[str, Any]) -> str:
    if outputs.get("already_production"):
        return f"Already production: {outputs['production']} (nothing switched again).\n"
    head = ""
    if outputs.get("canary"):
        if "verdicts" not in outputs:
            return f"Canary of {outputs['canary']} already live against {outputs['production']}.\n"
        head = (
            f"Passed the gate: a live canary of {outputs['canary']} started "
            "(`railtower canary step` moves it on).\n\n"
        )
        outputs = {**outputs, "promote": True}
    # JSON has no NaN: the state stores "no production value" as null; the table wants NaN.
    verdicts = [
        RailVerdict(**{k: float("nan") if x is None else x for k, x in v.items()})  # type: ignore[arg-type]
        for v in outputs.get("verdicts", [])
    ]
    fields = {k: outputs[k] for k in ("promote", "candidate", "production", "reasons")}
    return head + GateDecision(**fields, verdicts=verdicts).to_markdown()


def _write_report(settings: Settings, run: str, state: dict[str, Any]) -> NightlyResult:
    folder = settings.reports_dir / run
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# Nightly run {run}",
        "",
        f"Settings {state['settings_fingerprint']}, window_days {state['window_days']}.",
        "",
    ]
    for name, record in state["datasets"].items():
        w, steps = record["window"], record["steps"]
        lines += [
            f"## {name}: {str(record.get('outcome', 'unfinished')).upper()}",
            "",
            f"Window: {w['start']} to {w['end']} ({w['events']:,} events, {w['sessions']:,} "
            f"sessions; cut {w['cut'] or 'none: every event'}).",
        ]
        if record.get("reused_from"):
            lines.append(
                f"Same window and settings as run {record['reused_from']}: its outcome stands."
            )
        lines += ["", "| step | finished | seconds |", "|---|---|---|"]
        lines += [
            f"| {s} | {steps[s]['at']} | {steps[s]['seconds']} |" for s in STEPS if s in steps
        ]
        train = steps.get("train", {}).get("outputs", {})
        if train:
            lines += [
                "",
                f"Bundle `{train['rails_bundle']}`; towers `{train['tower_bundle']}`; "
                f"evaluation `{train['report']}/results.md`.",
                "",
            ]
        if "promote" in steps:
            lines += ["", decision_markdown(steps["promote"]["outputs"])]
    markdown = folder / "nightly.md"
    markdown.write_text("\n".join(lines) + "\n")
    payload = folder / "nightly.json"
    payload.write_bytes(
        orjson.dumps(state, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
    )
    return NightlyResult(run, state, payload, markdown)
