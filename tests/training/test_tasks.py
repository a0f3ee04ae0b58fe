"""Each rail's evaluation cases on toy sessions whose right answers are written out."""

from __future__ import annotations

from railtower.settings import DatasetSpec, EvaluationSettings, EventsMapping
from tests.conftest import toy_events
from training.tasks import build_cases

MAPPING = EventsMapping(path="x", columns={"event_time": "t"})
SEQ = DatasetSpec(
    name="toy",
    events=MAPPING,
    rails=["homepage_hero", "pdp_fbt", "cart_upsell"],
    fallback_to_views=True,
)
BASKET = SEQ.model_copy(update={"session_kind": "basket", "strong_event_types": ["purchase"]})
EVAL = EvaluationSettings(max_sessions_per_task=100, pdp_anchors_per_session=10)


def test_hero_targets_next_unseen_item_and_excludes_the_prefix():
    events = toy_events({"s": [("a", "view"), ("b", "view"), ("a", "view"), ("c", "cart")]})
    cases = build_cases("homepage_hero", events, SEQ, EVAL, seed=0)
    # 'a' again at step 3 is not a hero target: the shopper has already seen it
    assert [(c.query.session_items, set(c.targets)) for c in cases] == [
        (("a",), {"b"}),
        (("a", "b", "a"), {"c"}),
    ]
    assert cases[1].query.exclude == {"a", "b"}
    assert cases[1].length == 2


def test_pdp_targets_later_strong_events_then_falls_back_to_views():
    events = toy_events(
        {
            "s1": [("tv", "view"), ("hdmi", "view"), ("hdmi", "cart"), ("mount", "purchase")],
            "s2": [("phone", "view"), ("case", "view")],
        }
    )
    cases = {
        (c.session_id, c.query.anchor): c for c in build_cases("pdp_fbt", events, SEQ, EVAL, seed=0)
    }
    assert set(cases[("s1", "tv")].targets) == {"hdmi", "mount"}
    assert set(cases[("s1", "hdmi")].targets) == {"mount"}
    assert ("s1", "mount") not in cases  # nothing follows the last item
    assert set(cases[("s2", "phone")].targets) == {"case"}  # fallback: later views
    strict = SEQ.model_copy(update={"fallback_to_views": False})
    assert not [
        c for c in build_cases("pdp_fbt", events, strict, EVAL, seed=0) if c.session_id == "s2"
    ]


def test_cart_upsell_never_targets_cart_items_and_follows_removals():
    events = toy_events(
        {
            "s": [
                ("tv", "cart"),
                ("mount", "cart"),
                ("mount", "remove_from_cart"),
                ("hdmi", "cart"),
                ("tv", "purchase"),
                ("soundbar", "purchase"),
            ]
        }
    )
    cases = build_cases("cart_upsell", events, SEQ, EVAL, seed=0)
    assert [(c.query.cart, set(c.targets)) for c in cases] == [
        (("tv",), {"mount", "hdmi", "soundbar"}),
        (("tv", "mount"), {"hdmi", "soundbar"}),
        (("tv", "hdmi"), {"soundbar"}),
    ]
    for case in cases:
        assert not set(case.targets) & set(case.query.cart)
        assert case.query.exclude == set(case.query.cart)


def test_basket_cases_split_the_basket_without_overlap():
    events = toy_events({"b1": [(i, "purchase") for i in "abcdef"], "b2": [("z", "purchase")]})
    for seed in range(5):
        (case,) = build_cases("cart_upsell", events, BASKET, EVAL, seed=seed)
        assert set(case.query.cart) | set(case.targets) == set("abcdef")
        assert not set(case.query.cart) & set(case.targets)
    pdp = build_cases("pdp_fbt", events, BASKET, EVAL, seed=0)
    assert {c.query.anchor for c in pdp} == set("abcdef")  # single-item basket b2 gives none
    assert all(set(c.targets) == set("abcdef") - {c.query.anchor} for c in pdp)


def test_amazon_style_published_target_is_the_only_case():
    events = toy_events({"s": [("a", "view"), ("b", "view"), ("c", "view")]})
    events["is_target"] = [False, False, True]
    spec = SEQ.model_copy(update={"events": MAPPING.model_copy(update={"target_column": "t"})})
    (case,) = build_cases("homepage_hero", events, spec, EVAL, seed=0)
    assert case.query.session_items == ("a", "b") and set(case.targets) == {"c"}


def test_session_sampling_is_seeded_and_bounded():
    events = toy_events({f"s{i:03d}": [("a", "view"), (f"x{i}", "view")] for i in range(50)})
    small = EVAL.model_copy(update={"max_sessions_per_task": 10})
    first = build_cases("homepage_hero", events, SEQ, small, seed=4)
    again = build_cases("homepage_hero", events, SEQ, small, seed=4)
    assert len({c.session_id for c in first}) == 10
    assert [c.session_id for c in first] == [c.session_id for c in again]
