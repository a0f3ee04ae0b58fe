"""The catalogue topic's message kinds: decode round trips and each malformed case's reason."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from railtower.schemas import (
    CatalogueUpdate,
    ItemRetire,
    ItemUpsert,
    MalformedMessage,
    decode_catalogue_message,
    encode,
)

T0 = datetime(2019, 10, 1, 2, 0, tzinfo=UTC)


def _upsert(**fields: object) -> ItemUpsert:
    base: dict[str, object] = {
        "update_id": "u1",
        "item_id": "new-1",
        "time": T0,
        "title": "galaxy a50",
        "description": "a phone",
        "category_path": "electronics > smartphone",
        "brand": "samsung",
        "price": 199.0,
        "stock": 4,
        "image_path": "/photos/new-1.jpg",
        "margin": 0.3,
        "listed_at": T0,
    }
    return ItemUpsert(**{**base, **fields})  # type: ignore[arg-type]


def test_every_kind_round_trips_and_dispatches_on_kind():
    upsert, retire = _upsert(), ItemRetire(update_id="r1", item_id="new-1", time=T0)
    legacy = CatalogueUpdate(update_id="p1", item_id="a", time=T0, price=2.5, stock=0)
    assert decode_catalogue_message(encode(upsert)) == upsert
    assert decode_catalogue_message(encode(retire)) == retire
    assert decode_catalogue_message(encode(legacy)) == legacy  # no kind: a price/stock change
    assert orjson.loads(encode(upsert))["kind"] == "item_upsert"
    assert orjson.loads(encode(retire))["kind"] == "item_retire"
    only_brand = _upsert(title=None, category_path=None, description=None)
    assert decode_catalogue_message(encode(only_brand)) == only_brand


def test_an_upsert_is_a_listing_that_re_lists_the_item():
    listing = _upsert(margin=None).listing()
    assert listing["retired"] is False  # an upsert brings a retired item back
    assert listing["margin"] is None  # null: the record keeps its last margin
    assert listing["category_path"] == "electronics > smartphone"
    assert {"update_id", "item_id", "time", "kind", "schema_version"}.isdisjoint(listing)


def _raw(**fields: object) -> bytes:
    data = orjson.loads(encode(_upsert()))
    data.update(fields)
    return orjson.dumps({k: v for k, v in data.items() if v != "DROP"})


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (_raw(kind="item_delete"), "unknown catalogue message kind 'item_delete'"),
        (_raw(kind=3), "unknown catalogue message kind 3"),
        (
            _raw(title=None, category_path=None, brand=None),
            "an item upsert needs content: at least one of title, category_path, brand",
        ),
        (_raw(title="  ", category_path="", brand=None), "an item upsert needs content"),
        (_raw(image_path="photos/a.jpg"), "image_path must be an absolute path"),
        (_raw(margin=1.5), "margin"),
        (_raw(price=-1.0), "price"),
        (_raw(stock=-2), "stock"),
        (_raw(listed_at="0001-01-01T00:00:00Z"), "not a plausible time"),
        (_raw(colour="red"), "colour: Extra inputs are not permitted"),
        (_raw(item_id="DROP"), "item_id: Field required"),
        (
            orjson.dumps({"schema_version": 1, "kind": "item_retire", "update_id": "r"}),
            "invalid ItemRetire",
        ),
        (
            orjson.dumps(
                {
                    "schema_version": 1,
                    "kind": "item_retire",
                    "update_id": "r",
                    "item_id": "a",
                    "time": "2019-10-01T00:00:00Z",
                    "stock": 0,
                }
            ),
            "stock: Extra inputs are not permitted",
        ),
        (_raw(schema_version=2), "schema_version 2 is not supported"),
        (b"[1, 2]", "not a JSON object"),
        (None, "empty message"),
    ],
)
def test_malformed_catalogue_messages_name_their_reason(raw, reason):  # type: ignore[no-untyped-def]
    with pytest.raises(MalformedMessage) as caught:
        decode_catalogue_message(raw)
    assert reason in caught.value.reason
