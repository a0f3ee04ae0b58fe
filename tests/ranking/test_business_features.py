"""The re-ranker's business features on a toy shop whose right answers are written out, and the
train/serve identity: statistics saved and loaded give bit-identical features."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from railtower.settings import EventWeights, RankingSettings
from ranking.business_features import (
    CONTEXT_FEATURES,
    FEATURES,
    ITEM_FEATURES,
    SESSION_FEATURES,
    SOURCE_FEATURES,
    ItemStats,
    build_features,
)
from ranking.candidate_fusion import CandidateTable, fuse
from ranking.candidates import Candidate
from ranking.price_history import PRICE_FEATURES
from ranking.retriever import Catalogue, Query
from tests.conftest import toy_events

STRONG = ["cart", "purchase"]
BANDS = 4

# (id, category, brand, price, stock, margin)
SHOP = [
    ("hp1", "electronics > audio", "sony", 100.0, 3, 0.2),
    ("hp2", "electronics > audio", "bose", 300.0, 1, 0.3),
    ("hp3", "electronics > audio", "sony", 150.0, 2, 0.1),
    ("cab1", "electronics > cables", "acme", 10.0, 0, 0.5),
    ("cab2", "electronics > cables", "acme", 12.0, 9, 0.5),
    ("ph1", "electronics > phone", "sony", 500.0, 5, 0.1),
    ("ph2", "electronics > phone", "apple", 900.0, 4, 0.05),
    ("kt1", "appliances > kettle", "tefal", 30.0, 7, 0.3),
    ("kt2", "appliances > kettle", "tefal", 40.0, 7, None),
    ("odd", None, None, 5.0, None, None),
]
ITEMS = pd.DataFrame(
    SHOP, columns=["item_id", "category_path", "brand", "price", "stock", "margin"]
)
# Audio views lead to cable carts/purchases in two sessions (s1, s2); phone -> cables only once
# (s6); kettles are only ever viewed.
SESSIONS = {
    "s1": [("hp1", "view"), ("cab1", "cart")],
    "s2": [("hp2", "view"), ("cab2", "purchase")],
    "s3": [("ph1", "view"), ("ph2", "view")],
    "s4": [("ph1", "view"), ("kt1", "view")],
    "s5": [("kt1", "view"), ("ph2", "view")],
    "s6": [("ph1", "view"), ("cab1", "cart")],
}
EVENTS = toy_events(SESSIONS)
COL = {name: i for i, name in enumerate(FEATURES)}


def fit_stats(
    events: pd.DataFrame = EVENTS,
    items: pd.DataFrame = ITEMS,
    settings: RankingSettings | None = None,
    weights: EventWeights | None = None,
) -> ItemStats:
    return ItemStats.fit(
        events,
        items,
        Catalogue(items),
        settings or RankingSettings(),
        weights or EventWeights(),
        BANDS,
        STRONG,
    )


STATS = fit_stats()


def table_of(*per_query: list[str]):
    """One source naming each query's items in the given order."""
    rows = [
        [Candidate(item, float(len(items) - i)) for i, item in enumerate(items)]
        for items in per_query
    ]
    return fuse({"covisitation": rows}, queries=len(per_query), depth=100, rrf_k=60)


def features_by_item(items: list[str], query: Query, stats: ItemStats = STATS) -> pd.DataFrame:
    table = table_of(items)
    matrix = build_features(table, [query], stats)
    return pd.DataFrame(matrix, index=table.frame["item_id"].to_list(), columns=FEATURES)


def row_of(stats: ItemStats, item: str) -> int:
    return stats.row[item]


# ------------------------------------------------------------------------------ contract


def test_feature_names_are_unique_and_grouped():
    assert len(FEATURES) == len(set(FEATURES))
    groups = SOURCE_FEATURES + ITEM_FEATURES + SESSION_FEATURES + CONTEXT_FEATURES
    assert FEATURES == groups + PRICE_FEATURES
    for name in ("leaf_match", "top_match", "brand_match", "price_vs_session", "complement_lift"):
        assert name in FEATURES


def test_build_features_shape_and_dtype():
    table = table_of(["hp3", "cab2", "kt1"], ["ph2"], [])
    queries = [Query(session_items=("hp1",)), Query(anchor="ph1"), Query(cart=("kt1",))]
    matrix = build_features(table, queries, STATS)
    assert matrix.shape == (len(table.frame), len(FEATURES)) == (4, len(FEATURES))
    assert matrix.dtype == np.float32
    # source features are copied from the table, row for row
    np.testing.assert_array_equal(
        matrix[:, COL["fused"]], table.frame["fused"].to_numpy(dtype=np.float32)
    )
    np.testing.assert_array_equal(
        matrix[:, COL["covisitation_rank"]], np.array([1, 2, 3, 1], dtype=np.float32)
    )
    assert np.isnan(matrix[:, COL["two_tower_score"]]).all()


