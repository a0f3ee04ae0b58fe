"""`railtower rebuild-state`: session state rebuilt from the events topic's retention.

A Redis that loses its data (a crash without an append-only file, a failover to an empty
replica, a FLUSHALL) loses every session's events, and the refresh consumer group has
committed past them, so it never reads them again. This reads the events topic again,
from `from_offset` (or the first record at or after `since`) to the end offsets taken when
it starts, and appends each event to the session store exactly as the consumer does
(`streaming.consumer.read_session_event`, `SessionBatch`, `SessionStore.append_events`):
idempotent by event id, so an event Redis still holds, or one that a second run replays,
adds nothing.

It reads with its own group-less consumer (assigned partitions, no group id, nothing ever
committed), so the live group's committed offsets do not move. It ends at the end offsets
taken at its start, so it finishes while traffic continues; what arrives later is the live
consumer's. An invalid event is counted and skipped: the live consumer sent it to the
dead-letter topic when it first read it, so it is not sent there twice. Nothing is
pre-warmed: vectors and rails are computed on the sessions' next requests.

Order: `append_events` appends, so a session's events end up in topic order only if none of
its later events were appended before the rebuild reached them. Stop the consumers, rebuild,
then start them again (they resume from their committed offsets; what the rebuild applied
is a duplicate to them).
"""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from kafka import KafkaConsumer, TopicPartition

from railtower.errors import RailtowerError
from railtower.logs import get_logger
from railtower.schemas import MalformedMessage
from railtower.settings import Settings, StreamingSettings
from state.session_store import SessionStore
from streaming.consumer import SessionBatch, consumer_settings, read_session_event

log = get_logger(__name__)


class RebuildError(RailtowerError):
    """The rebuild cannot start (topic missing, bad bounds) or stopped making progress."""


class OffsetReader(Protocol):
    """What the rebuild needs of a group-less `kafka.KafkaConsumer`."""

    def partitions_for_topic(self, topic: str) -> set[int] | None: ...

    def assign(self, partitions: list[TopicPartition]) -> None: ...

    def beginning_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]: ...

    def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]: ...

    def offsets_for_times(self, timestamps: dict[TopicPartition, int]) -> dict[Any, Any]: ...

    def seek(self, partition: TopicPartition, offset: int) -> None: ...

    def position(self, partition: TopicPartition) -> int: ...

    def highwater(self, partition: TopicPartition) -> int | None: ...

    def pause(self, *partitions: TopicPartition) -> None: ...

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[Any, Any]: ...

    def close(self, autocommit: bool = True) -> None: ...


@dataclass
class RebuildReport:
    """What a rebuild read and wrote; `partitions`: partition -> {start, end, read}."""

    topic: str
    read: int = 0
    applied: int = 0
    duplicates: int = 0
    invalid: int = 0
    # records skipped for being stamped before --since
    before_since: int = 0
    sessions: int = 0
    seconds: float = 0.0
    partitions: dict[int, dict[str, int]] = field(default_factory=dict)
    invalid_reasons: Counter[str] = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "read": self.read,
            "applied": self.applied,
            "duplicates": self.duplicates,
            "invalid": self.invalid,
            "before_since": self.before_since,
            "sessions": self.sessions,
            "seconds": round(self.seconds, 3),
            "partitions": {str(p): dict(v) for p, v in sorted(self.partitions.items())},
            # the first words of each reason (an id or a value would make every one unique)
            "invalid_reasons": dict(self.invalid_reasons.most_common(10)),
        }


def group_less_consumer(streaming: StreamingSettings) -> KafkaConsumer:
    """A consumer in no group: it is assigned partitions and can commit nothing."""
    return KafkaConsumer(
        bootstrap_servers=streaming.bootstrap_servers,
        group_id=None,
        client_id=f"rebuild-{socket.gethostname()}-{os.getpid()}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=streaming.max_batch,
    )


