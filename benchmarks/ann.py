"""HNSW vs exact brute-force top-k: build time, memory, recall, latency and throughput.

Usage:
    python benchmarks/ann.py                      # 26,841 (Amazon-M2's catalogue) and 1M
    python benchmarks/ann.py --skip-1m            # the catalogue size only
    python benchmarks/ann.py --sizes 10000 100000 --threads 2

Vectors are a seeded, clustered Gaussian mixture on the unit sphere (uneven cluster sizes and
spreads, like item embeddings grouped by category); uniform noise would be unrealistically
hard for any graph index. Queries are fresh draws from the same mixture, never catalogue rows.
Both indexes are timed through the same `search` API that serving calls, so the numbers
include id mapping, not just the kernel. Writes `reports/benchmarks/ann.json` and `ann.md`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from railtower.settings import PROJECT_ROOT, IndexSettings, load_settings
from ranking.ann import ExactIndex, HnswIndex, build_hnsw, recall_at_k
from ranking.ann_files import HNSW_FILE, IDS

CATALOGUE_SIZE = 26_841  # Amazon-M2's catalogue, the size serving will index
ONE_MILLION = 1_000_000
FALLBACK_SIZE = 500_000
PILOT_SIZE = 50_000


@dataclass(frozen=True)
class Mixture:
    """A Gaussian mixture on the unit sphere: centres, uneven weights, per-cluster spread."""

    centres: np.ndarray  # (C, D) float64, unit rows
    weights: np.ndarray  # (C,) summing to 1
    spreads: np.ndarray  # (C,) per-dimension noise sigma

    @classmethod
    def for_size(cls, n: int, dim: int, rng: np.random.Generator) -> Mixture:
        # ~500 items per cluster on average, like categories; log-normal weights make some
        # clusters far larger than others. Noise of norm 0.6-1.2 puts items at cosine
        # ~0.65-0.85 from their centre, so clusters overlap at their edges.
        clusters = max(32, n // 500)
        centres = rng.standard_normal((clusters, dim))
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        weights = rng.lognormal(0.0, 1.0, clusters)
        spreads = rng.uniform(0.6, 1.2, clusters) / math.sqrt(dim)
        return cls(centres, weights / weights.sum(), spreads)

    def sample(self, n: int, rng: np.random.Generator, chunk: int = 100_000) -> np.ndarray:
        """(n, D) float32 L2-normalised draws, made in chunks to bound float64 temporaries."""
        out = np.empty((n, self.centres.shape[1]), dtype=np.float32)
        for start in range(0, n, chunk):
            size = min(chunk, n - start)
            labels = rng.choice(len(self.weights), size=size, p=self.weights)
            x = (
                self.centres[labels]
                + rng.standard_normal((size, out.shape[1])) * self.spreads[labels, None]
            )
            out[start : start + size] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def single_query_latency_ms(
    index: ExactIndex | HnswIndex, queries: np.ndarray, k: int
) -> dict[str, float]:
    """p50/p99 of one-query searches (batch 1), in milliseconds."""
    index.search(queries[:1], k)  # warm caches and the lazy id map
    times = []
    for row in range(len(queries)):
        start = time.perf_counter()
        index.search(queries[row : row + 1], k)
        times.append((time.perf_counter() - start) * 1e3)
    p50, p99 = np.percentile(times, [50, 99])
    return {"p50_ms": round(float(p50), 4), "p99_ms": round(float(p99), 4), "n": len(times)}


def batch_throughput_qps(
    index: ExactIndex | HnswIndex, queries: np.ndarray, k: int, repeats: int = 3
) -> float:
    """Queries per second for one `search` call over the whole batch (best of `repeats`)."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        index.search(queries, k)
        best = min(best, time.perf_counter() - start)
    return round(len(queries) / best, 1)


