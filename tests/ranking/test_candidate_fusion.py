"""Reciprocal-rank fusion of candidate sources: agreement wins, depth cuts, and the order is
fully determined by the input (never by dict or hash order)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ranking.candidate_fusion import (
    EVIDENCE_COLUMNS,
    PAIR_COLUMNS,
    SOURCES,
    CandidateTable,
    fuse,
    newest_items,
    with_pair_columns,
)
from ranking.candidates import Candidate
from ranking.retriever import Query


def ranked_list(*items: str) -> list[Candidate]:
    """Candidates best first, with descending made-up scores."""
    return [Candidate(item, float(len(items) - i)) for i, item in enumerate(items)]


def test_item_named_by_two_sources_outranks_items_named_by_one():
    # "both" is at rank 2 in each source; "a1" and "b1" top one source each.
    per_source = {
        "covisitation": [ranked_list("a1", "both", "a3")],
        "session_knn": [ranked_list("b1", "both", "b3")],
    }
    table = fuse(per_source, queries=1, depth=10, rrf_k=60)
    order = table.item_lists()[0]
    assert order[0] == "both"
    row = table.frame.set_index("item_id").loc["both"]
    assert row["sources"] == 2
    assert row["fused"] == pytest.approx(2 / 62)
    assert table.frame.set_index("item_id").loc["a1", "sources"] == 1
    assert set(order) == {"a1", "b1", "a3", "b3", "both"}


def test_fused_score_is_the_sum_of_reciprocal_ranks():
    per_source = {
        "two_tower": [ranked_list("x", "y")],
        "popularity": [ranked_list("y", "z", "x")],
    }
    frame = fuse(per_source, queries=1, depth=10, rrf_k=10).frame.set_index("item_id")
    assert frame.loc["x", "fused"] == pytest.approx(1 / 11 + 1 / 13)
    assert frame.loc["y", "fused"] == pytest.approx(1 / 12 + 1 / 11)
    assert frame.loc["z", "fused"] == pytest.approx(1 / 12)
    # rows of one query are sorted best fused first
    assert list(frame["fused"]) == sorted(frame["fused"], reverse=True)


def test_depth_cuts_each_query_separately():
    per_source = {
        "covisitation": [
            ranked_list(*[f"a{i}" for i in range(8)]),
            ranked_list("b0", "b1"),
            ranked_list(*[f"c{i}" for i in range(5)]),
        ]
    }
    table = fuse(per_source, queries=3, depth=3, rrf_k=60)
    assert table.frame.groupby("query").size().to_dict() == {0: 3, 1: 2, 2: 3}
    assert table.item_lists() == [["a0", "a1", "a2"], ["b0", "b1"], ["c0", "c1", "c2"]]


def test_per_source_columns_are_nan_where_the_source_did_not_name_the_item():
    per_source = {
        "covisitation": [[Candidate("a", 0.7), Candidate("b", 0.5)]],
        "popularity": [[Candidate("b", 42.0), Candidate("c", 17.0)]],
    }
    frame = fuse(per_source, queries=1, depth=10, rrf_k=60).frame.set_index("item_id")
    expected_columns = {f"{s}_{v}" for s in SOURCES for v in ("score", "rank")}
    assert expected_columns <= set(frame.columns)
    assert frame.loc["a", "covisitation_score"] == 0.7
    assert frame.loc["a", "covisitation_rank"] == 1
    assert math.isnan(frame.loc["a", "popularity_score"])
    assert math.isnan(frame.loc["a", "popularity_rank"])
    assert frame.loc["b", "covisitation_rank"] == 2
    assert frame.loc["b", "popularity_score"] == 42.0
    assert frame.loc["b", "popularity_rank"] == 1
    assert math.isnan(frame.loc["c", "covisitation_score"])
    assert frame.loc["c", "popularity_rank"] == 2
    # sources that did not run at all contribute all-NaN columns of float dtype
    for source in ("two_tower", "session_knn", "category_popularity"):
        for value in ("score", "rank"):
            column = frame[f"{source}_{value}"]
            assert column.dtype == np.float64
            assert column.isna().all()


def test_column_contract_is_fixed_whatever_sources_run():
    one = fuse({"popularity": [ranked_list("a")]}, queries=1, depth=5, rrf_k=60).frame
    two = fuse(
        {"session_knn": [ranked_list("a")], "two_tower": [ranked_list("b")]},
        queries=1,
        depth=5,
        rrf_k=60,
    ).frame
    assert list(one.columns) == list(two.columns)
    assert list(one.columns[:4]) == ["query", "item_id", "fused", "sources"]
    assert one["query"].dtype == np.int64
    assert one["sources"].dtype == np.int64


def test_query_without_candidates_gives_an_empty_list():
    per_source = {
        "covisitation": [ranked_list("a", "b"), [], ranked_list("c")],
        "popularity": [[], [], ranked_list("c", "d")],
    }
    table = fuse(per_source, queries=3, depth=10, rrf_k=60)
    ranked = table.ranked()
    assert len(ranked) == 3
    assert ranked[1] == []
    assert [c.item_id for c in ranked[0]] == ["a", "b"]
    assert [c.item_id for c in ranked[2]] == ["c", "d"]
    assert 1 not in set(table.frame["query"])


def test_no_candidates_at_all_gives_one_empty_list_per_query():
    table = fuse({"popularity": [[], []]}, queries=2, depth=10, rrf_k=60)
    assert table.frame.empty
    assert table.ranked() == [[], []]
    assert fuse({}, queries=2, depth=10, rrf_k=60).ranked() == [[], []]


def test_unknown_source_name_raises():
    with pytest.raises(ValueError, match="unknown candidate sources"):
        fuse({"popularity": [[]], "bestsellers": [[]]}, queries=1, depth=10, rrf_k=60)


def test_source_answering_the_wrong_number_of_queries_raises():
    with pytest.raises(ValueError, match="'covisitation' answered 1 queries, expected 2"):
        fuse(
            {"popularity": [[], []], "covisitation": [ranked_list("a")]},
            queries=2,
            depth=10,
            rrf_k=60,
        )


def test_ties_in_fused_score_break_by_best_rank_then_item_id():
    # rrf_k=1: "z-solo" at rank 1 of one source earns 1/2; "a-pair" at rank 3 of two sources
    # earns 1/4 + 1/4 = 1/2 exactly. Equal fused scores: the better single rank wins, even
    # though its id sorts last.
    per_source = {
        "covisitation": [ranked_list("z-solo", "f1", "a-pair")],
        "session_knn": [ranked_list("f2", "f3", "a-pair")],
    }
    table = fuse(per_source, queries=1, depth=10, rrf_k=1)
    frame = table.frame.set_index("item_id")
    assert frame.loc["z-solo", "fused"] == frame.loc["a-pair", "fused"] == 0.5
    order = table.item_lists()[0]
    assert order.index("z-solo") < order.index("a-pair")
    # Equal fused score and equal best rank (rank 1 of two sources): the id decides.
    ties = fuse(
        {"covisitation": [ranked_list("m")], "popularity": [ranked_list("b")]},
        queries=1,
        depth=10,
        rrf_k=60,
    )
    assert ties.item_lists() == [["b", "m"]]
    # the depth cut respects the tie-break too
    cut = fuse(
        {"covisitation": [ranked_list("m")], "popularity": [ranked_list("b")]},
        queries=1,
        depth=1,
        rrf_k=60,
    )
    assert cut.item_lists() == [["b"]]


def test_repeated_item_within_a_source_counts_once_at_its_best_rank():
    per_source = {"covisitation": [ranked_list("a", "b", "a")]}
    frame = fuse(per_source, queries=1, depth=10, rrf_k=60).frame.set_index("item_id")
    assert len(frame) == 2
    assert frame.loc["a", "covisitation_rank"] == 1
    assert frame.loc["a", "sources"] == 1
    assert frame.loc["a", "fused"] == pytest.approx(1 / 61)


def test_ranked_by_another_column_keeps_fused_order_on_ties():
    table = fuse({"covisitation": [ranked_list("a", "b", "c", "d")]}, queries=1, depth=10, rrf_k=60)
    frame = table.frame.assign(ranker=[0.0, 1.0, 0.0, 1.0])
    ranked = CandidateTable(frame, table.queries).ranked("ranker")
    assert [c.item_id for c in ranked[0]] == ["b", "d", "a", "c"]
    assert [c.score for c in ranked[0]] == [1.0, 1.0, 0.0, 0.0]


ITEM_IDS = st.sampled_from([f"i{n:02d}" for n in range(25)])
SOURCE_LISTS = st.lists(
    st.lists(st.builds(Candidate, ITEM_IDS, st.floats(-5, 5, allow_nan=False)), max_size=12),
    min_size=3,
    max_size=3,
)


@settings(max_examples=40, deadline=None)
@given(
    per_source=st.dictionaries(st.sampled_from(SOURCES), SOURCE_LISTS, min_size=1, max_size=4),
    depth=st.integers(1, 15),
    rrf_k=st.integers(1, 80),
)
def test_fusion_is_deterministic_and_independent_of_source_order(per_source, depth, rrf_k):
    table = fuse(per_source, queries=3, depth=depth, rrf_k=rrf_k)
    again = fuse(per_source, queries=3, depth=depth, rrf_k=rrf_k)
    reordered = fuse(dict(reversed(per_source.items())), queries=3, depth=depth, rrf_k=rrf_k)
    pd.testing.assert_frame_equal(table.frame, again.frame)
    assert table.item_lists() == reordered.item_lists()
    for q, items in enumerate(table.item_lists()):
        named = {c.item_id for rows in per_source.values() for c in rows[q]}
        assert len(items) == len(set(items)) == min(depth, len(named))
        assert set(items) <= named
    # within a query: fused non-increasing; on equal fused, best rank then id ascending
    frame = table.frame.assign(best=table.frame[[f"{s}_rank" for s in SOURCES]].min(axis=1))
    for _, group in frame.groupby("query"):
        keys = list(zip(-group["fused"], group["best"], group["item_id"], strict=True))
        assert keys == sorted(keys)


class _Pairs:
    """A pair source whose weight is the seed's position + the item's letter code."""

    def pair_weights(self, seeds, items):
        return np.array([[10 * s + ord(i[0]) for i in items] for s in range(len(seeds))], float)


def test_newest_items_put_the_page_product_then_the_cart_then_the_session_newest_first():
    query = Query(("v1", "v2", "c1"), anchor="p", cart=("c1", "c2"))
    assert newest_items(query) == ["p", "c2", "c1"]
    assert newest_items(Query(("a", "b", "a", "c"))) == ["c", "a", "b"]
    assert newest_items(Query()) == []


def test_pair_columns_hold_each_candidates_weight_with_each_newest_item():
    per_source = {
        "covisitation": [ranked_list("x", "y"), ranked_list("z")],
        "session_knn": [ranked_list("y"), []],
    }
    queries = [Query(("a", "b")), Query(("a",))]
    table = fuse(per_source, queries=2, depth=10, rrf_k=60)
    out = with_pair_columns(table, queries, {"covisitation": _Pairs(), "session_knn": object()})
    assert list(out.frame.columns[: len(table.frame.columns)]) == list(table.frame.columns)
    first = out.frame[out.frame["query"] == 0].set_index("item_id")
    # query 0's newest item is "b" (seed 0), then "a" (seed 1)
    assert first.loc["x", "covisitation_last1"] == ord("x")
    assert first.loc["x", "covisitation_last2"] == 10 + ord("x")
    assert np.isnan(first.loc["x", "covisitation_last3"])  # only two items in the session
    second = out.frame[out.frame["query"] == 1].set_index("item_id")
    assert second.loc["z", "covisitation_last1"] == ord("z")
    assert np.isnan(second.loc["z", "covisitation_last2"])
    # a source that is not running leaves its columns empty
    assert out.frame[[c for c in PAIR_COLUMNS if c.startswith("two_tower")]].isna().all().all()
    # one without counts behind its weights leaves the evidence columns empty
    assert out.frame[list(EVIDENCE_COLUMNS)].isna().all().all()


class _Counts:
    """A lookup pair source whose weights are scaled counts: row = the id's letter code,
    weight = 1000 × seed row + item row, raw = 2 × weight, share = weight / 100."""

    def rows_of(self, items):
        return np.array([ord(i[0]) for i in items], dtype=np.int64)

    def weights_at(self, seed_rows, item_rows):
        return 1000.0 * seed_rows + item_rows

    def evidence_at(self, seed_rows, weights):
        return 2 * weights, weights / 100


def test_evidence_columns_hold_each_count_sources_raw_count_and_share_per_newest_item():
    queries = [Query(("a", "b")), Query()]
    per_source = {"transitions": [ranked_list("x", "y"), ranked_list("x")]}
    table = fuse(per_source, queries=2, depth=10, rrf_k=60)
    frame = with_pair_columns(table, queries, {"transitions": _Counts()}).frame
    out = frame[frame["query"] == 0].set_index("item_id")
    # newest first: "b", then "a"
    assert out.loc["y", "transitions_last1"] == 1000 * ord("b") + ord("y")
    assert out.loc["y", "transitions_count_last1"] == 2 * (1000 * ord("b") + ord("y"))
    assert out.loc["y", "transitions_share_last2"] == (1000 * ord("a") + ord("y")) / 100
    assert np.isnan(out.loc["y", "transitions_count_last3"])  # only two items in the session
    assert out[[c for c in EVIDENCE_COLUMNS if c.startswith("covisitation")]].isna().all().all()
    # a request with no items has nothing to weigh against
    pair_columns = [c for c in (*PAIR_COLUMNS, *EVIDENCE_COLUMNS) if c.startswith("transitions")]
    assert frame.loc[frame["query"] == 1, pair_columns].isna().all().all()
