"""Where impressions go, and how often each catalogue item was shown.

    request / shadow thread --log()--> bounded buffer --sink thread--> Kafka topic | memory
                                                                  \\-> Redis daily counts

`log()` never blocks: it puts the impression in a bounded buffer and returns; a full buffer
drops the impression and counts it (`railtower_impressions_total{outcome="dropped"}`). The
sink's own background thread publishes (kafka-python batches by `linger_ms`) and adds the
shown items to the per-day counts in Redis, so neither Kafka nor Redis is ever on the
request path. The counts are summed in the sink thread and written at most once per
`_COUNT_EVERY_S` (and at every flush and close): a popular item is shown on many rails a
second, and one HINCRBY for all of them instead of one per 50 ms batch roughly halved the
commands, which were a tenth of a busy API process's interpreter time. A crash loses at most
that second of counts; they are exposure statistics, not orders.

Per-item counts (for the console's "items nobody saw"): one Redis hash per UTC day,

    rt:imp:<yyyymmdd>    field <item id> -> times shown that day, TTL shadow.count_ttl_days

Every command touches one key, so on Redis Cluster the pipelines (one per batch, one per
console read) simply go to the nodes that own each day's slot.

Only shown impressions (the production arm) count. The key has no model version on
purpose: exposure belongs to the catalogue item, whichever model chose it, so a promotion
halfway through a window must not reset the counts.

One module on purpose: the buffered sinks (memory, Kafka) and the per-day counts they
write are one pipeline behind `make_sink`; the console reads the counts back through
`items_without_impressions`.
"""

from __future__ import annotations

import itertools
import queue
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Protocol

import redis
from kafka import KafkaProducer
from kafka.errors import KafkaError

from railtower.errors import RailtowerError
from railtower.logs import get_logger
from railtower.schemas import Impression, decode_impression, encode
from railtower.settings import Settings, StreamingSettings
from serving.metrics import Metrics
from state.redis_client import RedisClient

log = get_logger(__name__)

_BATCH = 500  # impressions the sink thread takes from its buffer at once
# How long the sink thread gathers a batch after its first impression: one Redis pipeline
# per batch rather than per request (a pipeline per impression cost the API process about a
# millisecond of CPU per rail at low traffic).
_LINGER_S = 0.05
_COUNT_EVERY_S = 1.0  # how often the summed per-item counts go to Redis
_WARN_EVERY_S = 60.0  # a broken Redis or broker is logged once a minute, not per batch


class ImpressionSinkError(RailtowerError):
    """The configured impression sink cannot be used (e.g. `shadow.sink: kafka`, no broker)."""


