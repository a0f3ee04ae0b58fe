"""serving.new_items.apply_record on one model, with a stand-in item tower: which records
list, update, retire and encode, and that re-applying a record encodes nothing again; a
catalogue sync of many listings encodes them in one call and swaps the index once."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch

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
    """Stands in for the item tower: a vector per row from its title's hash, counting calls
    (the "features" are the rows themselves)."""

    photos = None  # no image encoder: listings are encoded without their photos

    def __init__(self, dim: int = 4) -> None:
        self.calls, self.dim = 0, dim

    def features(self, items: pd.DataFrame) -> SimpleNamespace:
        return SimpleNamespace(rows=items, has_image=torch.zeros(len(items), dtype=torch.bool))

    def run_tower(self, features: SimpleNamespace) -> np.ndarray:
        self.calls += 1
        items = features.rows
        vectors = [
            np.random.default_rng(abs(hash((title, price))) % 2**32).standard_normal(self.dim)
            for title, price in zip(items["title"], items["price"], strict=True)
        ]
        out = np.stack(vectors)
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def _model(encoder: CountingEncoder | None, dim: int = 4) -> SimpleNamespace:
    main = ExactIndex()
    main.build(np.array(["phone", "case"]), np.eye(dim, dtype=np.float32)[:2])
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


def test_a_listing_the_catalogue_knows_but_the_towers_lack_is_indexed():
    # the nightly folded it into the item table after the towers' cut: the bundle's
    # attributes have it, its HNSW graph does not
    encoder = CountingEncoder()
    model = _model(encoder)
    model.catalogue.index["lamp"] = 2
    model.pipeline.attributes.add("lamp", category_path="home > lighting", brand=None, price=20.0)
    assert apply_record(model, "lamp", {**LISTING, "title": "desk lamp"})  # type: ignore[arg-type]
    assert "lamp" in model.towers.index and encoder.calls == 1
    # an item with a trained vector keeps it, whatever its listing says
    assert apply_record(model, "phone", LISTING)  # type: ignore[arg-type]
    assert encoder.calls == 1 and "phone" not in model.new_items.encoded


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

    def catalogue_changed(self, records: dict[str, dict[str, object]]) -> None:
        self.seen.extend(records.items())


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


class FailingEncoder(CountingEncoder):
    def run_tower(self, features: SimpleNamespace) -> np.ndarray:
        raise RuntimeError("tower exploded")


def test_an_encoder_failure_leaves_the_item_listed_and_is_retried():
    model = _model(FailingEncoder())  # type: ignore[arg-type]
    assert apply_record(model, "new", LISTING)  # type: ignore[arg-type]
    assert "new" in model.pipeline.attributes and "new" not in model.new_items.encoded
    assert isinstance(model.towers.index, ExactIndex)
    model.new_items.encoder = CountingEncoder()
    assert apply_record(model, "new", LISTING)  # type: ignore[arg-type]
    assert "new" in model.towers.index and "new" in model.new_items.encoded


class ManyListingsStore:
    """The catalogue hash after a bulk upload of `count` listings (version 1)."""

    def __init__(self, count: int) -> None:
        self.records = {
            f"bulk-{i}": {**LISTING, "title": f"listing {i}", "price": 10.0 + i}
            for i in range(count)
        }

    def catalogue_changes(self, since: int) -> tuple[int, dict[str, dict[str, object]]]:
        return 1, {} if since == 1 else dict(self.records)


def _served(model: SimpleNamespace, store: object):  # type: ignore[no-untyped-def]
    from railtower.settings import load_settings
    from serving.metrics import Metrics
    from serving.served_model import ServedModel

    served = ServedModel(load_settings(), model, None, None, Metrics())  # type: ignore[arg-type]
    served.store = store  # type: ignore[assignment]
    return served


def test_a_sync_of_200_listings_encodes_once_and_swaps_the_index_once(monkeypatch):
    encoder = CountingEncoder(dim=32)
    model = _model(encoder, dim=32)
    rebuilds = []
    with_items = DeltaIndex.with_items

    def counted(self, ids, vectors):  # type: ignore[no-untyped-def]
        rebuilds.append(len(ids))
        return with_items(self, ids, vectors)

    monkeypatch.setattr(DeltaIndex, "with_items", counted)
    served = _served(model, ManyListingsStore(200))
    assert served.sync_catalogue() == 200
    assert encoder.calls == 1 and rebuilds == [200]
    index = model.towers.index
    assert isinstance(index, DeltaIndex) and len(index) == 202
    # every listing is retrievable: its own vector finds it first, beside the bundle's items
    ids = [f"bulk-{i}" for i in range(200)]
    found, _ = index.search(np.stack([index.vector(i) for i in ids]), k=1)
    assert [hits[0] for hits in found] == ids
    assert all(model.pipeline.attributes[i].price == 10.0 + n for n, i in enumerate(ids))
    # the next sync brings nothing new; a model load's replay of the same hash encodes nothing
    assert served.sync_catalogue() == 0
    assert served._replay_catalogue(model) == 1  # type: ignore[arg-type]
    assert encoder.calls == 1 and rebuilds == [200] and model.towers.index is index


def test_a_bad_listing_in_a_batch_keeps_the_others_and_is_retried():
    class PoisonEncoder(CountingEncoder):
        def run_tower(self, features: SimpleNamespace) -> np.ndarray:
            if (features.rows["title"] == "poison").any():
                self.calls += 1
                raise ValueError("cannot encode this listing")
            return super().run_tower(features)

    encoder = PoisonEncoder()
    model = _model(encoder)
    records = {"a": LISTING, "bad": {**LISTING, "title": "poison"}, "b": {**LISTING, "price": 5}}
    from serving.new_items import apply_records

    assert apply_records(model, records) == 3  # type: ignore[arg-type]
    assert 1 + 3 == encoder.calls  # the batch, then one call per listing
    assert "a" in model.towers.index and "b" in model.towers.index
    assert "bad" not in model.towers.index and "bad" not in model.new_items.encoded
    assert "bad" in model.pipeline.attributes  # listed for the rules all the same
