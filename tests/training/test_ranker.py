"""The re-ranker's labels and training: graded labels from what followed a request, and a
LambdaMART model that learns a planted relevance signal the fused order does not have."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest

from railtower.settings import DatasetSpec, EvaluationSettings, EventsMapping, RankerSettings
from ranking.business_features import FEATURES
from ranking.candidate_fusion import fuse
from ranking.candidates import Candidate
from tests.conftest import toy_events
from training.metrics import ndcg_at
from training.ranker import RankerFit, choose_order, fit_ranker, graded_labels
from training.tasks import build_cases, strongest

GRADES = RankerSettings().label_grades
SLOTS = 12
SIGNAL = FEATURES.index("leaf_match")
SMALL = RankerSettings(num_trees=50, min_groups=20, min_data_in_leaf=5, early_stopping_rounds=10)


@pytest.fixture(autouse=True)
def one_openmp_thread() -> Iterator[None]:
    """LightGBM trains with every core; on a small shared machine OpenMP threads waiting on a
    busy core make a sub-second fit take many seconds, so these fits use one thread."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        limits: contextlib.AbstractContextManager = contextlib.nullcontext()
    else:
        limits = threadpool_limits(1, user_api="openmp")
    with limits:
        yield


# ------------------------------------------------------------------------------ labels


def test_strongest_keeps_the_strongest_event_per_item():
    items = ["a", "a", "b", "b", "c", "a", "d"]
    types = ["view", "purchase", "cart", "view", "view", "cart", "purchase"]
    assert strongest(items, types, frozenset()) == {
        "a": "purchase",
        "b": "cart",
        "c": "view",
        "d": "purchase",
    }


def test_strongest_skips_excluded_items_and_removals():
    items = ["a", "b", "c", "c", "e"]
    types = ["purchase", "view", "remove_from_cart", "view", "remove_from_cart"]
    assert strongest(items, types, frozenset({"a"})) == {"b": "view", "c": "view"}
    assert strongest([], [], frozenset()) == {}


def test_strongest_is_independent_of_event_order():
    items = ["x", "x", "x"]
    for types in (["view", "cart", "purchase"], ["purchase", "cart", "view"]):
        assert strongest(items, types, frozenset()) == {"x": "purchase"}
    assert strongest(["y", "y"], ["cart", "view"], frozenset()) == {"y": "cart"}


def test_hero_cases_record_what_followed_the_request():
    events = toy_events(
        {"s": [("a", "view"), ("b", "view"), ("c", "cart"), ("b", "purchase"), ("a", "cart")]}
    )
    spec = DatasetSpec(
        name="toy",
        events=EventsMapping(path="x", columns={"event_time": "t"}),
        rails=["homepage_hero"],
    )
    cases = build_cases("homepage_hero", events, spec, EvaluationSettings(), seed=0)
    first = cases[0]
    assert first.query.session_items == ("a",)
    # after the prefix ("a"): b viewed then bought, c carted; a is in the prefix, so excluded
    assert dict(first.followed) == {"b": "purchase", "c": "cart"}


def test_graded_labels_map_followed_events_through_grades():
    table = fuse(
        {
            "covisitation": [
                [Candidate("a", 3.0), Candidate("b", 2.0), Candidate("c", 1.0)],
                [Candidate("a", 1.0), Candidate("d", 0.5)],
            ]
        },
        queries=2,
        depth=10,
        rrf_k=60,
    )
    followed = [{"a": "purchase", "c": "view", "zzz": "cart"}, {"d": "cart", "a": "remove"}]
    labels = graded_labels(table, followed, GRADES)
    assert labels.dtype == np.int32
    assert list(zip(table.frame["query"], table.frame["item_id"], labels, strict=True)) == [
        (0, "a", 3),
        (0, "b", 0),
        (0, "c", 1),
        (1, "a", 0),  # an event type without a grade is no relevance
        (1, "d", 2),
    ]
    custom = graded_labels(table, followed, {"view": 7, "cart": 1})
    assert custom.tolist() == [0, 0, 7, 0, 1]


# ------------------------------------------------------------------------------ training


