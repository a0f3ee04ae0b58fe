"""`railtower demo`: the online path for real, end to end, on a few real sessions.

Starts Redis, Triton (when the model has towers), a Kafka-protocol broker and the API as
separate processes on loopback, and a refresh consumer in this process; publishes the
events of a few held-out sessions to the events topic one at a time, shows the homepage
rail changing as each is consumed (refreshed and pre-warmed by the consumer, served from
Redis by the API), then each rail over HTTP with titles and categories, and stops
everything it started.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import httpx
from kafka import KafkaProducer
from rich.console import Console
from rich.table import Table

from devstack.local_services import (
    LocalServer,
    api_command,
    free_port,
    kafka_broker,
    redis_server,
    triton_server,
)
from railtower.datasets import load_dataset
from railtower.errors import RailtowerError
from railtower.schemas import Event, encode
from railtower.settings import Settings, load_dataset_spec
from ranking.rails_bundle import RailsBundle
from serving.app import build_service, production_pointer
from state.session_store import SessionStore
from streaming.consumer import RefreshConsumer
from streaming.topics import ensure_topics
from towers.session_features import HistoryEvent
from training.split import split_events

console = Console()


def run_demo(settings: Settings, sessions: int = 3) -> None:
    bundle = (settings.serving.bundle or production_pointer(settings)).resolve()
    if not bundle.exists():
        raise RailtowerError(f"no rails bundle at {bundle}: run the evaluation and promote first")
    rails = RailsBundle.load(bundle)
    work = settings.cache_dir / "demo"
    started: list[LocalServer] = []
    try:
        redis_port = free_port()
        started.append(redis_server(redis_port, work, settings.serving.redis_maxmemory_mb).start())
        env = {
            "RAILTOWER_SERVING__BUNDLE": str(bundle),
            "RAILTOWER_SERVING__REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "RAILTOWER_LOG_LEVEL": "WARNING",
        }
        if rails.tower_bundle:
            grpc = free_port()
            repo = settings.serving.triton_repository
            started.append(triton_server(repo, grpc, free_port(), work).start())
            env["RAILTOWER_SERVING__TRITON_URL"] = f"127.0.0.1:{grpc}"
        else:
            env["RAILTOWER_SERVING__TRITON_URL"] = ""  # no towers: nothing to ask Triton
        kafka_port = free_port()
        started.append(kafka_broker(kafka_port, work).start())
        streaming = settings.streaming.model_copy(
            update={"bootstrap_servers": f"127.0.0.1:{kafka_port}"}
        )
        ensure_topics(streaming)
        api_port = free_port()
        api = LocalServer(
            "api",
            api_command(api_port),
            api_port,
            work,
            env,
            ready_timeout_s=120,
        )
        started.append(api.start())
        base = f"http://127.0.0.1:{api_port}"
        _wait_ready(base)
        consumer_settings = settings.model_copy(
            update={
                "streaming": streaming,
                "serving": settings.serving.model_copy(
                    update={
                        "bundle": bundle,
                        "redis_url": env["RAILTOWER_SERVING__REDIS_URL"],
                        "triton_url": env["RAILTOWER_SERVING__TRITON_URL"] or None,
                    }
                ),
            }
        )
        service = build_service(consumer_settings)
        consumer = RefreshConsumer(consumer_settings, service)
        stop = threading.Event()
        thread = threading.Thread(target=consumer.run, kwargs={"stop": stop}, daemon=True)
        thread.start()
        producer = KafkaProducer(bootstrap_servers=streaming.bootstrap_servers, acks="all")
        store = SessionStore(env["RAILTOWER_SERVING__REDIS_URL"], 1.0, 50, 3600, 300)
        for session_id, history, context in _sessions(settings, rails, sessions):
            _stream_session(
                base,
                producer,
                streaming.events_topic,
                store,
                rails.version,
                session_id,
                history,
                context,
            )
            _show_session(base, session_id, history)
        stop.set()
        thread.join(timeout=30)
        consumer.close()
        producer.close()
    finally:
        for server in reversed(started):
            server.stop()
        console.print(f"stopped {', '.join(s.name for s in started) or 'nothing'}")


def _wait_ready(base: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RailtowerError(f"the API at {base} was not ready after {timeout_s} s")


def _sessions(settings: Settings, rails: RailsBundle, n: int):  # type: ignore[no-untyped-def]
    """Held-out sessions with at least four events, their history and context."""
    name = rails.evaluation["dataset"]
    dataset = load_dataset(load_dataset_spec(name, settings), settings)
    assert dataset.events is not None
    split = split_events(dataset.events, dataset.has_time, settings.split, settings.seed)
    test = split.test.sort_values(["session_id", "position"], kind="stable")
    sizes = test.groupby("session_id").size()
    chosen = sizes[sizes >= 4].index[:n]
    for session_id in chosen:
        frame = test[test["session_id"] == session_id]
        times = (
            (frame["event_time"].astype("int64") / 1e9).tolist()
            if dataset.has_time
            else [0.0] * len(frame)
        )
        history = [
            HistoryEvent(str(i), str(t), float(s))
            for i, t, s in zip(frame["item_id"], frame["event_type"], times, strict=True)
        ]
        context = next(
            (str(frame[c].iloc[0]) for c in ("device", "locale", "country") if c in frame), None
        )
        yield str(session_id), history, context


def _stream_session(  # noqa: PLR0913
    base: str,
    producer: KafkaProducer,
    topic: str,
    store: SessionStore,
    version: str,
    session_id: str,
    history: list[HistoryEvent],
    context: str | None,
) -> None:
    """Publish the session's events but the last, one by one; after each, the hero rail."""
    console.rule(f"session {session_id}: streaming {len(history) - 1} events through Kafka")
    table = Table(title="homepage_hero as the session's events arrive")
    for column in ("event", "item", "type", "refreshed after", "served_by", "top 5 of the rail"):
        table.add_column(column)
    for k, event in enumerate(history[:-1]):
        message = Event(
            event_id=f"{session_id}-{k}",
            event_time=datetime.fromtimestamp(event.time_s, UTC),
            event_type=event.event_type,
            session_id=session_id,
            item_id=event.item_id,
            device=context,
        )
        before = store.snapshot(session_id, version, None).marker
        sent = time.monotonic()
        producer.send(topic, key=session_id.encode(), value=encode(message))
        producer.flush()
        while time.monotonic() - sent < 30:  # until the consumer applied it and re-warmed
            now = store.snapshot(session_id, version, "homepage_hero")
            if now.marker != before and now.rail is not None:
                break
            time.sleep(0.02)
        waited = time.monotonic() - sent
        reply = httpx.post(
            f"{base}/v1/rails/homepage_hero", json={"session_id": session_id}, timeout=10
        ).json()
        top = " ".join(i["item_id"] for i in reply["items"][:5])
        table.add_row(
            str(k + 1),
            event.item_id,
            event.event_type,
            f"{waited * 1000:.0f} ms",
            reply["served_by"],
            top,
        )
    console.print(table)


