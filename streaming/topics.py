"""The topics Railtower reads and writes, created if missing (idempotent)."""

from __future__ import annotations

import time

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from railtower.settings import StreamingSettings


def ensure_topics(settings: StreamingSettings, timeout_s: float = 30.0) -> None:
    """Create the events and impressions (partitioned), catalogue and dead-letter topics if
    they are missing.

    Retries while the broker starts; raises KafkaError if it never answers.
    """
    wanted = {
        settings.events_topic: settings.partitions,
        settings.catalogue_topic: 1,
        settings.dead_letter_topic: 1,
        # keyed by session id like the events, so one session's impressions stay in order
        settings.impressions_topic: settings.partitions,
    }
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin = KafkaAdminClient(
                bootstrap_servers=settings.bootstrap_servers, request_timeout_ms=5000
            )
            break
        except KafkaError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    try:
        existing = set(admin.list_topics())
        missing = [
            NewTopic(name, partitions, replication_factor=1)
            for name, partitions in wanted.items()
            if name not in existing
        ]
        if missing:
            try:
                admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass  # another process created it first
    finally:
        admin.close()
