"""The refresh consumer: throughput and event -> refreshed-vector freshness, steady and burst.

Usage:
    python benchmarks/refresh_consumer.py --bundle artifacts/<run>-rees46-rails
    python benchmarks/refresh_consumer.py            # the production bundle of serving.dataset

Starts a Kafka-protocol broker (tansu), Redis and, when the model has towers, Triton, all on
loopback; runs one consumer (this process, one core for the model) over keyed events of
synthetic sessions drawn from the catalogue, sent by a producer process of its own (a shop's
producers are other services), in two regimes:

- steady: a fixed rate (events/s) for a fixed time;
- burst: a block of events sent as fast as the producer can.

Freshness is the time from an event's producer timestamp to the end of its batch's Redis
writes (the session's vector and pre-warmed rail are then current). Each regime runs with
session vectors computed in-process and via Triton. Writes
`reports/benchmarks/refresh_consumer.json` and `refresh_consumer.md`.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from kafka import KafkaProducer

from benchmarks.rails_api import command_line, git_revision
from benchmarks.report import write_report
from devstack.local_services import (
    LocalServer,
    free_port,
    kafka_broker,
    redis_server,
    triton_server,
)
from railtower.heap import gc_pauses
from railtower.schemas import Event, encode
from railtower.settings import Settings, load_settings
from serving.app import production_pointer
from serving.metrics import Metrics
from serving.rail_service import load_rails
from serving.service import RailService
from serving.user_vectors import TritonUserTower
from state.session_store import SessionStore
from streaming.consumer import BatchReport, RefreshConsumer
from streaming.topics import ensure_topics


def _events(items: np.ndarray, n: int, sessions: int, seed: int) -> list[Event]:
    rng = np.random.default_rng(seed)
    now = datetime.now(UTC)
    return [
        Event(
            event_id=f"{seed}-{k}",
            event_time=now,
            event_type="view",
            session_id=f"bench-{seed}-{rng.integers(sessions)}",
            item_id=str(rng.choice(items)),
        )
        for k in range(n)
    ]


def _produce(
    servers: str, topic: str, messages: list[tuple[bytes, bytes]], rate: float | None
) -> tuple[float, float]:
    """Send keyed `messages` at `rate` per second (or as fast as possible), in a process of
    its own; returns when sending started (the monotonic clock is the machine's, so the
    consumer's process can compare with it) and the seconds it took."""
    producer = KafkaProducer(bootstrap_servers=servers, acks=1, linger_ms=2)
    started = time.monotonic()
    for k, (key, value) in enumerate(messages):
        if rate:
            wait = started + k / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        producer.send(topic, key=key, value=value)
    producer.flush()
    producer.close()
    return started, time.monotonic() - started


def _run(
    settings: Settings,
    service: RailService,
    events: list[Event],
    rate: float | None,
    producer: ProcessPoolExecutor,
) -> dict[str, Any]:
    """Send `events` (at `rate` per second, or as fast as possible) while one consumer runs."""
    reports: list[BatchReport] = []
    consumer = RefreshConsumer(settings, service)
    stop = threading.Event()

    def consume() -> None:
        while not stop.is_set():
            reports.append(consumer.step())

    pauses = gc_pauses()
    gc_before = (list(pauses.count), list(pauses.seconds))
    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    while not consumer.consumer.assignment():  # let the member join before timing
        time.sleep(0.1)
    # The shop's producers are other processes: sending from this one would take the
    # consumer's interpreter lock for every record (kafka-python's sender thread).
    messages = [(e.session_id.encode(), encode(e)) for e in events]
    topic = settings.streaming.events_topic
    started, sent_s = producer.submit(
        _produce, settings.streaming.bootstrap_servers, topic, messages, rate
    ).result()
    deadline = time.monotonic() + 300
    while (
        sum(r.new_events + r.duplicates for r in reports) < len(events)
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    done_s = time.monotonic() - started
    stop.set()
    thread.join(timeout=30)
    consumer.close()
    fresh = np.asarray([f for r in reports for f in r.freshness_s]) * 1000
    gc_runs = [after - before for after, before in zip(pauses.count, gc_before[0], strict=True)]
    gc_s = [after - before for after, before in zip(pauses.seconds, gc_before[1], strict=True)]
    applied = sum(r.new_events for r in reports)
    busy = sum(r.seconds for r in reports if r.records)
    return {
        "events": len(events),
        "applied": applied,
        "rate_sent_per_s": len(events) / sent_s,
        "wall_s": done_s,
        # how long after the last send the last event was applied: about one batch when the
        # consumer keeps up, growing with the backlog when it does not
        "behind_after_send_s": done_s - sent_s,
        "throughput_per_s": applied / done_s,
        "throughput_busy_per_s": applied / busy if busy else 0.0,
        "sessions_refreshed": sum(r.sessions_refreshed for r in reports),
        # the cycle collector in this process during the run (the consumer holds it off
        # for each batch: railtower.heap.collector_held)
        "gc_runs_by_generation": gc_runs,
        "gc_seconds": sum(gc_s),
        "freshness_ms": {f"p{q}": float(np.percentile(fresh, q)) for q in (50, 95, 99)}
        if len(fresh)
        else {},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--rate", type=float, default=50.0, help="steady events/s")
    parser.add_argument("--steady-seconds", type=float, default=20.0)
    parser.add_argument("--burst", type=int, default=3000, help="events in the burst")
    parser.add_argument("--sessions", type=int, default=400)
    args = parser.parse_args()
    settings = load_settings(log_level="WARNING")
    bundle = (args.bundle or production_pointer(settings)).resolve()
    loaded = load_rails(bundle, settings)
    items = loaded.pipeline.stats.item_ids[np.argsort(-loaded.pipeline.stats.popularity)[:2000]]
    work = settings.cache_dir / "bench-streaming"
    started: list[LocalServer] = []
    producer = ProcessPoolExecutor(1, mp_context=get_context("spawn"))
    result: dict[str, Any] = {
        "bundle": loaded.version,
        "cpus": os.cpu_count(),
        "commit": git_revision(),
        "command": command_line(),
        "runs": {},
    }
    try:
        redis_port, kafka_port, grpc = free_port(), free_port(), free_port()
        started.append(redis_server(redis_port, work).start())
        started.append(kafka_broker(kafka_port, work).start())
        triton = None
        if loaded.towers is not None:
            started.append(
                triton_server(settings.serving.triton_repository, grpc, free_port(), work).start()
            )
            triton = TritonUserTower(f"127.0.0.1:{grpc}", "user_tower", 1.0)
            while not triton.ready():
                time.sleep(0.2)
        store = SessionStore(f"redis://127.0.0.1:{redis_port}/0", 2.0, 50, 3600, 300)
        modes = {"in_process": None, **({"triton": triton} if triton is not None else {})}
        for n, (mode, client) in enumerate(modes.items()):
            service = RailService(settings, None, store, client, Metrics())
            service.load(bundle)
            for regime, count, rate in (
                ("steady", int(args.rate * args.steady_seconds), args.rate),
                ("burst", args.burst, None),
            ):
                streaming = settings.streaming.model_copy(
                    update={
                        "bootstrap_servers": f"127.0.0.1:{kafka_port}",
                        "events_topic": f"bench-{mode}-{regime}",
                        "group_id": f"bench-{mode}-{regime}",
                    }
                )
                run_settings = settings.model_copy(update={"streaming": streaming})
                ensure_topics(streaming)
                events = _events(items, count, args.sessions, seed=10 * n + (regime == "burst"))
                run = _run(run_settings, service, events, rate, producer)
                result["runs"][f"{mode}/{regime}"] = run
                print(mode, regime, run)
    finally:
        producer.shutdown()
        for server in reversed(started):
            server.stop()
    write_report("refresh_consumer", result, markdown(result))


def markdown(r: dict[str, Any]) -> str:
    head = [
        "vectors / regime",
        "events",
        "sent/s",
        "applied/s (wall)",
        "applied/s (busy)",
        "done s after the last send",
        "collector runs (gen 0/1/2), time",
        "sessions refreshed",
        "freshness p50 ms",
        "p95",
        "p99",
    ]
    lines = [f"# Refresh consumer ({r['bundle']}, {r['cpus']} CPUs, one consumer)", ""]
    if "commit" in r:
        lines += [f"Commit `{r['commit']}`; command `{r['command']}`.", ""]
    lines += [
        "Applied/s (wall) counts from the first send to the last event applied, so it stays"
        " under the offered rate even for a consumer that keeps up; 'done after the last"
        " send' tells the two apart (about one batch when it keeps up). The burst rows are"
        " the capacity: a backlog drained as fast as one consumer can.",
        "",
    ]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in r["runs"].items():
        f = row["freshness_ms"]
        cells = [
            name,
            f"{row['events']:,}",
            f"{row['rate_sent_per_s']:.0f}",
            f"{row['throughput_per_s']:.0f}",
            f"{row['throughput_busy_per_s']:.0f}",
            f"{row.get('behind_after_send_s', float('nan')):.1f}",
            "/".join(map(str, row.get("gc_runs_by_generation", [])))
            + f", {1000 * row.get('gc_seconds', float('nan')):.0f} ms",
            f"{row['sessions_refreshed']:,}",
            *(f"{f.get(q, float('nan')):.0f}" for q in ("p50", "p95", "p99")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