# ------------------------------------------------------------------------------ item stats


def test_popularity_weights_purchases_above_views():
    events = toy_events(
        {"a": [("kt1", "purchase")], "b": [("kt2", "view"), ("kt2", "view"), ("kt2", "view")]}
    )
    stats = fit_stats(events)
    kt1, kt2 = row_of(stats, "kt1"), row_of(stats, "kt2")
    weights = EventWeights()
    assert stats.popularity[kt1] == weights.purchase == 5.0
    assert stats.popularity[kt2] == 3 * weights.view == 3.0
    assert stats.popularity[kt1] > stats.popularity[kt2]
    assert stats.popularity[row_of(stats, "hp1")] == 0.0
    # the weights are read, not hard-coded: a cheap purchase loses to three views
    cheap = fit_stats(events, weights=EventWeights(purchase=2.0))
    assert cheap.popularity[kt1] == 2.0 < cheap.popularity[kt2]
    # and the feature is log1p of the count
    frame = features_by_item(["kt1", "kt2"], Query(), stats)
    assert frame.loc["kt1", "popularity_log"] == pytest.approx(math.log1p(5.0))
    assert frame.loc["kt2", "popularity_log"] == pytest.approx(math.log1p(3.0))


def test_popularity_ignores_items_outside_the_catalogue():
    events = toy_events({"a": [("kt1", "view"), ("ghost", "purchase")]})
    stats = fit_stats(events)
    assert stats.popularity.sum() == 1.0
    assert "ghost" not in stats.row


def test_recent_popularity_counts_only_the_last_share_of_the_window():
    # 11 events one minute apart (minutes 0..10): nine on kt1, then two on kt2.
    events = toy_events({"old": [("kt1", "view")] * 9, "new": [("kt2", "view")] * 2})
    stats = fit_stats(events, settings=RankingSettings(short_window_share=0.1))
    kt1, kt2 = row_of(stats, "kt1"), row_of(stats, "kt2")
    # the last 10% of a 10-minute window starts at minute 9: both kt2 views, no kt1 view
    assert stats.recent_popularity[kt1] == 0.0
    assert stats.recent_popularity[kt2] == 2.0
    assert stats.popularity[kt1] == 9.0
    half = fit_stats(events, settings=RankingSettings(short_window_share=0.5))
    # from minute 5 on: kt1's views at minutes 5..8 and both kt2 views
    assert half.recent_popularity[kt1] == 4.0
    assert half.recent_popularity[kt2] == 2.0
    frame = features_by_item(["kt1", "kt2"], Query(), stats)
    assert frame.loc["kt2", "trend"] > 0 > frame.loc["kt1", "trend"]


def test_first_and_last_seen_and_end_time():
    stats = STATS
    start = pd.Timestamp("2024-01-01", tz="UTC").timestamp()
    # ph1 is seen at minutes 4, 6 and 10 of the toy window (events one minute apart)
    ph1 = row_of(stats, "ph1")
    assert stats.first_seen[ph1] == start + 4 * 60
    assert stats.last_seen[ph1] == start + 10 * 60
    assert stats.end_time == start + 11 * 60
    assert math.isnan(stats.first_seen[row_of(stats, "hp3")])  # never seen


def test_catalogue_attributes_and_event_price_fill():
    items = ITEMS.assign(price=ITEMS["price"].where(ITEMS["item_id"] != "kt2"))
    events = toy_events({"a": [("kt2", "view")]}).assign(price=[42.0])
    stats = fit_stats(events, items)
    assert stats.price[row_of(stats, "kt2")] == 42.0
    assert stats.stock[row_of(stats, "cab1")] == 0.0
    assert math.isnan(stats.stock[row_of(stats, "odd")])
    assert math.isnan(stats.margin[row_of(stats, "kt2")])
    assert stats.leaf[row_of(stats, "odd")] == -1
    assert stats.brand[row_of(stats, "odd")] == -1
    assert stats.leaf[row_of(stats, "hp1")] == stats.leaf[row_of(stats, "hp3")]
    assert stats.top[row_of(stats, "hp1")] == stats.top[row_of(stats, "ph1")]
    assert stats.top[row_of(stats, "hp1")] != stats.top[row_of(stats, "kt1")]


# ------------------------------------------------------------------------------ session features


SESSION_QUERY = Query(
    session_items=("hp1", "hp2", "ph1"),
    session_types=("view", "view", "view"),
    session_times=(EVENTS["event_time"].iloc[-1].timestamp(),) * 3,
)


