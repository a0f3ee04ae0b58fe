"""ItemAttributes on a toy catalogue: what each column becomes, updates, and refused input."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from ranking.item_attributes import ItemAttributes

ITEMS = pd.DataFrame(
    {
        "item_id": [101, 102, 103, 104],  # ids are strings in the attributes, whatever the source
        "category_path": ["electronics > audio", "electronics > audio", None, "kids > toys"],
        "brand": ["sony", None, "acme", "lego"],
        "price": [10.0, 1000.0, np.nan, 30.0],
        "stock": pd.array([0, 4, None, 2], dtype="Int64"),
        "margin": [0.2, np.nan, 0.1, 0.3],
    }
)


def test_columns_become_typed_attributes_with_none_for_missing():
    attrs = ItemAttributes.from_frame(ITEMS, price_bands=2)
    a, b, c = attrs["101"], attrs["102"], attrs["103"]
    assert (a.category_path, a.top_category, a.brand) == (
        "electronics > audio",
        "electronics",
        "sony",
    )
    assert (a.stock, a.margin, a.out_of_stock) == (0, 0.2, True)
    assert (b.brand, b.margin, b.stock, b.out_of_stock) == (None, None, 4, False)
    assert (c.category_path, c.top_category, c.price, c.stock) == (None, None, None, None)
    assert not c.out_of_stock  # unknown stock is not out of stock
    assert (a.price_band, b.price_band, c.price_band) == (1, 2, 0)  # cheap, dear, no price
    assert len(attrs) == 4 and "104" in attrs and attrs.get("nope") is None


def test_absent_columns_are_unknown_not_errors():
    attrs = ItemAttributes.from_frame(pd.DataFrame({"item_id": ["x"]}))
    info = attrs["x"]
    assert (info.category_path, info.brand, info.price, info.stock, info.margin) == (None,) * 5
    assert info.price_band == 0


def test_update_sets_stock_and_rebands_price_with_fitted_edges():
    attrs = ItemAttributes.from_frame(ITEMS, price_bands=2)
    edges_before = attrs.price_bands.edges
    attrs.update("101", stock=7, price=5000.0)
    assert (attrs["101"].stock, attrs["101"].price, attrs["101"].price_band) == (7, 5000.0, 2)
    assert attrs.price_bands.edges == edges_before
    attrs.update("102", stock=0)
    assert attrs["102"].out_of_stock and attrs["102"].price == 1000.0  # price left as it was


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"item_id": "999", "stock": 1}, "item '999' is not in the catalogue"),
        ({"item_id": "101", "stock": -1}, "stock must be an integer >= 0, got -1"),
        ({"item_id": "101", "price": math.nan}, "price must be a finite number >= 0, got nan"),
        ({"item_id": "101", "price": -3.0}, "price must be a finite number >= 0, got -3.0"),
    ],
)
def test_update_refuses_unknown_items_and_impossible_values(kwargs, message):
    attrs = ItemAttributes.from_frame(ITEMS)
    with pytest.raises(ValueError) as err:
        attrs.update(**kwargs)
    assert message in str(err.value)


def test_frame_without_item_id_is_refused():
    with pytest.raises(ValueError, match="no 'item_id' column"):
        ItemAttributes.from_frame(pd.DataFrame({"id": ["a"]}))


def test_duplicated_item_ids_are_refused_with_examples():
    with pytest.raises(ValueError, match=r"1 duplicated item_id value\(s\), e.g. \['a'\]"):
        ItemAttributes.from_frame(pd.DataFrame({"item_id": ["a", "b", "a"]}))
