"""The nightly folds the catalogue topic's records (Redis) into the item table it trains on."""

from __future__ import annotations

import pandas as pd
import pytest

from devstack.local_services import free_port, redis_server
from state.session_store import SessionStore
from tests.training.conftest import nightly_settings
from training import nightly
from training.catalogue_fold import CatalogueSnapshot, fold_catalogue, read_catalogue

NOW = pd.Timestamp("2024-03-01 12:00", tz="UTC")
LISTING = {
    "title": "Desk lamp",
    "description": "A lamp",
    "category_path": "home > lighting",
    "brand": "Acme",
    "price": 25,
    "stock": 4,
    "image_path": "/photos/lamp.jpg",
    "margin": 0.3,
    "listed_at": "2024-02-28T08:30:00+00:00",
    "retired": False,
}


def _items() -> pd.DataFrame:
    """A canonical item table as railtower.validation leaves it (no stock, no dates)."""
    return pd.DataFrame(
        {
            "item_id": pd.array(["a", "c"], dtype="string"),
            "title": pd.array(["Phone", "Cable"], dtype="string"),
            "category_path": pd.array(["electronics > phones", None], dtype="string"),
            "brand": pd.array(["sony", None], dtype="string"),
            "price": pd.array([100.0, 5.0], dtype="Float64"),
        }
    )


def test_a_new_listing_is_appended_with_its_listing_time_and_the_tables_columns():
    folded = fold_catalogue(_items(), {"b": LISTING}, NOW)

    items = folded.items
    assert items["item_id"].tolist() == ["a", "c", "b"]  # the table's order, then the new
    new = items.set_index("item_id").loc["b"]
    assert (new["title"], new["category_path"], new["brand"]) == (
        "Desk lamp",
        "home > lighting",
        "acme",  # canonical brands are lower-cased
    )
    assert (new["price"], new["stock"], new["margin"]) == (25.0, 4, 0.3)
    assert new["first_seen"] == pd.Timestamp("2024-02-28 08:30", tz="UTC")
    # content columns the table does not map stay out (its towers read no photos)
    assert "image_path" not in items.columns and "description" not in items.columns
    # the table's dtypes hold; rows it had get no invented listing time
    assert items["title"].dtype == "string" and items["price"].dtype == "Float64"
    assert str(items["first_seen"].dtype) == "datetime64[ns, UTC]"
    assert items.set_index("item_id")["first_seen"].drop("b").isna().all()
    assert (folded.listed, folded.updated, folded.retired) == (("b",), (), ())


def test_a_listing_without_listed_at_is_dated_now():
    record = {k: v for k, v in LISTING.items() if k != "listed_at"}
    items = fold_catalogue(_items(), {"b": record}, NOW).items
    assert items.set_index("item_id").loc["b", "first_seen"] == NOW


def test_a_known_items_price_update_applies_its_non_null_fields_only():
    folded = fold_catalogue(_items(), {"a": {"price": 89, "stock": None}}, NOW)

    row = folded.items.set_index("item_id").loc["a"]
    assert row["price"] == 89.0 and row["title"] == "Phone"
    assert "stock" not in folded.items.columns  # no record set a stock
    assert folded.updated == ("a",) and folded.listed == ()


def test_a_record_that_changes_nothing_is_not_an_update():
    folded = fold_catalogue(_items(), {"a": {"price": 100.0, "retired": False}}, NOW)
    assert folded.updated == ()


def test_a_retired_item_keeps_its_row_with_stock_zero():
    folded = fold_catalogue(_items(), {"a": {"price": 100.0, "stock": 7, "retired": True}}, NOW)

    items = folded.items.set_index("item_id")
    assert items.loc["a", "stock"] == 0 and items["stock"].dtype == "Int64"
    assert pd.isna(items.loc["c", "stock"])  # the column is new: unknown elsewhere
    assert folded.retired == ("a",) and folded.updated == ()


def test_a_price_change_of_an_unknown_item_is_ignored_and_counted():
    folded = fold_catalogue(_items(), {"zz": {"price": 3.0, "stock": 1}}, NOW)

    assert folded.items["item_id"].tolist() == ["a", "c"]
    assert folded.ignored == ("zz",)
    assert folded.counts() == {"listed": 0, "updated": 0, "retired": 0, "ignored": 1}