def projected_build_s(settings: IndexSettings, dim: int, n: int, threads: int, seed: int) -> float:
    """Build time for n items, extrapolated from a 50k pilot as n log n, times 3.

    The factor is measured, not guessed: on 2 shared cores the 1M build took ~3x the plain
    n log n extrapolation (cache misses grow with the graph, and other jobs take CPU).
    """
    rng = np.random.default_rng(seed + 1)
    vectors = Mixture.for_size(PILOT_SIZE, dim, rng).sample(PILOT_SIZE, rng)
    pilot = HnswIndex(settings.m, settings.ef_construction, num_threads=threads, seed=seed)
    start = time.perf_counter()
    pilot.build(np.arange(PILOT_SIZE).astype(str), vectors)
    seconds = time.perf_counter() - start
    scale = (n / PILOT_SIZE) * (math.log(n) / math.log(PILOT_SIZE))
    return 3.0 * seconds * scale


def bench_size(n: int, args: argparse.Namespace, settings: IndexSettings) -> dict[str, Any]:
    """Every measurement for one catalogue size."""
    rng = np.random.default_rng(args.seed + n)
    mixture = Mixture.for_size(n, args.dim, rng)
    vectors = mixture.sample(n, rng)
    queries = mixture.sample(args.queries, rng)
    ids = np.array([f"item-{i}" for i in range(n)])
    print(f"[{n:,}] data ready; building HNSW with {args.threads} threads", flush=True)

    rss_before = rss_bytes()
    hnsw, tuning = build_hnsw(ids, vectors, settings, args.k, args.seed, num_threads=args.threads)
    hnsw_rss_delta = rss_bytes() - rss_before
    with tempfile.TemporaryDirectory() as tmp:
        hnsw.save(Path(tmp))
        hnsw_file_bytes = (Path(tmp) / HNSW_FILE).stat().st_size
        ids_file_bytes = (Path(tmp) / IDS).stat().st_size
    print(f"[{n:,}] built in {tuning['build_s']:.1f} s, ef={tuning['ef']}", flush=True)

    exact = ExactIndex()
    start = time.perf_counter()
    exact.build(ids, vectors)
    exact_build_s = time.perf_counter() - start

    truth, _ = exact.search(queries, args.k)
    found, _ = hnsw.search(queries, args.k)
    recall = recall_at_k(found, truth)
    print(f"[{n:,}] recall@{args.k} on held-out queries = {recall:.4f}; timing", flush=True)

    # Exact single queries cost ~30 ms at 1M; 300 of them still give a stable p99.
    exact_latency_queries = queries[: 300 if n >= FALLBACK_SIZE else len(queries)]
    latency = {
        "hnsw": single_query_latency_ms(hnsw, queries, args.k),
        "exact": single_query_latency_ms(exact, exact_latency_queries, args.k),
    }
    qps = {
        "hnsw": batch_throughput_qps(hnsw, queries, args.k),
        "exact": batch_throughput_qps(exact, queries, args.k),
    }
    return {
        "n": n,
        "dim": args.dim,
        "k": args.k,
        "clusters": len(mixture.weights),
        "hnsw": {
            "build_s": tuning["build_s"],
            "tune_s": tuning["tune_s"],
            "ef": tuning["ef"],
            "recall_by_ef_on_tuning_sample": tuning["recall_by_ef"],
            "reached_target_on_tuning_sample": tuning["reached"],
            "index_file_bytes": hnsw_file_bytes,
            "ids_file_bytes": ids_file_bytes,
            "rss_delta_bytes": hnsw_rss_delta,
            f"recall_at_{args.k}": round(recall, 5),
            "latency": latency["hnsw"],
            "batch_qps": qps["hnsw"],
        },
        "exact": {
            "build_s": round(exact_build_s, 3),
            "vectors_bytes": int(exact.vectors.nbytes),
            "latency": latency["exact"],
            "batch_qps": qps["exact"],
        },
        # exact time / HNSW time: how many times faster HNSW is.
        "speedup": {
            "p50": round(latency["exact"]["p50_ms"] / latency["hnsw"]["p50_ms"], 2),
            "p99": round(latency["exact"]["p99_ms"] / latency["hnsw"]["p99_ms"], 2),
            "batch": round(qps["hnsw"] / qps["exact"], 2),
        },
    }


