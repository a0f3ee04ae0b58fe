"""The refresh consumer: events and catalogue changes from Kafka into Redis, at least once.

One micro-batch (`step`):

1. poll up to `streaming.max_batch` records from the events and catalogue topics;
2. decode each; a malformed one goes to the dead-letter topic with its reason and its
   original bytes (flushed before anything is committed: a rejected message is kept too);
3. publish the batch's catalogue changes (price, stock; item_upsert listings and
   item_retire) for every API process and apply them here, merged per item (a batch's new
   listings are encoded together and indexed by one swap), append each session's new events
   to Redis (idempotent by event id, atomic; one pipelined round trip), and append the
   batch's prices (events' prices and price updates) to the price stream
   (state.price_store, idempotent by event / update id), then extend the served model's
   price history from it, so deals and the re-ranker's price features see them before the
   rails are re-warmed;
4. recompute the session vector (Triton or in-process) and the homepage rail of every
   session in the batch, redelivered ones included, in one batch (`RailRefresher.prewarm`,
   the API's serving.prewarm: the rail engine's stages, the rules and the state markers), so
   the API answers them from the pre-warmed cache;
5. commit the offsets, only now: a crash before this replays the batch, and step 3 makes the
   replay change nothing that was already applied.

The freshness of a refresh is measured from the record's producer timestamp to the end of
its batch's Redis writes.

Scale-out is Kafka's own consumer group: run several `railtower consume` processes with one
`streaming.group_id`; the broker splits the events topic's partitions between them (a session
is keyed to one partition, so one member applies it, in order) and hands a dead member's
partitions to the others after its session timeout. What the dead member applied but did not
commit is read again by the new owner; step 3 absorbs it. Each member has a name
(`member_id`: the Kafka client id, so the broker's member ids and the logs say which process
holds what), logs every assignment and revocation, and can keep a ledger: one JSON line per
batch with the offsets it applied and, separately, that it committed them, so an operator
(or a test) can tell exactly what a killed member left uncommitted.

One module on purpose: the order of a step (decode, append, publish, pre-warm, commit) is
the at-least-once guarantee, so it is read in one place with the batch and ledger types it
passes along; Redis state lives in state/, the pre-warm in the API's RailRefresher.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import orjson
import redis
from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError

from railtower.heap import collector_held
from railtower.logs import get_logger
from railtower.schemas import (
    ItemRetire,
    ItemUpsert,
    MalformedMessage,
    decode_catalogue_message,
    decode_event,
)
from railtower.settings import Settings
from state.price_store import PricePoint
from state.session_store import SessionStore
from towers.session_features import HistoryEvent

log = get_logger(__name__)


@dataclass
class BatchReport:
    records: int = 0
    new_events: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    # catalogue-topic messages applied (of which item_upsert and item_retire below)
    catalogue_updates: int = 0
    upserts: int = 0
    retirements: int = 0
    # new price observations (events' prices and price updates) added to the price stream
    price_points: int = 0
    sessions_refreshed: int = 0
    seconds: float = 0.0
    # records still waiting on this member's partitions after the batch (consumer lag)
    lag_records: int = 0
    # seconds from each applied event's producer timestamp to its session's refresh
    freshness_s: list[float] = field(default_factory=list)
    # "topic:partition" -> (first offset, last offset, records) polled in this batch
    offsets: dict[str, tuple[int, int, int]] = field(default_factory=dict)


class MemberLedger:
    """Append-only JSON lines of what one member did: assignments, batches applied, commits.

    Each line is written and flushed before the member goes on, so after a SIGKILL the file
    still says which offsets it applied and which of those it committed.
    """

    def __init__(self, path: Path, member_id: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.member_id = path, member_id
        self._file = path.open("ab", buffering=0)  # unbuffered: one write() per line

    def write(self, kind: str, **fields: Any) -> None:
        line = {"kind": kind, "member": self.member_id, "pid": os.getpid(), "t": time.time()}
        self._file.write(orjson.dumps({**line, **fields}) + b"\n")

    def close(self) -> None:
        self._file.close()


def read_ledger(path: Path) -> list[dict[str, Any]]:
    """A ledger's lines; a last line cut short by a kill is left out."""
    lines = []
    for raw in path.read_bytes().splitlines():
        try:
            lines.append(orjson.loads(raw))
        except orjson.JSONDecodeError:
            continue
    return lines


