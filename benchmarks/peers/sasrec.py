"""RecBole's SASRec beside the towers and the baselines: the same cases, the project's metrics.

A published sequential model is the bar a reader expects the towers to be held to, and only
a comparison on identical cases says anything. So SASRec is one more retriever in the
harness (training.evaluate.evaluate_dataset): fitted on the "test" split's training events
(train + validation), it ranks the full point-in-time catalogue for every test case of every
rail, and is scored by the same code, with session-bootstrap intervals, as every other row.

RecBole 1.2.1 needs numpy<2 and pins of its own, so it lives in its own venv (`.venv-peers`,
made by `bash benchmarks/peers/install.sh`) and is driven through files by
benchmarks/peers/recbole_sasrec.py. Writes `<out>/<data set>.json` and `<out>/<data set>.md`.

Usage:
    python benchmarks/peers/sasrec.py -d amazon_m2 [--no-towers] [--epochs N] [--out DIR]

`--epochs` caps SASRec's epochs (RecBole early-stops on its own validation; default: the
towers' `training.max_epochs`, so both get the same cap). The towers train as configured
(`RAILTOWER_TRAINING__…` variables apply), exactly as `python -m training.towers_eval`.

One module on purpose: one comparison whose steps (the shared split, the peer's fit
through files, scoring every row on the same cases, the table) must agree on the same
cases; the RecBole side lives apart in benchmarks/peers/recbole_sasrec.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd

from railtower.datasets import Dataset, load_dataset
from railtower.logs import configure_logging, get_logger
from railtower.manifest import new_version, now_iso
from railtower.settings import Settings, load_dataset_spec, load_settings
from ranking.retriever import Catalogue, Query, Retriever
from training.evaluate import (
    DatasetResult,
    Interval,
    TaskResult,
    _cases,
    evaluate_dataset,
    metric_names,
    per_case_metrics,
)
from training.harness import baseline_models
from training.later_window import Paired, _paired
from training.split import split_events
from training.tasks import EvalCase
from training.tower_model import TowerRetriever

log = get_logger(__name__)

ROOT = Path(__file__).resolve().parents[2]
PEER_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
PEER_SCRIPT = Path(__file__).with_name("recbole_sasrec.py")
SASREC = "sasrec_recbole"
TOWERS = "two_tower"


# --- the files between the project and the peer venv ---------------------------------------


def write_sessions(events: pd.DataFrame, path: Path, first_touch: bool = False) -> int:
    """One {"session", "items"} JSON line per session, items in the order the shopper saw them.

    SASRec learns from order alone, so the order is the session's own (`position`, else the
    clock), never the row order of the frame; sessions are sorted so the file repeats exactly.
    With `first_touch`, each item is kept at its first event only: every prefix -> next item
    example is then a "next *new* item" example, the homepage_hero task (and the towers'
    training target, training.examples); raw sessions teach, and RecBole's validation
    rewards, re-predicting the item just viewed, which the rails exclude.
    Returns the number of sessions written.
    """
    order = ["session_id", "position" if "position" in events.columns else "event_time"]
    ordered = events.sort_values(order, kind="stable")
    sessions = ordered["session_id"].astype(str).to_numpy()
    items = ordered["item_id"].astype(str).to_numpy()
    bounds = np.flatnonzero(np.r_[True, sessions[1:] != sessions[:-1], True])
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            seen = items[start:end].tolist()
            if first_touch:
                seen = list(dict.fromkeys(seen))
            record = {"session": sessions[start], "items": seen}
            out.write(orjson.dumps(record) + b"\n")
    return len(bounds) - 1


def query_history(query: Query) -> list[str]:
    """The sequence SASRec reads for a query: the session so far, then what the rail is about.

    As the baselines' seed_weights reads a query: cart items not already in the session are
    appended, and the anchor (the product on the page) goes last, the newest position, where
    SASRec attends most.
    """
    history = list(query.session_items)
    history += [item for item in query.cart if item not in history]
    if query.anchor is not None and (not history or history[-1] != query.anchor):
        history.append(query.anchor)
    return history


def write_queries(queries: Sequence[Query], path: Path) -> None:
    """One {"items", "exclude"} JSON line per query, in query order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        for query in queries:
            record = {"items": query_history(query), "exclude": sorted(query.exclude)}
            out.write(orjson.dumps(record) + b"\n")


