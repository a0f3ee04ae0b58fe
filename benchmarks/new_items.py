"""New items live: a listing or a retirement on the catalogue topic -> every API replica.

Usage:
    python benchmarks/new_items.py --bundle artifacts/<run>-rees46-rails   # a bundle with towers
    python benchmarks/new_items.py --quick                                # 3 of each: does it work

Everything is a real process on loopback, started and stopped here: Redis, a Kafka-protocol
broker (tansu), tritonserver on the project's model repository (`serving.triton_repository`,
where the bundle's export wrote its item tower), one `railtower consume` and two API
processes (`serving.http_server`, the bundle pinned, session vectors in process,
`serving.encode_new_items` on: each replica embeds a new item's text with MiniLM and runs the
item tower on Triton, in process if Triton fails). First the item tower on Triton is
compared with the same tower in process (max abs difference, time per call). Then, one at a
time:

- **listings**: an `item_upsert` with a new id and the content (category path, brand,
  price) of a seeded catalogue item. Each replica is polled with the new product's own
  page (`pdp_fbt`, item_id = the new id) until it answers 200 with `vector_source`
  "new_item": the replica has the listing and the item tower's vector of it in its delta
  index, so tower retrieval can return it. Time from publish to that answer, per replica.
- **retirements**: a session views a seeded item (an event through the broker; the
  consumer pre-warms its homepage rail into Redis), the first item of that cached rail is
  retired, and both replicas are polled (the session's homepage rail and the viewed item's
  page) until no answer shows it. Time from publish to gone everywhere.

Writes `reports/benchmarks/new_items.json` and `new_items.md`. The replicas learn catalogue
changes from Redis on their catalogue watch (`serving.catalogue_sync_s`), so that interval
is the floor of both figures; the table says which it was.

One module on purpose: one benchmark run whose steps share the processes it starts (Redis,
the broker, tritonserver, the consumer, two replicas) and the report they fill.
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pandas as pd
import torch
from kafka import KafkaProducer

from benchmarks.live_stack import wait_ready
from benchmarks.report import write_report
from devstack.local_services import (
    LocalServer,
    api_command,
    free_port,
    kafka_broker,
    redis_server,
    triton_server,
)
from railtower.schemas import Event, ItemRetire, ItemUpsert, encode
from railtower.settings import Settings, load_settings
from ranking.bundle import ITEM_TOWER, TowerBundle
from serving.app import production_pointer
from serving.triton_item_tower import TritonItemTower
from streaming.local_group import consumer_env, start_members, wait_for_assignment
from streaming.topics import ensure_topics
from towers.item_content import ItemContentEncoder, uncached_texts

REPLICAS = 2
_POLL_S = 0.02
_TIMEOUT_S = 30.0


def _rail(http: httpx.Client, base: str, rail: str, body: dict[str, Any]) -> httpx.Response:
    return http.post(f"{base}/v1/rails/{rail}", json=body, timeout=10.0)


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "max": None}
    ms = np.asarray(values) * 1000
    return {
        "p50": round(float(np.percentile(ms, 50)), 1),
        "p95": round(float(np.percentile(ms, 95)), 1),
        "max": round(float(ms.max()), 1),
    }


def _publish(producer: KafkaProducer, topic: str, item: str, message: object) -> float:
    started = time.monotonic()
    producer.send(topic, key=item.encode(), value=encode(message))  # type: ignore[arg-type]
    producer.flush()
    return started


def listings(
    http: httpx.Client,
    bases: list[str],
    producer: KafkaProducer,
    topic: str,
    content: pd.DataFrame,
) -> list[dict[str, Any]]:
    """Publish one upsert per row of `content`; time each replica until it serves the page."""
    runs = []
    for k, row in enumerate(content.itertuples(index=False)):
        item = f"bench-new-{os.getpid()}-{k}"
        upsert = ItemUpsert(
            update_id=f"{item}-listed",
            item_id=item,
            time=datetime.now(UTC),
            category_path=row.category_path,
            brand=row.brand,
            price=float(row.price),
            stock=5,
        )
        started = _publish(producer, topic, item, upsert)
        seen: dict[str, float | None] = dict.fromkeys(bases)
        statuses: dict[str, int] = {}
        while time.monotonic() - started < _TIMEOUT_S and None in seen.values():
            for base in bases:
                if seen[base] is not None:
                    continue
                reply = _rail(
                    http, base, "pdp_fbt", {"session_id": f"{item}-page", "item_id": item}
                )
                statuses[base] = reply.status_code
                if reply.status_code == 200 and reply.json()["vector_source"] == "new_item":
                    seen[base] = time.monotonic() - started
            time.sleep(_POLL_S)
        runs.append(
            {"item": item, "like": row.item_id, "replica_s": list(seen.values()), "last": statuses}
        )
        print("listed", runs[-1])
    return runs


def retirements(
    http: httpx.Client,
    bases: list[str],
    producer: KafkaProducer,
    topics: tuple[str, str],
    anchors: list[str],
) -> list[dict[str, Any]]:
    """Per anchor: a session views it (an event through the broker; the consumer pre-warms
    its homepage rail), the first item of that cached rail is retired, and every replica's
    homepage and page rails are polled until none shows it."""
    events_topic, catalogue_topic = topics
    runs = []
    for k, anchor in enumerate(anchors):
        session = f"bench-retire-{os.getpid()}-{k}"
        view = Event(
            event_id=f"{session}-view",
            event_time=datetime.now(UTC),
            event_type="view",
            session_id=session,
            item_id=anchor,
        )
        _publish(producer, events_topic, session, view)
        home, page = {"session_id": session}, {"session_id": session, "item_id": anchor}
        cached = _wait_cached(http, bases[0], home)
        if cached is None:
            runs.append({"anchor": anchor, "item": None, "gone_s": None, "home_before": []})
            continue
        target = cached[0]
        served = [_rail(http, b, "homepage_hero", home).json()["served_by"] for b in bases]
        retire = ItemRetire(update_id=f"{session}-retire", item_id=target, time=datetime.now(UTC))
        started = _publish(producer, catalogue_topic, target, retire)
        gone_after: float | None = None
        while time.monotonic() - started < _TIMEOUT_S:
            answers = [
                _rail(http, b, rail, body)
                for b in bases
                for rail, body in (("homepage_hero", home), ("pdp_fbt", page))
            ]
            if all(
                a.status_code == 200 and target not in {i["item_id"] for i in a.json()["items"]}
                for a in answers
            ):
                gone_after = time.monotonic() - started
                break
            time.sleep(_POLL_S)
        runs.append({"item": target, "anchor": anchor, "gone_s": gone_after, "home_before": served})
        print("retired", runs[-1])
    return runs


def _wait_cached(http: httpx.Client, base: str, home: dict[str, Any]) -> list[str] | None:
    """The homepage rail's items once the consumer's pre-warmed copy serves it."""
    deadline = time.monotonic() + _TIMEOUT_S
    while time.monotonic() < deadline:
        reply = _rail(http, base, "homepage_hero", home).json()
        if reply["served_by"] == "cache" and reply["items"]:
            return [i["item_id"] for i in reply["items"]]
        time.sleep(_POLL_S)
    return None


def item_tower_on_triton(
    settings: Settings, bundle: Path, content: pd.DataFrame, triton_url: str
) -> dict[str, Any]:
    """The bundle's item tower on Triton against the same tower in process, on the listings'
    content sent as new items (id 0): max abs difference, and time per call at batch 1 and
    64 (MiniLM runs in process for both, before either; not timed)."""
    towers = TowerBundle.load(settings.artifacts_dir / _tower_bundle(bundle))
    if not towers.triton_item_version:
        raise SystemExit(f"{towers.folder} exported no item tower to Triton: retrain it")
    client = TritonItemTower(triton_url, settings.serving.triton_item_model, 10.0)
    version = towers.triton_item_version
    deadline = time.monotonic() + 120
    while not client.ready(version) and time.monotonic() < deadline:
        time.sleep(0.2)
    encoder = ItemContentEncoder(
        towers.folder / ITEM_TOWER, towers.featurizer, uncached_texts(settings.text.model_path)
    )
    rows = content.assign(item_id=[f"bench-tower-{n}" for n in range(len(content))])
    rows = pd.concat([rows] * (64 // len(rows) + 1), ignore_index=True).head(64)
    features = encoder.features(rows)
    local, remote = encoder.run_tower(features), client.encode(features, version)
    one = features.take(torch.arange(1))
    timings: dict[str, float] = {}
    for name, call in (
        ("triton_batch_1", lambda: client.encode(one, version)),
        ("in_process_batch_1", lambda: encoder.run_tower(one)),
        ("triton_batch_64", lambda: client.encode(features, version)),
        ("in_process_batch_64", lambda: encoder.run_tower(features)),
    ):
        seconds = []
        for _ in range(30):
            start = time.perf_counter()
            call()
            seconds.append(time.perf_counter() - start)
        timings[name] = round(float(np.median(seconds)) * 1000, 3)
    return {
        "items": len(rows),
        "triton_version": version,
        "max_abs_diff": float(np.abs(local - remote).max()),
        "ms_p50": timings,
    }


def _tower_bundle(rails: Path) -> str:
    return str(orjson.loads((rails / "pipeline.json").read_bytes())["tower_bundle"])


def _api_env(
    settings: Settings, bundle: Path, redis_url: str, sync_s: float, triton_url: str
) -> dict[str, str]:
    return {
        "RAILTOWER_ARTIFACTS_DIR": str(settings.artifacts_dir),
        "RAILTOWER_SERVING__BUNDLE": str(bundle),
        "RAILTOWER_SERVING__REDIS_URL": redis_url,
        # the item tower on Triton; single sessions are encoded in process either way
        "RAILTOWER_SERVING__TRITON_URL": triton_url,
        "RAILTOWER_SERVING__ENCODE_NEW_ITEMS": "true",
        "RAILTOWER_SERVING__CATALOGUE_SYNC_S": str(sync_s),
        "RAILTOWER_SERVING__BUDGETS__REDIS_MS": "2000",
        "RAILTOWER_SERVING__BUDGETS__USER_VECTOR_MS": "5000",
        "RAILTOWER_SERVING__BUDGETS__RANKER_MS": "5000",
        "RAILTOWER_SERVING__BUDGETS__ADMISSION_MS": "5000",
        "RAILTOWER_SECURITY__RATE_LIMIT_PER_S": "0",
        "RAILTOWER_SHADOW__SINK": "memory",
        "RAILTOWER_LOG_LEVEL": "WARNING",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None, help="rails bundle with towers")
    parser.add_argument("--items", type=int, default=30, help="listings, one at a time")
    parser.add_argument("--retire", type=int, default=20, help="retirements, one at a time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="3 of each: does it work")
    args = parser.parse_args()
    settings = load_settings(log_level="WARNING")
    bundle = (args.bundle or production_pointer(settings)).resolve()
    pipeline = orjson.loads((bundle / "pipeline.json").read_bytes())
    if not pipeline.get("tower_bundle"):
        raise SystemExit(f"{bundle} has no towers: new items need an item tower to be encoded")
    items, retire = (3, 3) if args.quick else (args.items, args.retire)
    catalogue = pd.read_parquet(bundle / "catalogue.parquet")
    rng = np.random.default_rng(args.seed)
    listed = catalogue.dropna(subset=["category_path", "brand", "price"])
    content = listed.iloc[rng.choice(len(listed), min(items, len(listed)), replace=False)]
    anchors = catalogue["item_id"].iloc[rng.choice(len(catalogue), retire, replace=False)]
    sync_s = settings.serving.catalogue_sync_s
    work = settings.cache_dir / "bench-new-items"
    servers: list[LocalServer] = []
    members = []
    try:
        redis_port, kafka_port, grpc_port = free_port(), free_port(), free_port()
        servers.append(redis_server(redis_port, work / "redis").start())
        servers.append(kafka_broker(kafka_port, work / "kafka").start())
        repository = settings.serving.triton_repository
        servers.append(triton_server(repository, grpc_port, free_port(), work / "triton").start())
        triton_url = f"127.0.0.1:{grpc_port}"
        tower = item_tower_on_triton(settings, bundle, content, triton_url)
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        streaming = settings.streaming.model_copy(
            update={
                "bootstrap_servers": f"127.0.0.1:{kafka_port}",
                "events_topic": "bench-new-events",
                "catalogue_topic": "bench-new-catalogue",
                "dead_letter_topic": "bench-new-dlq",
                "group_id": "bench-new-items",
            }
        )
        ensure_topics(streaming)
        env = consumer_env(
            settings,
            streaming,
            bundle,
            redis_url,
            extra={"RAILTOWER_LOG_LEVEL": "WARNING", "RAILTOWER_SERVING__TRITON_URL": triton_url},
        )
        members = start_members(1, env, work / "consumer", prefix="new-items")
        wait_for_assignment(members, streaming.events_topic, streaming.partitions, 300)
        bases = []
        for k in range(REPLICAS):
            port = free_port()
            api = LocalServer(
                f"api-{k}",
                api_command(port),
                port,
                work / f"api-{k}",
                _api_env(settings, bundle, redis_url, sync_s, triton_url),
                240.0,
            )
            servers.append(api.start())
            bases.append(f"http://127.0.0.1:{port}")
        for base in bases:
            wait_ready(base, 240.0)
        producer = KafkaProducer(bootstrap_servers=streaming.bootstrap_servers, acks=1)
        try:
            with httpx.Client() as http:
                listed_runs = listings(http, bases, producer, streaming.catalogue_topic, content)
                topics = (streaming.events_topic, streaming.catalogue_topic)
                retired_runs = retirements(
                    http, bases, producer, topics, anchors.astype(str).tolist()
                )
        finally:
            producer.close()
    finally:
        for member in members:
            member.stop()
        for server in reversed(servers):
            server.stop()
    every = [s for r in listed_runs for s in r["replica_s"]]
    slowest = [max(r["replica_s"]) for r in listed_runs if None not in r["replica_s"]]
    result = {
        "bundle": bundle.name,
        "mode": "quick" if args.quick else "full",
        "replicas": REPLICAS,
        "catalogue_sync_s": sync_s,
        "cpus": os.cpu_count(),
        "listed": len(listed_runs),
        "listed_never_seen": sum(1 for r in listed_runs if None in r["replica_s"]),
        "listed_per_replica": _percentiles([s for s in every if s is not None]),
        "listed_on_every_replica": _percentiles(slowest),
        "retired": len(retired_runs),
        "retired_never_gone": sum(1 for r in retired_runs if r["gone_s"] is None),
        "retired_gone_everywhere": _percentiles(
            [r["gone_s"] for r in retired_runs if r["gone_s"] is not None]
        ),
        "home_rails_cached_before_retire": sum(
            1 for r in retired_runs for s in r["home_before"] if s == "cache"
        ),
        "item_tower": tower,
        "listings": listed_runs,
        "retirements": retired_runs,
    }
    write_report("new_items", result, markdown(result))


def markdown(r: dict[str, Any]) -> str:
    def row(name: str, key: str, goal: str, n: int, missed: int) -> str:
        p = r[key]
        return f"| {name} | {n} | {missed} | {p['p50']} | {p['p95']} | {p['max']} | {goal} |"

    return (
        "\n".join(
            [
                f"# New items live ({r['bundle']}, {r['replicas']} API replicas, {r['cpus']} CPUs, "
                f"catalogue watch every {r['catalogue_sync_s']} s, {r['mode']})",
                "",
                "| publish -> | messages | never | p50 ms | p95 ms | max ms | goal (p95) |",
                "|---|---|---|---|---|---|---|",
                row(
                    "new item served by one replica (its page, item-tower vector)",
                    "listed_per_replica",
                    "",
                    r["listed"] * r["replicas"],
                    r["listed_never_seen"],
                ),
                row(
                    "new item served by every replica",
                    "listed_on_every_replica",
                    "≤ 2,000 ms",
                    r["listed"],
                    r["listed_never_seen"],
                ),
                row(
                    "retired item gone from every replica's page and cached homepage rails",
                    "retired_gone_everywhere",
                    "≤ 1,000 ms",
                    r["retired"],
                    r["retired_never_gone"],
                ),
                "",
                f"Homepage rails served from the cache just before a retirement: "
                f"{r['home_rails_cached_before_retire']} of {r['retired'] * r['replicas']}.",
                "",
                _tower_table(r["item_tower"]),
            ]
        )
        + "\n"
    )


def _tower_table(t: dict[str, Any]) -> str:
    ms = t["ms_p50"]
    return "\n".join(
        [
            f"Item tower on Triton (version {t['triton_version']}) against the same tower in "
            f"process, {t['items']} listings' content as new items: max abs difference "
            f"{t['max_abs_diff']:.2e} (goal ≤ 1e-4).",
            "",
            "| item tower, p50 per call | batch 1 | batch 64 |",
            "|---|---|---|",
            f"| Triton (gRPC, Python backend) | {ms['triton_batch_1']} ms | "
            f"{ms['triton_batch_64']} ms |",
            f"| in process (TorchScript) | {ms['in_process_batch_1']} ms | "
            f"{ms['in_process_batch_64']} ms |",
        ]
    )


if __name__ == "__main__":
    main()
