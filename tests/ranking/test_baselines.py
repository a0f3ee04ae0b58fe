"""One contract for every baseline retriever, plus known-answer checks on a toy catalogue."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from railtower.settings import load_settings
from ranking.baselines import BASELINES
from ranking.covisitation import CovisitationRetriever, TransitionRetriever
from ranking.popularity import PopularityRetriever
from ranking.retriever import Catalogue, Query
from ranking.session_knn import SessionKnnRetriever
from tests.conftest import toy_events

SETTINGS = load_settings()

# Shoppers who view a TV go on to an HDMI cable and a wall mount; phone shoppers to a case.
SESSIONS = {
    **{f"tv{i}": [("tv", "view"), ("hdmi", "cart"), ("mount", "purchase")] for i in range(8)},
    **{f"ph{i}": [("phone", "view"), ("case", "cart")] for i in range(5)},
    **{f"pop{i}": [("charger", "view"), ("charger", "purchase")] for i in range(12)},
    "odd": [("lamp", "view"), ("tv", "view")],
}
EVENTS = toy_events(SESSIONS)
ITEMS = pd.DataFrame(
    {
        "item_id": ["tv", "hdmi", "mount", "phone", "case", "charger", "lamp", "kettle"],
        "category_path": ["tv", "cable", "mount", "phone", "case", "charger", "light", "kitchen"],
    }
)
CATALOGUE = Catalogue(ITEMS)


@pytest.fixture(params=sorted(BASELINES))
def fitted(request):
    return BASELINES[request.param](SETTINGS, False).fit(EVENTS, CATALOGUE)


def test_contract_fills_k_unique_items_never_excluded(fitted):
    queries = [
        Query(("tv",), ("view",), exclude=frozenset({"tv"})),
        Query(anchor="phone", exclude=frozenset({"phone"})),
        Query(
            ("tv", "hdmi"), ("view", "cart"), cart=("tv", "hdmi"), exclude=frozenset({"tv", "hdmi"})
        ),
        Query(("unknown-item",), ("view",), exclude=frozenset({"unknown-item"})),
    ]
    for query, ranked in zip(queries, fitted.recommend(queries, k=5), strict=True):
        assert len(ranked) == 5
        assert len(set(ranked)) == 5
        assert not set(ranked) & query.exclude
        assert set(ranked) <= set(CATALOGUE.ids)


def test_contract_is_deterministic(fitted):
    queries = [Query(("tv",), ("view",), exclude=frozenset({"tv"}))] * 3
    assert fitted.recommend(queries, 4) == fitted.recommend(queries, 4)


def test_contract_asking_for_more_than_the_catalogue_returns_all_eligible(fitted):
    (ranked,) = fitted.recommend([Query(anchor="tv", exclude=frozenset({"tv"}))], k=50)
    assert sorted(ranked) == sorted(set(CATALOGUE.ids) - {"tv"})


def test_popularity_ranks_by_weighted_events():
    pop = PopularityRetriever(SETTINGS.baselines.popularity, SETTINGS.event_weights)
    (ranked,) = pop.fit(EVENTS, CATALOGUE).recommend([Query()], k=3)
    assert ranked[0] == "charger"  # 12 views + 12 purchases outweigh everything else
    assert "kettle" not in ranked  # never seen


def test_popularity_decays_old_events():
    old = toy_events({f"o{i}": [("old", "purchase")] for i in range(5)}, start="2024-01-01")
    new = toy_events({f"n{i}": [("new", "purchase")] for i in range(3)}, start="2024-03-01")
    catalogue = Catalogue(pd.DataFrame({"item_id": ["old", "new"]}))
    pop = PopularityRetriever(SETTINGS.baselines.popularity, SETTINGS.event_weights)
    (ranked,) = pop.fit(pd.concat([old, new]), catalogue).recommend([Query()], k=2)
    assert ranked == ["new", "old"]  # fewer events, but recent


@pytest.mark.parametrize("basket", [False, True])
def test_covisitation_finds_the_companion_items(basket):
    model = CovisitationRetriever(
        SETTINGS.baselines.covisitation,
        SETTINGS.event_weights,
        SETTINGS.baselines.popularity,
        basket=basket,
    )
    (ranked,) = model.fit(EVENTS, CATALOGUE).recommend(
        [Query(anchor="tv", exclude=frozenset({"tv"}))], k=2
    )
    assert set(ranked) == {"hdmi", "mount"}
    (ranked,) = model.recommend([Query(anchor="phone", exclude=frozenset({"phone"}))], k=1)
    assert ranked == ["case"]


def test_session_knn_continues_like_similar_sessions():
    model = SessionKnnRetriever(
        SETTINGS.baselines.session_knn, SETTINGS.event_weights, SETTINGS.baselines.popularity
    ).fit(EVENTS, CATALOGUE)
    (ranked,) = model.recommend([Query(("tv",), ("view",), exclude=frozenset({"tv"}))], k=2)
    assert set(ranked) == {"hdmi", "mount"}
    # a lamp-then-tv session resembles 'odd' and the tv sessions: the lamp's only
    # neighbour session contributes nothing new, the tv sessions bring hdmi and mount
    (ranked,) = model.recommend(
        [Query(("lamp", "tv"), ("view", "view"), exclude=frozenset({"lamp", "tv"}))], k=2
    )
    assert set(ranked) == {"hdmi", "mount"}


def test_category_popularity_ranks_the_session_category_first():
    from ranking.category_popularity import CategoryPopularityRetriever

    items = pd.DataFrame(
        {
            "item_id": ["tv-a", "tv-b", "tv-new", "radio", "charger"],
            "category_path": ["tv", "tv", "tv", "audio", "power"],
        }
    )
    events = toy_events(
        {
            **{f"a{i}": [("tv-a", "view")] for i in range(2)},
            **{f"b{i}": [("tv-b", "view")] for i in range(3)},
            **{f"c{i}": [("charger", "purchase")] for i in range(9)},
        }
    )
    model = CategoryPopularityRetriever(
        SETTINGS.baselines.popularity, SETTINGS.event_weights, 0.7
    ).fit(events, Catalogue(items))
    (ranked,) = model.recommend([Query(("tv-a",), ("view",), exclude=frozenset({"tv-a"}))], k=4)
    # same category first (popular, then never-seen), then the global fill
    assert ranked == ["tv-b", "tv-new", "charger", "radio"]


def test_covisitation_pair_weights_follow_the_matrix_and_are_zero_for_unknown_items():
    model = CovisitationRetriever(
        SETTINGS.baselines.covisitation,
        SETTINGS.event_weights,
        SETTINGS.baselines.popularity,
        basket=False,
    ).fit(EVENTS, CATALOGUE)
    weights = model.pair_weights(["tv", "nowhere"], ["hdmi", "case", "nowhere"])
    assert weights.shape == (2, 3)
    assert weights[0, 0] > 0  # tv and hdmi share eight sessions
    assert weights[0, 1] == 0  # tv and case never met
    assert (weights[1] == 0).all() and weights[0, 2] == 0


def test_covisitation_pair_evidence_gives_raw_counts_and_shares_that_survive_a_bundle(tmp_path):
    # Two-item baskets weigh 1/log2(4) = 0.5 per pair: the dock is bought with the laptop
    # three times, the bag once, so from the laptop: counts 1.5 and 0.5, shares 3/4 and 1/4.
    from ranking.source_state import load_sources, save_sources

    baskets = {
        **{f"d{i}": [("laptop", "purchase"), ("dock", "purchase")] for i in range(3)},
        "b0": [("laptop", "purchase"), ("bag", "purchase")],
    }
    catalogue = Catalogue(pd.DataFrame({"item_id": ["laptop", "dock", "bag", "mouse"]}))
    model = BASELINES["covisitation"](SETTINGS, True).fit(toy_events(baskets), catalogue)
    seeds, items = ["laptop", "dock", "nowhere"], ["dock", "bag", "mouse"]
    counts, shares = model.pair_evidence(seeds, model.pair_weights(seeds, items))
    assert counts[0] == pytest.approx([1.5, 0.5, 0.0])
    assert shares[0] == pytest.approx([0.75, 0.25, 0.0])
    assert counts[1] == pytest.approx([0.0, 0.0, 0.0])  # the dock only ever met the laptop
    assert np.isnan(counts[2]).all() and np.isnan(shares[2]).all()  # unknown seed: no evidence
    save_sources({"covisitation": model}, tmp_path)
    restored = load_sources(tmp_path, catalogue, SETTINGS, True)["covisitation"]
    again = restored.pair_evidence(seeds, restored.pair_weights(seeds, items))
    np.testing.assert_array_equal(again[0], counts)
    np.testing.assert_array_equal(again[1], shares)


def _transitions(basket: bool) -> TransitionRetriever:
    return TransitionRetriever(
        SETTINGS.baselines.transitions,
        SETTINGS.event_weights,
        SETTINGS.baselines.popularity,
        basket=basket,
    )


def test_transitions_count_only_what_came_after():
    model = _transitions(basket=False).fit(EVENTS, CATALOGUE)
    # tv -> hdmi -> mount in eight sessions: forward from tv, never back from the mount
    (after_tv,) = model.recommend([Query(anchor="tv", exclude=frozenset({"tv"}))], k=2)
    assert set(after_tv) == {"hdmi", "mount"}
    forward = model.pair_weights(["tv", "mount"], ["mount", "tv"])
    assert forward[0, 0] > 0 and forward[1, 1] == 0
    # symmetric co-visitation sees the same pair both ways
    symmetric = CovisitationRetriever(
        SETTINGS.baselines.covisitation,
        SETTINGS.event_weights,
        SETTINGS.baselines.popularity,
        basket=False,
    ).fit(EVENTS, CATALOGUE)
    assert symmetric.pair_weights(["mount"], ["tv"])[0, 0] > 0


def test_transitions_on_baskets_let_a_specific_complement_beat_an_item_in_every_basket():
    # A kettle is in every basket; the descaler only ever goes with it, and the filter with
    # the descaler. Plain co-occurrence ranks the kettle first after the descaler; lift
    # ranks the filter (bought with the descaler more often than its own count predicts).
    baskets = {
        **{
            f"a{i}": [("descaler", "purchase"), ("kettle", "purchase"), ("filter", "purchase")]
            for i in range(4)
        },
        **{f"b{i}": [("kettle", "purchase"), ("lamp", "purchase")] for i in range(30)},
        **{f"c{i}": [("descaler", "purchase"), ("kettle", "purchase")] for i in range(2)},
    }
    events = toy_events(baskets)
    items = pd.DataFrame({"item_id": ["descaler", "kettle", "filter", "lamp"]})
    catalogue = Catalogue(items)
    query = [Query(anchor="descaler", exclude=frozenset({"descaler"}))]
    plain = CovisitationRetriever(
        SETTINGS.baselines.covisitation,
        SETTINGS.event_weights,
        SETTINGS.baselines.popularity,
        basket=True,
    ).fit(events, catalogue)
    assert plain.recommend(query, k=1) == [["kettle"]]
    lift = _transitions(basket=True).fit(events, catalogue)
    assert lift.recommend(query, k=1) == [["filter"]]
