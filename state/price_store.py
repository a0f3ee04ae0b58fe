"""Price history in Redis: the refresh consumer appends, every API process follows.

Keys (one hash tag, so on Redis Cluster they share a slot and one script touches them all;
the whole stream therefore lives on one master, which is what lets every process follow one
cursor in order):

    rt:{price}:points           stream of price observations {item, t (epoch s), p}, capped,
                                with a TTL refreshed by every append that adds a point
    rt:{price}:seen:<point id>  marks an applied observation (event or update id), with a TTL

The stream lives `points_ttl_s` after its last new point: `price_points_ttl_s` makes that
the long price window (`ranking.prices.long_window_h`, 28 days by default), the longest
any reader looks back (a hot-swapped model replays the whole stream into its long-window
features and deal references). A shop that publishes no price for that long has nothing in
the stream inside any window, and its stream expires instead of staying in Redis for ever;
what goes with it is only each item's last price before the window opened, which a model
then takes from its bundle's own history.

The consumer appends each micro-batch's prices (events' prices and the catalogue topic's
price updates) in one Lua script that marks and appends atomically, so a redelivered batch
adds nothing twice. Each process (the consumer's own included) then reads the stream from
its cursor and extends the served model's :class:`~ranking.price_history.PriceHistory`:
the one path by which serving learns prices, so every process computes the same features
from the same observations. A hot-swapped model starts from its bundle's history and
replays the whole stream.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from railtower.settings import Settings
from state.redis_client import RedisClient

POINTS_KEY = "rt:{price}:points"
_SEEN_PREFIX = "rt:{price}:seen:"
_READ_BATCH = 10_000

# KEYS: stream, then one seen-marker per point. ARGV: max length, marker TTL, stream TTL,
# then (item, time, price) triples in KEYS order. The stream's TTL is refreshed only when
# a point was added: a redelivered batch brings nothing new and extends nothing.
_APPEND = """
local added = 0
for i = 2, #KEYS do
  local a = 4 + (i - 2) * 3
  if redis.call('SET', KEYS[i], '1', 'NX', 'EX', tonumber(ARGV[2])) then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*',
               'item', ARGV[a], 't', ARGV[a + 1], 'p', ARGV[a + 2])
    added = added + 1
  end
end
if added > 0 then redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3])) end
return added
"""


def price_points_ttl_s(settings: Settings) -> int:
    """Seconds the price stream lives after its last new point: the long price window."""
    return math.ceil(settings.ranking.prices.long_window_h * 3600)


@dataclass(frozen=True)
class PricePoint:
    """One price observation: `point_id` (the event or update id) makes it idempotent."""

    point_id: str
    item_id: str
    time_s: float
    price: float


class PriceStore:
    """The price stream in Redis (appends from the consumer, reads from every process).

    Args:
        client: the Redis (or cluster) client.
        max_points: observations the stream keeps (approximately: MAXLEN ~).
        seen_ttl_s: how long an applied point's idempotence marker lives.
        points_ttl_s: how long the stream lives after its last new point (None: as long as
            a marker; the API and the consumer pass `price_points_ttl_s(settings)`).
    """

    def __init__(
        self,
        client: RedisClient,
        max_points: int,
        seen_ttl_s: int,
        points_ttl_s: int | None = None,
    ) -> None:
        points_ttl_s = seen_ttl_s if points_ttl_s is None else points_ttl_s
        if max_points < 1 or seen_ttl_s < 1 or points_ttl_s < 1:
            raise ValueError(
                f"max_points ({max_points}), seen_ttl_s ({seen_ttl_s}) and points_ttl_s "
                f"({points_ttl_s}) must be >= 1; see serving.price_points_max, "
                "serving.state_ttl_s and ranking.prices.long_window_h"
            )
        self.client, self.max_points, self.seen_ttl_s = client, max_points, seen_ttl_s
        self.points_ttl_s = points_ttl_s
        self._append = client.register_script(_APPEND)

    def append(self, points: Sequence[PricePoint]) -> int:
        """Append the points not applied before; return how many were new.

        Raises:
            redis.RedisError: Redis is down (the consumer does not commit the batch).
        """
        if not points:
            return 0
        keys = [POINTS_KEY, *(f"{_SEEN_PREFIX}{p.point_id}" for p in points)]
        args: list[str | int | float] = [self.max_points, self.seen_ttl_s, self.points_ttl_s]
        for p in points:
            args += [p.item_id, repr(float(p.time_s)), repr(float(p.price))]
        return int(self._append(keys=keys, args=args))

    def read(self, after: str) -> tuple[str, list[tuple[str, float, float]]]:
        """(new cursor, [(item, time_s, price)]) of the entries after stream id `after`
        ("0" = from the start)."""
        out: list[tuple[str, float, float]] = []
        cursor = after
        while True:
            low = "-" if cursor == "0" else f"({cursor}"
            entries: list[tuple[bytes, dict[bytes, bytes]]] = self.client.xrange(  # type: ignore[assignment]
                POINTS_KEY, min=low, max="+", count=_READ_BATCH
            )
            for entry_id, fields in entries:
                out.append((fields[b"item"].decode(), float(fields[b"t"]), float(fields[b"p"])))
                cursor = entry_id.decode()
            if len(entries) < _READ_BATCH:
                return cursor, out
