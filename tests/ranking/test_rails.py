"""The rail pipeline end to end on a toy shop with fake candidate sources: the rules stage
never shows what it must not, fills its slots, and is deterministic; MMR keeps the score
order and spreads the slots over categories."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from railtower.settings import RAILS, EventWeights, RankingSettings
from ranking.business_features import ItemStats
from ranking.candidates import Candidate
from ranking.item_attributes import ItemAttributes
from ranking.rails import STAGES, RailPipeline, ranked_ids
from ranking.retriever import Catalogue, Query
from ranking.rules import RuleSet
from tests.conftest import toy_events

SLOTS = 6
DEPTH = 50
ITEM_IDS = [f"it{k:02d}" for k in range(24)]
CATEGORIES = ["electronics > audio", "electronics > phone", "home > kettle", "home > lamp"]
BRANDS = ["sony", "acme", "tefal"]
OUT_OF_STOCK = {"it03", "it10", "it17"}
ITEMS = pd.DataFrame(
    {
        "item_id": ITEM_IDS,
        "category_path": [CATEGORIES[k % 4] for k in range(24)],
        "brand": [BRANDS[k % 3] for k in range(24)],
        "price": [10.0 + 7 * k for k in range(24)],
        # it20's stock is unknown, which counts as in stock
        "stock": [0 if i in OUT_OF_STOCK else (np.nan if i == "it20" else 5) for i in ITEM_IDS],
        "margin": [0.05 * (k % 5) for k in range(24)],
    }
)
# Popularity: a mixed order, so the fill's order is not the catalogue's.
EVENTS = toy_events(
    {f"s{k}": [(item, "view")] * ((k * 7) % 11 + 1) for k, item in enumerate(ITEM_IDS)}
)
STATS = ItemStats.fit(
    EVENTS, ITEMS, Catalogue(ITEMS), RankingSettings(), EventWeights(), 4, ["cart", "purchase"]
)
ATTRS = ItemAttributes.from_frame(ITEMS)


class FixedSource:
    """A candidate source that answers every query with the same list (cut to k)."""

    def __init__(self, name: str, items: Sequence[str]) -> None:
        self.name = name
        self.items = list(items)

    def fit(self, events: pd.DataFrame, catalogue: Catalogue) -> FixedSource:
        return self

    def candidates(self, queries: Sequence[Query], k: int) -> list[list[Candidate]]:
        row = [Candidate(item, 1.0 / (1 + r)) for r, item in enumerate(self.items[:k])]
        return [list(row) for _ in queries]

    def recommend(self, queries: Sequence[Query], k: int) -> list[list[str]]:
        return [[c.item_id for c in row] for row in self.candidates(queries, k)]


def pipeline(
    covisitation: Sequence[str] = (),
    popularity: Sequence[str] = (),
    rule_set: RuleSet | None = None,
    ranking: RankingSettings | None = None,
    items: pd.DataFrame = ITEMS,
) -> RailPipeline:
    return RailPipeline(
        sources={
            "covisitation": FixedSource("covisitation", covisitation),
            "popularity": FixedSource("popularity", popularity),
        },
        stats=STATS,
        attributes=ItemAttributes.from_frame(items),
        settings=ranking or RankingSettings(),
        depth=DEPTH,
        slots=SLOTS,
        rule_set=rule_set,
    )


def rules_stage(pipe: RailPipeline, rail: str, queries: Sequence[Query]) -> list[list[str]]:
    return ranked_ids(pipe.run(rail, queries, stages=("rules",)), "rules")


def popularity_order() -> list[str]:
    """Catalogue items by popularity, ties in catalogue order (what the fill follows)."""
    return sorted(ITEM_IDS, key=lambda i: (-STATS.popularity[STATS.row[i]], ITEM_IDS.index(i)))


# ------------------------------------------------------------------------------ examples


def test_every_stage_is_returned_per_query():
    pipe = pipeline(["it00", "it01", "it02"], ["it01", "it05"])
    queries = [Query(), Query(session_items=("it05",), exclude=frozenset({"it05"}))]
    out = pipe.run("homepage_hero", queries)
    assert set(out) == set(STAGES)
    for stage in STAGES:
        assert len(out[stage]) == 2
    # with no ranker, the ranker stage keeps the fused order: it01 is named by both sources
    assert ranked_ids(out, "candidates")[0] == ["it01", "it00", "it05", "it02"]
    assert ranked_ids(out, "ranker")[0] == ranked_ids(out, "candidates")[0]
    only = pipe.run("homepage_hero", queries, stages=("candidates",))
    assert set(only) == {"candidates"}


def test_rules_stage_drops_exclusions_and_out_of_stock_then_fills_from_popular_items():
    pipe = pipeline(["it01", "it03", "it02"], [])  # it03 is out of stock
    query = Query(session_items=("it02",), exclude=frozenset({"it02"}))
    [result] = rules_stage(pipe, "homepage_hero", [query])
    assert result[0] == "it01"  # the only eligible candidate stays first
    assert "it02" not in result and "it03" not in result
    assert len(result) >= SLOTS
    expected_fill = [
        i for i in popularity_order() if i not in {"it01", "it02"} and i not in OUT_OF_STOCK
    ]
    assert result[1:SLOTS] == expected_fill[: SLOTS - 1]


def test_no_candidates_at_all_still_fills_the_slots():
    pipe = pipeline()
    [result] = rules_stage(
        pipe, "cart_upsell", [Query(cart=("it00",), exclude=frozenset({"it00"}))]
    )
    expected = [i for i in popularity_order() if i != "it00" and i not in OUT_OF_STOCK]
    assert result[:SLOTS] == expected[:SLOTS]


def test_rules_stage_returns_every_eligible_item_when_there_are_fewer_than_slots():
    blocked = RuleSet(
        name="t",
        version="1",
        rules=[
            {"kind": "block", "category": "home"},
            {"kind": "block", "brand": "sony"},
            {"kind": "block", "brand": "Acme"},
        ],
    )
    pipe = pipeline(["it01"], [], rule_set=blocked)
    [result] = rules_stage(pipe, "homepage_hero", [Query()])
    # electronics (k % 4 in {0, 1}), tefal (k % 3 == 2) and in stock: it05, it08, it20
    expected = {
        i
        for k, i in enumerate(ITEM_IDS)
        if k % 4 in (0, 1) and k % 3 == 2 and i not in OUT_OF_STOCK
    }
    assert expected == {"it05", "it08", "it20"}
    assert set(result) == expected
    assert len(result) == len(expected)


def test_pin_and_boost_shape_the_slots():
    rule_set = RuleSet(
        name="t",
        version="1",
        rules=[
            {"kind": "pin", "item_id": "it23", "slot": 2},
            {"kind": "boost", "item_id": "it04", "factor": 100.0},
        ],
    )
    pipe = pipeline(["it00", "it01", "it02", "it04", "it05", "it06", "it07"], [], rule_set)
    [result] = rules_stage(pipe, "pdp_fbt", [Query(anchor="it06", exclude=frozenset({"it06"}))])
    assert result[0] == "it04"
    assert result[1] == "it23"
    assert "it06" not in result


def test_a_pin_never_shows_the_pdp_anchor_or_a_cart_item():
    pin = RuleSet(name="t", version="1", rules=[{"kind": "pin", "item_id": "it01", "slot": 2}])
    pipe = pipeline(["it00", "it02", "it04"], [], rule_set=pin)
    pdp = Query(session_items=("it01",), anchor="it01", exclude=frozenset({"it01"}))
    cart = Query(cart=("it01",), exclude=frozenset({"it01"}))
    [on_pdp] = rules_stage(pipe, "pdp_fbt", [pdp])
    [on_cart] = rules_stage(pipe, "cart_upsell", [cart])
    assert "it01" not in on_pdp
    assert "it01" not in on_cart


# ------------------------------------------------------------------------------ properties

TARGET = st.one_of(
    st.sampled_from(ITEM_IDS).map(lambda i: {"item_id": i}),
    st.sampled_from([*CATEGORIES, "electronics", "home"]).map(lambda c: {"category": c}),
    st.sampled_from(BRANDS).map(lambda b: {"brand": b}),
)
BLOCK = TARGET.map(lambda t: {"kind": "block", **t})
BOOST = st.tuples(TARGET, st.floats(1.1, 5.0)).map(
    lambda x: {"kind": "boost", **x[0], "factor": x[1]}
)
BURY = st.tuples(TARGET, st.floats(0.05, 0.95)).map(
    lambda x: {"kind": "bury", **x[0], "factor": x[1]}
)
MARGIN = st.sampled_from([0.05, 0.1]).map(lambda m: {"kind": "margin_floor", "min_margin": m})
PINS = st.lists(
    st.tuples(st.sampled_from(ITEM_IDS), st.integers(1, SLOTS + 2)),
    max_size=3,
    unique_by=(lambda p: p[0], lambda p: p[1]),
)
CANDIDATE_LISTS = st.lists(st.sampled_from(ITEM_IDS), unique=True, max_size=16)


@st.composite
def requests(draw) -> tuple[str, list[Query]]:
    """A rail and a batch of 1-3 of its queries, built as the evaluation tasks build them."""
    rail = draw(st.sampled_from(RAILS))
    queries = []
    for _ in range(draw(st.integers(1, 3))):
        session = tuple(draw(st.lists(st.sampled_from(ITEM_IDS), max_size=5)))
        times = tuple(1.7e9 + 60.0 * t for t in range(len(session)))
        if rail == "pdp_fbt":
            anchor = draw(st.sampled_from(ITEM_IDS))
            query = Query(
                session, ("view",) * len(session), times, anchor=anchor, exclude=frozenset({anchor})
            )
        elif rail == "cart_upsell":
            cart = tuple(
                draw(st.lists(st.sampled_from(ITEM_IDS), min_size=1, max_size=4, unique=True))
            )
            query = Query(
                session, ("view",) * len(session), times, cart=cart, exclude=frozenset(cart)
            )
        else:
            query = Query(session, ("view",) * len(session), times, exclude=frozenset(session))
        queries.append(query)
    return rail, queries


@st.composite
def rule_sets(draw) -> RuleSet:
    rules: list[dict] = []
    rules += draw(st.lists(BLOCK, max_size=3))
    rules += draw(st.lists(st.one_of(BOOST, BURY), max_size=4))
    rules += draw(st.lists(MARGIN, max_size=1))
    # Pins may name items a request excludes (its anchor, its cart): they must not show.
    rules += [{"kind": "pin", "item_id": item, "slot": slot} for item, slot in draw(PINS)]
    order = draw(st.permutations(range(len(rules))))
    return RuleSet(name="random", version="1", rules=[rules[i] for i in order])


def eligible_items(rule_set: RuleSet, query: Query) -> set[str]:
    """Catalogue items the rules stage may show for this query, computed independently."""
    out = set()
    for item in ITEM_IDS:
        info = ATTRS[item]
        if item in query.exclude or info.out_of_stock:
            continue
        blocked = any(r.kind == "block" and r.targets(item, info) for r in rule_set.rules)
        below = any(
            r.kind == "margin_floor" and info.margin is not None and info.margin < r.min_margin
            for r in rule_set.rules
        )
        if not blocked and not below:
            out.add(item)
    return out


@settings(max_examples=30, deadline=None)
@given(
    request=requests(),
    covisitation=CANDIDATE_LISTS,
    popularity=CANDIDATE_LISTS,
    data=st.data(),
)
def test_rules_stage_invariants_under_random_rules(request, covisitation, popularity, data):
    rail, queries = request
    rule_set = data.draw(rule_sets())
    pipe = pipeline(covisitation, popularity, rule_set)
    results = pipe.run(rail, queries, stages=("rules",))["rules"]
    assert len(results) == len(queries)
    pins = [(r.item_id, r.slot) for r in rule_set.rules if r.kind == "pin"]
    for query, result in zip(queries, results, strict=True):
        ids = [c.item_id for c in result]
        eligible = eligible_items(rule_set, query)
        assert len(ids) == len(set(ids)), "duplicate item"
        assert not set(ids) & OUT_OF_STOCK
        assert not set(ids) & query.exclude
        assert set(ids) <= eligible, f"shown but not eligible: {set(ids) - eligible}"
        assert len(ids) <= DEPTH
        if len(eligible) >= SLOTS:
            assert len(ids) >= SLOTS
        else:
            # the fill runs the catalogue dry: every eligible item is shown
            assert set(ids) == eligible
        # a pin sits at its slot when enough other eligible items can fill the slots
        # before it; with too few, the pinned item closes the list (ranking.rules)
        others = len(eligible - {item for item, _ in pins})
        for item, slot in pins:
            if item in eligible and slot <= SLOTS and len(ids) >= slot and others >= slot - 1:
                assert ids[slot - 1] == item, (item, slot, ids)
        assert all(np.isfinite(c.score) for c in result)


@settings(max_examples=30, deadline=None)
@given(
    request=requests(),
    covisitation=CANDIDATE_LISTS,
    popularity=CANDIDATE_LISTS,
    data=st.data(),
)
def test_rail_pipeline_is_deterministic(request, covisitation, popularity, data):
    rail, queries = request
    rule_set = data.draw(rule_sets())
    first = pipeline(covisitation, popularity, rule_set).run(rail, queries)
    pipe = pipeline(covisitation, popularity, rule_set)
    second = pipe.run(rail, queries)
    third = pipe.run(rail, queries)  # the popularity cache is warm now
    assert first == second == third
    # each query is answered on its own: alone it gets what it got in the batch
    for n, query in enumerate(queries):
        alone = pipe.run(rail, [query], stages=("rules",))["rules"][0]
        assert alone == first["rules"][n]


# ------------------------------------------------------------------------------ MMR


def audio_first() -> list[Candidate]:
    """The six audio items on top, then phones, kettles and lamps, scores strictly falling."""
    audio = [i for k, i in enumerate(ITEM_IDS) if k % 4 == 0]
    rest = [i for k, i in enumerate(ITEM_IDS) if k % 4 != 0]
    order = audio + rest
    return [Candidate(item, 10.0 - 0.1 * r) for r, item in enumerate(order)]


def categories(candidates: Sequence[Candidate]) -> list[str]:
    return [ATTRS[c.item_id].category_path for c in candidates]


@pytest.mark.parametrize("lambda_", [0.0, 0.3, 0.85, 1.0])
def test_diversify_keeps_scores_non_increasing_and_every_item(lambda_):
    pipe = pipeline()
    ranked = audio_first()
    out = pipe.diversify(ranked, lambda_)
    scores = [c.score for c in out]
    assert scores == sorted(scores, reverse=True)
    assert sorted(scores) == sorted(c.score for c in ranked)  # the same scale, re-dealt
    assert sorted(c.item_id for c in out) == sorted(c.item_id for c in ranked)
    assert len(out) == len(ranked)


def test_diversify_spreads_categories_when_lambda_is_low():
    pipe = pipeline()
    ranked = audio_first()
    pure = pipe.diversify(ranked, 1.0)
    spread = pipe.diversify(ranked, 0.3)
    assert [c.item_id for c in pure] == [c.item_id for c in ranked]  # λ = 1 changes nothing
    assert set(categories(pure[:SLOTS])) == {"electronics > audio"}
    # a low λ trades relevance for another shelf: not all slots are audio any more
    assert categories(spread[:SLOTS]).count("electronics > audio") < SLOTS
    assert set(categories(spread[:SLOTS])) - {"electronics > audio"}
    # and λ = 0 spreads at least as far
    widest = pipe.diversify(ranked, 0.0)
    assert len(set(categories(widest[:SLOTS]))) >= len(set(categories(spread[:SLOTS])))
    assert spread[0].item_id == ranked[0].item_id  # the best item keeps the first slot
    # past the slots, the ranker's order is kept
    chosen = {c.item_id for c in spread[:SLOTS]}
    assert [c.item_id for c in spread[SLOTS:]] == [
        c.item_id for c in ranked if c.item_id not in chosen
    ]


def test_run_passes_mmr_lambda_through():
    audio = [i for k, i in enumerate(ITEM_IDS) if k % 4 == 0 and i not in OUT_OF_STOCK]
    others = [i for k, i in enumerate(ITEM_IDS) if k % 4 != 0 and i not in OUT_OF_STOCK]
    pipe = pipeline(audio + others, [])
    pure = pipe.run("homepage_hero", [Query()], stages=("mmr", "rules"), mmr_lambda=1.0)
    spread = pipe.run("homepage_hero", [Query()], stages=("mmr", "rules"), mmr_lambda=0.3)
    assert set(categories(pure["mmr"][0][:SLOTS])) == {"electronics > audio"}
    assert categories(spread["mmr"][0][:SLOTS]).count("electronics > audio") < SLOTS
    # without rules the rules stage keeps MMR's order
    assert [c.item_id for c in spread["rules"][0][:SLOTS]] == [
        c.item_id for c in spread["mmr"][0][:SLOTS]
    ]
