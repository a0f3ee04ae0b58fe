"""`railtower evaluate --later-window`: the protocol a shop lives in.

Cut each data set at a point in time (REES46, UCI: the newest `later_window_share` of
sessions by end time; Amazon-M2, which has no clock: a seeded session hash with its own
salt). Everything before the cut is the shop's history, everything after it the future:

1. the history goes through the harness exactly as a nightly run would: baselines and the
   ranking pipeline fitted on its train (+ validation) and judged on its own test split,
   the judged fit kept (`<bundle>-heldout`) and refitted on the whole history (`<bundle>`:
   the bundle that would serve), the gate run on the judged record with no production;
2. both bundles, not retrained, and every baseline refitted on the whole history are scored
   on the whole sessions after the cut, against the point-in-time catalogue of the history,
   with session-bootstrap intervals; nothing is tuned on those sessions.

The report gives, per data set and rail, every baseline and every stage, warm and cold
slices, the share of targets no model could know, and the paired differences that decide
whether the product earns its place: served vs the best baseline, the re-ranker vs the
fused order it re-ranks, and the refit vs the judged fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt
import numpy as np
import orjson
import pandas as pd

from railtower.datasets import Dataset, load_dataset
from railtower.logs import get_logger
from railtower.manifest import new_version, now_iso
from railtower.settings import Settings, load_dataset_spec
from ranking.rails_bundle import load_evaluation
from training.bundle_eval import evaluate_bundle
from training.evaluate import DatasetResult, TaskResult, evaluate_dataset
from training.fit_pipeline import staged_evaluation
from training.harness import baseline_models
from training.metrics import bootstrap_ci
from training.promotion import GateDecision, gate
from training.report import write_report
from training.split import session_bucket
from training.tower_model import tower_factory

log = get_logger(__name__)

# The hash later window uses its own salt, so the harness's own hash split of the history
# (seeded with settings.seed) still has all three parts.
LATER_SALT = 104729
JUDGED = "judged fit: "


@dataclass
class LaterWindow:
    """A data set cut in two: the history (a Dataset) and how to rebuild the later part."""

    history: Dataset
    held_out: dict[str, Any]
    cut: str | None


@dataclass(frozen=True)
class Paired:
    """A paired NDCG@slots difference (a - b) on the same cases, session-bootstrapped."""

    a: str
    b: str
    a_ndcg: float
    b_ndcg: float
    difference: float
    low: float
    high: float

    def cell(self) -> str:
        return f"{self.difference:+.4f} [{self.low:+.4f}, {self.high:+.4f}]"


@dataclass
class RailOutcome:
    dataset: str
    rail: str
    cases: int
    unknown_share: float
    best_baseline: str
    comparisons: dict[str, Paired] = field(default_factory=dict)


@dataclass
class LaterWindowResult:
    result: DatasetResult
    rails: list[RailOutcome]
    gate: GateDecision
    bundle: Path
    judged: Path | None
    summary: dict[str, Any]


def split_later(dataset: Dataset, settings: Settings) -> LaterWindow:
    """The history before the later window, and the `held_out` record of the window."""
    events = dataset.events
    if events is None:
        raise ValueError(f"{dataset.name} has no events: there is no later window to score")
    share = dataset.spec.later_window_share
    common = {"evaluation": settings.evaluation.model_dump(mode="json")}
    if dataset.has_time:
        ends = events.groupby("session_id")["event_time"].max().sort_values(kind="stable")
        cut = ends.iloc[int(len(ends) * (1 - share))]
        before = events["session_id"].map(ends) < cut
        held_out: dict[str, Any] = {
            **common,
            "split": "later_window",
            "seed": settings.seed,
            "kind": "time",
            "sessions_end_from": str(cut),
            "sessions_end_before": None,
            "sessions_start_from": None,
            "sessions_end_by": None,
        }
        cut_text: str | None = str(cut)
    else:
        seed = settings.seed + LATER_SALT
        before = pd.Series(session_bucket(events["session_id"], seed) < 1 - share)
        held_out = {
            **common,
            "split": "test",
            "seed": seed,
            "kind": "session_hash",
            "split_settings": {"validation_share": share, "test_share": share},
        }
        cut_text = None
    history = events[before.to_numpy()].reset_index(drop=True)
    return LaterWindow(
        Dataset(dataset.spec, history, dataset.items, dataset.reports), held_out, cut_text
    )


def later_events(dataset: Dataset, settings: Settings) -> pd.DataFrame:
    """The later window's events: every session `split_later` keeps out of the history."""
    assert dataset.events is not None
    history = split_later(dataset, settings).history.events
    assert history is not None
    return dataset.events[~dataset.events["session_id"].isin(set(history["session_id"]))]


