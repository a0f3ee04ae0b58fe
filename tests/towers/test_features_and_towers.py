"""Item and session features, the towers, and train/serve parity of session features."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from railtower.settings import TowerSettings
from tests.conftest import toy_events
from towers.item_features import (
    ItemFeaturizer,
    PriceBands,
    item_feature_specs,
    item_text,
    spec_hash,
    stable_bucket,
)
from towers.item_tower import ItemTower, ItemTowerConfig
from towers.session_features import (
    AGE_BUCKETS,
    HOURS,
    SESSION_INPUT_NAMES,
    SESSION_INPUTS,
    HistoryEvent,
    history_of,
    session_features,
)
from towers.user_tower import SessionEncoder, UserTower, UserTowerConfig
from training.examples import session_examples

TOWERS = TowerSettings(
    dim=32,
    id_buckets=4096,
    category_buckets=256,
    brand_buckets=256,
    max_history=5,
    layers=1,
    heads=2,
)
ITEMS = pd.DataFrame(
    {
        "item_id": ["tv1", "tv2", "hdmi", "case", "new"],
        "title": ["55in tv", "65in tv", "hdmi cable", None, "brand new tv"],
        "category_path": [
            "electronics > tv",
            "electronics > tv",
            "electronics > cable",
            "accessories > case",
            "electronics > tv",
        ],
        "brand": ["samsung", "lg", None, "otterbox", "samsung"],
        "price": [400.0, 900.0, 10.0, 20.0, np.nan],
    }
)


def test_item_text_joins_what_each_item_has():
    assert item_text(ITEMS)[:4] == [
        "55in tv. electronics > tv. samsung",
        "65in tv. electronics > tv. lg",
        "hdmi cable. electronics > cable",
        "accessories > case. otterbox",
    ]


def test_stable_bucket_is_deterministic_and_reserves_zero_for_missing():
    a = stable_bucket(["x", None, "y", float("nan")], 100, "salt")
    assert a.tolist() == stable_bucket(["x", None, "y", float("nan")], 100, "salt").tolist()
    assert a[1] == 0 and a[3] == 0 and 1 <= a[0] < 100
    salted = [
        stable_bucket([f"v{i}"], 1000, "one")[0] == stable_bucket([f"v{i}"], 1000, "two")[0]
        for i in range(50)
    ]
    assert sum(salted) < 5  # another salt (feature) hashes independently


def test_price_bands_are_per_top_level_category():
    items = pd.DataFrame(
        {
            "category_path": ["a > x"] * 4 + ["b > y"] * 4,
            "price": [1.0, 2.0, 3.0, 4.0, 100.0, 200.0, 300.0, 400.0],
        }
    )
    bands = PriceBands.fit(items, bands=2)
    # the cheapest item of each category is in the low band, whatever its absolute price
    assert bands.assign(items).tolist() == [1, 1, 2, 2, 1, 1, 2, 2]
    no_price = pd.DataFrame({"category_path": ["a > x"], "price": [np.nan]})
    assert bands.assign(no_price).tolist() == [0]


def test_cold_items_get_no_id_but_keep_their_content():
    featurizer = ItemFeaturizer.fit(
        ITEMS, warm_items={"tv1", "tv2", "hdmi", "case"}, settings=TOWERS
    )
    feats = featurizer.transform(ITEMS, np.ones((5, 384), np.float32))
    assert feats.item_id[4] == 0 and (feats.item_id[:4] > 0).all()
    assert (feats.categories[4] == feats.categories[0]).all()  # same category path as tv1
    assert feats.brand[4] == feats.brand[0]
    restored = ItemFeaturizer.from_state(featurizer.state(), TOWERS)
    again = restored.transform(ITEMS, np.ones((5, 384), np.float32))
    for name in ("item_id", "categories", "brand", "price_band"):
        assert torch.equal(getattr(again, name), getattr(feats, name))


def test_spec_hash_follows_the_feature_definition():
    base = spec_hash(item_feature_specs(TOWERS))
    assert base == spec_hash(item_feature_specs(TOWERS))
    assert base != spec_hash(item_feature_specs(TOWERS.model_copy(update={"id_buckets": 8192})))


def test_item_tower_gives_unit_vectors_and_separates_content_for_cold_items():
    torch.manual_seed(0)
    featurizer = ItemFeaturizer.fit(ITEMS, warm_items=set(), settings=TOWERS)
    rng = np.random.default_rng(0)
    feats = featurizer.transform(ITEMS, rng.normal(size=(5, 384)).astype(np.float32))
    tower = ItemTower(ItemTowerConfig.from_settings(TOWERS)).eval()
    vectors = tower(*feats.as_tuple())
    assert vectors.shape == (5, 32)
    assert torch.allclose(vectors.norm(dim=1), torch.ones(5), atol=1e-5)
    assert not torch.allclose(vectors[0], vectors[2])  # all cold: content alone differs


def test_session_features_pad_left_keep_newest_last_and_skip_unknown_items():
    row = {"a": 0, "b": 1, "c": 2}
    history = [
        HistoryEvent("a", "view", 0.0),
        HistoryEvent("zzz", "view", 10.0),
        HistoryEvent("b", "cart", 3600.0),
        HistoryEvent("c", "purchase", 3630.0),
    ]
    f = session_features(history, row, max_history=5, has_time=True, context="FR")
    assert f.items.tolist() == [0, 0, 1, 2, 3]
    assert f.types.tolist()[:2] == [0, 0] and f.types[-1] != f.types[-2]
    assert f.ages[-1] == 1 and f.ages[-3] > f.ages[-2] > f.ages[-1]  # older = larger bucket
    assert f.hour == 1 and f.context > 0
    untimed = session_features(history, row, 5, has_time=False)
    assert untimed.hour == HOURS - 1 and set(untimed.ages[2:]) == {AGE_BUCKETS - 1}
    assert untimed.context == 0


def test_history_of_adds_the_page_and_the_cart():
    h = history_of(["a", "b"], ["view", "view"], [1.0, 2.0], anchor="p", cart=["b", "c"])
    assert [(e.item_id, e.event_type) for e in h] == [
        ("a", "view"),
        ("b", "view"),
        ("c", "cart"),
        ("p", "view"),
    ]
    assert h[-1].time_s == 2.0
    # the product already last in the session is not added twice
    assert len(history_of(["a"], ["view"], [1.0], anchor="a")) == 1


def test_training_and_serving_build_identical_session_tensors():
    """The example the tower trains on equals what serving computes for that history."""
    events = toy_events({"s": [("a", "view"), ("b", "cart"), ("a", "view"), ("c", "view")]})
    row = {"a": 0, "b": 1, "c": 2}
    examples = session_examples(events, row, max_history=5, has_time=True, basket=False, seed=0)
    assert examples.targets.tolist() == [1, 2]  # b after [a]; c after [a, b, a]
    times = (events["event_time"].astype("int64") / 1e9).tolist()
    for i, t in enumerate([1, 3]):
        serving = session_features(
            history_of(
                events["item_id"][:t].tolist(), events["event_type"][:t].tolist(), times[:t]
            ),
            row,
            5,
            True,
        )
        for name in ("items", "types", "ages"):
            assert examples.inputs[name][i].tolist() == getattr(serving, name).tolist(), name
        assert examples.inputs["hour"][i] == serving.hour
    # the one session-side spec names exactly the inputs training builds, in encoder order
    assert list(examples.inputs) == list(SESSION_INPUT_NAMES)
    per_event = {i.name for i in SESSION_INPUTS if i.per_event}
    assert {n for n, t in examples.inputs.items() if t.dim() == 2} == per_event


def test_user_tower_handles_an_empty_session_and_ignores_padding_content():
    torch.manual_seed(0)
    tower = UserTower(UserTowerConfig.from_settings(TOWERS)).eval()
    table = torch.nn.functional.normalize(torch.randn(4, 32), dim=1)
    encoder = SessionEncoder(tower, table).eval()
    empty = torch.zeros(1, 5, dtype=torch.long)
    vec = encoder(empty, empty, empty, torch.tensor([3]), torch.tensor([0]))
    assert torch.isfinite(vec).all() and vec.norm().item() == pytest.approx(1.0, abs=1e-5)
    items = torch.tensor([[0, 0, 0, 1, 2]])
    types = torch.tensor([[0, 0, 0, 1, 1]])
    ages = torch.tensor([[0, 0, 0, 2, 1]])
    a = encoder(items, types, ages, torch.tensor([3]), torch.tensor([0]))
    b = encoder(items, types, ages, torch.tensor([3]), torch.tensor([0]))
    assert torch.allclose(a, b)
    assert not torch.allclose(a, vec)


def test_catalogue_without_categories_brands_or_prices_still_featurises():
    """UCI-like items: a title and nothing else (nullable columns full of <NA>)."""
    items = pd.DataFrame(
        {
            "item_id": pd.array(["a", "b"], dtype="string"),
            "title": pd.array(["jumbo bag", "red lantern"], dtype="string"),
            "category_path": pd.array([pd.NA, pd.NA], dtype="string"),
            "brand": pd.array([pd.NA, pd.NA], dtype="string"),
            "price": pd.array([pd.NA, 1.5], dtype="Float64"),
        }
    )
    featurizer = ItemFeaturizer.fit(items, {"a"}, TOWERS)
    feats = featurizer.transform(items, np.ones((2, 384), np.float32))
    assert feats.categories.tolist() == [[0, 0, 0], [0, 0, 0]]
    assert feats.brand.tolist() == [0, 0]
    assert feats.price_band[0] == 0 and feats.price_band[1] > 0
    assert item_text(items) == ["jumbo bag", "red lantern"]


def test_basket_examples_present_the_newest_item_as_a_page_view_half_the_time():
    from towers.session_features import EVENT_TYPE_INDEX

    events = toy_events({f"b{i}": [(x, "purchase") for x in "abcdef"] for i in range(40)})
    row = {x: i for i, x in enumerate("abcdef")}
    examples = session_examples(events, row, max_history=5, has_time=True, basket=True, seed=0)
    newest = examples.inputs["types"][:, -1]
    views = (newest == EVENT_TYPE_INDEX["view"]).float().mean().item()
    assert 0.35 < views < 0.65
    assert set(newest.tolist()) == {EVENT_TYPE_INDEX["view"], EVENT_TYPE_INDEX["cart"]}
    # never a target that is already in the basket prefix
    for items, target in zip(examples.inputs["items"], examples.targets, strict=True):
        assert int(target) + 1 not in items.tolist()


def test_full_softmax_scores_every_item_and_never_the_sessions_own():
    """The full-softmax loss is cross-entropy over the whole catalogue with the session's
    own items masked (they are never a rail's answer), the target always kept."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from railtower.settings import TrainingSettings
    from training.two_tower import TwoTowerModule

    torch.manual_seed(0)
    table = F.normalize(torch.randn(6, 4), dim=1)
    users = F.normalize(torch.randn(2, 4), dim=1)
    targets = torch.tensor([3, 0])
    history = torch.tensor([[0, 2, 5], [0, 0, 2]])  # catalogue rows + 1, 0 = padding
    cfg = TrainingSettings(temperature=0.5)
    module = SimpleNamespace(
        training_cfg=cfg,
        device=torch.device("cpu"),
        item_vectors=lambda rows=None: table,
        user_vectors=lambda batch, t: users,
    )
    loss = TwoTowerModule.full_softmax(module, {"items": history}, targets)
    logits = users @ table.T / cfg.temperature
    logits[0, [1, 4]] = float("-inf")  # session 0 holds rows 1 and 4
    logits[1, 1] = float("-inf")
    assert torch.allclose(loss, F.cross_entropy(logits, targets))
    unmasked = F.cross_entropy(users @ table.T / cfg.temperature, targets)
    assert not torch.allclose(loss, unmasked)