def synthetic(queries: int, seed: int, per_query: int = 30, useful: int | None = None):
    """A fused table in random order whose relevance only `leaf_match` reveals.

    Each candidate's leaf_match is drawn from {0, 0.5, 1}; a match of 1 is mostly bought, 0.5
    mostly viewed, 0 rarely touched. The fused order (one source, random ranks) knows nothing
    about it; every other feature is noise. With `useful`, only that many queries have any
    relevant candidate.
    """
    rng = np.random.default_rng(seed)
    lists = []
    for _ in range(queries):
        items = rng.choice(5000, size=per_query, replace=False)
        lists.append([Candidate(f"q-item{i}", float(per_query - r)) for r, i in enumerate(items)])
    table = fuse({"covisitation": lists}, queries, depth=per_query, rrf_k=60)
    n = len(table.frame)
    features = rng.normal(size=(n, len(FEATURES))).astype(np.float32)
    features[:, FEATURES.index("context")] = rng.integers(0, 8, size=n)
    match = rng.choice([0.0, 0.5, 1.0], size=n, p=[0.8, 0.12, 0.08])
    q = table.frame["query"].to_numpy()
    features[:, SIGNAL] = match
    u = rng.random(n)
    bought = (match == 1.0) & (u < 0.85)
    viewed = ((match == 0.5) & (u < 0.7)) | ((match == 0.0) & (u < 0.02))
    kind = np.where(bought, "purchase", np.where(viewed, "view", ""))
    if useful is not None:
        kind[q >= useful] = ""
    followed: list[dict[str, str]] = [{} for _ in range(queries)]
    for query, item, k in zip(q, table.frame["item_id"], kind, strict=True):
        if k:
            followed[query][item] = k
    labels = graded_labels(table, followed, GRADES)
    sessions = [f"session-{i // 2}" for i in range(queries)]  # two requests per session
    return table, features, labels, sessions


def mean_ndcg(table, labels: np.ndarray, scores: np.ndarray) -> float:
    frame = table.frame.assign(label=labels, score=scores)
    values = []
    for _, group in frame.groupby("query"):
        targets = set(group.loc[group["label"] > 0, "item_id"])
        if targets:
            order = group.sort_values("score", ascending=False, kind="stable")["item_id"]
            values.append(ndcg_at(order.tolist(), targets, SLOTS))
    return float(np.mean(values))


def test_ranker_learns_a_signal_the_fused_order_lacks():
    table, features, labels, sessions = synthetic(400, seed=1)
    fit = fit_ranker(features, labels, table, sessions, SMALL, slots=SLOTS, seed=7)
    assert isinstance(fit, RankerFit)
    assert fit.booster is not None, fit.reason
    assert fit.reason is None
    assert fit.requests == 400
    assert 20 <= fit.groups <= 400
    assert 1 <= fit.best_iteration <= SMALL.num_trees
    assert 0.5 < fit.validation_ndcg <= 1.0
    assert next(iter(fit.importance)) == "leaf_match"  # the planted signal carries the gain
    assert set(fit.importance) == set(FEATURES)
    # held-out requests the booster never saw
    test, test_features, test_labels, _ = synthetic(150, seed=2)
    fused = mean_ndcg(test, test_labels, test.frame["fused"].to_numpy())
    learned = mean_ndcg(test, test_labels, fit.booster.predict(test_features))
    assert learned > fused + 0.25, (learned, fused)
    assert learned > 0.75
    summary = fit.summary()
    assert summary["trained"] is True
    assert summary["groups"] == fit.groups


def test_ranker_training_is_deterministic():
    table, features, labels, sessions = synthetic(120, seed=3)
    one = fit_ranker(features, labels, table, sessions, SMALL, slots=SLOTS, seed=7)
    two = fit_ranker(features, labels, table, sessions, SMALL, slots=SLOTS, seed=7)
    assert one.booster is not None and two.booster is not None
    np.testing.assert_array_equal(one.booster.predict(features), two.booster.predict(features))
    assert one.best_iteration == two.best_iteration


def test_too_few_useful_groups_train_no_booster():
    table, features, labels, sessions = synthetic(60, seed=4, useful=5)
    useful = len(np.unique(table.frame["query"].to_numpy()[labels > 0]))
    assert 0 < useful <= 5
    fit = fit_ranker(features, labels, table, sessions, SMALL, slots=SLOTS, seed=7)
    assert fit.booster is None
    assert fit.groups == useful
    assert fit.requests == 60
    assert fit.reason is not None
    assert f"{useful} requests with a relevant candidate" in fit.reason
    assert "min_groups=20" in fit.reason
    assert fit.summary()["trained"] is False
    assert fit.importance == {}


