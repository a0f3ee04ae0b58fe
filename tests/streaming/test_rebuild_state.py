"""`railtower rebuild-state`: session state rebuilt from the events topic after Redis lost it.

The first tests drive `streaming.rebuild.rebuild_state` with in-process stand-ins for the
group-less consumer and the session store (bounds, counts, idempotence, a bad event, traffic
that goes on during the rebuild). The integration tests run it against a real broker (tansu)
and a real Redis, both started here (a server that cannot start fails the test): the live
refresh consumer applies and commits the events, Redis is flushed, the rebuild (the function,
then the command) brings every key of every session back as it was, a second run adds
nothing, and the live group's committed offsets do not move.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import orjson
import pytest
import redis as redis_lib
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from typer.testing import CliRunner

from devstack.local_services import free_port, kafka_broker, redis_server
from railtower.cli import app
from railtower.schemas import Event, encode
from railtower.settings import Settings, load_settings
from state.session_store import SessionStore
from streaming.consumer import RefreshConsumer
from streaming.rebuild import RebuildError, parse_since, rebuild_state
from streaming.topics import ensure_topics

T0 = datetime(2019, 10, 1, 2, 0, tzinfo=UTC)
TOPIC = "ev-rebuild"


def _event(n: int, session: str, item: str, user: str | None = None) -> Event:
    return Event(
        event_id=f"{session}-{n}",
        event_time=T0 + timedelta(seconds=30 * n),
        event_type="purchase" if n % 5 == 4 else "view",
        session_id=session,
        item_id=item,
        user_id=user,
        device="mobile",
    )


def _session_events(sessions: int, per_session: int) -> list[Event]:
    """`per_session` events of each session, interleaved across sessions as traffic is."""
    return [
        _event(n, f"s{k}", f"item-{(k * 7 + n) % 13}", user=f"u{k}" if k % 2 else None)
        for n in range(per_session)
        for k in range(sessions)
    ]


# ------------------------------------------------------------------ in-process stand-ins


@dataclass
class _Record:
    offset: int
    value: bytes | None
    timestamp: int = 0


class _Found:
    def __init__(self, offset: int) -> None:
        self.offset = offset


class FakeReader:
    """The group-less consumer's surface over in-memory partitions. `late` records are added
    to their partition after the first poll (traffic that goes on during a rebuild)."""

    def __init__(
        self,
        partitions: dict[int, list[bytes | None]],
        first: dict[int, int] | None = None,
        late: dict[int, list[bytes]] | None = None,
        batch: int = 4,
        short_listing: bool = False,
    ) -> None:
        first = first or {}
        self.logs = {
            p: [_Record(first.get(p, 0) + i, v, 1000 * i) for i, v in enumerate(values)]
            for p, values in partitions.items()
        }
        self.late, self.batch, self.short_listing = late or {}, batch, short_listing
        self.positions: dict[int, int] = {}
        self.highwaters: dict[int, int] = {}  # each partition's end at its last fetch
        self.paused: set[int] = set()
        self.closed_with: bool | None = None
        self.polls = 0

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        return set(self.logs) if topic == TOPIC else None

    def assign(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.positions[tp.partition] = self._first(tp.partition)

    def _first(self, p: int) -> int:
        return self.logs[p][0].offset if self.logs[p] else 0

    def _end(self, p: int) -> int:
        return self.logs[p][-1].offset + 1 if self.logs[p] else 0

    def beginning_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self._first(tp.partition) for tp in partitions}

    def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        if self.short_listing:  # tansu's answer: the last batch's base offset + 1
            first = self.beginning_offsets(partitions)
            return {tp: max(first[tp], self._end(tp.partition) - 2) for tp in partitions}
        return {tp: self._end(tp.partition) for tp in partitions}

    def highwater(self, partition: TopicPartition) -> int | None:
        return self.highwaters.get(partition.partition)

    def offsets_for_times(self, timestamps: dict[TopicPartition, int]) -> dict:  # type: ignore[type-arg]
        out: dict[TopicPartition, _Found | None] = {}
        for tp, ms in timestamps.items():
            hits = [r.offset for r in self.logs[tp.partition] if r.timestamp >= ms]
            out[tp] = _Found(hits[0]) if hits else None
        return out

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self.positions[partition.partition] = offset

    def position(self, partition: TopicPartition) -> int:
        return self.positions[partition.partition]

    def pause(self, *partitions: TopicPartition) -> None:
        self.paused.update(tp.partition for tp in partitions)

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict:  # type: ignore[type-arg]
        self.polls += 1
        if self.polls == 2:  # the producers go on after the rebuild took its end offsets
            for p, values in self.late.items():
                end = self._end(p)
                self.logs[p] += [_Record(end + i, v) for i, v in enumerate(values)]
        out = {}
        for p, log in self.logs.items():
            if p in self.paused:
                continue
            self.highwaters[p] = self._end(p)
            records = [r for r in log if r.offset >= self.positions[p]][: self.batch]
            if records:
                out[TopicPartition(TOPIC, p)] = records
                self.positions[p] = records[-1].offset + 1
        return out

    def close(self, autocommit: bool = True) -> None:
        self.closed_with = autocommit


class FakeStore:
    """`SessionStore.append_events` / `append_many`'s contract in memory: appends the
    events whose ids it has not seen, returns how many."""

    def __init__(self) -> None:
        self.events: dict[str, list[tuple[str, str, str, float, str | None]]] = defaultdict(list)
        self.seen: dict[str, set[str]] = defaultdict(set)
        self.users: dict[str, set[str]] = defaultdict(set)

    def append_events(self, session_id, events, user_ids=()) -> int:  # type: ignore[no-untyped-def]
        for user in user_ids:
            self.users[user].add(session_id)
        added = 0
        for event_id, event, context in events:
            if event_id not in self.seen[session_id]:
                self.seen[session_id].add(event_id)
                row = (event_id, event.item_id, event.event_type, event.time_s, context)
                self.events[session_id].append(row)
                added += 1
        return added

    def append_many(self, sessions) -> dict[str, int]:  # type: ignore[no-untyped-def]
        return {s: self.append_events(s, events, users) for s, (events, users) in sessions.items()}

    def state(self) -> tuple[dict, dict]:  # type: ignore[type-arg]
        return dict(self.events), dict(self.users)


def _streaming():  # type: ignore[no-untyped-def]
    settings = load_settings(log_level="WARNING")
    return settings.streaming.model_copy(update={"events_topic": TOPIC, "poll_timeout_ms": 10})


def _partitioned(events: list[Event], partitions: int = 3) -> dict[int, list[bytes | None]]:
    out: dict[int, list[bytes | None]] = {p: [] for p in range(partitions)}
    for event in events:
        out[int(event.session_id[1:]) % partitions].append(encode(event))
    return out


def test_a_wiped_store_is_rebuilt_exactly_and_a_second_run_adds_nothing():
    events = _session_events(sessions=9, per_session=5)
    live = FakeStore()  # what the live consumer wrote, session by session in topic order
    for event in events:
        live.append_events(*_applied(event))
    wiped = FakeStore()
    reader = FakeReader(_partitioned(events))
    report = rebuild_state(_streaming(), wiped, consumer=reader)  # type: ignore[arg-type]
    assert wiped.state() == live.state()
    assert (report.read, report.applied, report.duplicates, report.invalid) == (45, 45, 0, 0)
    assert report.sessions == 9
    assert reader.closed_with is False  # a group-less reader: never a commit
    assert report.to_dict()["partitions"] == {
        "0": {"start": 0, "end": 15, "read": 15},
        "1": {"start": 0, "end": 15, "read": 15},
        "2": {"start": 0, "end": 15, "read": 15},
    }

    again = rebuild_state(_streaming(), wiped, consumer=FakeReader(_partitioned(events)))  # type: ignore[arg-type]
    assert (again.read, again.applied, again.duplicates) == (45, 0, 45)
    assert wiped.state() == live.state()


def _applied(event: Event):  # type: ignore[no-untyped-def]
    from streaming.consumer import read_session_event

    e = read_session_event(encode(event))
    return e.session_id, [(e.event_id, e.history, e.context)], [e.user_id] if e.user_id else []


def test_a_bad_event_is_counted_and_the_rebuild_goes_on():
    events = _session_events(sessions=3, per_session=4)
    partitions = _partitioned(events)
    bad_time = encode(events[0]).replace(b"2019-10-01", b"2999-10-01")  # decodes, then refused
    partitions[0][1:1] = [b"{not json", None, bad_time]
    partitions[2].append(b'{"schema_version": 2, "event_id": "x"}')
    store = FakeStore()
    report = rebuild_state(_streaming(), store, consumer=FakeReader(partitions))  # type: ignore[arg-type]
    assert report.invalid == 4
    assert (report.read, report.applied) == (16, 12)
    assert sum(len(v) for v in store.events.values()) == 12
    assert sum(report.invalid_reasons.values()) == 4


def test_it_ends_at_the_end_offsets_taken_at_its_start_while_traffic_goes_on():
    events = _session_events(sessions=3, per_session=6)
    later = [encode(_event(n, "s0", "late")) for n in range(100, 130)]
    reader = FakeReader(_partitioned(events), late={0: later}, batch=2)
    store = FakeStore()
    report = rebuild_state(_streaming(), store, consumer=reader)  # type: ignore[arg-type]
    assert report.read == report.applied == 18
    assert "late" not in {row[1] for row in store.events["s0"]}
    assert report.partitions[0] == {"start": 0, "end": 6, "read": 6}


def test_the_end_is_the_high_watermark_when_the_broker_lists_it_short():
    events = _session_events(sessions=3, per_session=5)
    reader = FakeReader(_partitioned(events), short_listing=True)
    store = FakeStore()
    report = rebuild_state(_streaming(), store, consumer=reader)  # type: ignore[arg-type]
    assert report.read == report.applied == 15
    assert all(v["end"] == 5 for v in report.partitions.values())


def test_bounds_from_offset_since_and_retention():
    events = _session_events(sessions=3, per_session=4)
    # partition 1's retention starts at offset 2 (records 0 and 1 were deleted)
    partitions = _partitioned(events)
    partitions[1] = partitions[1][2:]
    first = {1: 2}

    report = rebuild_state(
        _streaming(), FakeStore(), from_offset=1, consumer=FakeReader(partitions, first)
    )  # type: ignore[arg-type]
    assert {p: (v["start"], v["end"]) for p, v in report.partitions.items()} == {
        0: (1, 4),
        1: (2, 4),  # below the retention: its first record
        2: (1, 4),
    }
    assert report.read == 3 + 2 + 3

    past_end = rebuild_state(
        _streaming(), FakeStore(), from_offset=50, consumer=FakeReader(partitions, first)
    )  # type: ignore[arg-type]
    assert past_end.read == 0 and all(v["start"] == v["end"] for v in past_end.partitions.values())

    # the stand-in stamps record i at i seconds after the epoch
    since = datetime.fromtimestamp(2.5, tz=UTC)
    timed = rebuild_state(
        _streaming(), FakeStore(), since=since, consumer=FakeReader(partitions, first)
    )  # type: ignore[arg-type]
    assert {p: v["start"] for p, v in timed.partitions.items()} == {0: 3, 1: 4, 2: 3}

    with pytest.raises(RebuildError, match="not both"):
        rebuild_state(_streaming(), FakeStore(), 0, since, consumer=FakeReader(partitions))  # type: ignore[arg-type]
    with pytest.raises(RebuildError, match=">= 0"):
        rebuild_state(_streaming(), FakeStore(), -1, consumer=FakeReader(partitions))  # type: ignore[arg-type]
    missing = _streaming().model_copy(update={"events_topic": "nope"})
    with pytest.raises(RebuildError, match="does not exist"):
        rebuild_state(missing, FakeStore(), consumer=FakeReader(partitions))  # type: ignore[arg-type]
    assert parse_since("2024-05-01T12:00:00") == datetime(2024, 5, 1, 12, tzinfo=UTC)
    with pytest.raises(RebuildError, match="ISO 8601"):
        parse_since("yesterday")


@pytest.mark.parametrize(
    ("answered", "error"), [(0, "no fetch answer"), (1, "no record")], ids=["at-start", "later"]
)
def test_a_broker_that_stops_answering_ends_the_rebuild_with_an_error(answered, error):
    class Silent(FakeReader):
        def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict:  # type: ignore[type-arg]
            return super().poll() if self.polls < answered else {}

    reader = Silent(_partitioned(_session_events(3, 2)))
    with pytest.raises(RebuildError, match=error):
        rebuild_state(_streaming(), FakeStore(), consumer=reader, idle_timeout_s=0.05)  # type: ignore[arg-type]
    assert reader.closed_with is False


# ------------------------------------------------------------------ real broker, real Redis


class _StoreOnly:
    """The live consumer's refresher with no model: it writes the session store only
    (pre-warming and prices are not what the rebuild restores)."""

    def __init__(self, store: SessionStore) -> None:
        self.store = store

    def append_prices(self, points) -> int:  # type: ignore[no-untyped-def]
        return 0

    def sync_prices(self) -> int:
        return 0

    def prewarm(self, session_ids, users=None) -> int:  # type: ignore[no-untyped-def]
        return 0

    def apply_catalogue_records(self, records) -> int:  # type: ignore[no-untyped-def]
        return 0


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    port = free_port()
    server = kafka_broker(port, tmp_path_factory.mktemp("kafka")).start()
    yield f"127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def stack(broker, tmp_path, request):
    """Settings on fresh topics and group, a real Redis, its store and client."""
    redis_port = free_port()
    server = redis_server(redis_port, tmp_path / "redis").start()
    name = request.node.name[:30]
    url = f"redis://127.0.0.1:{redis_port}/0"
    settings = load_settings(
        log_level="WARNING",
        streaming={
            "bootstrap_servers": broker,
            "events_topic": f"ev-{name}",
            "catalogue_topic": f"cat-{name}",
            "dead_letter_topic": f"dlq-{name}",
            "impressions_topic": f"imp-{name}",
            "group_id": f"g-{name}",
            "partitions": 3,
            "max_batch": 50,
        },
        serving={"redis_url": url, "session_events": 1000},
    )
    ensure_topics(settings.streaming)
    store = SessionStore.from_settings(settings.serving)
    client = redis_lib.Redis.from_url(url)
    yield settings, store, client
    client.close()
    server.stop()


def _produce(settings: Settings, messages: list[tuple[bytes, bytes]]) -> None:
    producer = KafkaProducer(bootstrap_servers=settings.streaming.bootstrap_servers, acks="all")
    for key, value in messages:
        producer.send(settings.streaming.events_topic, key=key, value=value)
    producer.flush()
    producer.close()


def _consume_all(settings: Settings, store: SessionStore, records: int) -> None:
    """The live consumer applies and commits `records` records, then leaves its group."""
    consumer = RefreshConsumer(settings, _StoreOnly(store))  # type: ignore[arg-type]
    seen, deadline = 0, time.monotonic() + 40
    try:
        while seen < records:
            assert time.monotonic() < deadline, f"the live consumer read {seen}/{records}"
            seen += consumer.step().records
    finally:
        consumer.close()


def _dump(client: redis_lib.Redis) -> dict[bytes, object]:
    """Every Railtower key with its value (lists in order, sets sorted) and whether it
    has a TTL."""
    out: dict[bytes, object] = {}
    for key in client.scan_iter(match=b"rt:*"):
        kind = client.type(key)
        if kind == b"list":
            value: object = client.lrange(key, 0, -1)
        elif kind == b"set":
            value = sorted(client.smembers(key))
        elif kind == b"zset":
            value = client.zrange(key, 0, -1, withscores=True)
        else:
            value = client.get(key)
        out[key] = (value, client.ttl(key) > 0)
    return out


def _group_offsets(settings: Settings) -> dict[TopicPartition, int]:
    admin = KafkaAdminClient(bootstrap_servers=settings.streaming.bootstrap_servers)
    try:
        group = settings.streaming.group_id
        committed = admin.list_group_offsets(group).get(group, {})
    finally:
        admin.close()
    return {tp: meta.offset for tp, meta in committed.items()}


def _end_offsets(settings: Settings, topic: str) -> dict[TopicPartition, int]:
    reader = KafkaConsumer(bootstrap_servers=settings.streaming.bootstrap_servers)
    try:
        tps = [TopicPartition(topic, p) for p in reader.partitions_for_topic(topic) or ()]
        return reader.end_offsets(tps)
    finally:
        reader.close()


def _live_traffic(settings: Settings, store: SessionStore, sessions: int, per: int) -> int:
    """Events (and one malformed message) through the live consumer; records sent."""
    events = _session_events(sessions, per)
    messages = [(e.session_id.encode(), encode(e)) for e in events]
    messages.insert(7, (b"s1", b"{not json"))
    _produce(settings, messages)
    _consume_all(settings, store, len(messages))
    return len(messages)


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_after_a_flushall_the_rebuild_restores_every_session_and_moves_no_group_offset(stack):
    settings, store, client = stack
    sent = _live_traffic(settings, store, sessions=12, per=6)
    before = _dump(client)
    assert len([k for k in before if k.endswith(b":events")]) == 12
    committed = _group_offsets(settings)
    assert sum(committed.values()) == sent  # the live group is past every event
    dead_letters = _end_offsets(settings, settings.streaming.dead_letter_topic)

    client.flushall()  # Redis lost everything; the group will not read the events again
    report = rebuild_state(settings.streaming, store)
    assert _dump(client) == before  # events in order, seen sets, counts, users, purchases
    assert (report.read, report.applied, report.invalid, report.sessions) == (sent, 72, 1, 12)

    again = rebuild_state(settings.streaming, store)
    assert (again.applied, again.duplicates) == (0, 72)
    assert _dump(client) == before
    assert _group_offsets(settings) == committed  # the live group's offsets did not move
    # the bad event was the live consumer's to dead-letter, once
    assert _end_offsets(settings, settings.streaming.dead_letter_topic) == dead_letters


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_the_command_rebuilds_from_an_offset_and_from_a_time(stack, monkeypatch):
    settings, store, client = stack
    sent = _live_traffic(settings, store, sessions=6, per=4)
    before = _dump(client)
    committed = _group_offsets(settings)
    client.flushall()
    env = {
        "RAILTOWER_STREAMING__BOOTSTRAP_SERVERS": settings.streaming.bootstrap_servers,
        "RAILTOWER_STREAMING__EVENTS_TOPIC": settings.streaming.events_topic,
        "RAILTOWER_SERVING__REDIS_URL": settings.serving.redis_url,
        "RAILTOWER_SERVING__SESSION_EVENTS": "1000",
        "RAILTOWER_LOG_LEVEL": "WARNING",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # the command reads its settings from the environment

    result = CliRunner().invoke(app, ["rebuild-state", "--from-offset", "0"])
    assert result.exit_code == 0, result.output
    summary = orjson.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["read"], summary["applied"], summary["invalid"]) == (sent, 24, 1)
    assert sorted(summary["partitions"]) == ["0", "1", "2"]
    assert _dump(client) == before
    assert _group_offsets(settings) == committed

    # --since: only what was produced after it (the broker's own timestamps)
    time.sleep(1.0)
    since = datetime.now(UTC)
    time.sleep(0.2)
    late = [_event(50 + n, "s0", "late-item") for n in range(3)]
    _produce(settings, [(b"s0", encode(e)) for e in late])
    result = CliRunner().invoke(app, ["rebuild-state", "--since", since.isoformat()])
    assert result.exit_code == 0, result.output
    summary = orjson.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["read"], summary["applied"], summary["duplicates"]) == (3, 3, 0)
    assert [e.item_id for e in store.snapshot("s0", "v", None).events][-3:] == ["late-item"] * 3

    bad = CliRunner().invoke(app, ["rebuild-state", "--from-offset", "0", "--since", "x"])
    assert bad.exit_code == 1
