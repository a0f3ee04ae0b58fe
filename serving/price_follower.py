"""Each API process follows the price stream (state.price_store) into its served model.

The one path by which serving learns prices: every process (the consumer's own included)
reads the stream from its cursor and extends the served model's
:class:`~ranking.price_history.PriceHistory`, so all compute the same features from the same
observations. A hot-swapped model starts from its bundle's history and replays the stream.
"""

from __future__ import annotations

import threading

import numpy as np

from railtower.logs import get_logger
from ranking.price_history import PriceHistory
from serving.rail_service import LoadedRails
from state.price_store import PriceStore

log = get_logger(__name__)


class PriceFollower:
    """Keeps the served model's price history current from the Redis stream."""

    def __init__(self, store: PriceStore) -> None:
        self.store = store
        self._version: str | None = None
        self._cursor = "0"
        # the consumer's step and an app's catalogue watch may share one follower: each
        # stream entry must extend the history exactly once
        self._lock = threading.Lock()

    def sync(self, loaded: LoadedRails | None) -> int:
        """Apply the stream's new observations to `loaded`; return how many were read.

        Raises:
            redis.RedisError: Redis is down (callers keep the history they have).
        """
        if loaded is None:
            return 0
        with self._lock:
            return self._sync(loaded)

    def _sync(self, loaded: LoadedRails) -> int:
        if loaded.version != self._version:
            # a new model holds its bundle's history only: replay every live observation
            self._version, self._cursor = loaded.version, "0"
        cursor, entries = self.store.read(self._cursor)
        self._cursor = cursor
        if not entries:
            return 0
        stats = loaded.pipeline.stats
        rows = np.array([stats.row.get(item, -1) for item, _, _ in entries], dtype=np.int64)
        times = np.array([t for _, t, _ in entries])
        prices = np.array([p for _, _, p in entries])
        history = stats.prices or PriceHistory.empty(len(stats.item_ids))
        stats.prices = history.extend(rows, times, prices, advance_clock=True)
        unknown = int((rows < 0).sum())
        log.info(
            "price history extended",
            version=loaded.version,
            points=len(entries),
            unknown_items=unknown,
            clock_s=stats.prices.clock_s,
        )
        return len(entries)