@dataclass(frozen=True)
class SessionEvent:
    """One events-topic record as the session store takes it."""

    session_id: str
    event_id: str
    history: HistoryEvent
    # the event's context (device, else locale, else country)
    context: str | None
    user_id: str | None
    price: float | None


def read_session_event(raw: bytes | None) -> SessionEvent:
    """Decode one events-topic record (railtower.schemas.decode_event) into what the session
    store takes: the one decoding of the refresh consumer and of `railtower rebuild-state`.

    Raises:
        MalformedMessage: not a valid event (its reason, as the dead-letter topic records
            it), or one that decodes but cannot be applied ("cannot be applied: <error>").
    """
    event = decode_event(raw)
    try:
        history = HistoryEvent(event.item_id, event.event_type, event.event_time.timestamp())
    except Exception as exc:  # noqa: BLE001 - decoded but not appliable: never retried
        raise MalformedMessage(f"cannot be applied: {type(exc).__name__}: {exc}") from exc
    context = event.device or event.locale or event.country
    return SessionEvent(
        event.session_id, event.event_id, history, context, event.user_id, event.price
    )


class SessionBatch:
    """Events grouped by session, appended to the store in one pipeline (one Lua script per
    session: idempotent by event id, atomic), in the order they were added."""

    def __init__(self) -> None:
        self.events: dict[str, list[tuple[str, HistoryEvent, str | None]]] = defaultdict(list)
        # the users each session's events name: deleting a user finds these sessions
        self.users: dict[str, set[str]] = defaultdict(set)

    def add(self, event: SessionEvent) -> None:
        self.events[event.session_id].append((event.event_id, event.history, event.context))
        if event.user_id:
            self.users[event.session_id].add(event.user_id)

    def append_to(self, store: SessionStore) -> dict[str, int]:
        """Append every session's events (one pipelined round trip on one Redis); session id
        -> how many were new (the rest had been applied before).

        Raises:
            redis.RedisError: Redis is down (the batch is not committed and is read again).
        """
        return store.append_many(
            {s: (events, self.users.get(s, ())) for s, events in self.events.items()}
        )


def merge_changes(
    changes: Sequence[tuple[str, Mapping[str, object]]],
) -> dict[str, dict[str, object]]:
    """Item -> its changes merged in order, as the catalogue hash in Redis merges them (a
    null field keeps the earlier value; state.session_store)."""
    merged: dict[str, dict[str, object]] = {}
    for item_id, change in changes:
        record = merged.setdefault(item_id, {})
        record.update({k: v for k, v in change.items() if v is not None or k not in record})
    return merged


def consumer_settings(settings: Settings) -> Settings:
    """`settings` as the consumer's service uses them: its Redis client waits
    `streaming.redis_timeout_ms`, not the API's per-request Redis budget."""
    budgets = settings.serving.budgets.model_copy(
        update={"redis_ms": settings.streaming.redis_timeout_ms}
    )
    serving = settings.serving.model_copy(update={"budgets": budgets})
    return settings.model_copy(update={"serving": serving})