def test_category_and_brand_match_shares():
    # the session: audio/sony, audio/bose, phone/sony (all electronics)
    frame = features_by_item(["hp3", "cab2", "kt1", "ph2", "odd"], SESSION_QUERY)
    assert frame.loc["hp3", "leaf_match"] == pytest.approx(2 / 3)
    assert frame.loc["hp3", "top_match"] == 1.0
    assert frame.loc["hp3", "brand_match"] == pytest.approx(2 / 3)
    assert frame.loc["ph2", "leaf_match"] == pytest.approx(1 / 3)
    assert frame.loc["ph2", "top_match"] == 1.0
    assert frame.loc["ph2", "brand_match"] == 0.0
    assert frame.loc["cab2", "leaf_match"] == 0.0
    assert frame.loc["cab2", "top_match"] == 1.0
    assert frame.loc["kt1", "leaf_match"] == 0.0
    assert frame.loc["kt1", "top_match"] == 0.0
    assert frame.loc["kt1", "brand_match"] == 0.0
    # an item with no category or brand matches nothing and is not "0% alike" either
    assert np.isnan(frame.loc["odd", ["leaf_match", "top_match", "brand_match"]]).all()
    # focus is the last session item (ph1): only the other phone shares its leaf
    assert frame.loc["ph2", "focus_same_leaf"] == 1.0
    assert frame.loc["hp3", "focus_same_leaf"] == 0.0


def test_anchor_is_the_focus_of_a_pdp_request():
    frame = features_by_item(["hp3", "ph2"], Query(session_items=("ph1",), anchor="hp1"))
    assert frame.loc["hp3", "focus_same_leaf"] == 1.0
    assert frame.loc["ph2", "focus_same_leaf"] == 0.0
    # seeds are the session and the anchor
    assert frame.loc["hp3", "leaf_match"] == pytest.approx(1 / 2)
    assert (frame["has_anchor"] == 1.0).all()
    assert (frame["session_length"] == 1.0).all()
    assert (frame["cart_size"] == 0.0).all()


def test_price_vs_session_sign():
    # session prices 100, 300, 500: median 300
    frame = features_by_item(["ph2", "hp2", "cab2"], SESSION_QUERY)
    assert frame.loc["ph2", "price_vs_session"] == pytest.approx(math.log(3.0), rel=1e-5)
    assert frame.loc["ph2", "price_vs_session"] > 0
    assert frame.loc["hp2", "price_vs_session"] == pytest.approx(0.0, abs=1e-5)
    assert frame.loc["cab2", "price_vs_session"] < 0


def test_no_session_leaves_session_features_nan_but_fills_context():
    frame = features_by_item(["hp3", "cab2"], Query())
    for name in ("price_vs_session", "band_gap", "leaf_match", "top_match", "brand_match"):
        assert frame[name].isna().all(), name
    assert frame["complement_lift"].isna().all()
    assert (frame["session_length"] == 0.0).all()
    assert frame["hour"].isna().all()  # no clock on the request
    assert frame["context"].isna().all()


def test_context_is_a_stable_bucket():
    one = features_by_item(["hp3"], Query(context="mobile|de"))
    two = features_by_item(["cab2"], Query(context="mobile|de"))
    other = features_by_item(["hp3"], Query(context="desktop|fr"))
    value = one.loc["hp3", "context"]
    assert 0 <= value < 64
    assert value == two.loc["cab2", "context"]
    assert value != other.loc["hp3", "context"]


def test_complement_lift_for_category_pairs_bought_together():
    stats = STATS
    leaf = {item: stats.leaf[row_of(stats, item)] for item in ("hp1", "cab1", "ph1", "kt1")}
    # 6 sessions; audio touched in 2, cables bought in 3, together in 2: log(2*6 / (2*3))
    assert stats.complement[leaf["hp1"], leaf["cab1"]] == pytest.approx(math.log(2.0))
    # phone -> cables together in only one session (s6): no lift is kept
    assert stats.complement[leaf["ph1"], leaf["cab1"]] == 0.0
    audio = features_by_item(["cab2", "kt2", "hp3"], Query(session_items=("hp1",)))
    assert audio.loc["cab2", "complement_lift"] == pytest.approx(math.log(2.0), rel=1e-5)
    assert audio.loc["cab2", "complement_lift"] > 0
    assert np.isnan(audio.loc["kt2", "complement_lift"])  # audio -> kettle never seen
    assert np.isnan(audio.loc["hp3", "complement_lift"])  # audio -> audio never bought
    phone = features_by_item(["cab2"], Query(session_items=("ph1",)))
    assert np.isnan(phone.loc["cab2", "complement_lift"])  # one session is an anecdote


