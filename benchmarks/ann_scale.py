"""HNSW build time and index memory as the catalogue grows: measured points and a fitted law.

Usage:
    python -m benchmarks.ann_scale               # 100k, 300k and 1M items (a few minutes)
    python -m benchmarks.ann_scale --quick       # 5k, 10k, 20k: checks the script works
    python -m benchmarks.ann_scale --sizes 100000 300000

Vectors are the clustered mixture of benchmarks/ann.py at the towers' dimension
(`towers.dim`), indexed with the project's HNSW parameters (`index.m`,
`index.ef_construction`) through serving's own `HnswIndex`. For each size: build seconds
(wall and CPU), the saved index's bytes (what serving loads into memory), the process's RSS
growth, and a recall check against exact search. The baseline in the same run is the raw
float32 matrix (index bytes / vector bytes). Build time is fitted as c * n^b on the
measured points (log-log least squares) and memory as a + bytes_per_item * n; the 10M row is
an extrapolation of those fits and says so. Writes `reports/benchmarks/ann_scale.json` and
`ann_scale.md`, which scripts/capacity_model.py reads.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.ann import Mixture, rss_bytes
from railtower.settings import PROJECT_ROOT, IndexSettings, load_settings
from ranking.ann import ExactIndex, HnswIndex, recall_at_k
from ranking.ann_files import HNSW_FILE

DEFAULT_SIZES = [100_000, 300_000, 1_000_000]
QUICK_SIZES = [5_000, 10_000, 20_000]
EXTRAPOLATE_TO = [1_000_000, 10_000_000]
RECALL_QUERIES = 200


def measure(n: int, dim: int, index: IndexSettings, k: int, threads: int, seed: int) -> dict:
    """Build one index of n items; its build time, bytes and a recall sanity check."""
    rng = np.random.default_rng(seed + n)
    mixture = Mixture.for_size(n, dim, rng)
    vectors = mixture.sample(n, rng)
    queries = mixture.sample(RECALL_QUERIES, rng)
    ids = np.array([f"item-{i}" for i in range(n)])
    print(f"[{n:,}] building HNSW (M={index.m}, ef_construction={index.ef_construction})")

    rss_before = rss_bytes()
    hnsw = HnswIndex(index.m, index.ef_construction, num_threads=threads, seed=seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    hnsw.build(ids, vectors)
    build_s = time.perf_counter() - start
    # CPU seconds of all build threads: steadier than wall time when others share the cores
    build_cpu_s = time.process_time() - cpu_start
    rss_delta = rss_bytes() - rss_before
    with tempfile.TemporaryDirectory() as tmp:
        hnsw.save(Path(tmp))
        index_bytes = (Path(tmp) / HNSW_FILE).stat().st_size

    # Not a tuning run (benchmarks/ann.py does that): a check that the graph is usable.
    hnsw.ef = max(index.ef_grid[0], k)
    exact = ExactIndex()
    exact.build(ids, vectors)
    recall = recall_at_k(hnsw.search(queries, k)[0], exact.search(queries, k)[0])
    print(f"[{n:,}] {build_s:.1f} s, {index_bytes / 2**20:.0f} MB, recall@{k} {recall:.3f}")
    return {
        "n": n,
        "build_s": round(build_s, 2),
        "build_cpu_s": round(build_cpu_s, 2),
        "index_file_bytes": index_bytes,
        "rss_delta_bytes": rss_delta,
        "vectors_bytes": int(vectors.nbytes),
        "index_bytes_per_item": round(index_bytes / n, 1),
        "index_over_vectors": round(index_bytes / vectors.nbytes, 3),
        "ef": hnsw.ef,
        f"recall_at_{k}": round(recall, 4),
    }


def fit_scaling(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Build time as c * n^b (log-log least squares); index bytes as a + per_item * n."""
    n = np.array([r["n"] for r in results], dtype=float)
    seconds = np.array([r["build_s"] for r in results], dtype=float)
    size = np.array([r["index_file_bytes"] for r in results], dtype=float)
    exponent, log_c = np.polyfit(np.log(n), np.log(np.maximum(seconds, 1e-6)), 1)
    per_item, intercept = np.polyfit(n, size, 1)
    return {
        "build_s": {"model": "c * n^b", "c": float(np.exp(log_c)), "b": round(float(exponent), 4)},
        "index_bytes": {
            "model": "a + per_item * n",
            "a": round(float(intercept), 1),
            "per_item": round(float(per_item), 2),
        },
        "fitted_on": [int(x) for x in n],
    }


