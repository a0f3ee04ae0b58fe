"""What MMR and the merchandising rules need to know about each item, as dict lookups.

Built once from the canonical catalogue (:mod:`railtower.schemas` columns); the streaming
path updates stock and price of single items in place, so the rules see fresh stock without
a rebuild.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import pandas as pd

from railtower.schemas import category_levels
from railtower.settings import TowerSettings
from towers.item_features import PriceBands

# The same number of price bands the item tower sees, unless the caller says otherwise.
DEFAULT_PRICE_BANDS = TowerSettings().price_bands


@dataclass(frozen=True)
class ItemInfo:
    """The attributes of one item; None wherever the catalogue does not say.

    Attributes:
        item_id: the item id.
        category_path: levels joined by " > " (e.g. "electronics > smartphone"), or None.
        top_category: the first level of the path (e.g. "electronics"), or None.
        brand: lower-case brand, or None.
        price: current list price, or None.
        stock: units in stock (0 = out of stock), or None when the catalogue has no stock.
        margin: gross margin share 0..1, or None.
        price_band: quantile band of the price within its top-level category, 1..bands;
            0 when the price is unknown.
        retired: withdrawn from sale (an `item_retire` on the catalogue topic): out of
            every rail, whatever its stock, until an `item_upsert` lists it again.
    """

    item_id: str
    category_path: str | None
    top_category: str | None
    brand: str | None
    price: float | None
    stock: int | None
    margin: float | None
    price_band: int
    retired: bool = False

    @property
    def out_of_stock(self) -> bool:
        """True when the stock is known and nothing is left (unknown stock counts as in stock)."""
        return self.stock is not None and self.stock <= 0


class ItemAttributes:
    """Per-item attributes keyed by item id, with the price bands they were banded with.

    Example:
        >>> items = pd.DataFrame({"item_id": ["a"], "category_path": ["electronics > audio"],
        ...                       "brand": ["sony"], "price": [99.0], "stock": [0]})
        >>> attrs = ItemAttributes.from_frame(items, price_bands=4)
        >>> attrs["a"].top_category, attrs["a"].out_of_stock
        ('electronics', True)
    """

    def __init__(self, items: dict[str, ItemInfo], price_bands: PriceBands) -> None:
        self._items = items
        self.price_bands = price_bands

    @classmethod
    def from_frame(
        cls, items: pd.DataFrame, price_bands: int = DEFAULT_PRICE_BANDS
    ) -> ItemAttributes:
        """Build attributes from a canonical catalogue frame.

        Args:
            items: one row per item with `item_id` and any of `category_path`, `brand`,
                `price`, `stock`, `margin`; absent columns and missing values become None.
            price_bands: number of quantile price bands per top-level category.

        Returns:
            The attributes of every row, with price bands fitted on this frame.

        Raises:
            ValueError: `item_id` is missing or an item id appears more than once.
        """
        if "item_id" not in items.columns:
            raise ValueError(
                f"items has no 'item_id' column (columns: {', '.join(map(str, items.columns))}); "
                "pass a canonical catalogue frame (railtower.schemas.ITEM_COLUMNS)"
            )
        ids = items["item_id"].astype(str)
        duplicated = ids[ids.duplicated()].unique().tolist()
        if duplicated:
            raise ValueError(
                f"items has {len(duplicated)} duplicated item_id value(s), e.g. "
                f"{duplicated[:5]}; keep one row per item (the catalogue is one row per item)"
            )
        bands = PriceBands.fit(items, price_bands)
        band_of = bands.assign(items).tolist()
        paths, brands, prices, stocks, margins = (
            _column(items, name) for name in ("category_path", "brand", "price", "stock", "margin")
        )
        records = {}
        for i, item_id in enumerate(ids.tolist()):
            raw_path = paths[i]
            path = raw_path if isinstance(raw_path, str) and raw_path else None
            records[item_id] = ItemInfo(
                item_id=item_id,
                category_path=path,
                top_category=category_levels(path, 1)[0],
                brand=str(brands[i]) if brands[i] is not None else None,
                price=_number(prices[i]),
                stock=_count(stocks[i]),
                margin=_number(margins[i]),
                price_band=int(band_of[i]),
            )
        return cls(records, bands)

    def __getitem__(self, item_id: str) -> ItemInfo:
        return self._items[item_id]

    def get(self, item_id: str) -> ItemInfo | None:
        """The item's attributes, or None when the catalogue does not know it."""
        return self._items.get(item_id)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def update(
        self,
        item_id: str,
        *,
        stock: int | None = None,
        price: float | None = None,
        margin: float | None = None,
        retired: bool | None = None,
    ) -> None:
        """Set the stock, price, margin and/or retired flag of one known item (the streaming
        path calls this).

        The price band is re-assigned with the fitted band edges; the edges themselves are
        not refitted, so one price change never moves other items between bands.

        Args:
            item_id: an item the attributes were built with.
            stock: new units in stock (>= 0), or None to leave the stock as it is.
            price: new price (>= 0), or None to leave the price as it is.
            margin: new gross margin share (0..1), or None to leave it as it is.
            retired: True withdraws the item, False lists it again, None leaves it.

        Raises:
            ValueError: the item is unknown (`add` lists a new one), or stock/price is
                negative or not finite, or margin is outside 0..1.
        """
        info = self._items.get(item_id)
        if info is None:
            raise ValueError(
                f"item {item_id!r} is not in the catalogue these attributes were built from; "
                "list it with ItemAttributes.add (or rebuild with ItemAttributes.from_frame)"
            )
        if stock is not None and (isinstance(stock, bool) or stock < 0):
            raise ValueError(f"stock must be an integer >= 0, got {stock!r} for item {item_id!r}")
        if price is not None and not (math.isfinite(price) and price >= 0):
            raise ValueError(f"price must be a finite number >= 0, got {price!r} for {item_id!r}")
        if margin is not None and not (math.isfinite(margin) and 0 <= margin <= 1):
            raise ValueError(f"margin must be within 0..1, got {margin!r} for {item_id!r}")
        if stock is not None:
            info = replace(info, stock=int(stock))
        if margin is not None:
            info = replace(info, margin=float(margin))
        if retired is not None:
            info = replace(info, retired=bool(retired))
        if price is not None:
            one = pd.DataFrame({"category_path": [info.category_path], "price": [float(price)]})
            band = int(self.price_bands.assign(one)[0])
            info = replace(info, price=float(price), price_band=band)
        self._items[item_id] = info

    def add(
        self,
        item_id: str,
        *,
        category_path: str | None,
        brand: str | None,
        price: float | None = None,
        stock: int | None = None,
        margin: float | None = None,
    ) -> None:
        """List a new item (an `item_upsert` of an id these attributes were not built with):
        its price band comes from the fitted edges, as `update` assigns one. Adding a known
        item replaces its category and brand and applies the rest as `update` does.

        Raises:
            ValueError: stock/price/margin out of range (as `update`).
        """
        path = category_path if isinstance(category_path, str) and category_path else None
        known = self._items.get(item_id)
        base = ItemInfo(
            item_id=item_id,
            category_path=path,
            top_category=category_levels(path, 1)[0],
            brand=brand if isinstance(brand, str) and brand else None,
            price=None if known is None else known.price,
            stock=None if known is None else known.stock,
            margin=None if known is None else known.margin,
            price_band=0 if known is None else known.price_band,
        )
        self._items[item_id] = base
        try:
            self.update(item_id, stock=stock, price=price, margin=margin, retired=False)
        except ValueError:
            if known is None:
                del self._items[item_id]
            else:
                self._items[item_id] = known
            raise


def _column(items: pd.DataFrame, name: str) -> list[object]:
    """A column as Python values with every kind of missing (NaN, NA, None) as None."""
    if name not in items.columns:
        return [None] * len(items)
    column = items[name]
    values: list[object] = column.astype(object).where(column.notna(), None).tolist()
    return values


def _number(value: object) -> float | None:
    if value is None:
        return None
    number = float(value)  # type: ignore[arg-type]
    return None if math.isnan(number) else number


def _count(value: object) -> int | None:
    number = _number(value)
    return None if number is None else int(number)
