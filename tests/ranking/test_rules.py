"""Merchandising rules: every validation error names its line and field, each rule kind has
its known effect on a toy shop, and the slot invariants hold for random rule sets."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from railtower.errors import RailtowerError
from railtower.schemas import CATEGORY_SEPARATOR
from railtower.settings import PROJECT_ROOT, RAILS
from ranking.candidates import Candidate
from ranking.item_attributes import ItemAttributes
from ranking.rules import (
    BlockRule,
    BoostRule,
    BuryRule,
    MarginFloorRule,
    PinRule,
    RuleSet,
    RuleSetError,
    apply_rules,
    category_matches,
    dry_run,
    explain_rules,
    load_rule_set,
)

NOW = datetime(2024, 11, 29, 12, tzinfo=UTC)
HOUR = timedelta(hours=1)

# A toy shop: (id, category, brand, stock, margin). "elx" sits in "electronicsx", a sibling
# whose name merely starts like "electronics"; "kettle" is never a candidate.
SHOP = [
    ("s-phone", "electronics > smartphone", "samsung", 5, 0.20),
    ("s-old", "electronics > smartphone", "samsung", 0, 0.30),
    ("a-phone", "electronics > smartphone", "apple", 3, 0.02),
    ("s-buds", "electronics > audio > headphone", "samsung", 10, None),
    ("x-buds", "electronics > audio > headphone", "xiaomi", None, 0.40),
    ("mouse", "computers > peripherals > mouse", "logitech", 50, 0.30),
    ("drill", "construction > tools > drill", "bosch", 2, 0.25),
    ("elx", "electronicsx > gadget", "acme", 1, 0.50),
    ("kettle", "appliances > kitchen > kettle", "tefal", 4, 0.30),
]
ITEMS = pd.DataFrame(SHOP, columns=["item_id", "category_path", "brand", "stock", "margin"])
ATTRS = ItemAttributes.from_frame(ITEMS)
SCORES = {"s-phone": 0.9, "s-old": 0.85, "a-phone": 0.8, "s-buds": 0.7, "x-buds": 0.6}
CANDIDATES = [
    Candidate(i, s) for i, s in {**SCORES, "mouse": 0.5, "drill": 0.4, "elx": 0.3}.items()
]
IN_STOCK_ORDER = ["s-phone", "a-phone", "s-buds", "x-buds", "mouse", "drill", "elx"]


def rules_of(*rules: dict, **fields) -> RuleSet:
    return RuleSet(name="test", version="1", rules=rules, **fields)


def apply(rule_set: RuleSet, slots: int = 10, rail: str = "homepage_hero", now=NOW) -> list[str]:
    return [c.item_id for c in apply_rules(CANDIDATES, rule_set, ATTRS, rail, slots, now)]


def text_with(*rules: str) -> str:
    """A rule set whose rules[i] sits alone on line 5 + i."""
    head = ["{", '  "name": "test",', '  "version": "1",', '  "rules": [']
    return "\n".join([*head, ",\n".join(f"    {r}" for r in rules), "  ]", "}"])


# ------------------------------------------------------------------------------ loading


def test_example_rule_set_loads_with_every_kind():
    rule_set = load_rule_set(PROJECT_ROOT / "configs" / "rules" / "example.json")
    assert {r.kind for r in rule_set.rules} == {"pin", "boost", "bury", "block", "margin_floor"}
    assert all(r.valid_from is None or r.valid_from.tzinfo == UTC for r in rule_set.rules)


def test_text_and_path_load_the_same_rule_set(tmp_path: Path):
    text = text_with('{"kind": "boost", "brand": "Samsung", "factor": 1.5}')
    (tmp_path / "r.json").write_text(text)
    from_text, from_path = load_rule_set(text), load_rule_set(str(tmp_path / "r.json"))
    assert from_text == from_path
    assert from_text.rules[0].brand == "samsung"  # catalogue brands are lower-case
    assert from_text.rails == RAILS  # every rail unless told otherwise


PIN = '"kind": "pin", "item_id": "a"'
BAD_RULES = [
    # (rule text, field, part of the why)
    ('{"kind": "teleport", "item_id": "a"}', "kind", "unknown kind 'teleport'"),
    ('{"item_id": "a", "slot": 1}', "kind", "missing 'kind'"),
    ('{"kind": "boost", "brand": "x", "factor": 0.5}', "factor", "greater than 1"),
    ('{"kind": "boost", "brand": "x", "factor": 1}', "factor", "greater than 1"),
    ('{"kind": "bury", "brand": "x", "factor": 1.5}', "factor", "between 0 and 1"),
    ('{"kind": "bury", "brand": "x", "factor": 0}', "factor", "between 0 and 1"),
    ('{"kind": "boost", "brand": "x", "factor": "2"}', "factor", "valid number"),
    ("{" + PIN + ', "slot": 0}', "slot", "slots count from 1"),
    ("{" + PIN + ', "slot": 1.5}', "slot", "valid integer"),
    ("{" + PIN + "}", "slot", "required field is missing"),
    ('{"kind": "margin_floor", "min_margin": 1.5}', "min_margin", "between 0 and 1"),
    ('{"kind": "margin_floor", "min_margin": -0.1}', "min_margin", "between 0 and 1"),
    (
        "{" + PIN + ', "slot": 1, "valid_from": "2024-12-01T00:00:00Z", '
        '"valid_until": "2024-11-01T00:00:00Z"}',
        "valid_until",
        "must be after valid_from",
    ),
    ("{" + PIN + ', "slot": 1, "valid_from": "2024-12-01T00:00:00"}', "valid_from", "UTC offset"),
    ("{" + PIN + ', "slot": 1, "valid_from": 1700000000}', "valid_from", "ISO 8601"),
    ('{"kind": "block", "brand": "x", "item_id": "a"}', "brand", "two targets"),
    ('{"kind": "block", "category": "electronics > "}', "category", "empty level"),
    ('{"kind": "block", "brand": " "}', "brand", "brand is empty"),
    ('{"kind": "block", "brand": "x", "out_of_stock": false}', "out_of_stock", "unknown field"),
    ("{" + PIN + ', "slot": 1, "slot": 2}', "slot", "duplicate key"),
    ('{"kind": "boost", "brand": "x", "factor": NaN}', "factor", "NaN is not valid JSON"),
]


@pytest.mark.parametrize(("rule", "field", "why"), BAD_RULES, ids=[b[2] for b in BAD_RULES])
def test_invalid_rule_names_line_field_and_why(rule, field, why):
    good = '{"kind": "block", "brand": "noname"}'
    with pytest.raises(RuleSetError) as err:
        load_rule_set(text_with(good, good, rule))  # the bad rule is rules[2], on line 7
    assert isinstance(err.value, RailtowerError)
    assert f"line 7, rules[2].{field}: " in str(err.value)
    assert why in str(err.value)


def test_rule_without_a_target_points_at_the_rule():
    with pytest.raises(RuleSetError, match=r"line 5, rules\[0\]: needs a target"):
        load_rule_set(text_with('{"kind": "bury", "factor": 0.5}'))


@pytest.mark.parametrize(
    ("second_pin", "field", "why"),
    [
        ('{"kind": "pin", "item_id": "b", "slot": 1}', "slot", "slot 1 is already pinned"),
        ('{"kind": "pin", "item_id": "a", "slot": 2}', "item_id", "item 'a' is already pinned"),
    ],
)
def test_two_pins_on_one_slot_or_item_are_refused(second_pin, field, why):
    with pytest.raises(RuleSetError) as err:
        load_rule_set(text_with('{"kind": "pin", "item_id": "a", "slot": 1}', second_pin))
    assert f"line 6, rules[1].{field}: {why}" in str(err.value)


def test_pins_on_one_slot_in_separate_windows_are_allowed():
    black_friday = {"valid_from": "2024-11-29T00:00:00Z", "valid_until": "2024-11-30T00:00:00Z"}
    cyber_monday = {"valid_from": "2024-11-30T00:00:00Z", "valid_until": "2024-12-03T00:00:00Z"}
    rule_set = rules_of(
        {"kind": "pin", "item_id": "mouse", "slot": 1, **black_friday},
        {"kind": "pin", "item_id": "drill", "slot": 1, **cyber_monday},
    )
    assert apply(rule_set, 3)[0] == "mouse"
    assert apply(rule_set, 3, now=datetime(2024, 12, 1, tzinfo=UTC))[0] == "drill"


def test_pin_conflict_is_refused_when_built_in_python_too():
    with pytest.raises(ValidationError, match=r"rules\[1\].slot: slot 3 is already pinned"):
        rules_of(
            {"kind": "pin", "item_id": "a", "slot": 3}, {"kind": "pin", "item_id": "b", "slot": 3}
        )


def test_every_problem_is_listed_in_line_order():
    with pytest.raises(RuleSetError) as err:
        load_rule_set(
            text_with(
                '{"kind": "margin_floor", "min_margin": 2}',
                '{"kind": "block", "brand": "ok"}',
                '{"kind": "pin", "item_id": "a", "slot": -1}',
            )
        )
    assert err.value.problems == [
        "line 5, rules[0].min_margin: min_margin is a share between 0 and 1 (0.15 = 15%), got 2.0",
        "line 7, rules[2].slot: slots count from 1 (the first slot is 1), got -1",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '{\n  "name": "x",\n  "version": "1"\n  "rules": []\n}',
            "line 4, column 3: not valid JSON",
        ),
        ("{\n", "line 2, column 1: not valid JSON"),
        ('[{"kind": "pin"}]', "line 1, rule set: a rule set is a JSON object"),
        ('{\n  "name": "x",\n  "version": 2\n}', "line 3, version: Input should be a valid string"),
        ('{\n  "name": "x"\n}', "line 1, version: required field is missing"),
        ('{\n "name": "x",\n "version": "1",\n "rails": ["hero"]\n}', "line 4, rails[0]: Input"),
        ('{\n "name": "x",\n "version": "1",\n "rails": []\n}', "line 4, rails: rails is empty"),
        ('{\n "name": "x",\n "version": "1",\n "owner": "me"\n}', "line 4, owner: unknown field"),
    ],
)
def test_malformed_json_and_bad_top_level_fields_name_the_line(text, expected):
    with pytest.raises(RuleSetError) as err:
        load_rule_set(text)
    assert expected in str(err.value)


def test_file_with_a_byte_order_mark_loads(tmp_path: Path):
    path = tmp_path / "bom.json"
    path.write_text(text_with('{"kind": "block", "brand": "x"}'), encoding="utf-8-sig")
    assert load_rule_set(path).rules[0].brand == "x"


def test_missing_file_and_non_utf8_file_are_rule_set_errors(tmp_path: Path):
    with pytest.raises(RuleSetError, match="file not found"):
        load_rule_set(tmp_path / "absent.json")
    latin = tmp_path / "latin.json"
    latin.write_bytes('{"name": "caf\u00e9"}'.encode("latin-1"))
    with pytest.raises(RuleSetError, match="not UTF-8 text"):
        load_rule_set(latin)


# ------------------------------------------------------------------------------ effects


@pytest.mark.parametrize(
    ("path", "category", "expected"),
    [
        ("electronics > audio", "electronics", True),
        ("electronics", "electronics", True),
        ("electronics > audio > headphone", "electronics > audio", True),
        ("electronicsx > gadget", "electronics", False),
        ("electronics > audiophile", "electronics > audio", False),
        ("electronics", "electronics > audio", False),
        (None, "electronics", False),
    ],
)
def test_category_prefix_matches_whole_levels(path, category, expected):
    assert category_matches(path, category) is expected


def test_out_of_stock_is_dropped_without_any_rule():
    assert apply(rules_of()) == IN_STOCK_ORDER


def without(*items: str) -> list[str]:
    return [i for i in IN_STOCK_ORDER if i not in items]


def test_block_by_brand_category_and_item():
    assert apply(rules_of({"kind": "block", "brand": "samsung"})) == without("s-phone", "s-buds")
    assert apply(rules_of({"kind": "block", "item_id": "mouse"})) == without("mouse")


def test_category_block_is_level_aware():
    # "electronics" takes its whole subtree but not the "electronicsx" sibling.
    electronics = rules_of({"kind": "block", "category": "electronics"})
    assert apply(electronics) == ["mouse", "drill", "elx"]
    audio = rules_of({"kind": "block", "category": "electronics>audio"})  # spaces optional
    assert apply(audio) == without("s-buds", "x-buds")


def test_margin_floor_drops_known_low_margins_and_keeps_unknown():
    kept = apply(rules_of({"kind": "margin_floor", "min_margin": 0.1}))
    assert "a-phone" not in kept  # margin 0.02
    assert "s-buds" in kept  # margin unknown


def test_boost_multiplies_score_and_reorders():
    out = apply_rules(
        CANDIDATES,
        rules_of({"kind": "boost", "brand": "xiaomi", "factor": 2}),
        ATTRS,
        "homepage_hero",
        3,
        NOW,
    )
    assert out == [Candidate("x-buds", 1.2), Candidate("s-phone", 0.9), Candidate("a-phone", 0.8)]


def test_boosts_and_buries_multiply_together():
    rule_set = rules_of(
        {"kind": "boost", "category": "computers", "factor": 2},
        {"kind": "boost", "item_id": "mouse", "factor": 1.5},
        {"kind": "bury", "category": "electronics > smartphone", "factor": 0.5},
    )
    out = apply_rules(CANDIDATES, rule_set, ATTRS, "homepage_hero", 3, NOW)
    assert out == [Candidate("mouse", 1.5), Candidate("s-buds", 0.7), Candidate("x-buds", 0.6)]


def test_boost_moves_a_negative_score_up_too():
    negative = [Candidate("mouse", -1.0), Candidate("drill", -2.0)]
    rule_set = rules_of({"kind": "boost", "item_id": "drill", "factor": 4})
    out = apply_rules(negative, rule_set, ATTRS, "homepage_hero", 2, NOW)
    assert out == [Candidate("drill", -0.5), Candidate("mouse", -1.0)]


def test_pin_moves_a_candidate_without_duplicating_it():
    pinned = apply(rules_of({"kind": "pin", "item_id": "drill", "slot": 1}), 4)
    assert pinned == ["drill", "s-phone", "a-phone", "s-buds"]


def test_pin_places_an_eligible_item_that_was_no_candidate():
    out = apply_rules(
        CANDIDATES,
        rules_of({"kind": "pin", "item_id": "kettle", "slot": 2}),
        ATTRS,
        "homepage_hero",
        3,
        NOW,
    )
    assert out == [Candidate("s-phone", 0.9), Candidate("kettle", 0.0), Candidate("a-phone", 0.8)]


@pytest.mark.parametrize(
    ("pin", "extra_rule", "why"),
    [
        ({"item_id": "s-old", "slot": 1}, None, "excluded"),  # out of stock
        ({"item_id": "mouse", "slot": 1}, {"kind": "block", "brand": "logitech"}, "excluded"),
        ({"item_id": "a-phone", "slot": 1}, {"kind": "margin_floor", "min_margin": 0.1}, "exc"),
        ({"item_id": "ghost", "slot": 1}, None, "not in the catalogue"),
        ({"item_id": "mouse", "slot": 11}, None, "beyond this rail's 10 slots"),
    ],
)
def test_pin_is_not_placed_when_the_item_may_not_be_shown(pin, extra_rule, why):
    rule_set = rules_of({"kind": "pin", **pin}, *([extra_rule] if extra_rule else []))
    outcome = explain_rules(CANDIDATES, rule_set, ATTRS, "homepage_hero", 10, NOW)
    shown = [c.item_id for c in outcome.candidates]
    assert shown[0] != pin["item_id"]
    skipped = [e for e in outcome.effects[pin["item_id"]] if e.kind == "pin_skipped"]
    assert len(skipped) == 1 and why in skipped[0].detail


def test_pin_beyond_the_remaining_items_closes_the_list():
    rule_set = rules_of({"kind": "pin", "item_id": "kettle", "slot": 9})
    outcome = explain_rules(CANDIDATES, rule_set, ATTRS, "homepage_hero", 12, NOW)
    assert [c.item_id for c in outcome.candidates] == [*IN_STOCK_ORDER, "kettle"]
    assert outcome.effects["kettle"][0].detail.startswith("pinned at slot 9, shown at 8")


@pytest.mark.parametrize(
    ("now", "pinned"),
    [
        (NOW - 2 * HOUR, False),  # before valid_from
        (NOW - HOUR, True),  # at valid_from (inclusive)
        (NOW, True),
        (NOW + HOUR, False),  # at valid_until (exclusive)
        (NOW + 2 * HOUR, False),
    ],
)
def test_pin_acts_only_inside_its_validity_window(now, pinned):
    rule_set = rules_of(
        {
            "kind": "pin",
            "item_id": "drill",
            "slot": 1,
            "valid_from": (NOW - HOUR).isoformat(),
            "valid_until": (NOW + HOUR).isoformat(),
        }
    )
    assert (apply(rule_set, 3, now=now)[0] == "drill") is pinned


def test_expired_block_and_boost_do_nothing():
    expired = {"valid_until": (NOW - HOUR).isoformat()}
    rule_set = rules_of(
        {"kind": "block", "brand": "samsung", **expired},
        {"kind": "boost", "item_id": "elx", "factor": 100, **expired},
    )
    assert apply(rule_set) == IN_STOCK_ORDER


def test_rules_apply_only_on_their_rails_but_stock_everywhere():
    rule_set = rules_of({"kind": "block", "brand": "samsung"}, rails=["pdp_fbt"])
    assert apply(rule_set, rail="homepage_hero") == IN_STOCK_ORDER
    assert "s-phone" not in apply(rule_set, rail="pdp_fbt")


def test_effects_say_which_rule_touched_which_item():
    rule_set = rules_of(
        {"kind": "boost", "brand": "samsung", "factor": 1.5},
        {"kind": "block", "item_id": "drill"},
        {"kind": "pin", "item_id": "mouse", "slot": 1},
    )
    effects = explain_rules(CANDIDATES, rule_set, ATTRS, "homepage_hero", 5, NOW).effects
    assert [(e.rule_index, e.kind) for e in effects["s-phone"]] == [(0, "boost")]
    assert effects["s-phone"][0].detail == "score x1.5 (brand 'samsung')"
    assert [(e.rule_index, e.kind) for e in effects["drill"]] == [(1, "block")]
    assert [(e.rule_index, e.kind) for e in effects["s-old"]] == [(None, "out_of_stock")]
    assert [(e.rule_index, e.kind) for e in effects["mouse"]] == [(2, "pin")]
    assert "a-phone" not in effects  # untouched items have no entry


def test_repeated_candidates_are_shown_once():
    doubled = [*CANDIDATES, Candidate("mouse", 99.0)]
    assert apply_rules(doubled, rules_of(), ATTRS, "homepage_hero", 10, NOW) == [
        c for c in CANDIDATES if c.item_id != "s-old"
    ]


def test_hand_built_conflicting_pins_place_the_first_only():
    # model_construct skips validation, as a buggy caller might; the result stays duplicate-free.
    rule_set = RuleSet.model_construct(
        name="raw",
        version="1",
        rails=RAILS,
        rules=(
            PinRule(kind="pin", item_id="drill", slot=1),
            PinRule(kind="pin", item_id="mouse", slot=1),
        ),
    )
    outcome = explain_rules(CANDIDATES, rule_set, ATTRS, "homepage_hero", 3, NOW)
    assert [c.item_id for c in outcome.candidates] == ["drill", "s-phone", "a-phone"]
    assert outcome.effects["mouse"][0].kind == "pin_skipped"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rail": "footer"}, "rail must be one of homepage_hero, pdp_fbt, cart_upsell"),
        ({"slots": -1}, "slots must be >= 0, got -1"),
        ({"now": datetime(2024, 1, 1)}, "now must be timezone-aware"),
        ({"candidates": [Candidate("mouse", float("inf"))]}, "'mouse' has score inf"),
    ],
)
def test_invalid_request_is_refused_with_the_argument_named(kwargs, message):
    args = {"candidates": CANDIDATES, "rail": "homepage_hero", "slots": 3, "now": NOW, **kwargs}
    with pytest.raises(ValueError) as err:
        apply_rules(rule_set=rules_of(), attributes=ATTRS, **args)
    assert message in str(err.value)


# ------------------------------------------------------------------------------ dry run


def test_dry_run_reports_items_a_brand_block_removes():
    current = rules_of()
    proposed = RuleSet(
        name="no-samsung", version="2", rules=[{"kind": "block", "brand": "samsung"}]
    )
    requests = [("homepage_hero", CANDIDATES), ("pdp_fbt", CANDIDATES[4:])]
    report = dry_run(current, proposed, requests, ATTRS, 4, NOW)
    first, second = report.requests
    assert first.removed == ("s-phone", "s-buds")
    assert first.added == ("mouse", "drill")
    assert first.moved == (("a-phone", 2, 1), ("x-buds", 4, 2))
    assert first.newly_blocked == ("s-phone", "s-buds")  # s-old was out of stock already
    assert not second.changed  # no Samsung among its candidates
    assert report.changed_share == 0.5
    assert report.newly_blocked == ("s-buds", "s-phone")
    markdown = report.to_markdown()
    assert "`test@1` → `no-samsung@2`" in markdown
    assert "- removed: s-phone, s-buds" in markdown
    assert "| requests changed | 1 (50.0%) |" in markdown


def test_dry_run_counts_pins_placed_and_truncates_detail():
    proposed = rules_of({"kind": "pin", "item_id": "kettle", "slot": 1})
    report = dry_run(rules_of(), proposed, [("cart_upsell", CANDIDATES)] * 3, ATTRS, 3, NOW)
    assert report.pins_placed == 3 and report.changed_share == 1.0
    assert "… and 2 more changed requests." in report.to_markdown(max_requests=1)


def test_dry_run_of_identical_rule_sets_changes_nothing():
    report = dry_run(rules_of(), rules_of(), [("pdp_fbt", CANDIDATES)], ATTRS, 5, NOW)
    assert report.changed_share == 0.0 and report.newly_blocked == () and report.pins_placed == 0


# ------------------------------------------------------------------------------ properties

ITEM_IDS = [row[0] for row in SHOP]
CATEGORIES = ["electronics", "electronics > smartphone", "electronics > audio", "computers"]
BRANDS = ["samsung", "apple", "xiaomi", "bosch"]


@st.composite
def windows(draw) -> dict[str, str]:
    """No window, an open-ended one, or a closed one around NOW (active or not)."""
    start = draw(st.none() | st.integers(-3, 3))
    length = draw(st.none() | st.integers(1, 4))
    window = {}
    if start is not None:
        window["valid_from"] = (NOW + start * HOUR).isoformat()
    if length is not None:
        window["valid_until"] = (NOW + ((start or 0) + length) * HOUR).isoformat()
    return window


targets = st.one_of(
    st.builds(lambda i: {"item_id": i}, st.sampled_from([*ITEM_IDS, "ghost"])),
    st.builds(lambda c: {"category": c}, st.sampled_from(CATEGORIES)),
    st.builds(lambda b: {"brand": b}, st.sampled_from(BRANDS)),
)
other_rules = st.one_of(
    st.builds(lambda t, w: {"kind": "block", **t, **w}, targets, windows()),
    st.builds(
        lambda t, f, w: {"kind": "boost", **t, "factor": f, **w},
        targets,
        st.floats(1.01, 5),
        windows(),
    ),
    st.builds(
        lambda t, f, w: {"kind": "bury", **t, "factor": f, **w},
        targets,
        st.floats(0.05, 0.99),
        windows(),
    ),
    st.builds(
        lambda m, w: {"kind": "margin_floor", "min_margin": m, **w},
        st.sampled_from([0.0, 0.1, 0.25, 1.0]),
        windows(),
    ),
)


@st.composite
def rule_sets(draw) -> RuleSet:
    # Distinct slots and items, so pins never collide whatever their windows.
    pinned = draw(st.lists(st.sampled_from([*ITEM_IDS, "ghost"]), unique=True, max_size=4))
    slots = draw(st.lists(st.integers(1, 14), unique=True, min_size=len(pinned)))
    pins = [
        {"kind": "pin", "item_id": i, "slot": s, **draw(windows())}
        for i, s in zip(pinned, slots, strict=False)
    ]
    rails = draw(st.lists(st.sampled_from(RAILS), unique=True, min_size=1))
    rules = draw(st.permutations([*pins, *draw(st.lists(other_rules, max_size=6))]))
    return RuleSet(name="random", version="1", rails=rails, rules=rules)


@st.composite
def shops(draw) -> ItemAttributes:
    items = ITEMS.assign(
        stock=draw(st.lists(st.sampled_from([None, 0, 1, 5]), min_size=9, max_size=9)),
        margin=draw(st.lists(st.sampled_from([None, 0.05, 0.2, 0.5]), min_size=9, max_size=9)),
    )
    return ItemAttributes.from_frame(items.astype({"stock": "Int64"}))


candidate_lists = st.lists(
    st.builds(
        Candidate, st.sampled_from([*ITEM_IDS, "unlisted"]), st.floats(-3, 3, allow_nan=False)
    ),
    max_size=14,
)


def _active(rule) -> bool:
    start, end = rule.valid_from, rule.valid_until
    return not ((start and NOW < start) or (end and NOW >= end))


def _may_show(item: str, rule_set: RuleSet, attrs: ItemAttributes, rail: str) -> bool:
    """An independent reading of the exclusion rules (no code shared with ranking.rules)."""
    info = attrs.get(item)
    if info is not None and info.stock == 0:
        return False
    if rail not in rule_set.rails:
        return True
    for rule in rule_set.rules:
        if not _active(rule):
            continue
        if rule.kind == "margin_floor" and info and info.margin is not None:
            if info.margin < rule.min_margin:
                return False
        if rule.kind == "block":
            path = (info.category_path if info else None) or ""
            levels = {
                CATEGORY_SEPARATOR.join(path.split(CATEGORY_SEPARATOR)[:n]) for n in (1, 2, 3)
            }
            if (
                rule.item_id == item
                or (rule.category is not None and rule.category in levels)
                or (rule.brand is not None and info is not None and info.brand == rule.brand)
            ):
                return False
    return True


@settings(max_examples=200, deadline=None)
@given(candidate_lists, rule_sets(), shops(), st.sampled_from(RAILS), st.integers(0, 12))
def test_slots_are_eligible_unique_full_and_deterministic(candidates, rule_set, attrs, rail, n):
    out = apply_rules(candidates, rule_set, attrs, rail, n, NOW)
    shown = [c.item_id for c in out]
    applies = rail in rule_set.rails
    pins = [
        r
        for r in rule_set.rules
        if isinstance(r, PinRule) and applies and _active(r) and r.slot <= n
    ]
    candidate_ids = {c.item_id for c in candidates}
    placeable = {
        p.item_id
        for p in pins
        if (p.item_id in attrs or p.item_id in candidate_ids)
        and _may_show(p.item_id, rule_set, attrs, rail)
    }
    eligible = {i for i in candidate_ids if _may_show(i, rule_set, attrs, rail)}

    assert len(shown) == len(set(shown))
    assert all(_may_show(i, rule_set, attrs, rail) for i in shown)
    assert len(shown) == min(n, len(eligible | placeable))
    assert apply_rules(candidates, rule_set, attrs, rail, n, NOW) == out
    # Unpinned items keep the (boosted) score order; pins sit at their slot when items suffice.
    unpinned = [c.score for c in out if c.item_id not in placeable]
    assert unpinned == sorted(unpinned, reverse=True)
    if len(eligible - placeable) >= n:
        assert all(shown[p.slot - 1] == p.item_id for p in pins if p.item_id in placeable)


def test_a_boost_lifts_an_item_from_below_the_judged_head():
    # best first; the samsung buds sit last, far below the two slots, until a x10 boost
    ranked = [
        Candidate("mouse", 0.9),
        Candidate("drill", 0.8),
        Candidate("elx", 0.7),
        Candidate("x-buds", 0.6),
        Candidate("s-buds", 0.1),
    ]
    boost = rules_of({"kind": "boost", "brand": "samsung", "factor": 10.0})
    shown = explain_rules(ranked, boost, ATTRS, "homepage_hero", 2, NOW).candidates
    assert [c.item_id for c in shown] == ["s-buds", "mouse"]


@settings(max_examples=300, deadline=None)
@given(candidate_lists, rule_sets(), shops(), st.sampled_from(RAILS), st.integers(0, 12))
def test_judging_only_the_head_of_a_best_first_list_changes_nothing(
    candidates, rule_set, attrs, rail, n
):
    """A best-first list is judged only as far as an item could still reach the slots; the
    unpinned items shown must be those of judging the whole list (asking for more slots than
    there are candidates and pin slots judges it all). Pins depend on the slot count (a pin
    beyond it is skipped), so they are compared apart: the same pins, at the same slots."""
    ordered = sorted(candidates, key=lambda c: -c.score)
    every = max(len(ordered), 14) + len(rule_set.rules) + 1
    whole = explain_rules(ordered, rule_set, attrs, rail, every, NOW).candidates
    head = explain_rules(ordered, rule_set, attrs, rail, n, NOW).candidates
    pinned = {r.item_id for r in rule_set.rules if isinstance(r, PinRule)}
    unpinned = [c for c in head if c.item_id not in pinned]
    whole_unpinned = [c for c in whole if c.item_id not in pinned]
    assert len(unpinned) == min(n - (len(head) - len(unpinned)), len(whole_unpinned))
    assert unpinned == whole_unpinned[: len(unpinned)]
    shown_whole = {c.item_id: c for c in whole}
    assert all(c == shown_whole.get(c.item_id, c) for c in head if c.item_id in pinned)


@settings(max_examples=50, deadline=None)
@given(rule_sets())
def test_random_rule_sets_survive_a_json_round_trip(rule_set):
    text = json.dumps(rule_set.model_dump(mode="json", exclude_none=True), indent=2)
    assert load_rule_set(text) == rule_set


def test_rule_classes_are_exported_for_python_callers():
    assert {BlockRule, BoostRule, BuryRule, MarginFloorRule, PinRule}