def predict(fit: dict[str, Any], n: int) -> dict[str, float]:
    build = fit["build_s"]
    size = fit["index_bytes"]
    return {
        "build_s": round(build["c"] * n ** build["b"], 1),
        "index_file_bytes": round(size["a"] + size["per_item"] * n),
    }


def extrapolations(fit: dict[str, Any], measured: set[int]) -> dict[str, dict[str, Any]]:
    """Fitted predictions at the sizes the capacity model asks for that were not measured."""
    return {
        str(n): {**predict(fit, n), "extrapolated": True, "from": fit["fitted_on"]}
        for n in EXTRAPOLATE_TO
        if n not in measured
    }


def markdown(report: dict[str, Any]) -> str:
    fit = report["fit"]
    lines = [
        "# HNSW build time and memory by catalogue size",
        "",
        f"hnswlib {report['libraries']['hnswlib']}, {report['dim']}-d, M={report['index']['m']}, "
        f"ef_construction={report['index']['ef_construction']}, {report['threads']} build "
        f"threads; 1-min load average at start / end {report['load_average']}.",
        "",
        "| items | build s | index MB | vectors MB | index / vectors (x) | bytes/item | "
        "build s / fit (x) | recall check |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    k = report["k"]
    for r in report["results"]:
        fitted = predict(fit, r["n"])["build_s"]
        lines.append(
            f"| {r['n']:,} | {r['build_s']:.1f} | {r['index_file_bytes'] / 2**20:.0f} "
            f"| {r['vectors_bytes'] / 2**20:.0f} | {r['index_over_vectors']} "
            f"| {r['index_bytes_per_item']:.0f} | {r['build_s'] / max(fitted, 1e-9):.2f} "
            f"| {r[f'recall_at_{k}']:.3f} |"
        )
    for n, row in report["extrapolated"].items():
        lines.append(
            f"| {int(n):,} (extrapolated) | {row['build_s']:.0f} "
            f"| {row['index_file_bytes'] / 2**20:.0f} | — | — | — | — | — |"
        )
    lines += [
        "",
        f"- Build time fit: {fit['build_s']['c']:.3g} * n^{fit['build_s']['b']} s; index bytes "
        f"fit: {fit['index_bytes']['a']:.0f} + {fit['index_bytes']['per_item']} * n "
        f"(on {', '.join(f'{n:,}' for n in fit['fitted_on'])}).",
        f"- Recall check: recall@{k} vs exact on {RECALL_QUERIES} fresh queries at one ef, "
        "not a tuned ef (benchmarks/ann.py tunes).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "reports" / "benchmarks")
    args = parser.parse_args()
    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    if len(sizes) < 2:
        parser.error("--sizes needs at least two sizes to fit a scaling law")

    settings = load_settings()
    k, dim = settings.evaluation.candidates, settings.towers.dim
    header = {
        "dim": dim,
        "k": k,
        "threads": args.threads,
        "quick": args.quick,
        "index": settings.index.model_dump(),
        "libraries": {name: importlib.metadata.version(name) for name in ("hnswlib", "numpy")},
        "cpus": len(os.sched_getaffinity(0)),
    }
    load_start = os.getloadavg()[0]
    results: list[dict[str, Any]] = []
    for n in sorted(sizes):
        results.append(measure(n, dim, settings.index, k, args.threads, settings.seed))
        # written after every size: the largest build can take many minutes on a busy
        # machine, and what was measured before it must survive a timeout
        if len(results) >= 2:
            report = write(args.out, header, results, load_start)
    print(markdown(report))


def write(
    out: Path, header: dict[str, Any], results: list[dict[str, Any]], load_start: float
) -> dict[str, Any]:
    fit = fit_scaling(results)
    report = {
        **header,
        "results": results,
        "fit": fit,
        "extrapolated": extrapolations(fit, {r["n"] for r in results}),
        "load_average": [round(load_start, 2), round(os.getloadavg()[0], 2)],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "ann_scale.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "ann_scale.md").write_text(markdown(report))
    return report


if __name__ == "__main__":
    main()
