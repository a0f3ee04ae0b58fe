"""Three `railtower consume` processes in one group over a six-partition events topic, one of
them SIGKILLed in the middle of a replay of real REES46 events.

Everything is real: the tansu broker, Redis and three OS processes running the consume
command with the trained model (they pre-warm rails as in production). The victim is killed
while it holds a batch it applied to Redis but has not committed (it is frozen with SIGSTOP
until its ledger and the broker's committed offsets both say so), so the group must rebalance,
re-deliver that batch to a survivor, and idempotence must absorb it. Then, for every session:
Redis holds exactly the source events, in source order, each applied once.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import defaultdict

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

from devstack.local_services import free_port, kafka_broker, redis_server
from railtower.datasets import load_dataset
from railtower.schemas import decode_event
from state.session_store import SessionStore
from streaming.consumer import read_ledger
from streaming.local_group import (
    Member,
    applied_events,
    consumer_env,
    start_members,
    wait_for_assignment,
)
from streaming.replay import events_of, replay
from streaming.topics import ensure_topics

pytestmark = pytest.mark.integration

EVENTS = 3000  # the first 3,000 REES46 events in time order: ~1,300 sessions
MEMBERS, PARTITIONS = 3, 6
REPLAY_S = 25.0  # the replay's length in wall time (a speed-up of the events' own clock)


@pytest.fixture
def group(trained_rees46, tmp_path):
    """A broker, a Redis, the source events, and three members that split the partitions."""
    settings, bundle = trained_rees46
    broker_port, redis_port = free_port(), free_port()
    broker = kafka_broker(broker_port, tmp_path / "kafka").start()
    redis = redis_server(redis_port, tmp_path / "redis").start()
    streaming = settings.streaming.model_copy(
        update={
            "bootstrap_servers": f"127.0.0.1:{broker_port}",
            "events_topic": "ev-group",
            "catalogue_topic": "cat-group",
            "dead_letter_topic": "dlq-group",
            "impressions_topic": "imp-group",
            "group_id": "g-group",
            "partitions": PARTITIONS,
            "max_batch": 200,
        }
    )
    url = f"redis://127.0.0.1:{redis_port}/0"
    members: list[Member] = []
    try:
        ensure_topics(streaming)
        frame = load_dataset("rees46", settings).events
        # session_events above any session's length: the list must keep every event to compare
        env = consumer_env(settings, streaming, bundle, url, session_events=1000)
        members = start_members(MEMBERS, env, tmp_path / "members")
        wait_for_assignment(members, streaming.events_topic, PARTITIONS, timeout_s=240)
        yield streaming, frame, members, SessionStore(url, 5.0, 1000, 3600, 300)
    finally:
        for member in members:
            if member.alive:
                member.process.kill()
                member.process.wait(timeout=10)
        redis.stop()
        broker.stop()


def _pending_batch(victim: Member, admin: KafkaAdminClient, group_id: str, topic: str) -> int:
    """Records of the victim's last applied batch that the broker has not seen committed
    (0 if its last batch was committed); read while the victim is frozen."""
    lines = victim.lines()
    applied = [x for x in lines if x["kind"] == "applied"]
    if not applied or any(
        x["kind"] == "committed" and x["batch"] == applied[-1]["batch"] for x in lines
    ):
        return 0
    committed = admin.list_group_offsets(group_id).get(group_id, {})
    pending = 0
    for name, (first, last, _) in applied[-1]["offsets"].items():
        partition_topic, partition = name.rsplit(":", 1)
        if partition_topic != topic:
            continue
        done = committed.get(TopicPartition(topic, int(partition)))
        start = max(first, done.offset if done is not None else 0)
        pending += max(0, last + 1 - start)
    return pending


def _kill_mid_batch(victim: Member, bootstrap: str, group_id: str, topic: str) -> int:
    """SIGKILL `victim` while a batch it applied is uncommitted; how many records that is."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline:
            if len(victim.lines("committed")) < 2:  # let it work a little first
                time.sleep(0.1)
                continue
            os.kill(victim.process.pid, signal.SIGSTOP)
            pending = _pending_batch(victim, admin, group_id, topic)
            if pending:
                victim.kill()  # SIGKILL delivered to a stopped process ends it
                return pending
            os.kill(victim.process.pid, signal.SIGCONT)
            time.sleep(0.03)
    finally:
        admin.close()
    raise AssertionError(f"{victim.member_id} never held an uncommitted batch in 90 s")


