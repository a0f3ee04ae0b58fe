"""Triton user tower under concurrent load: 1 vs 2 instances x two dynamic-batching delays.

Usage:
    python -m benchmarks.triton_instances --towers artifacts/<run>-rees46   # a tower bundle
    python -m benchmarks.triton_instances --bundle artifacts/<run>-rees46-rails
    python -m benchmarks.triton_instances            # the production bundle's towers
    python -m benchmarks.triton_instances --quick    # short rows: checks the script works

For each setting (instances, max_queue_delay_us) the bundle's session encoder is exported
into a fresh model repository by the export step itself (training/triton_export.py, the
config.pbtxt written from those settings), a tritonserver is started on it, and two load
rows run against it, closed loop: several client threads each sending one session per
request (what the API sends on a cache miss), and a few threads sending batches of 64
(what the refresh consumer sends). Throughput (sessions/s) and p50/p99 per request, with
ratios vs (1 instance, no delay) from the same run. Writes
`reports/benchmarks/triton_instances.json` and `.md`.

On a small machine the client threads, tritonserver and its instances share the same
cores: the table says how many there were, and where the ceiling is.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.rails_api import _head, _row, percentiles
from benchmarks.report import write_report
from devstack.local_services import free_port, triton_server
from railtower.settings import TritonModelSettings, load_settings
from ranking.bundle import SESSION_ENCODER, TowerBundle
from serving.app import production_pointer
from serving.rail_service import load_rails
from serving.user_vectors import TritonUserTower
from towers.session_features import HistoryEvent
from training.triton_export import export_user_tower

# (instances, max_queue_delay_us); the baseline runs again last, so the table shows how
# much the machine itself drifted during the run.
SETTINGS = [(1, 0), (1, 2000), (2, 0), (2, 2000), (1, 0)]


def session_batches(towers: TowerBundle, batch: int, n: int) -> list[dict]:
    """`n` prepared encoder inputs of `batch` sessions each (2-6 of the bundle's items)."""
    rng = np.random.default_rng(0)
    ids = towers.item_ids
    out = []
    for _ in range(n):
        histories = [
            [
                HistoryEvent(str(i), "view", 1569890000.0 + 30 * k)
                for k, i in enumerate(rng.choice(ids, size=int(rng.integers(2, 7)), replace=False))
            ]
            for _ in range(batch)
        ]
        out.append(towers.session_inputs(histories, [None] * batch))
    return out


def load_row(
    url: str, version: str, inputs: list[dict], threads: int, seconds: float
) -> dict[str, Any]:
    """`threads` clients (one gRPC channel each) sending requests back to back."""
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors = [0] * threads
    deadline = time.perf_counter() + seconds

    def client(n: int) -> None:
        tower = TritonUserTower(url, "user_tower", 10.0)
        k = n
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                tower.encode(inputs[k % len(inputs)], version)
            except Exception:  # noqa: BLE001 - counted: a row with errors says so
                errors[n] += 1
                continue
            latencies[n].append(time.perf_counter() - started)
            k += threads

    workers = [threading.Thread(target=client, args=(n,)) for n in range(threads)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - started
    flat = [s for per_thread in latencies for s in per_thread]
    batch = len(inputs[0]["items"])
    return {
        "threads": threads,
        "batch": batch,
        "requests": len(flat),
        "requests_per_s": len(flat) / elapsed,
        "sessions_per_s": len(flat) * batch / elapsed,
        **percentiles(flat or [0.0]),
        "errors": sum(errors),
    }


def run_setting(
    towers: TowerBundle, triton: TritonModelSettings, rows: list[tuple[list[dict], int]], args
) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Export, start tritonserver, warm up, run every load row, stop."""
    work = Path(tempfile.mkdtemp(prefix="bench-triton-"))
    encoder = towers.folder / SESSION_ENCODER
    version = str(export_user_tower(encoder, towers.version, work / "repo", "user_tower", triton))
    grpc = free_port()
    server = triton_server(work / "repo", grpc, free_port(), work).start()
    url = f"127.0.0.1:{grpc}"
    try:
        probe = TritonUserTower(url, "user_tower", 10.0)
        deadline = time.monotonic() + 120
        while not probe.ready(version):
            if time.monotonic() > deadline:
                raise RuntimeError(f"user tower not ready; see {server.log}")
            time.sleep(0.2)
        load_row(url, version, rows[0][0], 2, 1.0)  # first calls are slow: not measured
        out = [load_row(url, version, inputs, threads, args.seconds) for inputs, threads in rows]
    finally:
        server.stop()
    return {
        "instances": triton.instances,
        "max_queue_delay_us": triton.max_queue_delay_us,
        "rows": out,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--towers", type=Path, default=None, help="a tower bundle folder")
    parser.add_argument("--bundle", type=Path, default=None, help="a rails bundle with towers")
    parser.add_argument("--seconds", type=float, default=8.0, help="per load row")
    parser.add_argument("--threads", type=int, default=8, help="client threads, batch-1 row")
    parser.add_argument("--batch-threads", type=int, default=2, help="client threads, batch 64")
    parser.add_argument("--quick", action="store_true", help="1.5 s rows: checks it works")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.threads = 1.5, 4
    settings = load_settings(log_level="WARNING")
    towers = _towers(args, settings)
    rows = [
        (session_batches(towers, 1, 256), args.threads),
        (session_batches(towers, 64, 16), args.batch_threads),
    ]
    base = settings.serving.triton
    results = [
        run_setting(
            towers,
            base.model_copy(update={"instances": n, "max_queue_delay_us": delay}),
            rows,
            args,
        )
        for n, delay in SETTINGS
    ]
    result = {
        "tower_bundle": towers.version,
        "quick": args.quick,
        "seconds_per_row": args.seconds,
        "preferred_batch_sizes": base.preferred_batch_sizes,
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        },
        "settings": results,
    }
    write_report("triton_instances", result, markdown(result))


def _towers(args, settings) -> TowerBundle:  # type: ignore[no-untyped-def]
    if args.towers is not None:
        return TowerBundle.load(args.towers.resolve())
    loaded = load_rails((args.bundle or production_pointer(settings)).resolve(), settings)
    if loaded.towers is None:
        raise SystemExit("that rails bundle has no towers; pass --towers or a bundle with towers")
    return loaded.towers


def markdown(r: dict[str, Any]) -> str:
    cpus = r["machine"]["cpus"]
    lines = [
        f"# Triton user tower: instances x batching delay ({r['tower_bundle']}, {cpus} CPUs)",
        "",
        f"Closed loop, {r['seconds_per_row']:g} s per row; preferred batch sizes "
        f"{r['preferred_batch_sizes']}; ratios vs (1 instance, 0 us) in the same run."
        + (" QUICK run: not a measurement." if r["quick"] else ""),
        "",
    ]
    lines += _head(
        [
            "instances",
            "delay us",
            "batch",
            "threads",
            "sessions/s",
            "p50 ms",
            "p99 ms",
            "sessions/s vs base",
            "p99 vs base",
            "errors",
        ]
    )
    base = {row["batch"]: row for row in r["settings"][0]["rows"]}
    for setting in r["settings"]:
        for row in setting["rows"]:
            ref = base[row["batch"]]
            lines.append(
                _row(
                    [
                        setting["instances"],
                        setting["max_queue_delay_us"],
                        row["batch"],
                        row["threads"],
                        f"{row['sessions_per_s']:,.0f}",
                        f"{row['p50']:.2f}",
                        f"{row['p99']:.2f}",
                        f"{row['sessions_per_s'] / ref['sessions_per_s']:.2f}x",
                        f"{row['p99'] / ref['p99']:.2f}x",
                        row["errors"],
                    ]
                )
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