def default_member_id() -> str:
    return f"refresh-{socket.gethostname()}-{os.getpid()}"


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Logs (and writes to the ledger) every partition the group gives or takes away."""

    def __init__(self, member: RefreshConsumer) -> None:
        self.member = member

    def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        self.member._membership("revoked", revoked)

    def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self.member._membership("assigned", assigned)


class RailRefresher(Protocol):
    """What the consumer needs of the served model. The API's `RailService` is one (the CLI
    hands it over), so streaming never imports serving: the two meet in the state they
    share (state/) and the rail engine (ranking/)."""

    store: SessionStore | None

    def append_prices(self, points: Sequence[PricePoint]) -> int: ...

    def sync_prices(self) -> int: ...

    def prewarm(
        self, session_ids: Sequence[str], users: Mapping[str, str] | None = None
    ) -> int: ...

    def apply_catalogue_records(self, records: Mapping[str, Mapping[str, object]]) -> int: ...


class RefreshConsumer:
    """One member of the refresh consumer group.

    Args:
        settings: the streaming section names the topics, the group and the batch size.
        service: the served model's refresher (serving.service.RailService, wired by the
            CLI): its store takes the events, and it pre-warms the sessions they touch.
        member_id: this member's name (the Kafka client id); default host and PID.
        ledger: a file to append one JSON line per assignment, applied batch and commit.
    """

    def __init__(
        self,
        settings: Settings,
        service: RailRefresher,
        member_id: str | None = None,
        ledger: Path | None = None,
    ) -> None:
        s = settings.streaming
        self.settings, self.service = settings, service
        self.member_id = member_id or default_member_id()
        self.ledger = MemberLedger(ledger, self.member_id) if ledger is not None else None
        self._batches = 0
        self.consumer = self._new_consumer()
        self.dead_letters = KafkaProducer(
            bootstrap_servers=s.bootstrap_servers, acks="all", retries=5
        )
        self._pending_letters: list = []  # type: ignore[type-arg]

    def _new_consumer(self) -> KafkaConsumer:
        s = self.settings.streaming
        consumer = KafkaConsumer(
            bootstrap_servers=s.bootstrap_servers,
            group_id=s.group_id,
            # the broker names the member "<client id>-<uuid>": logs and tools show who it is
            client_id=self.member_id,
            enable_auto_commit=False,  # offsets move only after the Redis writes
            auto_offset_reset="earliest",
            max_poll_records=s.max_batch,
            session_timeout_ms=6000,
            heartbeat_interval_ms=1000,
            max_poll_interval_ms=120_000,
        )
        consumer.subscribe([s.events_topic, s.catalogue_topic], listener=_Rebalance(self))
        return consumer

    def _membership(self, kind: str, partitions: Iterable[TopicPartition]) -> None:
        names = sorted(f"{tp.topic}:{tp.partition}" for tp in partitions)
        log.info(f"partitions {kind}", member=self.member_id, partitions=names)
        if self.ledger is not None:
            self.ledger.write(kind, partitions=names)

    def close(self) -> None:
        """Leave the group (the others take this member's partitions at once, not after the
        session timeout); nothing uncommitted is committed."""
        self.consumer.close(autocommit=False)
        self.dead_letters.close()
        if self.ledger is not None:
            self.ledger.write("closed")
            self.ledger.close()

    def step(self) -> BatchReport:
        """Consume, apply and commit one micro-batch (with the cycle collector held off
        until it is done: railtower.heap.collector_held)."""
        with collector_held():
            return self._step()

    def _step(self) -> BatchReport:
        s = self.settings.streaming
        started = time.monotonic()
        report = BatchReport()
        polled = self.consumer.poll(timeout_ms=s.poll_timeout_ms, max_records=s.max_batch)
        batch = SessionBatch()
        produced_at: dict[str, list[float]] = defaultdict(list)
        prices: list[PricePoint] = []
        # (item, change, the message it came from), in topic order
        catalogue: list[tuple[str, dict[str, object], Any]] = []
        for partition, records in polled.items():
            if records:
                report.offsets[f"{partition.topic}:{partition.partition}"] = (
                    records[0].offset,
                    records[-1].offset,
                    len(records),
                )
            for record in records:
                report.records += 1
                try:
                    if partition.topic == s.catalogue_topic:
                        catalogue.append((*self._catalogue(record.value, report, prices), record))
                        continue
                    event = read_session_event(record.value)
                except MalformedMessage as exc:
                    self._dead_letter(record, exc.reason, report)
                    continue
                except (redis.RedisError, KafkaError):
                    raise  # a part is down, not the message: the batch is retried
                except Exception as exc:  # noqa: BLE001 - one message must not stop the group
                    # decoded but not appliable (an event's own case is read_session_event's):
                    # never retried forever (the batch would never commit and every member
                    # taking the partition would die on it in turn)
                    reason = f"cannot be applied: {type(exc).__name__}: {exc}"
                    self._dead_letter(record, reason, report)
                    continue
                if event.price is not None:
                    # the price the shopper saw is an observation of the item's price, as
                    # the training window's events were (ranking.business_features)
                    prices.append(
                        PricePoint(
                            event.event_id, event.history.item_id, event.history.time_s, event.price
                        )
                    )
                batch.add(event)
                produced_at[event.session_id].append(record.timestamp / 1000)
        store = self.service.store
        if catalogue:
            self._apply_catalogue(catalogue, report)
        if self._pending_letters:
            self.dead_letters.flush()
            for future in self._pending_letters:
                future.get(timeout=10)  # raises if the broker did not take it: no commit
            self._pending_letters = []
        touched, redelivered = [], []
        for session_id, added in batch.append_to(store).items():  # type: ignore[arg-type]
            report.new_events += added
            report.duplicates += len(batch.events[session_id]) - added
            # Nothing new is a redelivery, perhaps of a batch whose member died between this
            # append and the pre-warm below: its rail is warmed again, or it stays cold.
            (touched if added else redelivered).append(session_id)
        if self.ledger is not None and report.records:
            self._batches += 1
            self.ledger.write(
                "applied",
                batch=self._batches,
                offsets=report.offsets,
                records=report.records,
                new_events=report.new_events,
                duplicates=report.duplicates,
            )
        if prices:
            report.price_points = self.service.append_prices(prices)
        if report.records:
            # the one path by which serving learns prices: this process reads the stream
            # like every API process does (before re-warming: rails see the new prices);
            # an idle poll touches no Redis
            self.service.sync_prices()
        # one encoder call and one pipeline pass for every touched session of the batch
        warm = touched + redelivered
        users = batch.users
        self.service.prewarm(warm, {s: min(users[s]) for s in warm if users.get(s)})
        now = time.time()
        for session_id in touched:
            report.freshness_s += [now - t for t in produced_at[session_id]]
        report.sessions_refreshed = len(touched)
        if report.records:
            self.consumer.commit()
            if self.ledger is not None:
                self.ledger.write("committed", batch=self._batches)
            report.lag_records = self._lag()
        report.seconds = time.monotonic() - started
        if report.records:
            worst = max(report.freshness_s, default=0.0)
            log_fn = log.warning if worst > s.refresh_bound_s else log.info
            log_fn(
                "batch applied",
                member=self.member_id,
                records=report.records,
                new_events=report.new_events,
                duplicates=report.duplicates,
                dead_letters=report.dead_letters,
                catalogue_updates=report.catalogue_updates,
                upserts=report.upserts,
                retirements=report.retirements,
                price_points=report.price_points,
                sessions=report.sessions_refreshed,
                lag_records=report.lag_records,
                freshness_p50_s=round(float(np.median(report.freshness_s)), 3)
                if report.freshness_s
                else None,
                freshness_max_s=round(worst, 3),
            )
        return report

    def _lag(self) -> int:
        assigned = list(self.consumer.assignment())
        if not assigned:
            return 0
        ends = self.consumer.end_offsets(assigned)
        return int(sum(max(0, ends[tp] - self.consumer.position(tp)) for tp in assigned))

    def _apply_catalogue(
        self, catalogue: Sequence[tuple[str, dict[str, object], Any]], report: BatchReport
    ) -> None:
        """Publish the batch's catalogue changes (every API process then applies them) and
        apply them here merged per item, as Redis merged them: one encoding batch and one
        index swap for a batch's new listings, whatever their number. Should applying fail
        for a reason other than a part being down, each item is applied alone and the
        messages of one that still fails go to the dead-letter topic with the reason (one
        bad record must not make the batch fail for ever)."""
        changes = [(item, change) for item, change, _ in catalogue]
        self.service.store.put_catalogue_records(changes)  # type: ignore[union-attr]
        merged = merge_changes(changes)
        try:
            self.service.apply_catalogue_records(merged)
            return
        except (redis.RedisError, KafkaError):
            raise  # a part is down, not the message: the batch is retried
        except Exception as exc:  # noqa: BLE001 - find the item, keep the others
            log.warning("catalogue batch not applied; applying item by item", error=str(exc))
        for item_id, record in merged.items():
            try:
                self.service.apply_catalogue_records({item_id: record})
            except (redis.RedisError, KafkaError):
                raise
            except Exception as exc:  # noqa: BLE001 - this item's messages are dead letters
                reason = f"cannot be applied: {type(exc).__name__}: {exc}"
                for item, _, message in catalogue:
                    if item == item_id:
                        self._dead_letter(message, reason, report)

    def _catalogue(
        self, raw: bytes | None, report: BatchReport, prices: list[PricePoint]
    ) -> tuple[str, dict[str, object]]:
        """One catalogue message as (item, the change to merge into its record in Redis,
        from where every API process and every model load applies it); its price joins
        the batch's price observations."""
        message = decode_catalogue_message(raw)
        record: dict[str, object]
        if isinstance(message, ItemRetire):
            record = {"retired": True}  # kept by later merges until an upsert re-lists it
            report.retirements += 1
        elif isinstance(message, ItemUpsert):
            record = message.listing()
            report.upserts += 1
        else:
            record = {"price": message.price, "stock": message.stock}
        price = record.get("price")
        if isinstance(price, int | float):
            prices.append(
                PricePoint(message.update_id, message.item_id, message.time.timestamp(), price)
            )
        report.catalogue_updates += 1
        return message.item_id, record

    def _dead_letter(self, record, reason: str, report: BatchReport) -> None:  # type: ignore[no-untyped-def]
        headers = [
            ("reason", reason.encode()),
            ("source_topic", record.topic.encode()),
            ("source_partition", str(record.partition).encode()),
            ("source_offset", str(record.offset).encode()),
        ]
        self._pending_letters.append(
            self.dead_letters.send(
                self.settings.streaming.dead_letter_topic,
                key=record.key,
                value=record.value if record.value is not None else b"",
                headers=headers,
            )
        )
        report.dead_letters += 1
        log.warning("dead letter", reason=reason, topic=record.topic, offset=record.offset)

    def run(
        self, stop_after_idle_s: float | None = None, stop: threading.Event | None = None
    ) -> None:
        """Consume until interrupted (or, with `stop_after_idle_s`, until the topic is quiet).

        A batch that fails (Redis or the broker gone) is not committed: the consumer backs
        off, rejoins the group (retrying for as long as the broker is away) and resumes from
        the last committed offset, so the batch is applied again once the part is back (and
        changes nothing it already applied).
        """
        idle_since = time.monotonic()
        while stop is None or not stop.is_set():
            try:
                report = self.step()
            except (redis.RedisError, KafkaError) as exc:
                log.warning("batch failed; rejoining from the committed offset", error=str(exc))
                self._rejoin_until_back(stop)
                continue
            if report.records:
                idle_since = time.monotonic()
            elif (
                stop_after_idle_s is not None and time.monotonic() - idle_since > stop_after_idle_s
            ):
                return

    def _rejoin_until_back(self, stop: threading.Event | None) -> None:
        """Rejoin the group, retrying with a capped backoff for as long as the broker is
        away: an outage of any length leaves the process up, and it resumes by itself."""
        delay, attempts = 0.5, 0
        while stop is None or not stop.is_set():
            time.sleep(delay)
            attempts += 1
            try:
                self.rejoin()
            except KafkaError as exc:
                log.warning(
                    "broker unreachable; retrying",
                    member=self.member_id,
                    attempts=attempts,
                    retry_in_s=min(delay * 2, 10.0),
                    error=str(exc),
                )
                delay = min(delay * 2, 10.0)
                continue
            if attempts > 1:
                log.info("rejoined the group", member=self.member_id, attempts=attempts)
            return

    def rejoin(self) -> None:
        """A fresh group member: it starts from the committed offsets, not past them.

        The failed batch's dead letters are sent again with it (at least once, like events).
        """
        self._pending_letters = []
        try:
            self.consumer.close(autocommit=False)
        except KafkaError:
            pass
        self.consumer = self._new_consumer()