def parse_since(text: str) -> datetime:
    """An ISO 8601 time; one without a zone is UTC. Raises RebuildError if unreadable."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise RebuildError(
            f"--since {text!r} is not an ISO 8601 time (e.g. 2024-05-01T12:00:00Z)"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def rebuild_from_settings(
    settings: Settings, from_offset: int | None = None, since: datetime | None = None
) -> RebuildReport:
    """`rebuild_state` on the store and topic `settings` configure (the command's path): the
    session store as the consumer builds it, with the consumer's Redis timeout."""
    settings = consumer_settings(settings)
    store = SessionStore.from_settings(settings.serving)
    return rebuild_state(settings.streaming, store, from_offset, since)


def rebuild_state(
    streaming: StreamingSettings,
    store: SessionStore,
    from_offset: int | None = None,
    since: datetime | None = None,
    consumer: OffsetReader | None = None,
    progress_every: int = 10_000,
    idle_timeout_s: float = 30.0,
) -> RebuildReport:
    """Append the events topic's events, from the given start to the end offsets taken now,
    to `store`; return the counts.

    Args:
        streaming: the events topic, the broker and the batch size.
        store: the session store the live consumer writes (`SessionStore.from_settings`).
        from_offset: start at this offset on every partition (one below a partition's
            retention starts at its first record); None with `since` None: the earliest.
        since: start on each partition at its first record stamped at or after this time
            (the broker's offsets_for_times, taken as a lower bound: records stamped
            earlier ahead of that first one are skipped, counted in `before_since`); a
            partition without one has nothing to read.
        consumer: a group-less consumer (default `group_less_consumer(streaming)`); closed here.
        progress_every: log a progress line every this many records read.
        idle_timeout_s: give up when no record arrives for this long before the end.

    Raises:
        RebuildError: both or negative bounds, the topic is missing, or no progress.
        redis.RedisError: Redis is down (run it again: what was applied stays applied).
    """
    if from_offset is not None and since is not None:
        raise RebuildError("give --from-offset or --since, not both")
    if from_offset is not None and from_offset < 0:
        raise RebuildError(f"--from-offset must be >= 0, got {from_offset}")
    topic = streaming.events_topic
    reader: OffsetReader = consumer if consumer is not None else group_less_consumer(streaming)
    report = RebuildReport(topic)
    started = time.monotonic()
    sessions: set[str] = set()
    try:
        numbers = reader.partitions_for_topic(topic)
        if not numbers:
            raise RebuildError(f"topic {topic!r} does not exist on {streaming.bootstrap_servers}")
        tps = [TopicPartition(topic, p) for p in sorted(numbers)]
        reader.assign(tps)
        first = reader.beginning_offsets(tps)
        end = _end_offsets(reader, tps, first, idle_timeout_s)
        start = _starts(reader, tps, first, end, from_offset, since)
        # a record stamped before `since` ahead of the first one at or after it is skipped
        # (the broker's answer is only trusted as a lower bound)
        since_ms = None if since is None else int(since.timestamp() * 1000)
        reached = dict.fromkeys(tps, since_ms is None)
        remaining = set()
        for tp in tps:
            report.partitions[tp.partition] = {"start": start[tp], "end": end[tp], "read": 0}
            if start[tp] < end[tp]:
                reader.seek(tp, start[tp])
                remaining.add(tp)
            else:
                reader.pause(tp)
        log.info(
            "rebuild started",
            topic=topic,
            partitions={str(tp.partition): [start[tp], end[tp]] for tp in tps},
            records=sum(end[tp] - start[tp] for tp in tps),
        )
        last_record, next_progress = time.monotonic(), progress_every
        while remaining:
            polled = reader.poll(timeout_ms=streaming.poll_timeout_ms, max_records=None)
            batch = SessionBatch()
            for tp, records in polled.items():
                if tp not in remaining:
                    continue
                for record in records:
                    if record.offset >= end[tp]:
                        break  # arrived after the start: the live consumer's
                    if not reached[tp]:
                        if record.timestamp < since_ms:  # type: ignore[operator]
                            report.before_since += 1
                            continue
                        reached[tp] = True
                    report.read += 1
                    report.partitions[tp.partition]["read"] += 1
                    try:
                        batch.add(read_session_event(record.value))
                    except MalformedMessage as exc:
                        report.invalid += 1
                        report.invalid_reasons[exc.reason.split(":", 1)[0][:60]] += 1
                        log.warning(
                            "invalid event skipped",
                            reason=exc.reason,
                            partition=tp.partition,
                            offset=record.offset,
                        )
            for session_id, added in batch.append_to(store).items():
                report.applied += added
                report.duplicates += len(batch.events[session_id]) - added
                sessions.add(session_id)
            for tp in list(remaining):
                if reader.position(tp) >= end[tp]:
                    remaining.discard(tp)
                    reader.pause(tp)
            if polled:
                last_record = time.monotonic()
            elif time.monotonic() - last_record > idle_timeout_s:
                behind = {str(tp.partition): [reader.position(tp), end[tp]] for tp in remaining}
                raise RebuildError(
                    f"no record from {topic} for {idle_timeout_s:g} s with partitions still "
                    f"short of their end (position, end): {behind}; is the broker up? "
                    "Run the rebuild again: what it applied stays applied"
                )
            if report.read >= next_progress:
                next_progress = report.read + progress_every
                _log_counts("rebuild progress", report, sessions, started)
    finally:
        reader.close(autocommit=False)
    report.sessions = len(sessions)
    report.seconds = time.monotonic() - started
    _log_counts("rebuild done", report, sessions, started)
    return report


def _end_offsets(
    reader: OffsetReader,
    tps: list[TopicPartition],
    first: dict[TopicPartition, int],
    timeout_s: float,
) -> dict[TopicPartition, int]:
    """Each partition's end offset now: the high watermark of a fetch of its last record.

    The broker's ListOffsets answer alone is not enough: tansu (the local and test broker)
    answers the last batch's base offset + 1, short of the end when that batch holds several
    records. Reading from one below that answer (a record of the last batch, so a valid
    offset on either broker) returns the partition's high watermark with the records; on
    Kafka it equals the ListOffsets answer (or is later, if records arrived in between).
    """
    listed = reader.end_offsets(tps)
    probe = [tp for tp in tps if listed[tp] > first[tp]]
    for tp in probe:
        reader.seek(tp, listed[tp] - 1)
    ends = dict(listed)
    deadline = time.monotonic() + timeout_s
    waiting = set(probe)
    while waiting:
        reader.poll(timeout_ms=200, max_records=None)
        for tp in list(waiting):
            highwater = reader.highwater(tp)
            if highwater is not None:
                ends[tp] = max(listed[tp], highwater)
                waiting.discard(tp)
        if waiting and time.monotonic() > deadline:
            names = sorted(tp.partition for tp in waiting)
            raise RebuildError(
                f"no fetch answer from partitions {names} of {tps[0].topic} in {timeout_s:g} s; "
                "is the broker up?"
            )
    return ends


def _starts(
    reader: OffsetReader,
    tps: list[TopicPartition],
    first: dict[TopicPartition, int],
    end: dict[TopicPartition, int],
    from_offset: int | None,
    since: datetime | None,
) -> dict[TopicPartition, int]:
    """Each partition's first offset to read, within [its first retained record, its end]."""
    if since is not None:
        found = reader.offsets_for_times({tp: int(since.timestamp() * 1000) for tp in tps})
        start = {tp: end[tp] if found.get(tp) is None else found[tp].offset for tp in tps}
    elif from_offset is not None:
        start = dict.fromkeys(tps, from_offset)
    else:
        start = dict(first)
    for tp in tps:
        if start[tp] < first[tp]:
            log.warning(
                "offset below the partition's retention; starting at its first record",
                partition=tp.partition,
                asked=start[tp],
                first=first[tp],
            )
        start[tp] = min(max(start[tp], first[tp]), end[tp])
    return start


def _log_counts(message: str, report: RebuildReport, sessions: set[str], started: float) -> None:
    log.info(
        message,
        topic=report.topic,
        read=report.read,
        applied=report.applied,
        duplicates=report.duplicates,
        invalid=report.invalid,
        sessions=len(sessions),
        seconds=round(time.monotonic() - started, 2),
    )