def test_a_relisting_keeps_the_trained_content_and_fills_only_gaps():
    relisted = {**LISTING, "title": "Phone 2", "category_path": "phones", "brand": "Other"}
    folded = fold_catalogue(_items(), {"a": relisted, "c": relisted}, NOW)

    items = folded.items.set_index("item_id")
    assert items.loc["a", "title"] == "Phone"
    assert items.loc["a", "category_path"] == "electronics > phones"
    # "c" came without category and brand (as an item known from its events only does)
    assert (items.loc["c", "title"], items.loc["c", "category_path"]) == ("Cable", "phones")
    assert items.loc["c", "brand"] == "other"
    assert folded.listed == () and set(folded.updated) == {"a", "c"}


def test_the_fold_is_deterministic_and_leaves_its_input_alone():
    records = {
        "b": LISTING,
        "a": {"price": 80.0},
        "x": {"title": "Kettle", "listed_at": "2024-01-01T00:00:00Z"},
        "c": {"retired": True},
        "q": {"stock": 2},
    }
    before = _items()
    first = fold_catalogue(before, records, NOW)
    second = fold_catalogue(_items(), dict(reversed(list(records.items()))), NOW)

    pd.testing.assert_frame_equal(first.items, second.items)
    ids = [(f.listed, f.updated, f.retired, f.ignored) for f in (first, second)]
    assert (
        ids[0]
        == ids[1]
        == (
            ("b", "x"),
            ("a",),
            ("c",),
            ("q",),
        )
    )
    pd.testing.assert_frame_equal(before, _items())


# ------------------------------------------------------------------ the nightly's window


def test_the_window_digest_follows_the_catalogue_snapshot(tmp_path):
    settings = nightly_settings(tmp_path)
    one = CatalogueSnapshot(1_709_294_400_000, {"new-1": LISTING})
    two = CatalogueSnapshot(1_709_294_500_000, {"new-1": LISTING, "new-2": LISTING})

    def window(catalogue: CatalogueSnapshot | None) -> dict:
        return nightly._windows(settings, ["rees46"], catalogue)["rees46"][1]

    first, again, other, unavailable = window(one), window(one), window(two), window(None)
    assert first["digest"] == again["digest"]
    assert len({first["digest"], other["digest"], unavailable["digest"]}) == 3
    assert first["catalogue"] == {
        "version": one.version,
        "records": 1,
        "digest": one.digest,
        "listed": 1,
        "updated": 0,
        "retired": 0,
        "ignored": 0,
    }
    assert "unavailable" in unavailable["catalogue"]
    dataset, _ = nightly._windows(settings, ["rees46"], two)["rees46"]
    assert {"new-1", "new-2"} <= set(dataset.items["item_id"])
    # off: the window is the data set's alone, as before the fold existed
    off = settings.model_copy(
        update={"nightly": settings.nightly.model_copy(update={"fold_catalogue": False})}
    )
    assert "catalogue" not in nightly._windows(off, ["rees46"], two)["rees46"][1]


def test_a_run_folds_the_snapshot_it_pinned_whatever_redis_holds_now(tmp_path, monkeypatch):
    settings = nightly_settings(tmp_path)
    folder = tmp_path / "run"
    snapshot = CatalogueSnapshot(1_709_294_400_000, {"new-1": LISTING, "a": {"price": 2}})
    nightly._pin_catalogue(settings, folder, snapshot)

    def fresh_read(_settings):  # type: ignore[no-untyped-def]
        raise AssertionError("a pinned run read Redis again")

    monkeypatch.setattr(nightly, "read_catalogue", fresh_read)
    pinned = nightly._catalogue(settings, folder)
    assert pinned is not None and pinned.digest == snapshot.digest
    nightly._pin_catalogue(settings, tmp_path / "down", None)
    assert nightly._catalogue(settings, tmp_path / "down") is None


# ------------------------------------------------------------------ Redis


@pytest.mark.integration
def test_read_catalogue_returns_every_record_and_none_without_redis(tmp_path):
    port = free_port()
    server = redis_server(port, tmp_path / "redis").start()
    try:
        url = f"redis://127.0.0.1:{port}/0"
        store = SessionStore(url, 2.0, 50, 600, 600)
        store.put_catalogue_record("new-1", LISTING)
        store.put_catalogue_record("new-1", {"price": 19.5, "stock": None})
        store.put_catalogue_record("a", {"retired": True})
        snapshot = read_catalogue(nightly_settings(tmp_path, serving={"redis_url": url}))
    finally:
        server.stop()

    assert snapshot is not None and snapshot.version > 0
    assert set(snapshot.records) == {"new-1", "a"}
    assert snapshot.records["new-1"]["price"] == 19.5  # merged: null stock kept its value
    assert snapshot.records["new-1"]["stock"] == 4
    dead = nightly_settings(tmp_path, serving={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    assert read_catalogue(dead) is None
