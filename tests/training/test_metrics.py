"""Metric functions against hand-computed cases, including ties and duplicates."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.metrics import (
    bootstrap_ci,
    coverage_at,
    dedupe,
    intra_list_diversity,
    ndcg_at,
    rank_by_score,
    recall_at,
    reciprocal_rank,
)

LOG3 = math.log2(3)


def test_ndcg_two_targets_one_found_at_rank_two():
    # DCG = 1/log2(3); ideal puts both targets first: 1 + 1/log2(3)
    assert ndcg_at(["a", "b", "c", "e"], {"b", "d"}, k=3) == pytest.approx(
        (1 / LOG3) / (1 + 1 / LOG3)
    )


def test_ndcg_perfect_and_empty_lists():
    assert ndcg_at(["b", "d", "x"], {"b", "d"}, k=3) == pytest.approx(1.0)
    assert ndcg_at([], {"b"}, k=3) == 0.0


def test_ndcg_ideal_is_capped_at_k():
    # 5 targets, k=2: the ideal DCG has only two terms, so two hits give 1.0
    assert ndcg_at(["a", "b"], {"a", "b", "c", "d", "e"}, k=2) == pytest.approx(1.0)


def test_duplicates_count_once_at_first_position():
    assert dedupe(["a", "a", "b", "a", "c"]) == ["a", "b", "c"]
    # the repeated 'x' must not push 't' out of the top 2, nor earn credit twice
    assert reciprocal_rank(["x", "x", "t"], {"t"}, depth=100) == pytest.approx(0.5)
    assert recall_at(["a", "a", "a"], {"a", "b", "c"}, k=3) == pytest.approx(1 / 3)
    assert ndcg_at(["a", "a", "b"], {"a", "b"}, k=2) == pytest.approx(1.0)


def test_recall_counts_targets_in_top_k():
    assert recall_at(["a", "z", "b"], {"a", "b", "c"}, k=2) == pytest.approx(1 / 3)
    assert recall_at(["a", "z", "b"], {"a", "b", "c"}, k=3) == pytest.approx(2 / 3)


def test_mrr_respects_depth():
    assert reciprocal_rank(["x", "y", "t"], {"t"}, depth=100) == pytest.approx(1 / 3)
    assert reciprocal_rank(["x", "y", "t"], {"t"}, depth=2) == 0.0
    assert reciprocal_rank(["t", "u"], {"u", "t"}, depth=5) == 1.0


def test_metrics_refuse_empty_targets():
    with pytest.raises(ValueError, match="target"):
        recall_at(["a"], set(), 1)
    with pytest.raises(ValueError, match="target"):
        ndcg_at(["a"], set(), 1)


def test_ties_break_by_input_order():
    assert rank_by_score(["a", "b", "c", "d"], [1.0, 2.0, 2.0, 0.5]) == ["b", "c", "a", "d"]
    # the same scores in another input order give another (but still stable) order
    assert rank_by_score(["c", "b", "a", "d"], [2.0, 2.0, 1.0, 0.5]) == ["c", "b", "a", "d"]


def test_tied_target_below_k_cutoff_does_not_count():
    ranked = rank_by_score(["x", "t"], [1.0, 1.0])  # tie: input order keeps x first
    assert recall_at(ranked, {"t"}, k=1) == 0.0


def test_coverage_counts_distinct_items_in_top_k():
    assert coverage_at([["a", "b"], ["b", "c"]], catalogue_size=10, k=1) == pytest.approx(0.2)
    assert coverage_at([["a", "b"], ["b", "c"]], catalogue_size=10, k=2) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        coverage_at([["a"]], catalogue_size=0, k=1)


def test_intra_list_diversity_share_of_differing_pairs():
    cats = {"a": "tv", "b": "tv", "c": "audio"}
    assert intra_list_diversity(["a", "b", "c"], cats, k=3) == pytest.approx(2 / 3)
    assert intra_list_diversity(["a", "b"], cats, k=3) == 0.0
    assert intra_list_diversity(["a", "zz"], cats, k=3) is None  # one categorised item only


def test_bootstrap_constant_metric_has_zero_width():
    mean, low, high = bootstrap_ci(np.full(50, 0.25), np.arange(50), 200, 0.95, seed=1)
    assert (mean, low, high) == pytest.approx((0.25, 0.25, 0.25))


def test_bootstrap_is_deterministic_and_brackets_the_mean():
    rng = np.random.default_rng(0)
    values = rng.random(400)
    clusters = np.repeat(np.arange(100), 4)
    first = bootstrap_ci(values, clusters, 500, 0.95, seed=7)
    assert first == bootstrap_ci(values, clusters, 500, 0.95, seed=7)
    mean, low, high = first
    assert low < mean < high
    wide = bootstrap_ci(values, clusters, 500, 0.99, seed=7)
    assert wide[1] <= low and wide[2] >= high


def test_bootstrap_resamples_sessions_not_cases():
    # Two sessions: one with 99 hits, one with 99 misses. Case-level resampling would give a
    # narrow interval around 0.5; session-level resampling must span nearly [0, 1].
    values = np.r_[np.ones(99), np.zeros(99)]
    clusters = np.r_[np.zeros(99), np.ones(99)]
    _, low, high = bootstrap_ci(values, clusters, 500, 0.95, seed=3)
    assert low == pytest.approx(0.0) and high == pytest.approx(1.0)


def test_bootstrap_ignores_nan():
    mean, _, _ = bootstrap_ci(np.array([1.0, np.nan, 0.0]), np.arange(3), 100, 0.9, seed=0)
    assert mean == pytest.approx(0.5)