def _show_session(base: str, session_id: str, history: list[HistoryEvent]) -> None:
    shown = history[:-1]  # the last event is what the shopper did next: not yet known
    console.print(f"next item the shopper touched: {history[-1].item_id}")
    requests = [
        ("homepage_hero", {"session_id": session_id, "slots": 6}),
        ("pdp_fbt", {"session_id": session_id, "item_id": shown[-1].item_id, "slots": 6}),
        ("cart_upsell", {"session_id": session_id, "cart": [shown[-1].item_id], "slots": 6}),
    ]
    for rail, body in requests:
        reply = httpx.post(f"{base}/v1/rails/{rail}", json=body, timeout=10)
        if reply.status_code != 200:
            console.print(f"{rail}: HTTP {reply.status_code} {reply.text}")
            continue
        data = reply.json()
        table = Table(
            title=(
                f"{rail} · {data['served_by']} · vector {data['vector_source']} · "
                f"{data['timings_ms']['total']:.1f} ms · {data['model_version']}"
            )
        )
        for column in ("slot", "item", "title", "category", "score"):
            table.add_column(column)
        for slot, item in enumerate(data["items"], 1):
            table.add_row(
                str(slot),
                item["item_id"],
                item["title"] or "",
                item["category"] or "",
                f"{item['score']:.3f}",
            )
        console.print(table)
        for reason in data["reasons"]:
            console.print(f"  degraded: {reason}")
