"""deals_for_you freshness: a price drop published on the catalogue topic -> visible in the rail.

Usage:
    python benchmarks/deals_freshness.py --bundle artifacts/<run>-rees46-rails
    python benchmarks/deals_freshness.py            # the production bundle of serving.dataset

Starts a Kafka-protocol broker (tansu) and Redis on loopback, one refresh consumer (a thread
of this process, like benchmarks/refresh_consumer.py) and a second RailService standing in
for an API process: it learns prices only from Redis, pulled every second as
`serving.app`'s catalogue watch does. Then, one at a time, it publishes injected price drops
(seeded items with a price history, `--drop` off their last price, stamped after the
bundle's window) and polls both services' deals_for_you until the item shows:

- consumer process: publish -> the consumer's batch applied -> the rail shows it;
- API process: the same plus the Redis pull (up to a second).

It also reports spike detection on the injected drops (the share whose item is then in a
deal-spike state; an item needs `ranking.prices.min_points` prices first) and how many items
were in a spike before any injection. Every figure here comes from injected drops on the
bundle's real price histories, not from real price movement. Writes
`reports/benchmarks/deals_freshness.json` and `deals_freshness.md`.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from kafka import KafkaProducer

from benchmarks.report import write_report
from devstack.local_services import LocalServer, free_port, kafka_broker, redis_server
from railtower.schemas import CatalogueUpdate, encode
from railtower.settings import Settings, load_settings
from ranking.price_history import column
from serving.api_models import RailRequest
from serving.app import production_pointer
from serving.metrics import Metrics
from serving.service import RailService
from state.session_store import SessionStore
from streaming.consumer import RefreshConsumer
from streaming.topics import ensure_topics

_RAIL = "deals_for_you"
_POLL_S = 0.01
_TIMEOUT_S = 30.0


def _shows(service: RailService, item: str, slots: int) -> bool:
    reply = service.serve(_RAIL, RailRequest(session_id="bench-deals", slots=slots))
    return item in {i.item_id for i in reply.items}


def _spikes(service: RailService) -> int:
    """Items in a deal-spike state now, by the served model's own features."""
    stats = service.loaded.pipeline.stats  # type: ignore[union-attr]
    if stats.prices is None:
        return 0
    rows = stats.prices.items_with_history()
    nows = stats.prices.request_clock(np.full(len(rows), stats.end_time))
    return int(np.nansum(column(stats.price_matrix(rows, nows), "price_deal_spike")))


def _percentiles(values: list[float]) -> dict[str, float]:
    ms = np.asarray(values) * 1000
    return {f"p{q}": float(np.percentile(ms, q)) for q in (50, 95, 99)} if len(ms) else {}