class ImpressionSink(Protocol):
    """Where impressions go. `log` must return at once whatever the backend is doing."""

    def log(self, impression: Impression) -> bool:
        """Hand over one impression; False when it was dropped (buffer full, closed)."""
        ...

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything logged so far is published; False on timeout."""
        ...

    def close(self) -> None:
        """Flush, stop the background thread and release the backend."""
        ...


def arm_kind(arm: str) -> str:
    """The metrics label of an arm: "production", "challenger" or "rules" (low cardinality)."""
    return arm.split(":", 1)[0]


# ----------------------------------------------------------------------- per-item counts


def day_key(day: date) -> str:
    return f"rt:imp:{day:%Y%m%d}"


class ImpressionCounts:
    """Per-item daily counts of shown impressions in Redis (see the module docstring)."""

    def __init__(self, client: RedisClient, ttl_days: int) -> None:
        self.client, self.ttl_s = client, ttl_days * 86400
        self._pending: dict[str, Counter[str]] = {}

    def add(self, impressions: Sequence[Impression]) -> int:
        """Sum the shown items of `impressions` into the pending counts; return items added."""
        added = 0
        for impression in impressions:
            if impression.shown:
                key = day_key(impression.served_at.astimezone(UTC).date())
                self._pending.setdefault(key, Counter()).update(impression.items)
                added += len(impression.items)
        return added

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def write(self) -> int:
        """Add the pending counts to their days' hashes in Redis; return items written.

        One pipeline, one HINCRBY per (day, item) with the summed count. Raises
        redis.RedisError when Redis is down; the counts stay pending for the next write.
        """
        if not self._pending:
            return 0
        pipe = self.client.pipeline(transaction=False)
        for key, counts in self._pending.items():
            for item, n in counts.items():
                pipe.hincrby(key, item, n)
            pipe.expire(key, self.ttl_s)
        pipe.execute()
        written = sum(sum(c.values()) for c in self._pending.values())
        self._pending = {}
        return written

    def record(self, impressions: Sequence[Impression]) -> int:
        """`add` then `write`: the shown items of `impressions` counted in Redis now."""
        self.add(impressions)
        return self.write()


def items_without_impressions(
    redis_client: RedisClient, catalogue_ids: Iterable[str], days: int, now: datetime
) -> list[str]:
    """Catalogue items shown on no rail over the last `days` UTC days (today included).

    Args:
        redis_client: the Redis the sinks count into.
        catalogue_ids: the items to check, e.g. the served model's catalogue.
        days: window length in whole UTC days, ending with `now`'s day (1 = today only).
        now: timezone-aware end of the window.

    Returns:
        The ids of `catalogue_ids` (in their order) with no shown impression in the window.
    """
    if days < 1:
        raise ValueError(f"days must be at least 1 (1 = today only), got {days}")
    if now.utcoffset() is None:
        raise ValueError("now must be timezone-aware, e.g. datetime.now(UTC)")
    today = now.astimezone(UTC).date()
    pipe = redis_client.pipeline(transaction=False)
    for back in range(days):
        pipe.hkeys(day_key(today - timedelta(days=back)))
    shown = {item.decode() for items in pipe.execute() for item in items}
    return [item for item in catalogue_ids if item not in shown]


# ----------------------------------------------------------------------------- the sinks


class _Flush:
    """A marker in the buffer: set once every impression before it is published."""

    def __init__(self) -> None:
        self.done = threading.Event()


class _Idle:
    """No impression came for a while: the sink thread's cue to write pending counts."""


