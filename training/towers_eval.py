"""Train the towers alone on one data set and score them on its test split; write JSON.

`python -m training.towers_eval -d rees46 --version v1 --out towers.json` is the entry point
for distributed training: settings come from the config and `RAILTOWER_…` variables, so the
same command runs one process (`training.strategy: auto`) or several
(`RAILTOWER_TRAINING__DEVICES=2 RAILTOWER_TRAINING__STRATEGY=ddp`). Strategy "ddp" re-runs
this command once per extra rank; those ranks leave after training (training.fit_towers), so
the bundle, the scoring and the JSON are written once, by rank 0.

Scoring is the harness's own (training.evaluate): the bundle's retriever ranks the full
catalogue for every test case of every rail, with session-bootstrap intervals.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

from railtower.datasets import load_dataset
from railtower.settings import Settings, load_dataset_spec, load_settings
from training.evaluate import TaskResult, evaluate_dataset
from training.tower_model import TowerRetriever


def evaluate_towers(settings: Settings, dataset_name: str, version: str) -> dict[str, object]:
    """Fit the towers on the test split's training events; their metrics and training report.

    Returns:
        {"dataset", "version", "training": the bundle manifest's training report (world
        size, strategy, batches included), "tasks": [{"rail", "cases", "sessions",
        "metrics": {name: {"mean", "low", "high"}}}]}.
    """
    spec = load_dataset_spec(dataset_name, settings)
    dataset = load_dataset(spec, settings)
    towers = {"two_tower": partial(TowerRetriever, settings, spec, dataset.items, version)}
    result = evaluate_dataset(dataset, settings, towers, "test")
    manifest = json.loads((settings.artifacts_dir / version / "manifest.json").read_text())
    return {
        "dataset": spec.name,
        "version": version,
        "training": manifest["metrics"]["training"],
        "tasks": [_task(t) for t in result.tasks],
    }


def _task(task: TaskResult) -> dict[str, object]:
    return {
        "rail": task.rail,
        "cases": task.cases,
        "sessions": task.sessions,
        "metrics": {
            name: {"mean": i.mean, "low": i.low, "high": i.high} for name, i in task.metrics.items()
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-d", "--dataset", default="rees46")
    # Explicit, never a timestamp: every DDP rank must compute the same bundle folder.
    parser.add_argument("--version", required=True, help="bundle name under artifacts_dir")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    summary = evaluate_towers(load_settings(), args.dataset, args.version)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