def markdown(report: dict[str, Any]) -> str:
    """A short table of the results, with speed-ups (exact time / HNSW time)."""
    k = report["k"]
    lines = [
        f"# HNSW vs exact top-{k}",
        "",
        f"{report['machine']['cpus']} CPUs, {report['threads']} build/query threads, "
        f"hnswlib {report['libraries']['hnswlib']}, M={report['index_settings']['m']}, "
        f"ef_construction={report['index_settings']['ef_construction']}, "
        f"target recall {report['index_settings']['target_recall']}. Clustered Gaussian "
        f"mixture, {report['dim']}-d, L2-normalised; {report['queries']} held-out queries.",
        "",
        "| items | HNSW build s | HNSW index MB | exact MB | ef | recall@"
        f"{k} | p50 ms exact / HNSW (x) | p99 ms exact / HNSW (x) "
        f"| batch-{report['queries']} q/s exact / HNSW (x) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        h, e, s = r["hnsw"], r["exact"], r["speedup"]
        lines.append(
            f"| {r['n']:,} | {h['build_s']:.1f} | {h['index_file_bytes'] / 2**20:.0f} "
            f"| {e['vectors_bytes'] / 2**20:.0f} | {h['ef']} | {h[f'recall_at_{k}']:.4f} "
            f"| {e['latency']['p50_ms']:.2f} / {h['latency']['p50_ms']:.2f} ({s['p50']}x) "
            f"| {e['latency']['p99_ms']:.2f} / {h['latency']['p99_ms']:.2f} ({s['p99']}x) "
            f"| {e['batch_qps']:,.0f} / {h['batch_qps']:,.0f} ({s['batch']}x) |"
        )
    notes = list(report["notes"])
    for r in report["results"]:
        h = r["hnsw"]
        if not h["reached_target_on_tuning_sample"]:
            # Keys are ints in memory and strings once read back from ann.json.
            table = {int(ef): recall for ef, recall in h["recall_by_ef_on_tuning_sample"].items()}
            notes.append(
                f"At {r['n']:,} items no ef in the grid reached the target recall on the tuning "
                f"sample (ef={h['ef']}: {table[h['ef']]:.4f}); the largest was kept. "
                "Raise M / ef_construction or extend ef_grid."
            )
    if "load_average" in report:
        notes.append(f"1-min load average at start / end: {report['load_average']}.")
    lines += ["", *[f"- {note}" for note in notes], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[CATALOGUE_SIZE, ONE_MILLION])
    parser.add_argument("--skip-1m", action="store_true", help="drop sizes of 1M and above")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=None, help="default: evaluation.candidates")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=None, help="default: settings seed")
    parser.add_argument("--max-build-min", type=float, default=12.0)
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "reports" / "benchmarks")
    args = parser.parse_args()

    settings = load_settings()
    args.k = args.k or settings.evaluation.candidates
    args.seed = settings.seed if args.seed is None else args.seed
    sizes = [n for n in args.sizes if not (args.skip_1m and n >= ONE_MILLION)]
    notes = [
        "x = exact time / HNSW time (higher means HNSW is faster). Latency is one query "
        "per call through `search` (id mapping included); batch is one call of "
        f"{args.queries} queries.",
        "HNSW index MB is the saved hnsw.bin (vectors + graph); exact MB is the float32 matrix.",
    ]
    load_start = os.getloadavg()[0]
    results = []
    for n in sizes:
        if n > FALLBACK_SIZE:
            projected = projected_build_s(settings.index, args.dim, n, args.threads, args.seed)
            print(f"[{n:,}] projected build {projected / 60:.1f} min", flush=True)
            if projected > args.max_build_min * 60:
                note = (
                    f"{n:,} items reduced to {FALLBACK_SIZE:,}: projected build "
                    f"{projected / 60:.1f} min > {args.max_build_min} min on {args.threads} threads"
                )
                print(note, flush=True)
                notes.append(note)
                n = FALLBACK_SIZE
        results.append(bench_size(n, args, settings.index))

    report = {
        "k": args.k,
        "dim": args.dim,
        "queries": args.queries,
        "threads": args.threads,
        "seed": args.seed,
        "index_settings": settings.index.model_dump(),
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
        },
        "libraries": {
            name: importlib.metadata.version(name) for name in ("hnswlib", "numpy", "railtower")
        },
        "results": results,
        "notes": notes,
        # Other jobs share these cores; a high load explains noisy latencies.
        "load_average": [round(load_start, 2), round(os.getloadavg()[0], 2)],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ann.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "ann.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