class _BufferedSink:
    """The common half of every sink: a bounded buffer drained by one background thread."""

    def __init__(
        self, metrics: Metrics, counts: ImpressionCounts | None, queue_size: int, name: str
    ) -> None:
        self.metrics, self.counts = metrics, counts
        self._buffer: queue.Queue[Impression | _Flush | None] = queue.Queue(queue_size)
        self._closed = False
        self._warned_at = 0.0
        # set by flush() and close(): ends the sink thread's linger at once
        self._urgent = threading.Event()
        self._thread = threading.Thread(target=self._drain, name=name, daemon=True)
        self._thread.start()

    def log(self, impression: Impression) -> bool:
        if not self._closed:
            try:
                self._buffer.put_nowait(impression)
                return True
            except queue.Full:
                pass
        self.metrics.impressions.labels(arm=arm_kind(impression.arm), outcome="dropped").inc()
        return False

    def flush(self, timeout_s: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout_s
        marker = _Flush()
        try:
            self._buffer.put(marker, timeout=timeout_s)
        except queue.Full:
            return False
        self._urgent.set()
        if not marker.done.wait(max(0.0, deadline - time.monotonic())):
            return False
        return self._flush_backend(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
        self._closed = True
        self._buffer.put(None)
        self._urgent.set()
        self._thread.join(timeout=10)
        self._close_backend()

    def _drain(self) -> None:
        written_at = time.monotonic()
        while True:
            try:
                # with counts pending, wake up to write them even if no impression comes
                wait = _COUNT_EVERY_S if self.counts is not None and self.counts.pending else None
                first: Impression | _Flush | _Idle | None = self._buffer.get(timeout=wait)
            except queue.Empty:
                first = _Idle()
            batch, markers = [], []
            stop = False
            for entry in self._take(first):
                if entry is None:
                    stop = True
                elif isinstance(entry, _Flush):
                    markers.append(entry)
                elif isinstance(entry, Impression):
                    batch.append(entry)
            if batch:
                self._publish(batch)
            if self.counts is not None:
                self.counts.add(batch)
                if markers or stop or time.monotonic() - written_at >= _COUNT_EVERY_S:
                    self._write_counts(self.counts)
                    written_at = time.monotonic()
            for marker in markers:
                marker.done.set()
            if stop:
                return

    def _take(
        self, first: Impression | _Flush | _Idle | None
    ) -> list[Impression | _Flush | _Idle | None]:
        """`first` and what is buffered `_LINGER_S` later, up to a flush marker or the stop.

        The thread sleeps through the linger and then takes what is there, rather than
        waking for every impression: a wake-up and a GIL hand-over per request took a
        cached read from 0.72 to about 0.82 ms of the API's CPU at 1,200 req/s. flush()
        and close() cut the linger short, so they never wait on it.
        """
        taken = [first]
        if not isinstance(first, Impression):
            return taken
        self._urgent.wait(_LINGER_S)
        self._urgent.clear()
        while len(taken) < _BATCH and isinstance(taken[-1], Impression):
            try:
                taken.append(self._buffer.get_nowait())
            except queue.Empty:
                break
        return taken

    def _write_counts(self, counts: ImpressionCounts) -> None:
        try:
            counts.write()
        except redis.RedisError as exc:
            self.metrics.errors.labels(kind="impression_counts").inc()
            self._warn("impression counts not written to Redis", error=str(exc))

    def _warn(self, message: str, **fields: object) -> None:
        now = time.monotonic()
        if now - self._warned_at > _WARN_EVERY_S:
            self._warned_at = now
            log.warning(message, **fields)

    # the backend half, per sink
    def _publish(self, batch: Sequence[Impression]) -> None:
        raise NotImplementedError

    def _flush_backend(self, timeout_s: float) -> bool:  # noqa: ARG002 - memory needs none
        return True

    def _close_backend(self) -> None:
        return None


class MemoryImpressionSink(_BufferedSink):
    """Impressions kept in this process (the newest `keep`): the quick first run and tests.

    `dump_jsonl` writes them as the offline shadow evaluator reads them: one `encode()`d
    impression per line, the same bytes as on the impressions topic.

    Example:
        >>> sink = MemoryImpressionSink(Metrics())
        >>> sink.flush(), sink.impressions()
        (True, [])
    """

    def __init__(
        self,
        metrics: Metrics,
        counts: ImpressionCounts | None = None,
        queue_size: int = 10_000,
        keep: int = 100_000,
    ) -> None:
        # Kept encoded: bytes are invisible to the cycle collector, while 100,000 kept
        # Impression objects (with their lists and dicts) made every full collection of an
        # API process walk about a million more objects, a pause of 100-200 ms under load.
        self._kept: deque[bytes] = deque(maxlen=keep)
        self._lock = threading.Lock()
        super().__init__(metrics, counts, queue_size, "impressions-memory")

    def _publish(self, batch: Sequence[Impression]) -> None:
        encoded = [encode(impression) for impression in batch]
        with self._lock:
            self._kept.extend(encoded)
        for kind, n in Counter(arm_kind(i.arm) for i in batch).items():
            self.metrics.impressions.labels(arm=kind, outcome="logged").inc(n)

    def impressions(self, start: int = 0) -> list[Impression]:
        """The impressions kept so far from the `start`-th on (call `flush()` first for the
        latest). Decoding is the cost: a caller that follows the log asks only for what is
        new since its last call, not for everything again (a replay that did made every
        event cost more than the one before)."""
        with self._lock:
            kept = list(itertools.islice(self._kept, start, None))
        return [decode_impression(raw) for raw in kept]

    def dump_jsonl(self, path: Path) -> int:
        """Write the kept impressions to `path`, one encoded impression a line; return how many."""
        with self._lock:
            kept = list(self._kept)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as out:
            for raw in kept:
                out.write(raw + b"\n")
        return len(kept)


class KafkaImpressionSink(_BufferedSink):
    """Impressions on `streaming.impressions_topic`, keyed by session id (one session, one
    partition, in order). An impression counts as logged once the broker acknowledges it.

    Raises:
        ImpressionSinkError: no broker answered at `bootstrap_servers`.
    """

    def __init__(
        self,
        streaming: StreamingSettings,
        metrics: Metrics,
        counts: ImpressionCounts | None = None,
        queue_size: int = 10_000,
        linger_ms: int = 50,
    ) -> None:
        self.topic = streaming.impressions_topic
        try:
            self._producer = KafkaProducer(
                bootstrap_servers=streaming.bootstrap_servers,
                # One ack is enough for analytics logging; acks=all would hold batches
                # longer for a durability impressions do not need.
                acks=1,
                retries=3,
                linger_ms=linger_ms,
                bootstrap_timeout_ms=3000,
                # The sink thread (never a request) waits at most this long on metadata.
                max_block_ms=2000,
                # Bounds what piles up in the producer while the broker is away (kafka-python
                # wants delivery_timeout_ms >= linger_ms + request_timeout_ms).
                request_timeout_ms=10_000,
                delivery_timeout_ms=30_000 + linger_ms,
            )
        except KafkaError as exc:
            raise ImpressionSinkError(
                f"no Kafka broker at {streaming.bootstrap_servers} ({type(exc).__name__}); "
                "start one, fix streaming.bootstrap_servers, or set shadow.sink: memory"
            ) from exc
        super().__init__(metrics, counts, queue_size, "impressions-kafka")

    def _publish(self, batch: Sequence[Impression]) -> None:
        for impression in batch:
            kind = arm_kind(impression.arm)
            try:
                future = self._producer.send(
                    self.topic, key=impression.session_id.encode(), value=encode(impression)
                )
            except KafkaError as exc:  # metadata unavailable within max_block_ms: broker down
                self.metrics.impressions.labels(arm=kind, outcome="dropped").inc()
                self._warn("impression not sent; broker unavailable", error=str(exc))
                continue
            future.add_callback(self._acked, kind)
            future.add_errback(self._failed, kind)

    def _acked(self, kind: str, _metadata: object) -> None:
        self.metrics.impressions.labels(arm=kind, outcome="logged").inc()

    def _failed(self, kind: str, exc: Exception) -> None:
        self.metrics.impressions.labels(arm=kind, outcome="failed").inc()
        self._warn("impression refused by the broker", error=str(exc))

    def _flush_backend(self, timeout_s: float) -> bool:
        try:
            self._producer.flush(timeout=timeout_s)
        except KafkaError:
            return False
        return True

    def _close_backend(self) -> None:
        self._producer.close(timeout=5)


def _broker_answers(bootstrap_servers: str, timeout_s: float = 0.5) -> bool:
    """Whether the first bootstrap server accepts a TCP connection (a cheap check that
    spares the producer's multi-second bootstrap when nothing listens)."""
    host, _, port = bootstrap_servers.split(",")[0].strip().rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def make_sink(
    settings: Settings, metrics: Metrics, counts: ImpressionCounts | None
) -> ImpressionSink:
    """The sink `shadow.sink` asks for: kafka, memory, or auto (kafka if the broker answers).

    Raises:
        ImpressionSinkError: `shadow.sink: kafka` and no broker answers.
    """
    shadow, streaming = settings.shadow, settings.streaming
    choice = shadow.sink
    if choice == "auto":
        choice = "kafka" if _broker_answers(streaming.bootstrap_servers) else "memory"
        if choice == "memory":
            log.warning(
                "no Kafka broker answers; impressions are kept in memory only",
                bootstrap_servers=streaming.bootstrap_servers,
            )
    if choice == "kafka":
        sink: ImpressionSink = KafkaImpressionSink(
            streaming, metrics, counts, shadow.sink_queue_size, shadow.linger_ms
        )
        log.info("impressions go to kafka", topic=streaming.impressions_topic)
        return sink
    return MemoryImpressionSink(metrics, counts, shadow.sink_queue_size)
