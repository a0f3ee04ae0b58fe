"""The canonical event and item schema: one definition for every source, role and test.

Adapters (`railtower.datasets`) map each source into these columns, validation
(`railtower.validation`) enforces them, and the streaming producer and consumer parse the
same :class:`Event` on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

CATEGORY_SEPARATOR = " > "
EVENT_SCHEMA_VERSION = 1


class EventType(StrEnum):
    VIEW = "view"
    CART = "cart"
    REMOVE_FROM_CART = "remove_from_cart"
    PURCHASE = "purchase"


EVENT_TYPES: frozenset[str] = frozenset(t.value for t in EventType)

Kind = Literal["string", "time", "event_type", "float", "int"]


@dataclass(frozen=True)
class Column:
    """One canonical column: its name, kind, whether a source must provide it, and why."""

    name: str
    kind: Kind
    required: bool
    doc: str


EVENT_COLUMNS: tuple[Column, ...] = (
    Column("event_id", "string", False, "unique id; derived from the row's content when absent"),
    Column("event_time", "time", True, "UTC timestamp; synthesised from order where none"),
    Column("event_type", "event_type", True, "view | cart | remove_from_cart | purchase"),
    Column("user_id", "string", False, "permanent shopper id, null for guests"),
    Column("session_id", "string", True, "session (or basket/invoice) id"),
    Column("item_id", "string", True, "item id, always a string"),
    Column("price", "float", False, "price shown at the event, >= 0"),
    Column("quantity", "int", False, "units, for purchase lines"),
    Column("device", "string", False, "context: device class"),
    Column("locale", "string", False, "context: locale or market"),
    Column("country", "string", False, "context: shopper country"),
)

ITEM_COLUMNS: tuple[Column, ...] = (
    Column("item_id", "string", True, "item id, always a string"),
    Column("title", "string", False, "product title"),
    Column("description", "string", False, "longer product text"),
    Column("category_path", "string", False, f"levels joined by '{CATEGORY_SEPARATOR}'"),
    Column("brand", "string", False, "brand, lower-cased"),
    Column("price", "float", False, "current list price, >= 0"),
    Column("image_path", "string", False, "absolute path of the product photo"),
    Column("stock", "int", False, "units in stock; 0 means out of stock"),
    Column("margin", "float", False, "gross margin share, 0..1"),
    Column("product_group", "string", False, "variants of one product share it (colours)"),
)

EVENT_COLUMN_NAMES = tuple(c.name for c in EVENT_COLUMNS)
ITEM_COLUMN_NAMES = tuple(c.name for c in ITEM_COLUMNS)


def category_levels(path: object, depth: int = 3) -> list[str | None]:
    """Split a canonical category path into `depth` cumulative levels.

    Example:
        >>> category_levels("electronics > audio > headphone", 2)
        ['electronics', 'electronics > audio']
    """
    parts = path.split(CATEGORY_SEPARATOR) if isinstance(path, str) and path else []
    return [
        CATEGORY_SEPARATOR.join(parts[: i + 1]) if i < len(parts) else None for i in range(depth)
    ]


class Event(BaseModel):
    """One storefront event on the wire (Kafka) and in tests."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=True)

    schema_version: Literal[1] = EVENT_SCHEMA_VERSION
    event_id: str = Field(min_length=1)
    event_time: datetime
    event_type: EventType
    user_id: str | None = None
    session_id: str = Field(min_length=1)
    item_id: str = Field(min_length=1)
    price: float | None = Field(default=None, ge=0)
    quantity: int | None = Field(default=None, ge=0)
    device: str | None = None
    locale: str | None = None
    country: str | None = None


class Item(BaseModel):
    """One catalogue item."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    item_id: str = Field(min_length=1)
    title: str | None = None
    description: str | None = None
    category_path: str | None = None
    brand: str | None = None
    price: float | None = Field(default=None, ge=0)
    image_path: str | None = None
    stock: int | None = Field(default=None, ge=0)
    margin: float | None = Field(default=None, ge=0, le=1)
    product_group: str | None = None
