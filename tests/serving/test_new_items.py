"""serving.new_items.apply_record on one model, with a stand-in item tower: which records
list, update, retire and encode, and that re-applying a record encodes nothing again."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd

from ranking.ann import DeltaIndex, ExactIndex
from ranking.item_attributes import ItemAttributes
from serving.new_items import NewItems, apply_record

SHOP = pd.DataFrame(
    {
        "item_id": ["phone", "case"],
        "category_path": ["electronics > smartphone", "electronics > accessories"],
        "brand": ["samsung", "spigen"],
        "price": [300.0, 10.0],
        "stock": [5, 5],
    }
)


class CountingEncoder:
    """Stands in for the item tower: a vector from the title's hash, counting calls (the
    "features" are the rows themselves)."""

    def __init__(self) -> None:
        self.calls = 0

    def features(self, items: pd.DataFrame) -> pd.DataFrame:
        return items

    def run_tower(self, items: pd.DataFrame) -> np.ndarray:
        self.calls += 1
        seed = abs(hash((items["title"][0], items["price"][0]))) % 2**32
        vector = np.random.default_rng(seed).standard_normal((1, 4))
        return (vector / np.linalg.norm(vector)).astype(np.float32)


def _model(encoder: CountingEncoder | None) -> SimpleNamespace:
    main = ExactIndex()
    main.build(np.array(["phone", "case"]), np.eye(4, dtype=np.float32)[:2])
    return SimpleNamespace(
        version="v1",
        titles={},
        pipeline=SimpleNamespace(
            attributes=ItemAttributes.from_frame(SHOP),
            stats=SimpleNamespace(row={"phone": 0, "case": 1}, price=np.array([300.0, 10.0])),
        ),
        catalogue=SimpleNamespace(index={"phone": 0, "case": 1}, category_of={}),
        towers=SimpleNamespace(item_row={"phone": 0, "case": 1}, index=main),
        new_items=NewItems(encoder),  # type: ignore[arg-type]
    )


LISTING = {
    "title": "galaxy a55",
    "description": None,
    "category_path": "electronics > smartphone",
    "brand": "samsung",
    "price": 290.0,
    "stock": 3,
    "image_path": None,
    "margin": 0.2,
    "listed_at": None,
    "retired": False,
}


def test_a_listing_adds_and_indexes_a_new_item_once_per_content():
    encoder = CountingEncoder()
    model = _model(encoder)
    assert apply_record(model, "new", LISTING)  # type: ignore[arg-type]
    info = model.pipeline.attributes["new"]
    assert (info.stock, info.margin, info.top_category, info.retired) == (
        3,
        0.2,
        "electronics",
        False,
    )
    index = model.towers.index
    assert isinstance(index, DeltaIndex) and "new" in index and encoder.calls == 1
    assert model.titles["new"] == "galaxy a55"
    assert model.catalogue.category_of["new"] == "electronics > smartphone"  # its shelf
    # the whole hash again (every sync): nothing encoded, the same index object
    assert apply_record(model, "new", {**LISTING, "price": 290})  # type: ignore[arg-type]
    assert encoder.calls == 1 and model.towers.index is index
    # its content changed (the price band is a feature): encoded again, copy-on-write
    assert apply_record(model, "new", {**LISTING, "price": 9.0})  # type: ignore[arg-type]
    assert encoder.calls == 2 and model.towers.index is not index and len(model.towers.index) == 3
    assert model.pipeline.attributes["new"].price == 9.0
    # a price or stock message alone (the consumer's path) updates it, encodes nothing
    assert apply_record(model, "new", {"price": None, "stock": 0})  # type: ignore[arg-type]
    assert model.pipeline.attributes["new"].out_of_stock and encoder.calls == 2


def test_retire_and_relist_go_through_the_record():
    model = _model(CountingEncoder())
    assert apply_record(model, "phone", {"retired": True})  # type: ignore[arg-type]
    assert apply_record(model, "phone", {"price": 250.0, "stock": 9, "retired": True})  # type: ignore[arg-type]
    assert model.pipeline.attributes["phone"].retired
    assert model.pipeline.stats.price[0] == 250.0
    assert apply_record(model, "new", {**LISTING, "retired": True})  # type: ignore[arg-type]
    assert model.pipeline.attributes["new"].retired
    # a known item's upsert: price, stock, margin, re-listed; its trained vector stays
    assert apply_record(model, "phone", {**LISTING, "price": 280.0})  # type: ignore[arg-type]
    info = model.pipeline.attributes["phone"]
    assert (info.price, info.stock, info.margin, info.retired) == (280.0, 3, 0.2, False)
    assert "phone" not in model.new_items.encoded


def test_unknown_items_without_a_listing_and_models_without_an_encoder():
    model = _model(None)
    assert not apply_record(model, "ghost", {"price": 1.0, "stock": 2})  # type: ignore[arg-type]
    assert "ghost" not in model.pipeline.attributes
    assert apply_record(model, "new", LISTING)  # type: ignore[arg-type]
    assert "new" in model.pipeline.attributes  # rules see it; retrieval cannot find it
    assert isinstance(model.towers.index, ExactIndex)


class RecordingWatcher:
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, object]]] = []

    def catalogue_changed(self, item_id: str, record: dict[str, object]) -> None:
        self.seen.append((item_id, record))


class OneVersionStore:
    def catalogue_changes(self, since: int) -> tuple[int, dict[str, dict[str, object]]]:
        records: dict[str, dict[str, object]] = {"new": dict(LISTING), "phone": {"retired": True}}
        return 7, {} if since == 7 else records


def test_an_attached_watcher_first_takes_every_published_record():
    """The shadow challenger is loaded after production replayed the catalogue: attached,
    it gets every record at once, not only the next change."""
    from railtower.settings import load_settings
    from serving.metrics import Metrics
    from serving.served_model import ServedModel

    served = ServedModel(load_settings(), None, None, None, Metrics())
    served.store = OneVersionStore()  # type: ignore[assignment]
    watcher = RecordingWatcher()
    served.watch_catalogue(watcher)
    assert served.observer is watcher
    assert sorted(item for item, _ in watcher.seen) == ["new", "phone"]
    assert served.apply_catalogue_record("phone", {"stock": 0}) is False  # no model loaded
    assert watcher.seen[-1] == ("phone", {"stock": 0})


class FailingEncoder:
    def features(self, items: pd.DataFrame) -> pd.DataFrame:
        return items

    def run_tower(self, items: pd.DataFrame) -> np.ndarray:
        raise RuntimeError("tower exploded")


def test_an_encoder_failure_leaves_the_item_listed_and_is_retried():
    model = _model(FailingEncoder())  # type: ignore[arg-type]
    assert apply_record(model, "new", LISTING)  # type: ignore[arg-type]
    assert "new" in model.pipeline.attributes and "new" not in model.new_items.encoded
    assert isinstance(model.towers.index, ExactIndex)
    model.new_items.encoder = CountingEncoder()
    assert apply_record(model, "new", LISTING)  # type: ignore[arg-type]
    assert "new" in model.towers.index and "new" in model.new_items.encoded