def _topic_records(bootstrap: str, topic: str, expected: int) -> dict[int, list[tuple[str, str]]]:
    """Every record of `topic` by partition, as (key, event id), read without a group."""
    reader = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    reader.assign(partitions)
    reader.seek_to_beginning(*partitions)
    out: dict[int, list[tuple[str, str]]] = defaultdict(list)
    deadline = time.monotonic() + 60
    while sum(map(len, out.values())) < expected and time.monotonic() < deadline:
        for tp, records in reader.poll(timeout_ms=500).items():
            for r in records:
                out[tp.partition].append((r.key.decode(), _event_id(r.value)))
    reader.close()
    return out


def _event_id(value: bytes) -> str:
    return decode_event(value).event_id


def test_a_killed_member_rebalances_and_every_event_is_applied_once_in_order(group):
    streaming, frame, members, store = group
    source = list(events_of(frame))[:EVENTS]
    span = (source[-1].event_time - source[0].event_time).total_seconds()
    topic, victim, survivors = streaming.events_topic, members[0], members[1:]
    before = {m.member_id: m.partitions(topic) for m in members}

    sender = threading.Thread(
        target=replay, args=(frame, streaming, span / REPLAY_S, EVENTS), daemon=True
    )
    sender.start()
    pending = _kill_mid_batch(victim, streaming.bootstrap_servers, streaming.group_id, topic)
    replay_running_at_kill = sender.is_alive()
    sender.join(timeout=120)
    assert not sender.is_alive(), "the replay did not finish"

    # the survivors split all six partitions between them, taking over the victim's
    after = wait_for_assignment(survivors, topic, PARTITIONS, timeout_s=60)
    assert set().union(*after.values()) == set(range(PARTITIONS))
    assert any(after[m.member_id] - before[m.member_id] for m in survivors)

    deadline = time.monotonic() + 120
    while applied_events(members) < EVENTS and time.monotonic() < deadline:
        assert all(m.alive for m in survivors), "a surviving member exited"
        time.sleep(0.5)
    exits = [m.stop() for m in survivors]  # SIGTERM: finish the batch, commit, leave
    assert exits == [0, 0]
    assert all(m.lines()[-1]["kind"] == "closed" for m in survivors)

    # the partitioner kept each session on one partition, in source order, sent once
    position = {e.event_id: k for k, e in enumerate(source)}
    on_topic = _topic_records(streaming.bootstrap_servers, topic, EVENTS)
    assert sum(map(len, on_topic.values())) == EVENTS
    partitions_of: dict[str, set[int]] = defaultdict(set)
    for partition, records in on_topic.items():
        for key, _ in records:
            partitions_of[key].add(partition)
        by_session: dict[str, list[int]] = defaultdict(list)
        for key, event_id in records:
            by_session[key].append(position[event_id])
        assert all(ks == sorted(ks) for ks in by_session.values())
    assert all(len(ps) == 1 for ps in partitions_of.values())
    assert len(on_topic) == PARTITIONS  # the keys spread over every partition

    # each event applied exactly once across the group; every offset delivered at least once
    lines = [x for m in members for x in read_ledger(m.ledger) if x["kind"] == "applied"]
    assert sum(x["new_events"] for x in lines) == EVENTS
    delivered: dict[int, set[int]] = defaultdict(set)
    for x in lines:
        for name, (first, last, count) in x["offsets"].items():
            if name.rsplit(":", 1)[0] == topic:
                assert count == last - first + 1
                delivered[int(name.rsplit(":", 1)[1])].update(range(first, last + 1))
    assert {p: len(o) for p, o in delivered.items()} == {p: len(r) for p, r in on_topic.items()}

    # the victim's uncommitted batch came back to a survivor and was absorbed, not applied
    redelivered = sum(x["records"] for x in lines) - EVENTS
    absorbed = sum(x["duplicates"] for m in survivors for x in m.lines("applied"))
    assert pending > 0 and absorbed >= pending and redelivered >= pending

    # Redis: per session, exactly the source events, in source order, each once
    expected: dict[str, list[tuple[str, str, float]]] = defaultdict(list)
    for e in source:
        expected[e.session_id].append((e.item_id, e.event_type, e.event_time.timestamp()))
    wrong = []
    for session_id, events in expected.items():
        snapshot = store.snapshot(session_id, "none", None)
        got = [(e.item_id, e.event_type, e.time_s) for e in snapshot.events]
        if got != events or int(snapshot.marker) != len(events):
            wrong.append((session_id, len(events), len(got), snapshot.marker))
    assert not wrong, f"{len(wrong)} of {len(expected)} sessions differ, e.g. {wrong[:3]}"
    print(
        f"\nsessions {len(expected)}, events {EVENTS}, killed with {pending} uncommitted "
        f"(replay running: {replay_running_at_kill}); redelivered {redelivered}, "
        f"absorbed {absorbed}; partitions before {before}, after {after}"
    )