def measure(
    settings: Settings, bundle: Path, redis_url: str, drops: int, drop: float, seed: int
) -> dict[str, Any]:
    """Publish `drops` injected drops one at a time; time each until both services show it."""
    consumer_service = RailService(
        settings, None, SessionStore(redis_url, 2.0, 50, 3600, 300), None, Metrics()
    )
    api_service = RailService(
        settings, None, SessionStore(redis_url, 2.0, 50, 3600, 300), None, Metrics()
    )
    if not (consumer_service.load(bundle) and api_service.load(bundle)):
        raise SystemExit(f"bundle {bundle} did not load; see the log above")
    stats = consumer_service.loaded.pipeline.stats  # type: ignore[union-attr]
    if stats.prices is None or not len(stats.prices):
        raise SystemExit(f"{bundle} holds no price history; retrain it with this code")
    spikes_before = _spikes(consumer_service)
    rng = np.random.default_rng(seed)
    rows = stats.prices.items_with_history()
    chosen = rng.choice(rows, min(drops, len(rows)), replace=False)
    slots = settings.serving.max_slots
    consumer = RefreshConsumer(settings, consumer_service)
    stop = threading.Event()

    def consume() -> None:
        while not stop.is_set():
            consumer.step()

    def follow() -> None:  # serving.app's catalogue watch: every API process, every second
        while not stop.wait(1.0):
            api_service.sync_catalogue()

    threads = [threading.Thread(target=consume, daemon=True), threading.Thread(target=follow)]
    for thread in threads:
        thread.start()
    while not consumer.consumer.assignment():  # let the member join before timing
        time.sleep(0.1)
    producer = KafkaProducer(bootstrap_servers=settings.streaming.bootstrap_servers, acks=1)
    runs: list[dict[str, Any]] = []
    try:
        for k, row in enumerate(chosen.tolist()):
            item = str(stats.item_ids[row])
            last = float(stats.prices.prices[stats.prices.rows == row][-1])
            points = int((stats.prices.rows == row).sum())
            # stamped after the window and after the previous drop: data time moves forward
            at = datetime.fromtimestamp(stats.end_time + 60.0 * (k + 1), UTC)
            update = CatalogueUpdate(
                update_id=f"bench-drop-{seed}-{k}", item_id=item, time=at, price=last * (1 - drop)
            )
            started = time.monotonic()
            producer.send(
                settings.streaming.catalogue_topic, key=item.encode(), value=encode(update)
            )
            producer.flush()
            seen: dict[str, float | None] = {"consumer": None, "api": None}
            while time.monotonic() - started < _TIMEOUT_S and None in seen.values():
                for name, service in (("consumer", consumer_service), ("api", api_service)):
                    if seen[name] is None and _shows(service, item, slots):
                        seen[name] = time.monotonic() - started
                time.sleep(_POLL_S)
            features = consumer_service.loaded.pipeline.stats.price_matrix(  # type: ignore[union-attr]
                np.array([row]),
                consumer_service.loaded.pipeline.stats.prices.request_clock(  # type: ignore[union-attr]
                    np.array([at.timestamp() + 1])
                ),
            )
            runs.append(
                {
                    "item": item,
                    "prior_points": points,
                    "consumer_s": seen["consumer"],
                    "api_s": seen["api"],
                    "spike": bool(column(features, "price_deal_spike")[0] == 1.0),
                    "discount": float(column(features, "price_discount_long")[0]),
                }
            )
            print(runs[-1])
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        consumer.close()
        producer.close()
    min_points = stats.price_settings.min_points
    enough = [r for r in runs if r["prior_points"] + 1 >= min_points]
    return {
        "drops": len(runs),
        "drop": drop,
        "slots": slots,
        "spikes_before_injection": spikes_before,
        "visible_consumer_ms": _percentiles([r["consumer_s"] for r in runs if r["consumer_s"]]),
        "visible_api_ms": _percentiles([r["api_s"] for r in runs if r["api_s"]]),
        "not_visible": sum(1 for r in runs if r["api_s"] is None or r["consumer_s"] is None),
        "spike_detected_share": float(np.mean([r["spike"] for r in runs])) if runs else 0.0,
        "spike_detected_share_enough_points": float(np.mean([r["spike"] for r in enough]))
        if enough
        else float("nan"),
        "drops_with_enough_points": len(enough),
        "min_points": min_points,
        "deal_k": stats.price_settings.deal_k,
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--drops", type=int, default=30, help="injected drops, one at a time")
    parser.add_argument("--drop", type=float, default=0.3, help="fraction off the last price")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0.0 < args.drop < 1.0:
        parser.error(f"--drop must be a fraction in (0, 1), got {args.drop}")
    settings = load_settings(log_level="WARNING")
    bundle = (args.bundle or production_pointer(settings)).resolve()
    work = settings.cache_dir / "bench-deals"
    started: list[LocalServer] = []
    try:
        redis_port, kafka_port = free_port(), free_port()
        started.append(redis_server(redis_port, work).start())
        started.append(kafka_broker(kafka_port, work).start())
        streaming = settings.streaming.model_copy(
            update={
                "bootstrap_servers": f"127.0.0.1:{kafka_port}",
                "events_topic": "bench-deals-events",
                "catalogue_topic": "bench-deals-catalogue",
                "group_id": "bench-deals",
            }
        )
        settings = settings.model_copy(update={"streaming": streaming})
        ensure_topics(streaming)
        result = measure(
            settings, bundle, f"redis://127.0.0.1:{redis_port}/0", args.drops, args.drop, args.seed
        )
    finally:
        for server in reversed(started):
            server.stop()
    result.update(bundle=bundle.name, cpus=os.cpu_count(), source="injected drops")
    write_report("deals_freshness", result, markdown(result))


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# deals_for_you freshness ({r['bundle']}, {r['cpus']} CPUs, one consumer)",
        "",
        f"Source: **{r['source']}** ({r['drops']} drops of {r['drop']:.0%} on real price "
        "histories, published one at a time); no figure here is real price movement.",
        "",
        "| publish -> visible in deals_for_you | p50 ms | p95 ms | p99 ms |",
        "|---|---|---|---|",
    ]
    for name, key in (
        ("consumer process (in memory)", "visible_consumer_ms"),
        ("API process (Redis pull every 1 s)", "visible_api_ms"),
    ):
        f = r[key]
        cells = [f"{f.get(q, float('nan')):.0f}" for q in ("p50", "p95", "p99")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"- not visible within {_TIMEOUT_S:.0f} s: {r['not_visible']}",
        f"- items in a deal spike before any injection: {r['spikes_before_injection']}",
        f"- injected drops detected as a deal spike (k = {r['deal_k']}): "
        f"{r['spike_detected_share']:.0%} of all; {r['spike_detected_share_enough_points']:.0%} "
        f"of the {r['drops_with_enough_points']} whose item had >= {r['min_points']} prices",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