def read_rankings(path: Path, catalogue: Catalogue, k: int) -> list[list[str]]:
    """Each line's ranked ids that the catalogue lists, de-duplicated, at most k.

    The model knows every item of its training sessions; the harness ranks the point-in-time
    catalogue, so an id outside it must never be shown (nor count as a hit).
    """
    rankings: list[list[str]] = []
    for line in path.read_bytes().splitlines():
        if not line.strip():
            continue
        kept: list[str] = []
        for item in orjson.loads(line)["items"]:
            item = str(item)
            if item in catalogue.index and item not in kept:
                kept.append(item)
                if len(kept) == k:
                    break
        rankings.append(kept)
    return rankings


# --- the retrievers ------------------------------------------------------------------------


class PeerEnvironmentMissing(RuntimeError):
    """The peer venv is not installed: the one failure whose fix is a command to run."""


class RecBoleSasRec:
    """SASRec trained and queried in the peer venv, through files in `workdir`."""

    name = SASREC

    def __init__(
        self, workdir: Path, train_args: Sequence[str] = (), first_touch: bool = False
    ) -> None:
        """Args:
        train_args: extra flags for `recbole_sasrec.py train` (--epochs, --hidden, ...).
        first_touch: train on each session's first touches only (see write_sessions).
        """
        self.workdir = workdir
        self.train_args = list(train_args)
        self.first_touch = first_touch
        self.catalogue: Catalogue | None = None
        self.report: dict[str, Any] = {}

    def fit(self, events: pd.DataFrame, catalogue: Catalogue) -> RecBoleSasRec:
        if not PEER_PYTHON.exists():
            raise PeerEnvironmentMissing(
                f"{PEER_PYTHON} is missing: run `bash benchmarks/peers/install.sh` first "
                "(RecBole 1.2.1 lives in its own venv because it needs numpy<2)"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        sessions = write_sessions(events, self.workdir / "sessions.jsonl", self.first_touch)
        # The point-in-time catalogue: what rank may return (see read_rankings).
        (self.workdir / "allowed.txt").write_text("\n".join(map(str, catalogue.ids)) + "\n")
        log.info("sasrec: training in the peer venv", sessions=sessions, workdir=str(self.workdir))
        _peer(
            [
                "train",
                "--sessions",
                str(self.workdir / "sessions.jsonl"),
                "--workdir",
                str(self.workdir),
                *self.train_args,
            ],
            self.workdir / "train.log",
        )
        self.report = json.loads((self.workdir / "train.json").read_text())
        self.catalogue = catalogue
        log.info(
            "sasrec: trained",
            **{k: v for k, v in self.report.items() if not isinstance(v, dict | list)},
        )
        return self

    def recommend(self, queries: Sequence[Query], k: int) -> list[list[str]]:
        if self.catalogue is None:
            raise RuntimeError("RecBoleSasRec used before fit")
        write_queries(queries, self.workdir / "queries.jsonl")
        _peer(
            [
                "rank",
                "--workdir",
                str(self.workdir),
                "--queries",
                str(self.workdir / "queries.jsonl"),
                "--k",
                str(k),
                "--allowed",
                str(self.workdir / "allowed.txt"),
                "--out",
                str(self.workdir / "rankings.jsonl"),
            ],
            self.workdir / "rank.log",
        )
        ranked = read_rankings(self.workdir / "rankings.jsonl", self.catalogue, k)
        if len(ranked) != len(queries):
            raise RuntimeError(f"sasrec ranked {len(ranked)} of {len(queries)} queries")
        return ranked


def _peer(args: list[str], log_file: Path) -> None:
    """Run recbole_sasrec.py in the peer venv; its output goes to `log_file`."""
    # The peer venv finds the main venv's torch through its own .pth file; a PYTHONPATH
    # inherited from this process would put the main venv's numpy ahead of its numpy<2.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    with log_file.open("w") as out:
        done = subprocess.run(
            [str(PEER_PYTHON), str(PEER_SCRIPT), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    if done.returncode != 0:
        tail = "\n".join(log_file.read_text().splitlines()[-30:])
        raise RuntimeError(
            f"recbole_sasrec.py {args[0]} failed ({done.returncode}); {log_file}:\n{tail}"
        )


@dataclass
class Recorded:
    """A retriever as the harness calls it, keeping what the report needs beyond TaskResult:
    its fit time, the catalogue it was fitted on, and each batch of ranked lists (the
    paired Recall@candidates differences need them per case)."""

    inner: Retriever
    name: str = field(init=False)
    fit_seconds: float = 0.0
    catalogue: Catalogue | None = None
    calls: list[tuple[list[Query], list[list[str]]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.name = self.inner.name

    def fit(self, events: pd.DataFrame, catalogue: Catalogue) -> Recorded:
        started = time.perf_counter()
        self.inner.fit(events, catalogue)
        self.fit_seconds = time.perf_counter() - started
        self.catalogue = catalogue
        return self

    def recommend(self, queries: Sequence[Query], k: int) -> list[list[str]]:
        ranked = self.inner.recommend(queries, k)
        self.calls.append((list(queries), ranked))
        return ranked

    def ranked_for(self, queries: list[Query]) -> list[list[str]]:
        for asked, ranked in self.calls:
            if asked == queries:
                return ranked
        raise KeyError("no recommend call with these queries")


# --- the comparison ------------------------------------------------------------------------


def run_comparison(
    settings: Settings,
    dataset_name: str,
    towers: bool,
    epochs: int,
    workdir: Path,
    train_args: Sequence[str] = (),
    first_touch: bool = False,
) -> dict[str, Any]:
    """Fit every model on the test split's training events, score all on the same cases."""
    spec = load_dataset_spec(dataset_name, settings)
    dataset = load_dataset(spec, settings)
    if dataset.events is None or not spec.rails:
        raise ValueError(f"{dataset_name} has no events or no rails: nothing to compare on")
    recorded: dict[str, Recorded] = {}

    def keep(name: str, make: Callable[[], Retriever]) -> Callable[[], Retriever]:
        def build() -> Retriever:
            recorded[name] = Recorded(make())
            return recorded[name]

        return build

    models: dict[str, Callable[[], Retriever]] = dict(
        baseline_models(settings, spec.session_kind == "basket")
    )
    sasrec_args = ["--epochs", str(epochs), "--seed", str(settings.seed), *train_args]
    models[SASREC] = partial(RecBoleSasRec, workdir, sasrec_args, first_touch)
    version = ""
    if towers:
        version = new_version(f"peers-{spec.name}")
        models[TOWERS] = partial(TowerRetriever, settings, spec, dataset.items, version)
    models = {name: keep(name, make) for name, make in models.items()}
    result = evaluate_dataset(dataset, settings, models, "test")

    towers_report: dict[str, Any] = {}
    if towers:
        manifest = json.loads((settings.artifacts_dir / version / "manifest.json").read_text())
        towers_report = {"version": version, **manifest["metrics"]["training"]}
    sasrec = recorded[SASREC].inner
    sasrec_report = sasrec.report if isinstance(sasrec, RecBoleSasRec) else {}
    sasrec_report["training_sessions"] = (
        "with each item at its first touch" if first_touch else "as logged"
    )
    ran_on = dict.fromkeys(recorded, "cpu")
    ran_on[SASREC] = "gpu" if sasrec_report.get("device") == "cuda" else "cpu"
    if towers:
        ran_on[TOWERS] = "gpu" if "CUDA" in str(towers_report.get("accelerator")) else "cpu"
    paired = paired_differences(result, dataset, settings, recorded)
    return {
        "dataset": spec.name,
        "created_at": now_iso(),
        "protocol": "split 'test': fitted on train + validation, scored on test, same cases",
        "split": result.split,
        "evaluation": settings.evaluation.model_dump(mode="json"),
        "skipped": result.skipped,
        "sasrec": sasrec_report,
        "towers": towers_report,
        "tasks": [_task(t, recorded[t.model].fit_seconds, ran_on[t.model]) for t in result.tasks],
        "paired": paired,
    }


def paired_differences(
    result: DatasetResult,
    dataset: Dataset,
    settings: Settings,
    recorded: Mapping[str, Recorded],
) -> list[dict[str, Any]]:
    """Per rail: two_tower - sasrec_recbole, two_tower - best baseline and sasrec_recbole -
    best baseline, on NDCG@slots and Recall@candidates, session-bootstrapped and paired.

    The harness's own pairing (training.later_window._paired) works on TaskResult's per-case
    NDCG; Recall@candidates per case is rebuilt from the recorded rankings with the
    harness's per_case_metrics on the harness's own cases (rebuilt the same seeded way, and
    checked against the harness's per-case NDCG), then fed through the same function.
    """
    e = settings.evaluation
    ndcg, recall = f"ndcg@{e.slots}", f"recall@{e.candidates}"
    assert dataset.events is not None
    split = split_events(dataset.events, dataset.has_time, settings.split, settings.seed)
    out: list[dict[str, Any]] = []
    for rail in dataset.spec.rails:
        rows = {t.model: t for t in result.tasks if t.rail == rail}
        baselines = [n for n in e.baselines if n in rows]
        if not baselines:
            continue
        cases = _cases(rail, split, dataset, settings, "test")
        sessions = np.asarray([c.session_id for c in cases])
        best = max(baselines, key=lambda n: rows[n].metrics[ndcg].mean)
        recalls: dict[str, list[float]] = {}
        for a, b in ((TOWERS, SASREC), (TOWERS, best), (SASREC, best)):
            if a not in rows or b not in rows:
                continue
            for name in (a, b):
                if name not in recalls:
                    recalls[name] = per_case_recall(recorded[name], rows[name], cases, settings)
            pairs = {
                ndcg: _paired(rows[a], rows[b], sessions, settings),
                recall: _paired(
                    replace(rows[a], per_case_ndcg=recalls[a]),
                    replace(rows[b], per_case_ndcg=recalls[b]),
                    sessions,
                    settings,
                ),
            }
            out += [_pair(rail, metric, p, b == best) for metric, p in pairs.items()]
    return out


def per_case_recall(
    model: Recorded, task: TaskResult, cases: list[EvalCase], settings: Settings
) -> list[float]:
    """Recall@candidates per case, from the lists `model` ranked for these cases."""
    e = settings.evaluation
    ranked = model.ranked_for([c.query for c in cases])
    # as score_ranked does before scoring: excluded items out, then the cap
    ranked = [
        [i for i in r if i not in c.query.exclude][: e.candidates]
        for r, c in zip(ranked, cases, strict=True)
    ]
    if model.catalogue is None:
        raise RuntimeError(f"{task.model} ranked before it was fitted")
    values = per_case_metrics(ranked, cases, model.catalogue, settings)
    if not np.allclose(values[f"ndcg@{e.slots}"], task.per_case_ndcg, equal_nan=True):
        raise RuntimeError(f"{task.rail}/{task.model}: rebuilt cases differ from the harness's")
    return values[f"recall@{e.candidates}"]


def _pair(rail: str, metric: str, p: Paired, best_baseline: bool) -> dict[str, Any]:
    return {
        "rail": rail,
        "metric": metric,
        "a": p.a,
        "b": p.b,
        "b_is_best_baseline": best_baseline,
        "a_mean": p.a_ndcg,
        "b_mean": p.b_ndcg,
        "difference": p.difference,
        "low": p.low,
        "high": p.high,
    }


def _task(task: TaskResult, fit_seconds: float, ran_on: str) -> dict[str, Any]:
    def iv(i: Interval) -> dict[str, float]:
        return {"mean": i.mean, "low": i.low, "high": i.high}

    return {
        "rail": task.rail,
        "model": task.model,
        "cases": task.cases,
        "sessions": task.sessions,
        "metrics": {name: iv(i) for name, i in task.metrics.items()},
        "warm": {name: iv(i) for name, i in task.warm.items()},
        "cold_cases": task.cold_cases,
        "unknown_cases": task.unknown_cases,
        "coverage": task.coverage,
        "fit_seconds": round(fit_seconds, 2),
        "seconds": round(task.seconds, 2),
        "ran_on": ran_on,
    }


def markdown(summary: dict[str, Any], settings: Settings) -> str:
    """Per rail (homepage_hero first): one row per model, then the paired differences."""
    names = metric_names(settings)
    e = settings.evaluation
    columns = [f"ndcg@{e.slots}", f"recall@{e.slots}", f"recall@{e.candidates}"]
    assert all(c in names for c in columns)
    rails = sorted({t["rail"] for t in summary["tasks"]}, key=lambda r: (r != "homepage_hero", r))
    sasrec = summary["sasrec"]
    lines = [
        f"# {summary['dataset']}: RecBole SASRec beside the towers and the baselines",
        "",
        f"{summary['protocol']}; every model ranks the full point-in-time catalogue "
        f"({summary['split'].get('catalogue', {}).get('known_at_cut', '?')} items); "
        f"means with {e.ci_level:.0%} session-bootstrap intervals.",
        "",
    ]
    if sasrec:
        lines += [
            f"SASRec (RecBole {sasrec.get('recbole')}, {sasrec.get('device')}): "
            f"{sasrec.get('epochs')} of at most {sasrec.get('epochs_max')} epochs, best epoch "
            f"{sasrec.get('best_epoch')} by {sasrec.get('valid_metric')} "
            f"{sasrec.get('best_valid_score', float('nan')):.4f} on RecBole's own leave-one-out "
            f"validation; {sasrec.get('training_examples')} training prefixes from "
            f"sessions {sasrec.get('training_sessions', 'as logged')}.",
            "",
        ]
    for rail in rails:
        rows = [t for t in summary["tasks"] if t["rail"] == rail]
        lines += [
            f"## {rail}: {rows[0]['cases']:,} cases, {rows[0]['sessions']:,} sessions",
            "",
            "| model | " + " | ".join(columns) + " | fit s | ran on |",
            "|---|" + "---|" * (len(columns) + 2),
        ]
        for t in rows:
            cells = [_cell(t["metrics"].get(c)) for c in columns]
            lines.append(
                f"| {t['model']} | " + " | ".join(cells) + f" | {t['fit_seconds']:.1f} | "
                f"{t['ran_on']} |"
            )
        pairs = [p for p in summary["paired"] if p["rail"] == rail]
        if pairs:
            lines += [
                "",
                "| paired difference | metric | a | b | a − b [CI] |",
                "|---|---|---|---|---|",
            ]
            for p in pairs:
                b = f"{p['b']} (best baseline)" if p["b_is_best_baseline"] else p["b"]
                lines.append(
                    f"| {p['a']} − {p['b']} | {p['metric']} | {p['a_mean']:.4f} | "
                    f"{b} {p['b_mean']:.4f} | {p['difference']:+.4f} "
                    f"[{p['low']:+.4f}, {p['high']:+.4f}] |"
                )
        lines.append("")
    if summary["skipped"]:
        lines += ["Skipped: " + "; ".join(summary["skipped"]), ""]
    return "\n".join(lines)


def _cell(i: dict[str, float] | None) -> str:
    if i is None or np.isnan(i["mean"]):
        return "—"
    return f"{i['mean']:.4f} [{i['low']:.4f}, {i['high']:.4f}]"


def write_outputs(summary: dict[str, Any], settings: Settings, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / f"{summary['dataset']}.json",
        "markdown": out / f"{summary['dataset']}.md",
    }
    paths["json"].write_bytes(
        orjson.dumps(summary, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
    )
    paths["markdown"].write_text(markdown(summary, settings))
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-d", "--dataset", default="amazon_m2")
    parser.add_argument(
        "--towers", action=argparse.BooleanOptionalAction, default=True, help="train the towers"
    )
    parser.add_argument("--epochs", type=int, default=None, help="SASRec's epoch cap")
    parser.add_argument("--out", type=Path, default=None, help="default <reports>/benchmarks/peers")
    parser.add_argument("--workdir", type=Path, default=None, help="SASRec's files")
    parser.add_argument(
        "--repeats",
        choices=["keep", "first"],
        default="keep",
        help="SASRec's training sessions: as logged, or each item at its first touch only",
    )
    parser.add_argument(
        "--sasrec-arg",
        action="append",
        default=[],
        help="passed on to `recbole_sasrec.py train`, e.g. --sasrec-arg=--hidden=128",
    )
    args = parser.parse_args(argv)
    settings = load_settings()
    configure_logging(settings.log_level)
    if not PEER_PYTHON.exists():
        sys.exit(f"{PEER_PYTHON} is missing: run `bash benchmarks/peers/install.sh` first")
    workdir = args.workdir or settings.artifacts_dir / "peers" / f"{args.dataset}-{SASREC}"
    summary = run_comparison(
        settings,
        args.dataset,
        args.towers,
        args.epochs or settings.training.max_epochs,
        workdir.resolve(),
        args.sasrec_arg,
        args.repeats == "first",
    )
    paths = write_outputs(
        summary, settings, args.out or settings.reports_dir / "benchmarks" / "peers"
    )
    log.info("peer comparison written", **{k: str(v) for k, v in paths.items()})
    print(paths["markdown"].read_text())


if __name__ == "__main__":
    main()
