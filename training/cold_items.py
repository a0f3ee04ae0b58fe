"""New items on a later window: the served bundle scored with and without listing them.

Usage:
    python -m training.cold_items --bundle artifacts/<run>-<data set>-rails -d <data set>

`--bundle` is a later-window bundle (`railtower evaluate --later-window [--towers]`): fitted
on the history before the cut. The items the history never showed (first seen after the
cut) are listed in it the way the catalogue topic's `item_upsert` lists them in serving
(`training.bundle_eval.list_items`: attributes, category, and the item tower's content
vector in the delta index, no id embedding), then the later window's cases are scored
three times: without the listing, with it in the re-ranker's order, and with new items at
their towers' rank (`ranking.new_item_placement`, the served default). Per rail and model:
Recall@120 and NDCG@12 on the warm slice (a target the history saw) and the cold slice
(every target new), beside category-popularity, the content baseline (fitted on the
history: it cannot list items it never saw, exactly as the served bundle without the
listing).

Read with care: the data sets carry no listing feed, only items that got events, so every
listed item is one a shopper viewed in the later window. A shop lists many items nobody
views; here the towers search a delta index made only of wanted items. The cold figures
are an upper bound on what listing buys. The placement's effect is paired on the same
cases (all, the cold slice, the warm slice), session-bootstrapped. Writes
`reports/<run>/cold_items.json` and `.md`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from railtower.datasets import load_dataset
from railtower.logs import configure_logging, get_logger
from railtower.manifest import new_version
from railtower.settings import Settings, load_settings
from training.bundle_eval import evaluate_bundle
from training.evaluate import TaskResult
from training.later_window import split_later
from training.metrics import bootstrap_ci
from training.tasks import EvalCase

log = get_logger(__name__)

# The rows shown: the content baseline, the id baselines, the towers alone, the served rail.
SERVED = "+ranker+mmr+rules"
MODELS = ("category_popularity", "covisitation", "session_knn", "two_tower", SERVED)
# The arms: (listing, new-item placement; None = the configured one). The listed items
# scored in the re-ranker's order and at the towers' rank (ranking.new_item_placement),
# paired on the same cases.
PLACED, UNPLACED = "listed", "listed, re-ranker order"
ARMS: tuple[tuple[str, str | None], ...] = (
    ("not listed", None),
    (UNPLACED, "ranker"),
    (PLACED, "tower_rank"),
)


def cold_items(bundle: Path, dataset_name: str, settings: Settings) -> dict[str, Any]:
    """Score `bundle` on its later window without and with the new items listed."""
    dataset = load_dataset(dataset_name, settings)
    window = split_later(dataset, settings)
    history_items = set(window.history.events["item_id"].astype(str))  # type: ignore[index]
    new = dataset.items[~dataset.items["item_id"].astype(str).isin(history_items)]
    rows: list[dict[str, Any]] = []
    listed_count = 0
    served: dict[str, dict[str, TaskResult]] = {}
    cases: dict[str, list[EvalCase]] = {}
    for listing, placement in ARMS:
        evaluation = evaluate_bundle(
            bundle,
            dataset,
            _with_placement(settings, placement),
            window.held_out,
            write=False,
            baseline_events=window.history.events,
            listed=new if listing != "not listed" else None,
        )
        listed_count = max(listed_count, int(evaluation.result.split.get("listed_items", 0)))
        for task in evaluation.result.tasks:
            if task.model == SERVED:
                served.setdefault(task.rail, {})[listing] = task
            if task.model == "two_tower" and listing != PLACED:
                continue  # the towers alone do not depend on placement, nor exist unlisted
            if task.model in MODELS:
                rows.append(_row(task, listing, settings))
        cases = evaluation.cases
    paired = [
        _placement_effect(rail, arms, cases[rail], history_items, settings)
        for rail, arms in served.items()
        if {PLACED, UNPLACED} <= set(arms) and cases.get(rail)
    ]
    return {
        "dataset": dataset_name,
        "bundle": bundle.name,
        "cut": window.cut,
        "new_items": len(new),
        "listed": listed_count,
        "placement": settings.ranking.new_items.model_dump(),
        "rows": rows,
        "paired": paired,
    }


def _with_placement(settings: Settings, placement: str | None) -> Settings:
    if placement is None:
        return settings
    ranking = settings.ranking
    new_items = ranking.new_items.model_copy(update={"placement": placement})
    return settings.model_copy(
        update={"ranking": ranking.model_copy(update={"new_items": new_items})}
    )


def _placement_effect(
    rail: str,
    arms: dict[str, TaskResult],
    cases: list[EvalCase],
    history_items: set[str],
    settings: Settings,
) -> dict[str, Any]:
    """The served rail with new items at their towers' rank minus the same rail in the
    re-ranker's order, NDCG@slots paired on the same cases: all, the cold slice (every
    target new) and the warm slice, session-bootstrapped."""
    placed = np.asarray(arms[PLACED].per_case_ndcg, dtype=float)
    unplaced = np.asarray(arms[UNPLACED].per_case_ndcg, dtype=float)
    if len(placed) != len(cases) or len(unplaced) != len(cases):
        raise ValueError(f"{rail}: the arms scored different cases; cannot pair them")
    sessions = np.asarray([c.session_id for c in cases])
    cold = np.asarray([not (set(c.targets) & history_items) for c in cases])
    e = settings.evaluation
    out: dict[str, Any] = {"rail": rail}
    for part, mask in (("all", np.ones(len(cases), bool)), ("cold", cold), ("warm", ~cold)):
        if not mask.any():
            continue
        diff, low, high = bootstrap_ci(
            placed[mask] - unplaced[mask],
            sessions[mask],
            e.bootstrap_samples,
            e.ci_level,
            settings.seed,
        )
        out[part] = {
            "cases": int(mask.sum()),
            "tower_rank": round(float(placed[mask].mean()), 4),
            "reranker_order": round(float(unplaced[mask].mean()), 4),
            "difference": [round(diff, 4), round(low, 4), round(high, 4)],
        }
    return out


def _row(task: TaskResult, listing: str, settings: Settings) -> dict[str, Any]:
    slots = settings.evaluation.slots
    recall, ndcg = f"recall@{settings.evaluation.candidates}", f"ndcg@{slots}"

    def mean(part: dict[str, Any], key: str) -> float | None:
        interval = part.get(key)
        return None if interval is None else round(float(interval.mean), 4)

    return {
        "rail": task.rail,
        "model": task.model,
        "listing": listing,
        "cases": task.cases,
        "cold_cases": task.cold_cases,
        "warm_recall": mean(task.warm, recall),
        "cold_recall": mean(task.cold, recall),
        "warm_ndcg": mean(task.warm, ndcg),
        "cold_ndcg": mean(task.cold, ndcg),
    }


def markdown(result: dict[str, Any], settings: Settings) -> str:
    k, slots = settings.evaluation.candidates, settings.evaluation.slots
    lines = [
        f"# New items on the later window: {result['dataset']} ({result['bundle']})",
        "",
        f"Cut {result['cut']}; {result['new_items']:,} items first seen after it, "
        f"{result['listed']:,} listed (content only). Upper bound: every listed item was "
        "viewed in the later window (the data has no listing feed).",
        "",
        f"| rail | model | new items | cases (cold) | warm Recall@{k} | cold Recall@{k} "
        f"| cold / warm | warm NDCG@{slots} | cold NDCG@{slots} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        share = (
            f"{r['cold_recall'] / r['warm_recall']:.0%}"
            if r["cold_recall"] is not None and r["warm_recall"]
            else "n/a"
        )
        lines.append(
            f"| {r['rail']} | {r['model']} | {r['listing']} | {r['cases']:,} ({r['cold_cases']:,}) "
            f"| {_f(r['warm_recall'])} | {_f(r['cold_recall'])} | {share} "
            f"| {_f(r['warm_ndcg'])} | {_f(r['cold_ndcg'])} |"
        )
    if result.get("paired"):
        lines += [
            "",
            f"New items at the towers' rank minus the re-ranker's order (`ranking.new_items`: "
            f"{result['placement']}), served NDCG@{slots} paired on the same cases, "
            "session-bootstrapped:",
            "",
            "| rail | slice | cases | towers' rank | re-ranker order | difference [CI] |",
            "|---|---|---|---|---|---|",
        ]
        for effect in result["paired"]:
            for part in ("all", "cold", "warm"):
                if part in effect:
                    p = effect[part]
                    diff, low, high = p["difference"]
                    lines.append(
                        f"| {effect['rail']} | {part} | {p['cases']:,} | {p['tower_rank']:.4f} "
                        f"| {p['reranker_order']:.4f} | {diff:+.4f} [{low:+.4f}, {high:+.4f}] |"
                    )
    return "\n".join(lines) + "\n"


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="a later-window rails bundle")
    parser.add_argument("-d", "--dataset", required=True)
    parser.add_argument("--run-name", default=None, help="folder under reports/")
    args = parser.parse_args()
    settings = load_settings()
    configure_logging(settings.log_level)
    result = cold_items(args.bundle.resolve(), args.dataset, settings)
    folder = settings.reports_dir / (args.run_name or new_version("cold-items"))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cold_items.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    text = markdown(result, settings)
    (folder / "cold_items.md").write_text(text)
    sys.stdout.write(text)
    log.info("cold items scored", folder=str(folder))


if __name__ == "__main__":
    main()
