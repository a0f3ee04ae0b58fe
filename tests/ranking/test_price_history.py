"""Price-history features: rolling statistics written out by hand, deal spikes on series with
known answers, and point-in-time correctness (no price at or after a request reaches it)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from railtower.settings import EventWeights, PriceHistorySettings, RankingSettings
from ranking.business_features import FEATURES, ItemStats, build_features
from ranking.candidate_fusion import fuse
from ranking.candidates import Candidate
from ranking.price_history import (
    PRICE_FEATURES,
    PriceHistory,
    price_features,
    single_item_features,
)
from ranking.retriever import Catalogue, Query

H = 3600.0
COL = {name: i for i, name in enumerate(PRICE_FEATURES)}
CFG = PriceHistorySettings(short_window_h=2, long_window_h=10, deal_k=2.0, min_points=5)


def feature(row: np.ndarray, name: str) -> float:
    return float(row[COL[name]])


def test_rolling_statistics_match_the_hand_computed_values():
    # prices 10, 12, 11, 13, 9 at hours 0..4, asked at hour 5
    row = single_item_features([0, H, 2 * H, 3 * H, 4 * H], [10, 12, 11, 13, 9], 5 * H, CFG)
    assert feature(row, "price_last") == 9
    # short window [3h, 5h): 13 and 9, plus 11, the price in force when it opened
    assert feature(row, "price_mean_short") == pytest.approx(11.0)
    assert feature(row, "price_std_short") == pytest.approx(math.sqrt(8 / 3))
    # long window: all five prices
    assert feature(row, "price_mean_long") == pytest.approx(11.0)
    assert feature(row, "price_std_long") == pytest.approx(math.sqrt(2.0))
    assert feature(row, "price_discount_short") == pytest.approx(1 - 9 / 11)
    assert feature(row, "price_discount_long") == pytest.approx(1 - 9 / 11)
    assert feature(row, "price_z_long") == pytest.approx(-2 / math.sqrt(2.0))
    assert feature(row, "price_deal_spike") == 0.0  # z = -1.41 is not beyond k = 2
    assert feature(row, "price_hours_since_change") == pytest.approx(1.0)
    changes = np.log([12 / 10, 11 / 12, 13 / 11, 9 / 13])
    assert feature(row, "price_volatility") == pytest.approx(math.sqrt(np.mean(changes**2)))
    assert feature(row, "price_points_long") == 5


def test_an_observation_at_the_request_time_is_not_known_to_it():
    row = single_item_features([0, H, 2 * H, 3 * H, 4 * H], [10, 12, 11, 13, 9], 4 * H, CFG)
    assert feature(row, "price_last") == 13  # the 9 arrives at 4h, not before it
    assert feature(row, "price_points_long") == 4


def test_deal_spike_fires_exactly_past_k_standard_deviations():
    # ten prices of 100 then 70: z = -sqrt(10) = -3.162 (one outlier among n + 1)
    times = [k * H for k in range(11)]
    prices = [100.0] * 10 + [70.0]
    long = PriceHistorySettings(short_window_h=1, long_window_h=24, min_points=5, deal_k=3.1)
    row = single_item_features(times, prices, 11 * H, long)
    assert feature(row, "price_z_long") == pytest.approx(-math.sqrt(10))
    assert feature(row, "price_deal_spike") == 1.0
    assert feature(row, "price_discount_long") == pytest.approx(1 - 70 / (1070 / 11))
    assert feature(row, "price_hours_since_change") == pytest.approx(1.0)
    stricter = long.model_copy(update={"deal_k": 3.2})
    assert feature(single_item_features(times, prices, 11 * H, stricter), "price_deal_spike") == 0
    # before the drop nothing is a deal
    before = single_item_features(times, prices, 10 * H, long)
    assert feature(before, "price_deal_spike") == 0.0
    assert feature(before, "price_z_long") == 0.0


def test_too_few_prices_are_never_a_spike():
    # 100, 100, 50: z = -sqrt(2) beyond k = 1, but only 3 prices < min_points = 5
    few = PriceHistorySettings(short_window_h=1, long_window_h=24, min_points=5, deal_k=1.0)
    row = single_item_features([0, H, 2 * H], [100, 100, 50], 3 * H, few)
    assert feature(row, "price_z_long") == pytest.approx(-math.sqrt(2))
    assert feature(row, "price_deal_spike") == 0.0
    assert (
        feature(
            single_item_features(
                [0, H, 2 * H], [100, 100, 50], 3 * H, few.model_copy(update={"min_points": 3})
            ),
            "price_deal_spike",
        )
        == 1.0
    )


def test_a_constant_price_has_no_spread_no_deal_and_dates_from_its_first_sighting():
    row = single_item_features([0, H, 2 * H, 5 * H], [4.2] * 4, 6 * H, CFG)
    assert feature(row, "price_std_long") == 0.0
    assert feature(row, "price_z_long") == 0.0
    assert feature(row, "price_deal_spike") == 0.0
    assert feature(row, "price_volatility") == 0.0
    assert feature(row, "price_hours_since_change") == pytest.approx(6.0)
    assert feature(row, "price_mean_long") == pytest.approx(4.2)


def test_a_quiet_item_keeps_the_price_in_force_as_its_level():
    # last seen 50 h ago, far outside both windows: the price still holds
    row = single_item_features([0, H], [8.0, 6.0], 51 * H, CFG)
    assert feature(row, "price_mean_long") == 6.0
    assert feature(row, "price_points_long") == 1
    assert math.isnan(feature(row, "price_volatility"))  # one price: no change to measure
    assert feature(row, "price_hours_since_change") == pytest.approx(50.0)


def test_unknown_items_no_clock_and_bad_prices_give_nan():
    history = PriceHistory.from_observations(2, [0, 0, 1, 1], [0, H, 0, H], [5.0, 0.0, -1, 3])
    assert len(history) == 2  # a zero or negative price is a data error, not a deal
    out = price_features(
        history, np.array([0, -1, 1, 0]), np.array([2 * H, 2 * H, 2 * H, np.nan]), CFG
    )
    assert out[0, COL["price_last"]] == 5.0 and out[2, COL["price_last"]] == 3.0
    assert np.isnan(out[1]).all() and np.isnan(out[3]).all()
    nothing_yet = price_features(history, np.array([0]), np.array([0.0]), CFG)
    assert np.isnan(nothing_yet).all()  # nothing is known before the first observation


def test_mismatched_observation_arrays_say_which():
    with pytest.raises(ValueError, match="one entry per observation, got 2, 1 and 2"):
        PriceHistory.from_observations(3, [0, 1], [0.0], [1.0, 2.0])


def test_appending_a_later_price_leaves_earlier_requests_unchanged():
    history = PriceHistory.from_observations(
        3, [0, 0, 1, 1, 2, 0], [0, H, 0, 3 * H, H, 2 * H], [10, 11, 5, 4, 7, 9]
    )
    rows = np.array([0, 1, 2, 0, 1])
    nows = np.array([2.5 * H, 3.5 * H, 4 * H, 4 * H, 3 * H])
    before = price_features(history, rows, nows, CFG)
    # every later price, and one exactly at the latest request's time, changes nothing
    later = history.extend([0, 1, 2, 0], [4 * H, 4 * H, 9 * H, 4.5 * H], [1.0, 1.0, 1.0, 2.0])
    assert len(later) == len(history) + 4
    np.testing.assert_array_equal(price_features(later, rows, nows, CFG), before)
    # and a price in time does change the request that comes after it
    earlier = history.extend([0], [2.2 * H], [1.0])
    assert price_features(earlier, rows[:1], nows[:1], CFG)[0, COL["price_last"]] == 1.0


def _stats(events: pd.DataFrame, items: pd.DataFrame, ranking: RankingSettings) -> ItemStats:
    return ItemStats.fit(
        events, items, Catalogue(items), ranking, EventWeights(), 4, ["cart", "purchase"]
    )


def _events(rows: list[tuple[str, str, float, float]]) -> pd.DataFrame:
    """Events from (session, item, hours after t0, price)."""
    t0 = pd.Timestamp("2024-03-01", tz="UTC")
    frame = pd.DataFrame(
        {
            "event_id": [f"e{k}" for k in range(len(rows))],
            "event_time": [t0 + pd.Timedelta(hours=h) for _, _, h, _ in rows],
            "event_type": "view",
            "session_id": [s for s, _, _, _ in rows],
            "item_id": [i for _, i, _, _ in rows],
            "position": 0,
            "price": [p for _, _, _, p in rows],
        }
    )
    for col in ("event_id", "event_type", "session_id", "item_id"):
        frame[col] = frame[col].astype("string")
    return frame


ITEMS = pd.DataFrame({"item_id": ["a", "b", "c"], "category_path": ["x", "x", "y"]})
PRICED = [
    ("s0", "a", 0, 10.0),
    ("s0", "b", 1, 20.0),
    ("s1", "a", 2, 10.0),
    ("s1", "a", 3, 10.0),
    ("s2", "b", 4, 18.0),
    ("s2", "a", 5, 10.0),
    ("s3", "a", 6, 6.0),
    ("s3", "c", 7, 3.0),
]


def _table(queries: int) -> object:
    row = [Candidate(i, 1.0 / (1 + r)) for r, i in enumerate(["a", "b", "c"])]
    return fuse({"covisitation": [list(row) for _ in range(queries)]}, queries, 10, 60)


def test_training_features_of_earlier_requests_ignore_a_later_price_change():
    t0 = pd.Timestamp("2024-03-01", tz="UTC").timestamp()
    queries = [
        Query(session_items=("c",), session_times=(t0 + 5.5 * H,)),
        Query(session_items=("b",), session_times=(t0 + 7.5 * H,)),
    ]
    start = FEATURES.index(PRICE_FEATURES[0])
    ranking = RankingSettings(price_features=True)
    base = build_features(_table(2), queries, _stats(_events(PRICED), ITEMS, ranking))
    later = PRICED + [("s9", "a", 8, 1.0), ("s9", "b", 9, 1.0)]
    again = build_features(_table(2), queries, _stats(_events(later), ITEMS, ranking))
    prices = slice(start, start + len(PRICE_FEATURES))
    np.testing.assert_array_equal(again[:, prices], base[:, prices])
    # the first request (5.5 h) has not seen item a's drop to 6 at 6 h; the second has
    a_first, a_second = base[0, start + COL["price_last"]], base[3, start + COL["price_last"]]
    assert (a_first, a_second) == (10.0, 6.0)


def test_switching_price_features_off_leaves_their_columns_empty():
    t0 = pd.Timestamp("2024-03-01", tz="UTC").timestamp()
    queries = [Query(session_items=("c",), session_times=(t0 + 7.5 * H,))]
    off = RankingSettings(price_features=False)
    x = build_features(_table(1), queries, _stats(_events(PRICED), ITEMS, off))
    start = FEATURES.index(PRICE_FEATURES[0])
    assert np.isnan(x[:, start : start + len(PRICE_FEATURES)]).all()
    on_settings = RankingSettings(price_features=True)
    on = build_features(_table(1), queries, _stats(_events(PRICED), ITEMS, on_settings))
    assert np.isfinite(on[:, start + COL["price_last"]]).all()


def test_saved_and_loaded_statistics_give_identical_price_features(tmp_path):
    stats = _stats(_events(PRICED), ITEMS, RankingSettings())
    stats.save(tmp_path)
    loaded = ItemStats.load(tmp_path)
    rows, nows = np.array([0, 1, 2, 0]), np.full(4, stats.end_time + 1)
    np.testing.assert_array_equal(loaded.price_matrix(rows, nows), stats.price_matrix(rows, nows))
    assert loaded.price_settings == stats.price_settings


def test_the_live_clock_never_evaluates_before_data_already_received():
    history = PriceHistory.from_observations(1, [0, 0], [0, H], [10.0, 10.0])
    assert np.isnan(history.clock_s)
    np.testing.assert_array_equal(history.request_clock(np.array([5.0])), [5.0])
    live = history.extend([0], [7 * H], [5.0], advance_clock=True)
    assert live.clock_s == 7 * H
    clock = live.request_clock(np.array([2 * H, 9 * H, np.nan]))
    np.testing.assert_array_equal(clock, [7 * H + 0.001, 9 * H, 7 * H + 0.001])
    # the newest price the server holds is known to the next request
    now = live.request_clock(np.array([2 * H]))
    assert price_features(live, np.array([0]), now, CFG)[0, COL["price_last"]] == 5.0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 40), st.sampled_from([1.0, 2.5, 3.0, 7.25])),
        min_size=1,
        max_size=40,
    ),
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 45)), min_size=1, max_size=10),
)
def test_the_batch_over_many_items_equals_each_item_on_its_own(observations, requests):
    rows, hours, prices = (np.array(v) for v in zip(*observations, strict=True))
    history = PriceHistory.from_observations(4, rows, hours * H, prices)
    ask_rows = np.array([r for r, _ in requests])
    ask_nows = np.array([h * H for _, h in requests], dtype=float)
    batch = price_features(history, ask_rows, ask_nows, CFG)
    for k, (item, now) in enumerate(zip(ask_rows, ask_nows, strict=True)):
        mine = rows == item
        alone = single_item_features((hours[mine] * H).tolist(), prices[mine].tolist(), now, CFG)
        np.testing.assert_allclose(batch[k], alone, rtol=1e-9, atol=1e-9, equal_nan=True)
