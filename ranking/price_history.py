"""Price-history features: one point-in-time definition for training and serving.

A :class:`PriceHistory` holds every price observation of every item (an event's price, or a
price update from the catalogue topic), sorted by item and time. :func:`price_features`
answers "what did the prices known *strictly before* `now` say about this item?" for many
(item, now) pairs at once; the re-ranker's training rows, its serving rows and the
deals_for_you rail all call it, so the features cannot skew between them, and an
observation at or after a request's time can never reach that request's features.

Per (item, now), over the observations before `now`:

- ``price_last``: the latest known price (the price in force at `now`);
- ``price_mean_{short,long}`` / ``price_std_{short,long}``: mean and population standard
  deviation of the prices in the window ``[now - w, now)``, plus the price in force when
  the window opened (a price holds until it changes, so a quiet item still has a level);
- ``price_discount_{short,long}``: ``1 - last / mean`` (> 0: below its own level);
- ``price_z_long``: ``(last - mean_long) / std_long`` (0 when every price was equal);
- ``price_deal_spike``: 1 when ``last < mean_long - k * std_long`` over at least
  ``min_points`` prices, else 0;
- ``price_hours_since_change``: hours since the current price was first seen (since the
  first observation when it never changed);
- ``price_volatility``: root mean square of the log price changes between consecutive
  observations in the long window (NaN with a single observation);
- ``price_points_long``: how many prices the long window holds.

Example:
    >>> from railtower.settings import PriceHistorySettings
    >>> cfg = PriceHistorySettings(short_window_h=1, long_window_h=10, deal_k=1.5, min_points=3)
    >>> row = single_item_features([0, 3600, 7200, 10800], [10, 10, 10, 6], 14400, cfg)
    >>> round(row[PRICE_FEATURES.index("price_mean_long")], 2), row[PRICE_FEATURES.index(
    ...     "price_deal_spike")]
    (9.0, 1.0)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from railtower.settings import PriceHistorySettings

PRICE_FEATURES: tuple[str, ...] = (
    "price_last",
    "price_mean_short",
    "price_std_short",
    "price_mean_long",
    "price_std_long",
    "price_discount_short",
    "price_discount_long",
    "price_z_long",
    "price_deal_spike",
    "price_hours_since_change",
    "price_volatility",
    "price_points_long",
)
_COL = {name: i for i, name in enumerate(PRICE_FEATURES)}
# Sort keys pack (item row, time in ms) into one int64 so one searchsorted finds every
# (item, now) boundary at once: 2^42 ms is 139 years, which leaves 2^21 item rows.
_TIME_SPAN = 1 << 42
_MAX_ROWS = 1 << 21
_TICK_S = 0.001  # the keys' time resolution
# A standard deviation this small relative to the price is rounding, not movement.
_STD_TOLERANCE = 1e-9


@dataclass(frozen=True)
class PriceHistory:
    """Price observations of `n_items` items, sorted by (item row, time, arrival).

    Attributes:
        n_items: rows of the catalogue the observations index (ItemStats row order).
        rows: (N,) int64 item row of each observation.
        times_ms: (N,) int64 epoch milliseconds of each observation.
        prices: (N,) float64 prices, all > 0 (a zero price is a data error, not a deal).
        clock_s: the newest time the live stream has delivered (epoch seconds), NaN offline.
            Serving never evaluates prices at a time earlier than this: a request cannot
            precede data the server already holds (see :meth:`request_clock`).
    """

    n_items: int
    rows: np.ndarray
    times_ms: np.ndarray
    prices: np.ndarray
    clock_s: float = float("nan")

    def __post_init__(self) -> None:
        if self.n_items > _MAX_ROWS:
            raise ValueError(
                f"PriceHistory supports at most {_MAX_ROWS:,} items, got {self.n_items:,}; "
                "shard the catalogue or widen the sort key in ranking/price_history.py"
            )
        keys = _keys(self.rows, self.times_ms)
        n = len(self.prices)
        # Derived once per history: prefix sums make every window a subtraction.
        starts = np.searchsorted(keys, _keys(np.arange(self.n_items + 1), np.zeros(1)), "left")
        first_obs = np.repeat(starts[:-1], np.diff(starts))  # each observation's first of item
        reference = self.prices[first_obs]
        deviation = self.prices - reference  # exact 0 for an unchanged price: no cancellation
        same_item = np.zeros(n, dtype=bool)
        same_item[1:] = self.rows[1:] == self.rows[:-1]
        log_change = np.zeros(n)
        if n > 1:
            ratio = np.log(self.prices[1:] / self.prices[:-1])
            log_change[1:] = np.where(same_item[1:], ratio, 0.0)
        changed = ~same_item
        changed[1:] |= self.prices[1:] != self.prices[:-1]
        run_start = np.maximum.accumulate(np.where(changed, np.arange(n), 0)) if n else first_obs
        # the first sighting of the current price; a price that never changed dates from
        # the item's first observation
        since_ms = self.times_ms[run_start] if n else np.zeros(0, dtype=np.int64)
        # Running sums restart with each item, so one item's features never depend on the
        # rounding of another's prices: appending to item a leaves item b bit-identical.
        sum1, sum2, change2 = np.zeros(n), np.zeros(n), np.zeros(n)
        for lo, hi in zip(starts[:-1], starts[1:], strict=True):
            if hi > lo:
                sum1[lo:hi] = np.cumsum(deviation[lo:hi])
                sum2[lo:hi] = np.cumsum(deviation[lo:hi] ** 2)
                change2[lo:hi] = np.cumsum(log_change[lo:hi] ** 2)
        derived = {
            "keys": keys,
            "starts": starts,
            "reference": reference,
            # inclusive running sums within the item, and the deviations to step back by one
            "sum1": sum1,
            "sum2": sum2,
            "dev1": deviation,
            "dev2": deviation**2,
            "change2": change2,
            "since_ms": since_ms,
        }
        object.__setattr__(self, "_d", derived)

    # ------------------------------------------------------------------ construction

    @classmethod
    def empty(cls, n_items: int) -> PriceHistory:
        return cls.from_observations(n_items, [], [], [])

    @classmethod
    def from_observations(
        cls,
        n_items: int,
        rows: Sequence[int] | np.ndarray,
        times_s: Sequence[float] | np.ndarray,
        prices: Sequence[float] | np.ndarray,
        clock_s: float = float("nan"),
    ) -> PriceHistory:
        """A history of raw observations; unknown items, missing times and prices <= 0 drop.

        Args:
            n_items: catalogue rows (observations with a row outside 0..n_items-1 are dropped).
            rows / times_s / prices: one entry per observation, in arrival order (equal
                times keep it, so the later arrival is the price in force).
        """
        r = np.asarray(rows, dtype=np.int64).reshape(-1)
        t = np.asarray(times_s, dtype=float).reshape(-1)
        p = np.asarray(prices, dtype=float).reshape(-1)
        if not len(r) == len(t) == len(p):
            raise ValueError(
                f"rows, times_s and prices must have one entry per observation, got "
                f"{len(r)}, {len(t)} and {len(p)}"
            )
        keep = (r >= 0) & (r < n_items) & np.isfinite(t) & np.isfinite(p) & (p > 0)
        r, p = r[keep], p[keep]
        t_ms = np.floor(t[keep] * 1000.0).astype(np.int64)
        order = np.argsort(_keys(r, t_ms), kind="stable")
        return cls(n_items, r[order], t_ms[order], p[order], clock_s)

    def extend(
        self,
        rows: Sequence[int] | np.ndarray,
        times_s: Sequence[float] | np.ndarray,
        prices: Sequence[float] | np.ndarray,
        advance_clock: bool = False,
    ) -> PriceHistory:
        """A new history with more observations (this one is unchanged: readers keep theirs).

        `advance_clock` (the live stream) moves :attr:`clock_s` to the newest added time.
        """
        t = np.asarray(times_s, dtype=float).reshape(-1)
        clock = self.clock_s
        if advance_clock and len(t):
            newest = float(np.nanmax(t))
            clock = newest if not np.isfinite(clock) else max(clock, newest)
        return PriceHistory.from_observations(
            self.n_items,
            np.r_[self.rows, np.asarray(rows, dtype=np.int64).reshape(-1)],
            np.r_[self.times_ms / 1000.0, t],
            np.r_[self.prices, np.asarray(prices, dtype=float).reshape(-1)],
            clock,
        )

    def __len__(self) -> int:
        return len(self.prices)

    def items_with_history(self) -> np.ndarray:
        """Rows of the items that have at least one observation."""
        return np.flatnonzero(np.diff(self._d["starts"]) > 0)  # type: ignore[attr-defined]

    def request_clock(self, nows_s: np.ndarray) -> np.ndarray:
        """The time the features are evaluated at: `now`, never before the live clock.

        A live request comes after every price the server already holds, the newest
        included: so the clock is one key tick (1 ms) past it, as features count only what
        came strictly before.
        """
        nows = np.asarray(nows_s, dtype=float)
        if not np.isfinite(self.clock_s):
            return nows
        after = self.clock_s + _TICK_S
        return np.where(np.isfinite(nows), np.maximum(nows, after), after)

    # ------------------------------------------------------------------ persistence

    def save(self, path: Path) -> Path:
        np.savez(
            path,
            n_items=np.int64(self.n_items),
            rows=self.rows,
            times_ms=self.times_ms,
            prices=self.prices,
        )
        return path

    @classmethod
    def load(cls, path: Path) -> PriceHistory:
        with np.load(path, allow_pickle=False) as data:
            return cls(
                int(data["n_items"]),
                data["rows"].astype(np.int64),
                data["times_ms"].astype(np.int64),
                data["prices"].astype(float),
            )


def price_features(
    history: PriceHistory,
    rows: np.ndarray,
    nows_s: np.ndarray,
    settings: PriceHistorySettings,
) -> np.ndarray:
    """The (len(rows), len(PRICE_FEATURES)) float64 features, NaN where nothing is known.

    Args:
        history: the observations; only those strictly before each row's `now` count.
        rows: (n,) item row per output row (-1: unknown item, all NaN).
        nows_s: (n,) epoch seconds each row is evaluated at (NaN: no clock, all NaN).
        settings: windows, deal threshold k and the minimum number of prices.
    """
    rows = np.asarray(rows, dtype=np.int64)
    nows = np.asarray(nows_s, dtype=float)
    out = np.full((len(rows), len(PRICE_FEATURES)), np.nan)
    d = history._d  # type: ignore[attr-defined]
    ok = (rows >= 0) & (rows < history.n_items) & np.isfinite(nows)
    idx = np.flatnonzero(ok)
    r = rows[idx]
    now_ms = np.floor(nows[idx] * 1000.0).astype(np.int64)
    end = np.searchsorted(d["keys"], _keys(r, now_ms), "left")  # first observation >= now
    lo = d["starts"][r]
    seen = end > lo
    idx, r, now_ms, end, lo = idx[seen], r[seen], now_ms[seen], end[seen], lo[seen]
    if not len(idx):
        return out
    last = history.prices[end - 1]
    out[idx, _COL["price_last"]] = last
    stats = {}
    for name, hours in (("short", settings.short_window_h), ("long", settings.long_window_h)):
        opened = np.searchsorted(d["keys"], _keys(r, now_ms - int(hours * 3_600_000)), "left")
        # the price in force when the window opened counts as one of its prices
        begin = np.where(opened > lo, opened - 1, opened)
        n = (end - begin).astype(float)
        # sums over [begin, end): inclusive at end - 1 minus inclusive-before at begin
        first = d["sum1"][begin] - d["dev1"][begin]
        shift = (d["sum1"][end - 1] - first) / n
        second = d["sum2"][end - 1] - (d["sum2"][begin] - d["dev2"][begin])
        var = np.maximum(second / n - shift**2, 0.0)
        mean = d["reference"][end - 1] + shift
        std = np.sqrt(var)
        std = np.where(std <= _STD_TOLERANCE * np.maximum(mean, 1.0), 0.0, std)
        out[idx, _COL[f"price_mean_{name}"]] = mean
        out[idx, _COL[f"price_std_{name}"]] = std
        out[idx, _COL[f"price_discount_{name}"]] = 1.0 - last / mean
        stats[name] = (begin, n, mean, std)
    begin, n, mean, std = stats["long"]
    flat = std == 0.0
    out[idx, _COL["price_z_long"]] = np.where(flat, 0.0, (last - mean) / np.where(flat, 1.0, std))
    spike = (n >= settings.min_points) & ~flat & (last < mean - settings.deal_k * std)
    out[idx, _COL["price_deal_spike"]] = spike.astype(float)
    out[idx, _COL["price_hours_since_change"]] = (now_ms - d["since_ms"][end - 1]) / 3_600_000.0
    changes = n - 1.0  # the log changes inside the window: begin+1 .. end-1
    squares = d["change2"][end - 1] - d["change2"][begin]  # the changes at begin+1 .. end-1
    out[idx, _COL["price_volatility"]] = np.where(
        changes > 0, np.sqrt(squares / np.maximum(changes, 1.0)), np.nan
    )
    out[idx, _COL["price_points_long"]] = n
    return out


def single_item_features(
    times_s: Sequence[float],
    prices: Sequence[float],
    now_s: float,
    settings: PriceHistorySettings,
) -> np.ndarray:
    """The feature vector of one item's price history at `now_s` (the same definition)."""
    history = PriceHistory.from_observations(1, np.zeros(len(times_s)), times_s, prices)
    return price_features(history, np.zeros(1), np.array([now_s]), settings)[0]


def deal_strength(features: np.ndarray, spike_bonus: float) -> np.ndarray:
    """Discount against the long mean (>= 0), plus `spike_bonus` for a deal spike; NaN -> 0."""
    discount = np.nan_to_num(features[:, _COL["price_discount_long"]], nan=0.0)
    spike = np.nan_to_num(features[:, _COL["price_deal_spike"]], nan=0.0)
    return np.maximum(discount, 0.0) + spike_bonus * spike


def column(features: np.ndarray, name: str) -> np.ndarray:
    """One named column of a :func:`price_features` matrix."""
    return features[:, _COL[name]]


def _keys(rows: np.ndarray, times_ms: np.ndarray) -> np.ndarray:
    t = np.clip(np.asarray(times_ms, dtype=np.int64), 0, _TIME_SPAN - 1)
    return np.asarray(rows, dtype=np.int64) * _TIME_SPAN + t
