"""Each case's view of its shopper's earlier purchases, point in time.

A request carries what the user bought before (serving reads it from the order memory the
consumer keeps in Redis); an evaluation case must carry exactly what serving would have
had: the purchases of the same user's sessions that ended before this session began, never
a later one, capped and expired as the memory caps and expires them. Guests, and data sets
without a clock or user ids (Amazon-M2), get none.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

import numpy as np
import pandas as pd

from railtower.datasets import Dataset
from railtower.settings import PurchaseMemorySettings


@dataclass(frozen=True)
class PastPurchases:
    """Per user, the end times of their sessions with purchases (ascending) and each such
    session's purchased items in first-purchase order."""

    ends: dict[str, list[float]]
    items: dict[str, list[tuple[str, ...]]]
    max_entries: int
    ttl_s: float | None  # the memory's expiry after the last purchase (None = kept)

    @classmethod
    def of(cls, dataset: Dataset, memory: PurchaseMemorySettings) -> PastPurchases:
        """The purchase history of `dataset`'s users as `memory` keeps it (none when the
        memory is off)."""
        events = dataset.events if memory.days is not None else None
        return cls.from_events(events, dataset.has_time, memory.max_entries, memory.days)

    @classmethod
    def from_events(
        cls,
        events: pd.DataFrame | None,
        has_time: bool,
        max_entries: int,
        days: float | None = None,
    ) -> PastPurchases:
        """The purchase history of every user in `events` (empty without a clock or users)."""
        ends: dict[str, list[float]] = {}
        items: dict[str, list[tuple[str, ...]]] = {}
        ttl_s = None if days is None else days * 86400
        if events is None or not has_time or "user_id" not in events.columns:
            return cls(ends, items, max_entries, ttl_s)
        bought = events[(events["event_type"] == "purchase") & events["user_id"].notna()]
        if bought.empty:
            return cls(ends, items, max_entries, ttl_s)
        seconds = bought["event_time"].astype("int64").to_numpy() / 1e9
        frame = pd.DataFrame(
            {
                "user": bought["user_id"].astype(str).to_numpy(),
                "session": bought["session_id"].astype(str).to_numpy(),
                "item": bought["item_id"].astype(str).to_numpy(),
                "time": seconds,
            }
        ).sort_values(["time"], kind="stable")
        # a session ends at its last event of any kind, as the split assigns it
        session_end = events.groupby(events["session_id"].astype(str))["event_time"].max()
        end_s = session_end.astype("int64") / 1e9
        frame["end"] = frame["session"].map(end_s).to_numpy(dtype=np.float64)
        per_session = frame.groupby(["user", "end", "session"], sort=True)["item"].agg(
            lambda s: tuple(dict.fromkeys(s))
        )
        for (user, end, _session), basket in per_session.items():
            ends.setdefault(user, []).append(float(end))
            items.setdefault(user, []).append(basket)
        return cls(ends, items, max_entries, ttl_s)

    def before(self, user: str | None, start_s: float) -> tuple[str, ...]:
        """`user`'s purchases in sessions that ended before `start_s`, oldest first, the
        newest `max_entries` of them; none when the newest ended more than the memory's
        expiry before `start_s` (the memory had expired)."""
        if not user or user not in self.ends:
            return ()
        n = bisect_left(self.ends[user], start_s)
        if n == 0 or (self.ttl_s is not None and self.ends[user][n - 1] < start_s - self.ttl_s):
            return ()
        flat = [item for basket in self.items[user][:n] for item in basket]
        return tuple(flat[-self.max_entries :])
