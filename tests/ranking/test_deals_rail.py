"""deals_for_you on a toy shop whose price histories are written out: a stronger deal in the
shopper's category comes first, and the rail never shows a blocked, excluded or out-of-stock
item while it fills its slots."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from railtower.settings import EventWeights, RankingSettings
from ranking.business_features import ItemStats
from ranking.candidates import Candidate
from ranking.item_attributes import ItemAttributes
from ranking.rails import DEALS_RAIL, RailPipeline, ranked_ids
from ranking.retriever import Catalogue, Query
from ranking.rules import RuleSet

SLOTS = 4
T0 = pd.Timestamp("2024-05-01", tz="UTC")
# item: (category, list price, price after the drop at hour 6; None = no drop)
SHOP = {
    "d_audio_big": ("electronics > audio", 100.0, 70.0),  # 30% off, in the shopper's leaf
    "d_audio_small": ("electronics > audio", 50.0, 42.5),  # 15% off, same leaf
    "d_lamp_bigger": ("home > lamp", 40.0, 24.0),  # 40% off, a shelf the shopper never visits
    "d_phone": ("electronics > phone", 300.0, 255.0),  # 15% off, same top category
    "a1": ("electronics > audio", 80.0, None),
    "a2": ("electronics > audio", 90.0, None),
    "k1": ("home > kettle", 30.0, None),
    "k2": ("home > kettle", 35.0, None),
    "l1": ("home > lamp", 25.0, None),
    "p1": ("electronics > phone", 310.0, None),
}
ITEM_IDS = list(SHOP)
DEALS = [i for i, (_, _, after) in SHOP.items() if after is not None]
ITEMS = pd.DataFrame(
    {
        "item_id": ITEM_IDS,
        "category_path": [c for c, _, _ in SHOP.values()],
        "brand": "acme",
        "price": [p for _, p, _ in SHOP.values()],
        "stock": 5,
    }
)


def _events() -> pd.DataFrame:
    """Six hourly views of every item at its list price, then each deal's price at hour 6."""
    rows = []
    for item, (_, price, after) in SHOP.items():
        for hour in range(6):
            rows.append((f"other-{item}-{hour}", item, float(hour), price))
        if after is not None:
            rows.append((f"other-{item}-drop", item, 6.0, after))
    frame = pd.DataFrame(
        {
            "event_id": [f"e{k}" for k in range(len(rows))],
            "event_time": [T0 + pd.Timedelta(hours=h) for _, _, h, _ in rows],
            "event_type": "view",
            "session_id": [s for s, _, _, _ in rows],
            "item_id": [i for _, i, _, _ in rows],
            "position": 0,
            "price": [p for _, _, _, p in rows],
        }
    ).sort_values("event_time", kind="stable")
    for col in ("event_id", "event_type", "session_id", "item_id"):
        frame[col] = frame[col].astype("string")
    return frame.reset_index(drop=True)


STATS = ItemStats.fit(
    _events(), ITEMS, Catalogue(ITEMS), RankingSettings(), EventWeights(), 4, ["purchase"]
)
# The shopper browses audio at hour 7, after every drop.
NOW = (T0 + pd.Timedelta(hours=7)).timestamp()
AUDIO_SHOPPER = Query(
    session_items=("a1", "a2"),
    session_types=("view", "view"),
    session_times=(NOW, NOW + 60),
    exclude=frozenset({"a1", "a2"}),
)


class FixedSource:
    name = "popularity"

    def __init__(self, items: Sequence[str]) -> None:
        self.items = list(items)

    def fit(self, events: pd.DataFrame, catalogue: Catalogue) -> FixedSource:
        return self

    def candidates(self, queries: Sequence[Query], k: int) -> list[list[Candidate]]:
        row = [Candidate(item, 1.0 / (1 + r)) for r, item in enumerate(self.items[:k])]
        return [list(row) for _ in queries]

    def recommend(self, queries: Sequence[Query], k: int) -> list[list[str]]:
        return [[c.item_id for c in row] for row in self.candidates(queries, k)]


def pipeline(items: pd.DataFrame = ITEMS, rule_set: RuleSet | None = None) -> RailPipeline:
    return RailPipeline(
        sources={"popularity": FixedSource(["k1", "a1", "l1", "d_phone"])},
        stats=STATS,
        attributes=ItemAttributes.from_frame(items),
        settings=RankingSettings(),
        depth=50,
        slots=SLOTS,
        rule_set=rule_set,
    )


def test_the_candidates_are_exactly_the_items_whose_price_dropped():
    [candidates] = ranked_ids(
        pipeline().run(DEALS_RAIL, [AUDIO_SHOPPER], stages=("candidates",)), "candidates"
    )
    assert set(candidates) == set(DEALS)
    # the candidate stage orders by deal strength alone: the 40% lamp first
    assert candidates[0] == "d_lamp_bigger"


