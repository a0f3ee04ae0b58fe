"""`railtower replay`: publish a data set's events to the events topic, in time order.

Keyed by session id, so one session stays on one partition and in order. `speedup` scales
the gaps between events (1 = real time, 60 = an hour a minute, 0 = as fast as possible).

`inject_drops` makes a replay measure the deal mechanics on data whose prices barely move
(REES46's 3 hours): a seeded share of the priced items gets a price drop at one of its
event times, published on the catalogue topic just before that event, and the item's later
events carry the dropped price (the shop's price really changed). Every figure measured on
such a replay comes from injected drops, not from the shop's own prices.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
from kafka import KafkaProducer

from railtower.logs import get_logger
from railtower.schemas import CatalogueUpdate, Event, encode
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
    # acks=all and retries: an event the producer was told is sent is on the broker. One
    # request in flight per connection: with several, a retried batch can land after the
    # next one and a session's events reach the consumer out of order (a duplicate from a
    # retry is harmless: the session store drops an event id it has applied).
    return KafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        acks="all",
        retries=5,
        linger_ms=5,
        max_in_flight_requests_per_connection=1,
    )


def inject_drops(
    frame: pd.DataFrame, share: float, drop: float, seed: int
) -> tuple[pd.DataFrame, list[CatalogueUpdate]]:
    """Drop the price of a seeded `share` of the priced items by `drop` (a fraction).

    Each chosen item (one with at least two priced events, so it has a level before the
    drop) drops at a seeded one of its event times after its first: the update is stamped
    at that time and the event and every later one of the item show the dropped price.

    Args:
        frame: canonical events with `price`.
        share: share of the eligible items to drop, in (0, 1].
        drop: the fraction taken off, in (0, 1) (0.3 = 30% off).
        seed: the same seed picks the same items and times.

    Returns:
        (events with the dropped prices, the catalogue updates in time order).

    Raises:
        ValueError: share or drop outside its range, or the events have no prices.
    """
    if not 0.0 < share <= 1.0:
        raise ValueError(f"--inject-drops share must be in (0, 1], got {share}")
    if not 0.0 < drop < 1.0:
        raise ValueError(f"--drop must be a fraction in (0, 1), got {drop}")
    if "price" not in frame.columns or frame["price"].isna().all():
        raise ValueError("the events have no prices to drop; pick a data set with a price column")
    priced = frame[frame["price"].notna() & (frame["price"] > 0)]
    counts = priced.groupby("item_id", observed=True).size()
    eligible = np.sort(counts[counts >= 2].index.astype(str).to_numpy())
    rng = np.random.default_rng(seed)
    chosen = rng.choice(eligible, int(round(share * len(eligible))), replace=False)
    out = frame.copy()
    updates = []
    ordered = priced.sort_values(["event_time", "session_id", "position"], kind="stable")
    times_of = ordered.groupby(ordered["item_id"].astype(str), observed=True)["event_time"]
    groups = {item: times.to_numpy() for item, times in times_of}
    for item in sorted(chosen.tolist()):
        times = groups[item]
        at = pd.Timestamp(times[int(rng.integers(1, len(times)))])
        before = priced[(priced["item_id"].astype(str) == item) & (priced["event_time"] < at)]
        level = float(before["price"].median())
        later = (out["item_id"].astype(str) == item) & (out["event_time"] >= at)
        out.loc[later, "price"] = out.loc[later, "price"] * (1.0 - drop)
        updates.append(
            CatalogueUpdate(
                update_id=f"drop-{seed}-{item}",
                item_id=item,
                time=at.to_pydatetime(),
                price=round(level * (1.0 - drop), 4),
            )
        )
    updates.sort(key=lambda u: u.time)
    log.info("price drops injected", items=len(updates), eligible=len(eligible), drop=drop)
    return out, updates


def replay(
    frame: pd.DataFrame,
    settings: StreamingSettings,
    speedup: float = 0.0,
    limit: int = 0,
    updates: Sequence[CatalogueUpdate] = (),
) -> int:
    """Publish `frame`'s events (the first `limit`, 0 = all); return how many were sent.

    `updates` (e.g. from :func:`inject_drops`) go to the catalogue topic, keyed by item,
    each just before the first event at or after its time.
    """
    out = producer(settings)
    sent, first_event, started = 0, None, time.monotonic()
    pending = sorted(updates, key=lambda u: u.time)
    next_update = 0
    try:
        for event in events_of(frame):
            if limit and sent >= limit:
                break
            while next_update < len(pending) and pending[next_update].time <= event.event_time:
                update = pending[next_update]
                out.send(
                    settings.catalogue_topic, key=update.item_id.encode(), value=encode(update)
                )
                next_update += 1
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
        if not limit:  # drops stamped after the last event still reach the catalogue
            for update in pending[next_update:]:
                out.send(
                    settings.catalogue_topic, key=update.item_id.encode(), value=encode(update)
                )
            next_update = len(pending)
        out.flush()
    finally:
        out.close()
    log.info(
        "replay done",
        sent=sent,
        catalogue_updates=next_update,
        seconds=round(time.monotonic() - started, 2),
    )
    return sent
