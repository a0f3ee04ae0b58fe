"""Items listed and retired after training: the delta index beside the main one, the
attributes of a new item, and the rules' treatment of a retired one."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest

from ranking.ann import DeltaIndex, ExactIndex, HnswIndex
from ranking.candidates import Candidate
from ranking.item_attributes import ItemAttributes
from ranking.rules import RuleSet, apply_rules, explain_rules, ineligible

DIM = 8
NOW = datetime(2024, 11, 29, 12, tzinfo=UTC)


def _normalised(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(params=["exact", "hnsw"])
def main(request) -> ExactIndex | HnswIndex:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(3)
    vectors = _normalised(rng.standard_normal((60, DIM)))
    index: ExactIndex | HnswIndex = (
        ExactIndex() if request.param == "exact" else HnswIndex(8, 64, 64, num_threads=1)
    )
    index.build(np.array([f"old-{i}" for i in range(60)]), vectors)
    return index


def _truth(ids: list[str], vectors: np.ndarray, query: np.ndarray, k: int) -> list[str]:
    return [ids[i] for i in np.argsort(-(vectors @ query), kind="stable")[:k]]


def test_search_merges_the_new_items_with_the_main_index_by_score(main):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(4)
    fresh = _normalised(rng.standard_normal((5, DIM)))
    index = DeltaIndex(main).with_items(np.array([f"new-{i}" for i in range(5)]), fresh)
    all_ids = [*main.ids.tolist(), *[f"new-{i}" for i in range(5)]]
    all_vectors = np.vstack([main.vectors, fresh])
    queries = _normalised(rng.standard_normal((20, DIM)))
    ids, scores = index.search(queries, 10)
    for q, row, row_scores in zip(queries, ids, scores, strict=True):
        assert row == _truth(all_ids, all_vectors, q, 10)
        assert np.all(np.diff(row_scores) <= 1e-7) and len(row) == 10
    # a new item's own vector finds it first
    assert index.search(fresh[2:3], 1)[0] == [["new-2"]]
    assert len(index) == 65 and "new-2" in index and "old-0" in index
    np.testing.assert_allclose(index.vector("new-2"), fresh[2])
    assert index.ids.tolist() == all_ids
    np.testing.assert_allclose(index.vectors, all_vectors, atol=1e-6)


def test_search_honours_excludes_in_both_indexes(main):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(5)
    fresh = _normalised(rng.standard_normal((3, DIM)))
    index = DeltaIndex(main).with_items(np.array(["new-0", "new-1", "new-2"]), fresh)
    query = fresh[0:1]
    best = index.search(query, 4)[0][0]
    assert best[0] == "new-0"
    exclude = {"new-0", best[1], "unknown-id"}
    ids, _ = index.search(query, 4, [exclude])
    assert len(ids[0]) == 4 and not exclude & set(ids[0])
    assert ids[0][:2] == best[2:4]
    everything = set(index.ids.tolist())
    ids, _ = index.search(query, 100, [everything - {"new-1", "old-3"}])
    assert sorted(ids[0]) == ["new-1", "old-3"]


def test_with_items_is_copy_on_write_and_replaces_a_re_encoded_item(main):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(6)
    first = DeltaIndex(main).with_items(
        np.array(["new-0"]), _normalised(rng.standard_normal((1, DIM)))
    )
    moved = _normalised(rng.standard_normal((1, DIM)))
    second = first.with_items(np.array(["new-0"]), moved)
    third = second.with_items(np.array(["new-1"]), -moved)
    assert len(first) == len(second) == 61 and len(third) == 62
    assert not np.allclose(first.vector("new-0"), moved[0])  # untouched by the later copies
    np.testing.assert_allclose(third.vector("new-0"), moved[0])
    assert third.search(moved, 1)[0] == [["new-0"]]
    assert DeltaIndex(main).search(moved, 3)[0] == main.search(moved, 3)[0]  # empty delta


def test_searches_during_swaps_always_see_a_whole_index(main):  # type: ignore[no-untyped-def]
    """Writers build a new DeltaIndex and assign it; readers search whatever they read."""
    holder = {"index": DeltaIndex(main)}
    rng = np.random.default_rng(7)
    errors: list[BaseException] = []

    def read() -> None:
        try:
            for _ in range(200):
                ids, _ = holder["index"].search(_normalised(rng.standard_normal((2, DIM))), 5)
                assert all(len(r) == 5 for r in ids)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(50):
        vector = _normalised(np.random.default_rng(i).standard_normal((1, DIM)))
        holder["index"] = holder["index"].with_items(np.array([f"new-{i}"]), vector)
    reader.join()
    assert not errors and len(holder["index"]) == 110


SHOP = pd.DataFrame(
    {
        "item_id": ["phone", "case", "buds"],
        "category_path": ["electronics > smartphone", "electronics > accessories", "audio"],
        "brand": ["samsung", "spigen", "sony"],
        "price": [300.0, 10.0, 50.0],
        "stock": [5, 5, 5],
        "margin": [0.2, 0.5, 0.3],
    }
)


def test_a_new_item_gets_attributes_banded_with_the_fitted_edges():
    attrs = ItemAttributes.from_frame(SHOP, price_bands=2)
    attrs.add(
        "new", category_path="electronics > smartphone", brand="samsung", price=290.0, stock=3
    )
    info = attrs["new"]
    assert (info.top_category, info.brand, info.stock, info.retired) == (
        "electronics",
        "samsung",
        3,
        False,
    )
    assert info.price_band == attrs["phone"].price_band  # same edges, same band
    with pytest.raises(ValueError, match="margin"):
        attrs.add("bad", category_path="audio", brand=None, margin=1.5)
    assert "bad" not in attrs
    with pytest.raises(ValueError, match="ItemAttributes.add"):
        attrs.update("unknown", stock=1)


def test_retired_items_leave_every_rail_and_stock_does_not_bring_them_back():
    attrs = ItemAttributes.from_frame(SHOP)
    rules = RuleSet(name="none", version="1", rules=())
    pool = [Candidate("phone", 0.9), Candidate("case", 0.8), Candidate("buds", 0.7)]
    attrs.update("phone", retired=True)
    attrs.update("phone", stock=50, price=250.0)  # a later stock change
    assert attrs["phone"].retired and not attrs["phone"].out_of_stock
    shown = [c.item_id for c in apply_rules(pool, rules, attrs, "homepage_hero", 3, NOW)]
    assert shown == ["case", "buds"]
    assert ineligible(["phone", "case"], rules, attrs, "homepage_hero", NOW) == {"phone"}
    effects = explain_rules(pool, rules, attrs, "homepage_hero", 3, NOW).effects["phone"]
    assert [e.kind for e in effects] == ["retired"]
    attrs.update("phone", retired=False)  # an upsert re-lists it
    shown = [c.item_id for c in apply_rules(pool, rules, attrs, "homepage_hero", 3, NOW)]
    assert shown == ["phone", "case", "buds"]
