"""The shadow report's shape and how it is written: JSON, markdown and plots a person can read.

Built by `training.shadow_eval.summarise`; the conventions follow `training.report`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt
import numpy as np
import orjson

from railtower.settings import Settings
from training.evaluate import Interval


@dataclass
class ArmSummary:
    rail: str
    arm: str
    shown: bool
    model_versions: list[str]
    impressions: int
    sessions: int
    with_targets: int
    hit_rate: Interval
    ndcg: Interval
    coverage: Interval


@dataclass
class PairSummary:
    """A shadow arm against production on the requests both answered."""

    rail: str
    arm: str
    pairs: int
    unpaired: int
    slot_difference: Interval
    overlap: Interval
    hit_rate_diff: Interval
    ndcg_diff: Interval
    coverage_diff: Interval
    per_request_slot_difference: list[float] = field(repr=False, default_factory=list)


@dataclass
class ShadowReport:
    horizon_minutes: float
    slots: int
    catalogue_size: int
    catalogue_source: str
    impressions: int
    arms: list[ArmSummary]
    pairs: list[PairSummary]


def as_dict(report: ShadowReport) -> dict[str, object]:
    payload = asdict(report)
    for pair in payload["pairs"]:
        values = np.asarray(pair.pop("per_request_slot_difference"), dtype=float)
        counts, edges = np.histogram(values, bins=10, range=(0.0, 1.0))
        pair["slot_difference_histogram"] = {"edges": edges.tolist(), "counts": counts.tolist()}
    return payload


# ------------------------------------------------------------------------------ outputs

BIAS_NOTE = (
    "A shadow arm's list was never shown: its hits are counterfactual, counted against what "
    "the shopper did after seeing the production list. Shoppers click what they are shown, "
    "so this favours production (an item only the shadow arm would have shown had less "
    "chance to be touched); a shadow arm that is not worse here is likely not worse online, "
    "while a small deficit may be this bias. Only an A/B test (shown=True for both) removes it."
)


def _iv(value: Interval, signed: bool = False) -> str:
    if np.isnan(value.mean):
        return "n/a"
    fmt = "{:+.4f}" if signed else "{:.4f}"
    return f"{fmt.format(value.mean)} [{fmt.format(value.low)}, {fmt.format(value.high)}]"


def markdown(report: ShadowReport, title: str, settings: Settings) -> str:
    k, level = report.slots, int(settings.evaluation.ci_level * 100)
    out = [
        f"# Shadow evaluation {title}",
        "",
        f"{report.impressions:,} impressions joined with the events that followed in the same "
        f"session (after `served_at`, within {report.horizon_minutes:g} min; targets graded "
        "purchase 3 > cart 2 > view 1). Hit rate over every impression (nothing followed = "
        "miss); NDCG over impressions with a target; coverage of a catalogue of "
        f"{report.catalogue_size:,} items ({report.catalogue_source}). [low, high] = {level}% "
        f"bootstrap interval over sessions ({settings.evaluation.bootstrap_samples} resamples).",
        "",
        f"**Bias.** {BIAS_NOTE}",
        "",
        f"| rail | arm | shown | impressions | sessions | with a target | hit rate@{k} "
        f"| NDCG@{k} | coverage@{k} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    out += [
        f"| {a.rail} | {a.arm} | {'yes' if a.shown else 'no'} | {a.impressions:,} | "
        f"{a.sessions:,} | {a.with_targets:,} | {_iv(a.hit_rate)} | {_iv(a.ndcg)} | "
        f"{_iv(a.coverage)} |"
        for a in report.arms
    ]
    out += [
        "",
        "Shadow arms against the production impression of the same request (paired; "
        "difference = shadow - production):",
        "",
        "| rail | arm | pairs | slots differing | list overlap | hit rate diff | NDCG diff "
        "| coverage diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    out += [
        f"| {p.rail} | {p.arm} | {p.pairs:,} | {_iv(p.slot_difference)} | {_iv(p.overlap)} | "
        f"{_iv(p.hit_rate_diff, True)} | {_iv(p.ndcg_diff, True)} | "
        f"{_iv(p.coverage_diff, True)} |"
        for p in report.pairs
    ]
    unpaired = sum(p.unpaired for p in report.pairs)
    if unpaired:
        out += ["", f"{unpaired:,} shadow impressions had no production impression to pair."]
    out += ["", "Plots: `plots/<rail>_arms.png`, `plots/<rail>_slot_difference.png`.", ""]
    return "\n".join(out)


def plot_arms(arms: list[ArmSummary], path: Path, slots: int) -> None:
    """Per metric, one bar per arm with its bootstrap interval."""
    metrics = [
        ("hit_rate", f"hit rate@{slots}"),
        ("ndcg", f"NDCG@{slots}"),
        ("coverage", f"coverage@{slots}"),
    ]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.8))
    names = [a.arm for a in arms]
    colors = plt.cm.tab10(np.arange(len(arms)))  # type: ignore[attr-defined]
    for ax, (attr, label) in zip(axes, metrics, strict=True):
        values = [getattr(a, attr) for a in arms]
        means = np.array([v.mean for v in values])
        # a percentile interval need not contain the mean: bars never go negative
        low = np.clip(np.nan_to_num(means - np.array([v.low for v in values])), 0, None)
        high = np.clip(np.nan_to_num(np.array([v.high for v in values]) - means), 0, None)
        ax.bar(names, np.nan_to_num(means), yerr=[low, high], capsize=4, color=colors)
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=20, labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{arms[0].rail}: arms (shadow hits are counterfactual)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_slot_difference(pairs: list[PairSummary], path: Path, slots: int) -> None:
    """Histogram of the per-request share of slots a shadow arm changes."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for pair in pairs:
        ax.hist(
            pair.per_request_slot_difference,
            bins=np.linspace(0, 1, slots + 2).tolist(),
            alpha=0.6,
            label=f"{pair.arm} ({pair.pairs:,} requests)",
        )
    ax.set_xlabel(f"share of the {slots} slots differing from production")
    ax.set_ylabel("requests")
    ax.set_title(f"{pairs[0].rail}: slot difference per request")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_shadow_report(
    folder: Path, report: ShadowReport, settings: Settings, header: dict[str, object]
) -> dict[str, Path]:
    """Write shadow.json, shadow.md and plots/ under `folder`; return their paths."""
    plots = folder / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    json_path = folder / "shadow.json"
    json_path.write_bytes(
        orjson.dumps(
            {**header, **as_dict(report)},
            option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS,
        )
    )
    for rail in dict.fromkeys(a.rail for a in report.arms):
        plot_arms(
            [a for a in report.arms if a.rail == rail], plots / f"{rail}_arms.png", report.slots
        )
        pairs = [p for p in report.pairs if p.rail == rail]
        if pairs:
            plot_slot_difference(pairs, plots / f"{rail}_slot_difference.png", report.slots)
    md_path = folder / "shadow.md"
    md_path.write_text(markdown(report, str(header.get("run", "")), settings))
    return {"json": json_path, "markdown": md_path, "plots": plots}
