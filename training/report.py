"""Write an evaluation run as JSON, a markdown table and plots a person can read."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt
import numpy as np
import orjson

from railtower.settings import Settings
from training.evaluate import DatasetResult, TaskResult, as_dict, metric_names

_PLOTTED = ("recall@", "ndcg@", "mrr@")


def write_report(
    folder: Path, results: list[DatasetResult], settings: Settings, header: dict[str, object]
) -> dict[str, Path]:
    """Write results.json, results.md and plots/ under `folder`; return their paths."""
    plots = folder / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    payload = {
        **header,
        "settings": settings.model_dump(mode="json"),
        "datasets": [as_dict(r) for r in results],
    }
    json_path = folder / "results.json"
    json_path.write_bytes(
        orjson.dumps(payload, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
    )
    for result in results:
        for rail in dict.fromkeys(t.rail for t in result.tasks):
            tasks = [t for t in result.tasks if t.rail == rail]
            plot_metrics(tasks, settings, plots / f"{result.dataset}_{rail}_metrics.png")
            plot_by_length(tasks, settings, plots / f"{result.dataset}_{rail}_by_length.png")
        if result.pipeline:
            plot_pipeline(result, settings, plots / f"{result.dataset}_pipeline.png")
    md_path = folder / "results.md"
    md_path.write_text(markdown(results, settings, header))
    return {"json": json_path, "markdown": md_path, "plots": plots}


def _cell(task: TaskResult, metric: str) -> str:
    iv = task.metrics[metric]
    if np.isnan(iv.mean):
        return "n/a"
    return f"{iv.mean:.4f} [{iv.low:.4f}, {iv.high:.4f}]"


def markdown_table(results: list[DatasetResult], settings: Settings) -> str:
    """One row per data set x rail x model, metric means with their bootstrap intervals."""
    names = metric_names(settings)
    slots = settings.evaluation.slots
    head = ["data set", "rail", "model", "cases", *names, f"coverage@{slots}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for result in results:
        for t in result.tasks:
            row = [
                t.dataset,
                t.rail,
                t.model,
                f"{t.cases:,}",
                *(_cell(t, m) for m in names),
                f"{t.coverage:.4f}",
            ]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def slice_table(
    results: list[DatasetResult], settings: Settings, which: Literal["cold", "warm"]
) -> str:
    """The cold slice (targets never seen in training) or its complement, the warm slice."""
    slots, depth = settings.evaluation.slots, settings.evaluation.candidates
    names = [f"recall@{slots}", f"recall@{depth}", f"ndcg@{slots}"]
    head = ["data set", "rail", "model", f"{which} cases", "share of cases", *names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for result in results:
        for t in result.tasks:
            values = t.cold if which == "cold" else t.warm
            count = t.cold_cases if which == "cold" else t.cases - t.cold_cases
            if not values or not count:
                continue
            cells = [
                f"{values[m].mean:.4f} [{values[m].low:.4f}, {values[m].high:.4f}]" for m in names
            ]
            row = [t.dataset, t.rail, t.model, f"{count:,}", f"{count / t.cases:.1%}", *cells]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def pipeline_section(result: DatasetResult, settings: Settings) -> list[str]:
    """The re-ranker fits (groups, early stopping, top features) and the MMR trade-off."""
    report = result.pipeline
    if not report:
        return []
    out = [
        f"### {result.dataset}: ranking pipeline",
        "",
        f"- windows: `{orjson.dumps(report['windows']).decode()}`; sources: "
        f"{', '.join(report['sources'])}; rule set: {report['rule_set']}; "
        f"MMR λ = {report['mmr_lambda']}",
        "",
        "| rail | ranker | requests | groups | best iteration | validation NDCG "
        "| top features (gain share) |",
        "|---|---|---|---|---|---|---|",
    ]
    for rail, fit in report["rankers"].items():
        importance = fit["importance"]
        total = sum(importance.values()) or 1.0
        top = ", ".join(f"{k} {v / total:.0%}" for k, v in list(importance.items())[:6])
        trained = "trained" if fit["trained"] else f"not trained: {fit['reason']}"
        out.append(
            f"| {rail} | {trained} | {fit['requests']:,} | {fit['groups']:,} | "
            f"{fit['best_iteration']} | {fit['validation_ndcg']:.4f} | {top} |"
        )
    orders = report.get("orders") or {}
    if orders:
        out += ["", "Order each rail serves, chosen on the ranker window's held-out sessions:", ""]
        out += ["| rail | served order | NDCG@slots of each order tried |", "|---|---|---|"]
        for rail, chosen in orders.items():
            tried = ", ".join(f"{k} {v:.4f}" for k, v in chosen["validation_ndcg"].items())
            out.append(f"| {rail} | {chosen['order']} | {tried} |")
    out += ["", "Recall of each source's whole candidate list and of the fused pool:", ""]
    out += ["| rail | source | mean size | recall |", "|---|---|---|---|"]
    for rail, sources in report.get("pool_recall", {}).items():
        for name, row in sources.items():
            out.append(
                f"| {rail} | {name} | {row['mean_size']:.0f} | {row['recall']:.4f} "
                f"[{row['low']:.4f}, {row['high']:.4f}] |"
            )
    slots = settings.evaluation.slots
    out += ["", f"MMR trade-off on the re-ranked lists (NDCG@{slots} and diversity@{slots}):", ""]
    out += ["| rail | λ | NDCG | diversity |", "|---|---|---|---|"]
    for rail, rows in report["mmr_sweep"].items():
        for row in rows:
            out.append(
                f"| {rail} | {row['lambda']} | {row['ndcg']:.4f} "
                f"[{row['ndcg_low']:.4f}, {row['ndcg_high']:.4f}] | {row['diversity']:.4f} |"
            )
    out.append("")
    return out


def markdown(results: list[DatasetResult], settings: Settings, header: dict[str, object]) -> str:
    level = int(settings.evaluation.ci_level * 100)
    out = [
        f"# Evaluation run {header.get('run')}",
        "",
        f"Split: `{header.get('split')}`; every model ranks the full catalogue; "
        f"[low, high] is the {level}% bootstrap interval over sessions "
        f"({settings.evaluation.bootstrap_samples} resamples). "
        f"Settings `{header.get('settings_fingerprint')}`.",
        "",
        markdown_table(results, settings),
        "",
        "### Cold-item slice (targets never seen in training)",
        "",
        slice_table(results, settings, "cold"),
        "",
        "### Warm slice (a target seen in training)",
        "",
        "Where the catalogue lists only items that got an event somewhere in the log, an item "
        "never seen in training is bound to appear later, and a model can learn that; "
        "the warm slice cannot be flattered by it.",
        "",
        slice_table(results, settings, "warm"),
        "",
    ]
    for result in results:
        out.append(f"## {result.dataset}")
        if result.split:
            out.append(f"- split: `{orjson.dumps(result.split).decode()}`")
        for report in result.validation:
            dropped = report["dropped"] or "none"
            out.append(
                f"- {report['file']}: {report['rows_in']:,} rows in, "
                f"{report['rows_out']:,} kept, dropped: {dropped}"
            )
            out.extend(f"  - {note}" for note in report["notes"])  # type: ignore[attr-defined]
        out.extend(f"- skipped: {s}" for s in result.skipped)
        out.extend(pipeline_section(result, settings))
        for rail in dict.fromkeys(t.rail for t in result.tasks):
            out.append(
                f"- plots: `plots/{result.dataset}_{rail}_metrics.png`, "
                f"`plots/{result.dataset}_{rail}_by_length.png`"
            )
        out.append("")
    return "\n".join(out)


def plot_metrics(tasks: list[TaskResult], settings: Settings, path: Path) -> None:
    """Bars per model for each ranking metric, with the bootstrap interval as error bars."""
    metrics = [m for m in metric_names(settings) if m.startswith(_PLOTTED)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.6))
    models = [t.model for t in tasks]
    colors = plt.cm.tab10(np.arange(len(models)))  # type: ignore[attr-defined]
    for ax, metric in zip(np.atleast_1d(axes), metrics, strict=True):
        means = np.array([t.metrics[metric].mean for t in tasks])
        low = means - np.array([t.metrics[metric].low for t in tasks])
        high = np.array([t.metrics[metric].high for t in tasks]) - means
        ax.bar(models, means, yerr=[low, high], capsize=4, color=colors)
        ax.set_title(metric)
        ax.tick_params(axis="x", rotation=35)
        ax.grid(axis="y", alpha=0.3)
    first = tasks[0]
    fig.suptitle(
        f"{first.dataset} / {first.rail}  ({first.cases:,} cases, "
        f"{int(settings.evaluation.ci_level * 100)}% CI)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_by_length(tasks: list[TaskResult], settings: Settings, path: Path) -> None:
    """NDCG by session length (prefix length, anchor position or cart size) per model."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for task in tasks:
        labels = list(task.by_length)
        ax.plot(labels, [task.by_length[b]["ndcg"] for b in labels], marker="o", label=task.model)
    first = tasks[0]
    counts = ", ".join(f"{b}: {v['cases']:,}" for b, v in first.by_length.items())
    ax.set_xlabel(f"session length bucket (cases: {counts})", fontsize=8)
    ax.set_ylabel(f"NDCG@{settings.evaluation.slots}")
    ax.set_title(f"{first.dataset} / {first.rail}: NDCG by session length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pipeline(result: DatasetResult, settings: Settings, path: Path) -> None:
    """Per rail: the ranker's feature importance, and NDCG vs diversity over MMR's λ."""
    report = result.pipeline
    rails = list(report["mmr_sweep"])
    fig, axes = plt.subplots(2, len(rails), figsize=(5.5 * len(rails), 7.5), squeeze=False)
    slots = settings.evaluation.slots
    for col, rail in enumerate(rails):
        ax = axes[0, col]
        importance = report["rankers"].get(rail, {}).get("importance", {})
        top = list(importance.items())[:12][::-1]
        total = sum(importance.values()) or 1.0
        ax.barh([k for k, _ in top], [v / total for _, v in top], color="tab:blue")
        ax.set_title(f"{rail}: ranker gain share" if top else f"{rail}: no ranker trained")
        ax.tick_params(axis="y", labelsize=7)
        ax = axes[1, col]
        rows = report["mmr_sweep"][rail]
        ax.plot([r["diversity"] for r in rows], [r["ndcg"] for r in rows], marker="o")
        for r in rows:
            ax.annotate(f"λ={r['lambda']}", (r["diversity"], r["ndcg"]), fontsize=7)
        ax.set_xlabel(f"intra-list diversity@{slots}")
        ax.set_ylabel(f"NDCG@{slots}")
        ax.set_title(f"{rail}: MMR trade-off (λ = {report['mmr_lambda']} in config)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{result.dataset}: ranking pipeline")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