def evaluate_later_window(
    dataset: Dataset, settings: Settings, run: str, towers: bool
) -> LaterWindowResult:
    """Fit on the history, judge, refit, then score everything on the later window."""
    spec = dataset.spec
    window = split_later(dataset, settings)
    bundle = settings.artifacts_dir / f"{run}-{spec.name}-rails"
    towers_of = (
        tower_factory(settings, spec, dataset.items, f"{run}-{spec.name}") if towers else None
    )
    log.info("later window: fitting on the history", dataset=spec.name, cut=window.cut)
    models = baseline_models(settings, spec.session_kind == "basket")
    staged = staged_evaluation(window.history, settings, "test", towers_of, bundle)
    inner = evaluate_dataset(window.history, settings, models, "test", staged)
    decision = gate(load_evaluation(bundle), None, settings.promotion, settings.seed, bundle.name)
    log.info("later window: scoring", dataset=spec.name, gate=decision.promote)
    served = evaluate_bundle(
        bundle,
        dataset,
        settings,
        window.held_out,
        write=False,
        baseline_events=window.history.events,
    )
    tasks = list(served.result.tasks)
    judged_dir = bundle.with_name(f"{bundle.name}-heldout")
    if judged_dir.exists():
        no_baselines = settings.model_copy(
            update={"evaluation": settings.evaluation.model_copy(update={"baselines": []})}
        )
        judged = evaluate_bundle(
            judged_dir,
            dataset,
            no_baselines,
            window.held_out,
            write=False,
            baseline_events=window.history.events,
        )
        for task in judged.result.tasks:
            task.model = JUDGED + task.model
            tasks.append(task)
    result = served.result
    result.tasks = tasks
    result.pipeline = {**inner.pipeline, "inner_split": inner.split}
    result.split = {
        **result.split,
        "protocol": "later window",
        "cut": window.cut,
        "history_events": len(window.history.events),  # type: ignore[arg-type]
        "gate": {"promote": decision.promote, "reasons": decision.reasons},
    }
    outcomes = [
        _rail_outcome(result, rail, settings, [c.session_id for c in rail_cases])
        for rail, rail_cases in served.cases.items()
    ]
    return LaterWindowResult(
        result,
        outcomes,
        decision,
        bundle,
        judged_dir if judged_dir.exists() else None,
        result.split,
    )


def _rail_outcome(
    result: DatasetResult, rail: str, settings: Settings, sessions: list[str]
) -> RailOutcome:
    slots = settings.evaluation.slots
    rows = {t.model: t for t in result.tasks if t.rail == rail}
    baselines = [n for n in settings.evaluation.baselines if n in rows]
    best = max(baselines, key=lambda n: rows[n].metrics[f"ndcg@{slots}"].mean)
    served = settings.promotion.stage
    any_row = rows[best]
    outcome = RailOutcome(
        result.dataset,
        rail,
        any_row.cases,
        any_row.unknown_cases / max(any_row.cases, 1),
        best,
    )
    pairs = {
        "served vs best baseline": (served, best),
        "re-ranker vs fused order": ("+ranker", "fused_candidates"),
        "towers alone vs best baseline": ("two_tower", best),
        "refit vs judged fit": (served, JUDGED + served),
    }
    for label, (a, b) in pairs.items():
        if a in rows and b in rows:
            outcome.comparisons[label] = _paired(rows[a], rows[b], np.asarray(sessions), settings)
    return outcome


def _paired(a: TaskResult, b: TaskResult, sessions: np.ndarray, settings: Settings) -> Paired:
    mine = np.asarray(a.per_case_ndcg, dtype=float)
    theirs = np.asarray(b.per_case_ndcg, dtype=float)
    diff, low, high = bootstrap_ci(
        mine - theirs,
        sessions,
        settings.evaluation.bootstrap_samples,
        settings.evaluation.ci_level,
        settings.seed,
    )
    return Paired(a.model, b.model, float(mine.mean()), float(theirs.mean()), diff, low, high)


