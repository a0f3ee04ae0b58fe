"""MMR on a toy shop whose right answers are known, plus its invariants on random lists."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ranking.candidates import Candidate
from ranking.item_attributes import ItemAttributes
from ranking.mmr import SAME_AISLE, SAME_SHELF, mmr, similarity

# Four phones (two cheap, two dear), two headphones, two kettles, one item with no category.
ITEMS = pd.DataFrame(
    {
        "item_id": ["ph1", "ph2", "ph3", "ph4", "hp1", "hp2", "kt1", "kt2", "odd"],
        "category_path": [
            *["electronics > smartphone"] * 4,
            *["electronics > audio > headphone"] * 2,
            *["appliances > kitchen > kettle"] * 2,
            None,
        ],
        "price": [100.0, 110.0, 900.0, 950.0, 500.0, 520.0, 20.0, 25.0, 5.0],
    }
)
ATTRS = ItemAttributes.from_frame(ITEMS, price_bands=2)
# Ranked as a relevance-only ranker would: all phones first.
RANKED = [
    Candidate(item, score)
    for item, score in [
        ("ph3", 1.0),
        ("ph4", 0.98),
        ("ph1", 0.96),
        ("ph2", 0.94),
        ("hp1", 0.7),
        ("kt1", 0.6),
        ("hp2", 0.5),
        ("kt2", 0.4),
    ]
]


def _ids(candidates: list[Candidate]) -> list[str]:
    return [c.item_id for c in candidates]


def _top_categories(candidates: list[Candidate]) -> set[str | None]:
    return {ATTRS[c.item_id].top_category for c in candidates}


def test_toy_catalogue_price_bands_split_cheap_and_dear_phones():
    # The known answers below depend on this: ph1/ph2 share a band, ph3/ph4 share the other.
    bands = {item: ATTRS[item].price_band for item in ("ph1", "ph2", "ph3", "ph4")}
    assert bands["ph1"] == bands["ph2"] != bands["ph3"] == bands["ph4"]


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("ph3", "ph4", SAME_SHELF),  # same leaf, same band
        ("ph1", "ph3", SAME_AISLE),  # same leaf, other band
        ("ph1", "hp1", SAME_AISLE),  # other leaf, same top level (electronics)
        ("ph1", "kt1", 0.0),  # other top level
        ("ph1", "odd", 0.0),  # no category: nothing says they are alike
    ],
)
def test_similarity_known_answers(a, b, expected):
    assert similarity(ATTRS[a], ATTRS[b]) == expected
    assert similarity(ATTRS[b], ATTRS[a]) == expected


def test_similarity_of_unknown_items_is_zero():
    assert similarity(None, ATTRS["ph1"]) == 0.0


def test_unknown_price_band_is_not_the_same_band():
    items = pd.DataFrame({"item_id": ["a", "b"], "category_path": ["x > y"] * 2})
    attrs = ItemAttributes.from_frame(items)
    assert attrs["a"].price_band == attrs["b"].price_band == 0
    assert similarity(attrs["a"], attrs["b"]) == SAME_AISLE


def test_lambda_one_keeps_the_ranked_order():
    assert mmr(RANKED, ATTRS, slots=5, lambda_=1.0) == RANKED[:5]


def test_half_lambda_known_answer_spreads_categories():
    # rel = (score - 0.4) / 0.6. ph3 first (rel 1); then the cheap phone ph1 (0.5*0.93 - 0.5*0.5
    # = 0.22) beats its dear twin ph4 (0.5*0.97 - 0.5*1 < 0) and kt1 (0.5*0.33 - 0 = 0.17);
    # then kt1, as ph2 now shares ph1's shelf (0.45 - 0.5); then hp1 (0.25 - 0.25 = 0).
    picked = mmr(RANKED, ATTRS, slots=4, lambda_=0.5)
    assert _ids(picked) == ["ph3", "ph1", "kt1", "hp1"]
    assert [c.score for c in picked] == [1.0, 0.96, 0.6, 0.7]  # scores pass through unchanged


def test_lower_lambda_never_shows_fewer_top_categories():
    counts = [len(_top_categories(mmr(RANKED, ATTRS, 3, lam))) for lam in (1.0, 0.8, 0.5, 0.2, 0.0)]
    assert counts == sorted(counts)
    assert counts[0] == 1 and counts[-1] == 2  # only phones at λ=1; phones and kettles at λ=0


def test_equal_scores_break_ties_in_input_order():
    tied = [Candidate(i, 0.5) for i in ("kt2", "kt1", "hp2")]
    assert _ids(mmr(tied, ATTRS, 3, 1.0)) == ["kt2", "kt1", "hp2"]
    # At λ=0 the first pick is still the first candidate; hp2 (other top level) comes next.
    assert _ids(mmr(tied, ATTRS, 3, 0.0)) == ["kt2", "hp2", "kt1"]


def test_repeated_item_is_shown_once_at_its_first_position():
    doubled = [Candidate("ph1", 0.9), Candidate("ph1", 0.99), Candidate("kt1", 0.5)]
    assert mmr(doubled, ATTRS, 3, 1.0) == [Candidate("ph1", 0.9), Candidate("kt1", 0.5)]


def test_items_unknown_to_the_catalogue_are_ranked_without_penalty():
    ranked = [Candidate("new-1", 1.0), Candidate("new-2", 0.9)]
    assert _ids(mmr(ranked, ATTRS, 2, 0.0)) == ["new-1", "new-2"]


def test_zero_slots_or_no_candidates_give_an_empty_list():
    assert mmr(RANKED, ATTRS, 0, 0.5) == []
    assert mmr([], ATTRS, 5, 0.5) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"slots": -1, "lambda_": 0.5}, "slots must be >= 0, got -1"),
        ({"slots": 3, "lambda_": 1.5}, "lambda_ must be in [0, 1]"),
        ({"slots": 3, "lambda_": -0.1}, "lambda_ must be in [0, 1]"),
    ],
)
def test_invalid_arguments_are_refused_with_the_argument_named(kwargs, message):
    with pytest.raises(ValueError) as err:
        mmr(RANKED, ATTRS, **kwargs)
    assert message in str(err.value)


def test_non_finite_score_names_the_item():
    with pytest.raises(ValueError, match="'ph1' has score nan"):
        mmr([Candidate("ph1", math.nan)], ATTRS, 1, 0.5)


# ------------------------------------------------------------------------- properties

ids = st.sampled_from([*ITEMS["item_id"], "unknown"])
candidate_lists = st.lists(
    st.builds(Candidate, ids, st.floats(-5, 5, allow_nan=False)), max_size=15
)


@settings(max_examples=200, deadline=None)
@given(candidate_lists, st.integers(0, 12), st.floats(0, 1))
def test_result_is_a_duplicate_free_prefix_sized_subset(candidates, slots, lambda_):
    picked = mmr(candidates, ATTRS, slots, lambda_)
    distinct = {c.item_id for c in candidates}
    assert len(picked) == min(slots, len(distinct))
    assert len({c.item_id for c in picked}) == len(picked)
    assert set(picked) <= set(candidates)
    assert mmr(candidates, ATTRS, slots, lambda_) == picked


@settings(max_examples=200, deadline=None)
@given(candidate_lists, st.integers(0, 12))
def test_lambda_one_is_the_stable_score_order(candidates, slots):
    first = {}
    for c in candidates:
        first.setdefault(c.item_id, c)
    expected = sorted(first.values(), key=lambda c: -c.score)[:slots]
    assert mmr(candidates, ATTRS, slots, 1.0) == expected


def _textbook_mmr(candidates, attributes, slots, lambda_):  # type: ignore[no-untyped-def]
    """MMR as written down: every step scores every candidate left against every pick."""
    seen: set[str] = set()
    pool = [c for c in candidates if not (c.item_id in seen or seen.add(c.item_id))]
    if not pool or slots == 0:
        return []
    low, high = min(c.score for c in pool), max(c.score for c in pool)
    rel = [(c.score - low) / (high - low) if high > low else 1.0 for c in pool]
    info = [attributes.get(c.item_id) for c in pool]
    penalty, left, picked = [0.0] * len(pool), list(range(len(pool))), []
    while left and len(picked) < slots:
        best = max(
            left, key=lambda i: (lambda_ * rel[i] - (1.0 - lambda_) * penalty[i], pool[i].score)
        )
        left.remove(best)
        picked.append(pool[best])
        for i in left:
            penalty[i] = max(penalty[i], similarity(info[i], info[best]))
    return picked


# the toy shop plus a phone without a price (band 0: on no shelf, still in the aisle)
NO_PRICE = pd.DataFrame({"item_id": ["ph0"], "category_path": [ITEMS.category_path[0]]})
WIDE = ItemAttributes.from_frame(pd.concat([ITEMS, NO_PRICE]), price_bands=2)
wide_ids = st.sampled_from([*ITEMS["item_id"], "ph0", "unknown"])
# scores from a few values, so ties (equal scores, equal objectives) are common
tied_lists = st.lists(
    st.builds(Candidate, wide_ids, st.sampled_from([-1.0, 0.0, 0.25, 0.5, 0.5, 1.0, 3.0])),
    max_size=15,
)


@settings(max_examples=300)
@given(st.one_of(candidate_lists, tied_lists), st.integers(0, 12), st.floats(0, 1), st.booleans())
def test_picks_are_exactly_the_textbook_loops(candidates, slots, lambda_, best_first):
    """The scan that stops early on a best-first list and the penalties updated only for
    alike candidates pick exactly what scoring everything every step picks."""
    if best_first:  # a ranker's list; otherwise any order
        candidates = sorted(candidates, key=lambda c: -c.score)
    assert WIDE["ph0"].price_band == 0
    assert mmr(candidates, WIDE, slots, lambda_) == _textbook_mmr(candidates, WIDE, slots, lambda_)
