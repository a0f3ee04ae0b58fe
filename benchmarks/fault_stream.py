"""The event side of the fault benchmark: a Kafka-protocol broker, one `railtower consume`
process and a producer sending storefront events at a steady rate while the parts die, then
every event accounted for.

    producer thread --events topic--> broker (tansu) --> railtower consume --> Redis
          | acks (per event)                                  | ledger (per batch)
          v                                                   v
    produced / acknowledged / refused            applied (the sessions' idempotence sets)

The events go to their own sessions (`stream-<k>`), so the request side's seeded sessions
keep exactly their three events. Each event has a unique id and time, so after the run:

- **applied**: its id is in its session's idempotence set in Redis (what the consumer wrote);
- **duplicated**: a session's event list holds the same event twice (a redelivered batch
  applied again; idempotence by event id makes this 0);
- **lost**: the broker acknowledged it and Redis does not have it. Two known causes are
  counted apart: the local broker keeps its log in memory (tansu's build here has no
  durable storage engine; a production Kafka replicates its log), so what it had
  acknowledged but the consumer had not yet read dies with it; and Redis restarted from
  its append-only file, fsynced once a second, forgets up to that last second of writes
  the consumer had already committed.

`kill_broker` SIGKILLs the broker and starts an empty one on the same port (topics
recreated, as an operator would on a fresh cluster); `kill_consumer` SIGKILLs the consumer
mid-batch and starts a new member of the same group.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from kafka import KafkaProducer

from devstack.local_services import LocalServer, free_port, kafka_broker
from railtower.schemas import Event, encode
from railtower.settings import Settings, StreamingSettings
from state.session_store import SessionStore
from streaming.local_group import Member, consumer_env, start_members, wait_for_assignment
from streaming.topics import ensure_topics

# Redis here runs `appendfsync everysec` (devstack.local_services.redis_server); an event
# acknowledged within this many seconds before the Redis kill may have been applied and
# committed, then forgotten by the restart (the fsync second plus the consumer's batch).
REDIS_FSYNC_WINDOW_S = 2.0


@dataclass
class SentEvent:
    event_id: str
    session_id: str
    item_id: str
    sent_at: float
    acked_at: float | None = None
    error: str | None = None


@dataclass
class EventStream:
    """Broker, consumer and producer of one fault run; `start`, kill, `finish`, `stop`."""

    settings: Settings  # artifacts_dir: where the consumer finds the bundle's towers
    bundle: Path
    redis_url: str
    work: Path
    items: list[str]
    sessions: int = 100
    rate_per_s: float = 20.0
    sent: list[SentEvent] = field(default_factory=list)
    broker_killed_at: float | None = None
    redis_killed_at: float | None = None
    # (what restarted, when), for the recovery times
    _restarts: list[tuple[str, float]] = field(default_factory=list)
    applied_ids: set[str] = field(default_factory=set)  # filled by `finish`
    _streaming: StreamingSettings = field(init=False)
    _broker: LocalServer | None = None
    _members: list[Member] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._streaming = self.settings.streaming.model_copy(
            update={
                "bootstrap_servers": f"127.0.0.1:{free_port()}",
                "events_topic": "fault-events",
                "catalogue_topic": "fault-catalogue",
                "dead_letter_topic": "fault-dlq",
                "impressions_topic": "fault-impressions",
                "group_id": "fault-refresh",
                "partitions": 2,
            }
        )

    def start(self) -> EventStream:
        """Broker up, topics made, one consumer holding every partition, producer running."""
        port = int(self._streaming.bootstrap_servers.rsplit(":", 1)[1])
        self._broker = kafka_broker(port, self.work / "kafka-0").start()
        ensure_topics(self._streaming)
        self._start_consumer("consumer-a")
        wait_for_assignment(self._members, self._streaming.events_topic, 2, timeout_s=300)
        self._thread = threading.Thread(target=self._produce, daemon=True)
        self._thread.start()
        return self

    def _start_consumer(self, prefix: str) -> Member:
        env = consumer_env(
            self.settings,
            self._streaming,
            self.bundle,
            self.redis_url,
            extra={"RAILTOWER_LOG_LEVEL": "WARNING"},
        )
        member = start_members(1, env, self.work / prefix, prefix=prefix)[0]
        self._members.append(member)
        return member

    def _produce(self) -> None:
        producer = KafkaProducer(
            bootstrap_servers=self._streaming.bootstrap_servers,
            acks="all",
            retries=1_000_000,  # a shop's event source retries for as long as it takes
            # Not kafka-python's idempotent producer: its producer id lives in the broker, and
            # the memory broker forgets it on a restart, after which every send fails
            # (UnknownProducerId, then a fatal InitProducerId error). The consumer applies
            # each event id once whatever the producer does.
            enable_idempotence=False,
            linger_ms=5,
            max_block_ms=5_000,  # a send while the broker is away fails fast instead
            reconnect_backoff_max_ms=500,
        )
        start = datetime.now(UTC)
        n = 0
        try:
            while not self._stop.is_set():
                self._send_one(producer, n, start)
                n += 1
                self._stop.wait(1.0 / self.rate_per_s)
            producer.flush(timeout=60)
        finally:
            producer.close(timeout=10)

    def _send_one(self, producer: KafkaProducer, n: int, start: datetime) -> None:
        session = f"stream-{n % self.sessions}"
        item = self.items[(13 * n) % len(self.items)]
        event = Event(
            event_id=f"fault-{n}",
            event_time=start + timedelta(milliseconds=n),
            event_type="view",
            session_id=session,
            item_id=item,
        )
        record = SentEvent(event.event_id, session, item, time.time())
        with self._lock:
            self.sent.append(record)
        try:
            future = producer.send(
                self._streaming.events_topic, key=session.encode(), value=encode(event)
            )
        except Exception as exc:  # noqa: BLE001 - refused at once: the source knows, not lost
            record.error = type(exc).__name__
            return
        future.add_callback(lambda _meta: setattr(record, "acked_at", time.time()))
        future.add_errback(lambda exc: setattr(record, "error", type(exc).__name__))

    def kill_broker(self, down_s: float) -> None:
        """SIGKILL the broker; after `down_s` an empty one on the same port, topics remade."""
        assert self._broker is not None
        port = self._broker.port
        self.broker_killed_at = time.time()
        self._broker.kill()
        time.sleep(down_s)
        self._broker = kafka_broker(port, self.work / "kafka-1").start()
        ensure_topics(self._streaming)
        self._restarts.append(("broker", time.time()))

    def kill_consumer(self, down_s: float) -> None:
        """SIGKILL the consumer (no commit, no goodbye); after `down_s` a new member."""
        self._members[-1].kill()
        time.sleep(down_s)
        self._start_consumer("consumer-b")
        self._restarts.append(("consumer", time.time()))

    def mark_redis_kill(self) -> None:
        self.redis_killed_at = time.time()

    def _next_batch_after(self, since: float, timeout_s: float) -> float | None:
        """Seconds from `since` to the next batch any consumer applied with new events;
        None if none does within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            later = [
                x["t"]
                for m in self._members
                for x in m.lines("applied")
                if x["t"] > since and x["new_events"]
            ]
            if later:
                return round(min(later) - since, 3)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.2)

    def finish(self, settle_s: float = 60.0) -> dict[str, Any]:
        """Stop producing, wait until the consumer has applied what the broker still holds
        (or `settle_s`), and account for every event."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=90)
        recovery = {kind: self._next_batch_after(at, 30.0) for kind, at in self._restarts}
        store = SessionStore(self.redis_url, 5.0, 50, 3600, 300)
        wanted = {e.event_id for e in self.sent if e.acked_at is not None}
        deadline = time.monotonic() + settle_s
        applied = self._applied(store)
        while not wanted <= applied and time.monotonic() < deadline:
            time.sleep(1.0)
            grown = self._applied(store)
            if grown == applied and self._idle(5.0):
                break  # nothing more is coming: the rest is lost
            applied = grown
        self.applied_ids = applied
        return self._account(store, applied) | {"recovery_s": recovery}

    def per_phase(self, starts: dict[str, float]) -> list[dict[str, Any]]:
        """Events by the phase they were sent in (`starts`: phase -> wall-clock start)."""
        order = sorted(starts.items(), key=lambda kv: kv[1])
        rows = {
            name: {"phase": name, "sent": 0, "acknowledged": 0, "applied": 0, "lost": 0}
            for name, _ in order
        }
        for e in self.sent:
            name = next((n for n, at in reversed(order) if e.sent_at >= at), order[0][0])
            row = rows[name]
            row["sent"] += 1
            row["applied"] += e.event_id in self.applied_ids
            if e.acked_at is not None:
                row["acknowledged"] += 1
                row["lost"] += e.event_id not in self.applied_ids
        return list(rows.values())

    def _idle(self, seconds: float) -> bool:
        last = max((x["t"] for m in self._members for x in m.lines("applied")), default=0.0)
        return time.time() - last > seconds

    def _applied(self, store: SessionStore) -> set[str]:
        ids: set[str] = set()
        for k in range(self.sessions):
            ids |= store.applied_event_ids(f"stream-{k}")
        return ids

    def _account(self, store: SessionStore, applied: set[str]) -> dict[str, Any]:
        acked = [e for e in self.sent if e.acked_at is not None]
        lost = [e for e in acked if e.event_id not in applied]
        duplicated = 0
        for k in range(self.sessions):
            events = store.snapshot(f"stream-{k}", "any", None).events
            duplicated += len(events) - len({(e.item_id, e.time_s) for e in events})
        in_broker = [e for e in lost if _before(e.acked_at, self.broker_killed_at)]
        # Redis fsyncs its append-only file once a second: up to that second is forgotten
        in_redis = [
            e
            for e in lost
            if e not in in_broker
            and self.redis_killed_at is not None
            and _before(e.acked_at, self.redis_killed_at)
            and e.acked_at > self.redis_killed_at - REDIS_FSYNC_WINDOW_S  # type: ignore[operator]
        ]
        return {
            "produced": len(self.sent),
            "acknowledged": len(acked),
            "refused_to_producer": sum(e.error is not None for e in self.sent),
            "unanswered": sum(e.acked_at is None and e.error is None for e in self.sent),
            "applied": len(applied & {e.event_id for e in self.sent}),
            "duplicated": duplicated,
            # events a consumer read again (a killed member's uncommitted batch) and skipped
            "redelivered": sum(x["duplicates"] for m in self._members for x in m.lines("applied")),
            "lost": len(lost),
            "lost_with_broker_memory": len(in_broker),
            "lost_with_redis_last_second": len(in_redis),
            "lost_other": len(lost) - len(in_broker) - len(in_redis),
            "lost_ids": sorted(e.event_id for e in lost)[:50],
            # a member that exited by itself (not our SIGKILL: -9) is a consumer that died
            "consumer_exits": [m.process.poll() for m in self._members],
        }

    def stop(self) -> None:
        self._stop.set()
        for member in self._members:
            if member.alive:
                member.stop()
        if self._broker is not None:
            self._broker.stop()


def _before(at: float | None, moment: float | None) -> bool:
    return at is not None and moment is not None and at <= moment