def run_later_window(
    settings: Settings,
    datasets: list[str] | None = None,
    run_name: str | None = None,
    towers: bool = False,
) -> tuple[Path, list[LaterWindowResult]]:
    """The later-window protocol on each data set with events and rails; writes
    reports/<run>/ (results.json/md and plots as the harness, plus later_window.md/json and
    a plot of the paired differences)."""
    run = run_name or new_version("later")
    folder = settings.reports_dir / run
    folder.mkdir(parents=True, exist_ok=True)
    outcomes: list[LaterWindowResult] = []
    for name in datasets or settings.datasets:
        spec = load_dataset_spec(name, settings)
        if not spec.rails or spec.events is None:
            log.info("later window: no rail to score", dataset=name)
            continue
        outcomes.append(evaluate_later_window(load_dataset(spec, settings), settings, run, towers))
    header: dict[str, object] = {
        "run": run,
        "split": "later window (fit on the history, scored after the cut, never tuned there)",
        "created_at": now_iso(),
        "settings_fingerprint": settings.fingerprint(),
    }
    write_report(folder, [o.result for o in outcomes], settings, header)
    (folder / "later_window.md").write_text(later_window_markdown(outcomes, settings, header))
    (folder / "later_window.json").write_bytes(
        orjson.dumps(
            {
                **header,
                "rails": [
                    {
                        "dataset": r.dataset,
                        "rail": r.rail,
                        "cases": r.cases,
                        "unknown_share": r.unknown_share,
                        "best_baseline": r.best_baseline,
                        "comparisons": {k: vars(v) for k, v in r.comparisons.items()},
                    }
                    for o in outcomes
                    for r in o.rails
                ],
                "gates": {o.result.dataset: o.summary["gate"] for o in outcomes},
            },
            option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY,
        )
    )
    plot_paired(
        [r for o in outcomes for r in o.rails], folder / "plots" / "later_window_paired.png"
    )
    latest = settings.reports_dir / "latest-later-window"
    latest.unlink(missing_ok=True)
    latest.symlink_to(folder.name)
    log.info("later-window report written", folder=str(folder))
    return folder, outcomes


def later_window_markdown(
    outcomes: list[LaterWindowResult], settings: Settings, header: dict[str, object]
) -> str:
    """Per data set and rail: every row with its interval and slices, then the paired
    differences and the gate's verdict."""
    slots = settings.evaluation.slots
    ndcg, recall = f"ndcg@{slots}", f"recall@{settings.evaluation.candidates}"
    lines = [f"# Later-window evaluation: {header['run']}", "", str(header["split"]), ""]
    for o in outcomes:
        s = o.summary
        lines += [
            f"## {o.result.dataset}",
            "",
            f"- cut: {s.get('cut') or 'seeded session hash'}; history {s['history_events']:,} "
            f"events; later window {s['held_out']['sessions']:,} sessions",
            f"- gate on the judged fit (no production): "
            f"{'PROMOTE' if o.gate.promote else 'REFUSE'}: {'; '.join(o.gate.reasons)}",
            "",
        ]
        for r in o.rails:
            rows = [t for t in o.result.tasks if t.rail == r.rail]
            lines += [
                f"### {r.rail}: {r.cases:,} cases, {r.unknown_share:.1%} with no target in "
                f"the point-in-time catalogue (a miss for every model)",
                "",
                f"| model | {ndcg} | {recall} | coverage@{slots} | warm {ndcg} | cold {ndcg} |",
                "|---|---|---|---|---|---|",
            ]
            for t in rows:
                lines.append(
                    f"| {t.model} | {_iv(t.metrics.get(ndcg))} | {_iv(t.metrics.get(recall))} "
                    f"| {t.coverage:.4f} | {_iv(t.warm.get(ndcg))} | {_iv(t.cold.get(ndcg))} |"
                )
            lines += [
                "",
                "| paired difference (NDCG@slots) | a | b | a − b [CI] |",
                "|---|---|---|---|",
            ]
            for label, p in r.comparisons.items():
                lines.append(
                    f"| {label} | {p.a} {p.a_ndcg:.4f} | {p.b} {p.b_ndcg:.4f} | {p.cell()} |"
                )
            lines.append("")
    return "\n".join(lines) + "\n"


def _iv(interval: Any) -> str:
    if interval is None or np.isnan(interval.mean):
        return "—"
    return f"{interval.mean:.4f} [{interval.low:.4f}, {interval.high:.4f}]"


def plot_paired(rails: list[RailOutcome], path: Path) -> None:
    """Each rail's paired differences with their intervals; zero is the bar."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(9, 0.5 + 0.45 * max(1, sum(len(r.comparisons) for r in rails))))
    labels, means, lows, highs = [], [], [], []
    for r in rails:
        for label, p in r.comparisons.items():
            labels.append(f"{r.dataset}/{r.rail}: {label}")
            means.append(p.difference)
            lows.append(p.difference - p.low)
            highs.append(p.high - p.difference)
    if not labels:
        ax.text(0.5, 0.5, "no rail had both rows to compare", ha="center", va="center")
        ax.set_axis_off()
    else:
        y = np.arange(len(labels))
        colors = [
            "tab:green" if m - lo > 0 else "tab:red" if m + hi < 0 else "tab:gray"
            for m, lo, hi in zip(means, lows, highs, strict=True)
        ]
        for yi, m, lo, hi, color in zip(y, means, lows, highs, colors, strict=True):
            ax.errorbar([m], [yi], xerr=[[lo], [hi]], fmt="o", color=color, capsize=3)
        ax.axvline(0.0, color="black", lw=0.8)
        ax.set_yticks(y, labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("paired NDCG@slots difference a − b (95% session bootstrap)")
        ax.grid(axis="x", alpha=0.3)
    ax.set_title("Later window: paired differences (green: a wins, red: b wins)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
