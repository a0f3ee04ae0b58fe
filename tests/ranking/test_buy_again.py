"""The buy-again source: the shopper's earlier purchases, most baskets first, newest breaking
ties; nothing for a guest; never an excluded or unlisted item."""

from __future__ import annotations

import pandas as pd

from railtower.settings import Settings
from ranking.buy_again import BuyAgainRetriever
from ranking.rail_inputs import rail_query
from ranking.retriever import Catalogue

ITEMS = ["tv", "cable", "mount", "lamp", "kettle"]


def _fitted() -> BuyAgainRetriever:
    settings = Settings()
    catalogue = Catalogue(pd.DataFrame({"item_id": ITEMS}))
    events = pd.DataFrame(
        {
            "item_id": ["kettle", "kettle", "lamp"],
            "event_type": ["purchase", "view", "view"],
            "event_time": pd.to_datetime([1, 1, 1], unit="s", utc=True),  # no decay
            "session_id": ["a", "b", "c"],
        }
    )
    source = BuyAgainRetriever(settings.baselines.popularity, settings.event_weights)
    return source.fit(events, catalogue)


def test_more_baskets_rank_first_and_the_newest_purchase_breaks_a_tie():
    # cable in three sessions; mount and lamp in one each, lamp the newer
    bought = ("cable", "mount", "cable", "lamp", "cable", "gone-from-catalogue")
    (ranked,) = _fitted().candidates([rail_query(past_purchases=bought)], k=10)
    assert [c.item_id for c in ranked] == ["cable", "lamp", "mount"]
    assert 3 < ranked[0].score < 4 and ranked[1].score > ranked[2].score


def test_the_rails_exclusions_hold_and_a_guest_gets_nothing_of_its_own():
    source = _fitted()
    query = rail_query(anchor="cable", past_purchases=("cable", "tv"))
    (ranked,) = source.candidates([query], k=10)
    assert [c.item_id for c in ranked] == ["tv"]
    assert source.candidates([rail_query(anchor="cable")], k=10) == [[]]


def test_as_a_baseline_it_fills_with_popular_items_after_the_purchases():
    (ranked,) = _fitted().recommend([rail_query(anchor="tv", past_purchases=("mount",))], k=3)
    assert ranked[:2] == ["mount", "kettle"] and "tv" not in ranked and len(ranked) == 3