def test_no_booster_when_every_useful_request_is_on_one_side_of_the_holdout():
    table, features, labels, _ = synthetic(60, seed=5)
    one_session = ["the-only-session"] * 60
    fit = fit_ranker(features, labels, table, one_session, SMALL, slots=SLOTS, seed=7)
    assert fit.booster is None
    assert fit.groups >= SMALL.min_groups
    assert fit.reason is not None and "one side" in fit.reason


def test_no_relevant_candidate_at_all():
    table, features, labels, sessions = synthetic(30, seed=6)
    fit = fit_ranker(features, np.zeros_like(labels), table, sessions, SMALL, slots=SLOTS, seed=7)
    assert fit.booster is None
    assert fit.groups == 0


def test_requests_from_one_band_of_the_hash_split_still_get_a_holdout():
    """Amazon-M2's validation split is the sessions whose seeded hash falls in [0.8, 0.9);
    the ranker's own holdout must not reuse that hash, or nothing is held out."""
    import numpy as np
    import pandas as pd

    from railtower.settings import RankerSettings
    from ranking.candidate_fusion import fuse
    from ranking.candidates import Candidate
    from training.ranker import fit_ranker
    from training.split import session_bucket

    seed = 20191001
    ids = pd.Series([f"session-{i}" for i in range(6000)])
    band = ids[(session_bucket(ids, seed) >= 0.8) & (session_bucket(ids, seed) < 0.9)].tolist()
    rng = np.random.default_rng(0)
    queries = len(band)
    rows = [[Candidate(f"i{j}", float(rng.random())) for j in range(10)] for _ in range(queries)]
    table = fuse({"covisitation": rows}, queries, 10, 60)
    from ranking.business_features import FEATURES

    features = rng.random((len(table.frame), len(FEATURES))).astype(np.float32)
    labels = (table.frame["item_id"] == "i0").to_numpy().astype(np.int32)
    settings = RankerSettings(num_trees=5, min_groups=20, min_data_in_leaf=5)
    fit = fit_ranker(features, labels, table, band, settings, slots=12, seed=seed)
    assert fit.booster is not None, fit.reason


def two_sources(queries: int, seed: int, knn_knows: bool):
    """Two sources over the same 30 items per query in independent random orders; what
    followed is session-kNN's top 3 (`knn_knows`) or 3 random items."""
    rng = np.random.default_rng(seed)
    knn, covis, followed = [], [], []
    for q in range(queries):
        items = [f"q{q}-item{i}" for i in range(30)]
        a, b = rng.permutation(items).tolist(), rng.permutation(items).tolist()
        knn.append([Candidate(i, float(30 - r)) for r, i in enumerate(a)])
        covis.append([Candidate(i, float(30 - r)) for r, i in enumerate(b)])
        bought = a[:3] if knn_knows else rng.choice(items, 3, replace=False).tolist()
        followed.append(dict.fromkeys(bought, "purchase"))
    table = fuse({"session_knn": knn, "covisitation": covis}, queries, depth=30, rrf_k=60)
    labels = graded_labels(table, followed, GRADES)
    features = np.zeros((len(table.frame), len(FEATURES)), dtype=np.float32)
    sessions = [f"session-{i}" for i in range(queries)]
    return table, features, labels, sessions


def test_a_source_that_clearly_ranks_better_is_the_order_served():
    table, features, labels, sessions = two_sources(600, seed=4, knn_knows=True)
    order, tried = choose_order(
        table, features, labels, sessions, None, ["session_knn", "covisitation"], SMALL, SLOTS, 7
    )
    assert order == "session_knn" and tried["session_knn"] > 0.9 > tried["fused"]


def test_noise_does_not_overturn_the_default_order():
    table, features, labels, sessions = two_sources(600, seed=5, knn_knows=False)
    order, tried = choose_order(
        table, features, labels, sessions, None, ["session_knn", "covisitation"], SMALL, SLOTS, 7
    )
    # some order has the best mean by chance, but not beyond the paired interval
    assert order == "fused" and len(tried) == 3
