"""Clockless sessions given starts for a replay (training.shadow_replay.with_arrivals)."""

from __future__ import annotations

import pandas as pd
import pytest

from railtower.errors import RailtowerError
from training.shadow_replay import with_arrivals

EPOCH = pd.Timestamp("2000-01-01", tz="UTC")


def _clockless(sessions: int, length: int) -> pd.DataFrame:
    # as railtower.validation synthesises them: every session at the epoch, 1 s per position
    rows = [
        {"session_id": f"s{s}", "position": p, "event_time": EPOCH + pd.Timedelta(seconds=p)}
        for s in range(sessions)
        for p in range(length)
    ]
    return pd.DataFrame(rows)


def test_each_session_starts_once_per_interval_and_keeps_its_spacing():
    events = _clockless(30, 4)
    moved = with_arrivals(events, per_minute=6.0, seed=3)  # one session every 10 s
    starts = moved.groupby("session_id")["event_time"].min().sort_values()
    gaps = starts.diff().dropna().dt.total_seconds()
    assert (gaps == 10.0).all() and starts.iloc[0] == EPOCH
    spacing = (
        moved.sort_values("position")
        .groupby("session_id")["event_time"]
        .apply(lambda t: t.diff().dropna().dt.total_seconds().tolist())
    )
    assert all(s == [1.0, 1.0, 1.0] for s in spacing)


def test_the_order_is_seeded_and_not_the_input_order():
    events = _clockless(30, 2)
    first = with_arrivals(events, 6.0, seed=3)
    again = with_arrivals(events, 6.0, seed=3)
    other = with_arrivals(events, 6.0, seed=4)
    order = lambda f: f.groupby("session_id")["event_time"].min().sort_values().index.tolist()  # noqa: E731
    assert order(first) == order(again) != order(other)
    assert order(first) != [f"s{s}" for s in range(30)]


def test_no_rate_is_refused():
    with pytest.raises(RailtowerError, match="arrivals_per_minute"):
        with_arrivals(_clockless(2, 2), 0.0, seed=0)