def test_complement_lift_is_empty_without_strong_events():
    events = toy_events({"a": [("hp1", "view"), ("cab1", "view")], "b": [("hp1", "view")]})
    stats = fit_stats(events)
    assert stats.complement.nnz == 0
    assert stats.complement.shape[0] == stats.complement.shape[1]
    frame = features_by_item(["cab2"], Query(session_items=("hp1",)), stats)
    assert np.isnan(frame.loc["cab2", "complement_lift"])


def test_unknown_item_gets_nan_item_and_session_features():
    frame = features_by_item(["hp3", "ghost"], SESSION_QUERY)
    ghost = frame.loc["ghost"]
    assert ghost[list(ITEM_FEATURES)].isna().all()
    assert ghost[list(SESSION_FEATURES)].isna().all()
    assert ghost[["age_hours_log", "idle_hours_log"]].isna().all()
    # what the table and the request know is still there
    assert not np.isnan(ghost["fused"])
    assert ghost["covisitation_rank"] == 2.0
    assert ghost["session_length"] == 3.0
    # while the known neighbour has its item features
    assert not frame.loc["hp3", list(ITEM_FEATURES[:5])].isna().any()


def test_queries_without_rows_are_skipped_and_rows_keep_their_query():
    table = table_of(["hp3"], [], ["kt2"])
    queries = [
        Query(session_items=("hp1",)),
        Query(session_items=("ph1",)),
        Query(session_items=("kt1", "kt1"), cart=("kt1",)),
    ]
    matrix = build_features(table, queries, STATS)
    assert matrix.shape[0] == 2
    assert matrix[0, COL["session_length"]] == 1.0
    assert matrix[1, COL["session_length"]] == 2.0
    assert matrix[1, COL["cart_size"]] == 1.0
    assert matrix[1, COL["leaf_match"]] == 1.0  # kettle vs a kettle session


# ------------------------------------------------------------------------------ train/serve


def many_queries_table():
    per_query = [
        ["hp3", "cab2", "kt1", "ph2", "odd", "ghost"],
        ["cab1", "cab2", "hp2"],
        [],
        ["ph1", "kt2", "hp1"],
        ["kt1", "kt2"],
    ]
    queries = [
        SESSION_QUERY,
        Query(session_items=("hp1",), anchor="hp2", exclude=frozenset({"hp2"}), context="m"),
        Query(session_items=("hp1",)),
        Query(cart=("cab1", "kt1"), exclude=frozenset({"cab1", "kt1"}), context="desktop"),
        Query(),
    ]
    return table_of(*per_query), queries


@pytest.mark.parametrize("timed", [True, False], ids=["with-clock", "no-clock"])
def test_saved_and_loaded_stats_give_bit_identical_features(tmp_path, timed):
    events = EVENTS if timed else EVENTS.drop(columns=["event_time"])
    stats = fit_stats(events)
    assert math.isnan(stats.end_time) != timed
    paths = stats.save(tmp_path / "stats")
    assert all(p.exists() for p in paths)
    loaded = ItemStats.load(tmp_path / "stats")
    table, queries = many_queries_table()
    before = build_features(table, queries, stats)
    after = build_features(table, queries, loaded)
    assert before.dtype == after.dtype == np.float32
    np.testing.assert_array_equal(before, after)  # NaNs in the same places count as equal
    assert before.tobytes() == after.tobytes()
    # the statistics themselves survive
    for name in ItemStats._ARRAYS:
        np.testing.assert_array_equal(getattr(stats, name), getattr(loaded, name), err_msg=name)
    assert (stats.complement != loaded.complement).nnz == 0
    assert loaded.row == stats.row
    assert loaded.short_share == stats.short_share
    assert (math.isnan(loaded.end_time) and math.isnan(stats.end_time)) or (
        loaded.end_time == stats.end_time
    )
    if timed:
        # the features actually carry information (not an all-NaN comparison)
        assert np.isfinite(before[:, COL["complement_lift"]]).any()
        assert np.isfinite(before[:, COL["age_hours_log"]]).any()


def test_a_batch_gives_each_query_the_rows_it_gets_alone():
    """The session features run over the whole batch at once; no query's values may leak
    into another's rows (a request is served alone, a consumer batch is many)."""
    table, queries = many_queries_table()
    batch = build_features(table, queries, STATS)
    alone = []
    for q, query in enumerate(queries):
        rows = table["query"] == q
        if rows.any():
            one = CandidateTable(
                {k: (v[rows] * 0 if k == "query" else v[rows]) for k, v in table.columns.items()},
                1,
            )
            alone.append(build_features(one, [query], STATS))
    np.testing.assert_array_equal(batch, np.concatenate(alone))