def test_a_stronger_deal_in_the_shoppers_category_ranks_first():
    [ranked] = ranked_ids(pipeline().run(DEALS_RAIL, [AUDIO_SHOPPER], stages=("ranker",)), "ranker")
    assert ranked[0] == "d_audio_big"  # 30% off in the shopper's leaf beats 40% off elsewhere
    assert ranked.index("d_audio_big") < ranked.index("d_audio_small")  # same leaf: bigger first
    [shown] = ranked_ids(pipeline().run(DEALS_RAIL, [AUDIO_SHOPPER], stages=("rules",)), "rules")
    assert shown[0] == "d_audio_big" and len(shown) >= SLOTS


def test_a_shopper_without_history_gets_the_deals_by_strength():
    cold = Query(session_times=(NOW,))
    [ranked] = ranked_ids(pipeline().run(DEALS_RAIL, [cold], stages=("ranker",)), "ranker")
    # no affinity to weigh: 40% off, then 30%, then the two 15% deals (in either order)
    assert ranked[:2] == ["d_lamp_bigger", "d_audio_big"]
    assert set(ranked[2:]) == {"d_audio_small", "d_phone"}


def test_before_the_drops_there_are_no_deals_and_popular_items_fill_the_rail():
    early = Query(session_times=((T0 + pd.Timedelta(hours=5.5)).timestamp(),))
    out = pipeline().run(DEALS_RAIL, [early], stages=("candidates", "rules"))
    assert ranked_ids(out, "candidates") == [[]]
    [shown] = ranked_ids(out, "rules")
    assert len(shown) >= SLOTS


def test_the_rankers_price_switch_does_not_empty_the_deals_rail():
    pipe = pipeline()
    on = pipe.run(DEALS_RAIL, [AUDIO_SHOPPER], stages=("candidates",))
    pipe.stats = replace(STATS, price_features=False)
    off = pipe.run(DEALS_RAIL, [AUDIO_SHOPPER], stages=("candidates", "rules"))
    assert ranked_ids(off, "candidates") == ranked_ids(on, "candidates") != [[]]
    assert len(ranked_ids(off, "rules")[0]) >= SLOTS


def test_without_a_price_history_the_rail_still_fills_from_popular_items():
    pipe = pipeline()
    pipe.stats = replace(STATS, prices=None)
    out = pipe.run(DEALS_RAIL, [AUDIO_SHOPPER], stages=("candidates", "rules"))
    assert ranked_ids(out, "candidates") == [[]]  # no price history: no deal is known
    assert len(ranked_ids(out, "rules")[0]) >= SLOTS


def _shop_with_stock(out_of_stock: set[str]) -> pd.DataFrame:
    return ITEMS.assign(stock=[0 if i in out_of_stock else 5 for i in ITEM_IDS])


TARGETS = st.one_of(
    st.sampled_from(ITEM_IDS).map(lambda i: {"item_id": i}),
    st.sampled_from(["electronics", "home", "electronics > audio", "home > lamp"]).map(
        lambda c: {"category": c}
    ),
)


@settings(max_examples=40, deadline=None)
@given(
    blocks=st.lists(TARGETS, max_size=3),
    out_of_stock=st.sets(st.sampled_from(ITEM_IDS), max_size=5),
    seen=st.sets(st.sampled_from(ITEM_IDS), max_size=3),
)
def test_never_a_blocked_excluded_or_out_of_stock_item_and_the_slots_fill(
    blocks, out_of_stock, seen
):
    rule_set = RuleSet(name="t", version="1", rules=[{"kind": "block", **b} for b in blocks])
    pipe = pipeline(_shop_with_stock(out_of_stock), rule_set)
    query = Query(
        session_items=tuple(sorted(seen)),
        session_types=("view",) * len(seen),
        session_times=tuple(NOW + k for k in range(len(seen))),
        exclude=frozenset(seen),
    )
    [shown] = ranked_ids(pipe.run(DEALS_RAIL, [query], stages=("rules",)), "rules")
    attributes = pipe.attributes

    def blocked(item: str) -> bool:
        path = attributes[item].category_path or ""
        return any(
            b.get("item_id") == item
            or (b.get("category") is not None and (path + " > ").startswith(b["category"] + " > "))
            for b in blocks
        )

    eligible = {i for i in ITEM_IDS if i not in out_of_stock and i not in seen and not blocked(i)}
    assert len(shown) == len(set(shown))
    assert set(shown) <= eligible, set(shown) - eligible
    # the stage returns the whole ruled list, slots first: the slots are always full
    assert len(shown) >= min(SLOTS, len(eligible))
    # every eligible deal is there, before any filler
    deals_shown = [i for i in shown if i in DEALS]
    assert set(deals_shown) == eligible & set(DEALS)
    assert shown[: len(deals_shown)] == deals_shown
