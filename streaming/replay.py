"""`railtower replay`: publish a data set's events to the events topic, in time order.

Keyed by session id, so one session stays on one partition and in order. `speedup` scales
the gaps between events (1 = real time, 60 = an hour a minute, 0 = as fast as possible).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pandas as pd
from kafka import KafkaProducer

from railtower.logs import get_logger
from railtower.schemas import Event, encode
from railtower.settings import StreamingSettings

log = get_logger(__name__)

_OPTIONAL = ("user_id", "price", "quantity", "device", "locale", "country")


def events_of(frame: pd.DataFrame) -> Iterator[Event]:
    """Canonical event rows as wire events, in time order (position breaks ties)."""
    ordered = frame.sort_values(["event_time", "session_id", "position"], kind="stable")
    present = [c for c in _OPTIONAL if c in ordered.columns]
    for row in ordered.itertuples(index=False):
        extra = {c: getattr(row, c) for c in present}
        yield Event(
            event_id=str(row.event_id),
            event_time=row.event_time.to_pydatetime(),
            event_type=str(row.event_type),
            session_id=str(row.session_id),
            item_id=str(row.item_id),
            **{k: (None if pd.isna(v) else v) for k, v in extra.items()},
        )


def producer(settings: StreamingSettings) -> KafkaProducer:
    # acks=all and retries: an event the producer was told is sent is on the broker.
    return KafkaProducer(
        bootstrap_servers=settings.bootstrap_servers, acks="all", retries=5, linger_ms=5
    )


def replay(
    frame: pd.DataFrame, settings: StreamingSettings, speedup: float = 0.0, limit: int = 0
) -> int:
    """Publish `frame`'s events (the first `limit`, 0 = all); return how many were sent."""
    out = producer(settings)
    sent, first_event, started = 0, None, time.monotonic()
    try:
        for event in events_of(frame):
            if limit and sent >= limit:
                break
            if speedup > 0:
                first_event = first_event or event.event_time
                due = (event.event_time - first_event).total_seconds() / speedup
                wait = due - (time.monotonic() - started)
                if wait > 0:
                    time.sleep(wait)
            out.send(settings.events_topic, key=event.session_id.encode(), value=encode(event))
            sent += 1
            if sent % 10_000 == 0:
                log.info("replaying", sent=sent)
        out.flush()
    finally:
        out.close()
    log.info("replay done", sent=sent, seconds=round(time.monotonic() - started, 2))
    return sent
