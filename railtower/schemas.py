"""The canonical event and item schema: one definition for every source, role and test.

Adapters (`railtower.datasets`) map each source into these columns, validation
(`railtower.validation`) enforces them, and the streaming producer and consumer parse the
same :class:`Event` on the wire.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Literal

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

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
    Column("first_seen", "time", False, "listing time (UTC), from when the item is known"),
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


# A message time outside these bounds is a producer's bug (year 1, a unit mix-up), not an
# event: it would break every clock downstream (ages, rules' validity, freshness).
EARLIEST_TIME = datetime(1990, 1, 1, tzinfo=UTC)
LATEST_AHEAD = timedelta(days=7)


def plausible_time(value: datetime) -> datetime:
    """`value` in UTC (a naive time is taken as UTC), if it lies between 1990 and a week
    from now; raises ValueError otherwise (decoding turns that into a dead letter)."""
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    if not EARLIEST_TIME <= aware <= datetime.now(UTC) + LATEST_AHEAD:
        raise ValueError(
            f"{value.isoformat()} is not a plausible time (expected between "
            f"{EARLIEST_TIME.date()} and a week from now, UTC)"
        )
    return aware.astimezone(UTC)


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
    price: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    quantity: int | None = Field(default=None, ge=0)
    device: str | None = None
    locale: str | None = None
    country: str | None = None

    @field_validator("event_time")
    @classmethod
    def _plausible_event_time(cls, value: datetime) -> datetime:
        return plausible_time(value)


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


class Impression(BaseModel):
    """One rail as computed for one request, on the impressions topic.

    The served arm is what the shopper saw (`shown`); a shadow arm (a challenger bundle or a
    candidate rule set) is what it would have shown for the same request (`request_id`), computed
    off the critical path. The evaluators join impressions with the events that followed.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = EVENT_SCHEMA_VERSION
    impression_id: str = Field(min_length=1)
    request_id: str = Field(min_length=1)
    served_at: datetime
    session_id: str = Field(min_length=1)
    user_id: str | None = None
    rail: str = Field(min_length=1)
    # who served it (shown): "production", or "canary" (the live canary's challenger, whose
    # version is model_version); "challenger:<version>" or "rules:<name>" for a shadow
    arm: str = Field(min_length=1)
    shown: bool
    model_version: str
    rule_set: str | None = None
    items: list[str]
    scores: list[float] = Field(default_factory=list)
    # probability each slot's item had of being shown there (exploration slot); None = greedy
    propensities: list[float] | None = None
    # the exploration slot's draw, so another exploration policy can be valued on the log:
    # which slot explored, how many items it chose among, and the one the greedy rail had
    explored_slot: int | None = Field(default=None, ge=0)
    choice_set_size: int | None = Field(default=None, ge=1)
    greedy_item: str | None = None
    served_by: str = "computed"


class CatalogueUpdate(BaseModel):
    """A price and/or stock change of one item, on the catalogue topic."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = EVENT_SCHEMA_VERSION
    update_id: str = Field(min_length=1)
    item_id: str = Field(min_length=1)
    time: datetime
    price: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    stock: int | None = Field(default=None, ge=0)

    @field_validator("time")
    @classmethod
    def _plausible_update_time(cls, value: datetime) -> datetime:
        return plausible_time(value)


class ItemUpsert(BaseModel):
    """An item listed (a new id) or re-listed (a known one), with its content, on the
    catalogue topic. A known item takes its price, stock and margin from it and is no longer
    retired; a new item is encoded from its content (title, category path, brand) by the
    item tower and becomes retrievable. A field left null keeps the item's last value."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = EVENT_SCHEMA_VERSION
    kind: Literal["item_upsert"] = "item_upsert"
    update_id: str = Field(min_length=1)
    item_id: str = Field(min_length=1)
    time: datetime
    title: str | None = None
    description: str | None = None
    category_path: str | None = None
    brand: str | None = None
    price: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    stock: int | None = Field(default=None, ge=0)
    image_path: str | None = None
    margin: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    listed_at: datetime | None = None

    @field_validator("time")
    @classmethod
    def _plausible_update_time(cls, value: datetime) -> datetime:
        return plausible_time(value)

    @field_validator("listed_at")
    @classmethod
    def _plausible_listing_time(cls, value: datetime | None) -> datetime | None:
        return None if value is None else plausible_time(value)

    @field_validator("image_path")
    @classmethod
    def _absolute_image_path(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError(f"image_path must be an absolute path, got {value!r}")
        return value

    @model_validator(mode="after")
    def _has_content(self) -> ItemUpsert:
        if not any((v or "").strip() for v in (self.title, self.category_path, self.brand)):
            raise ValueError(
                "an item upsert needs content: at least one of title, category_path, brand"
            )
        return self

    def listing(self) -> dict[str, object]:
        """The fields the catalogue record (state.session_store) keeps for this item; null
        ones keep the record's last value. An upsert re-lists a retired item."""
        fields = self.model_dump(
            mode="json", exclude={"schema_version", "kind", "update_id", "item_id", "time"}
        )
        return {**fields, "retired": False}


def has_listing(record: Mapping[str, object]) -> bool:
    """Whether a catalogue record (the merged fields of an item's messages, as the
    catalogue hash in Redis keeps them) carries content a new item can be listed and
    encoded from: a title, category path or brand. Serving (serving.new_items) and the
    nightly fold (training.catalogue_fold) list new items by this one rule."""
    return any(
        isinstance(record.get(f), str) and record.get(f)
        for f in ("title", "category_path", "brand")
    )


class ItemRetire(BaseModel):
    """An item withdrawn from sale, on the catalogue topic: it leaves every rail and cache
    and stays out (a later price or stock change does not bring it back) until an
    :class:`ItemUpsert` lists it again."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = EVENT_SCHEMA_VERSION
    kind: Literal["item_retire"] = "item_retire"
    update_id: str = Field(min_length=1)
    item_id: str = Field(min_length=1)
    time: datetime

    @field_validator("time")
    @classmethod
    def _plausible_update_time(cls, value: datetime) -> datetime:
        return plausible_time(value)


CatalogueMessage = CatalogueUpdate | ItemUpsert | ItemRetire

# `kind` of a catalogue-topic message -> its schema; a message without `kind` is the
# original price/stock update (CatalogueUpdate), which producers may keep sending.
CATALOGUE_KINDS: dict[str, type[BaseModel]] = {
    "item_upsert": ItemUpsert,
    "item_retire": ItemRetire,
}


# ---------------------------------------------------------------------------- wire format
# One JSON object per message, UTF-8, carrying `schema_version`. Producers write
# encode(); consumers read decode_*(), which names what is wrong with a bad message so it
# can go to the dead-letter topic with its reason.


class MalformedMessage(ValueError):
    """A message that cannot be applied; `reason` says why, for the dead-letter topic."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def encode(message: Event | CatalogueMessage | Impression) -> bytes:
    return orjson.dumps(message.model_dump(mode="json"))


def _decode(raw: bytes | None, model: type[BaseModel]) -> BaseModel:
    return _validate(_object(raw), model)


def _object(raw: bytes | None) -> dict[str, object]:
    """The message's JSON object at a supported schema version."""
    if raw is None:
        raise MalformedMessage("empty message (no value)")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MalformedMessage(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MalformedMessage(f"not a JSON object but {type(data).__name__}")
    version = data.get("schema_version")
    if version != EVENT_SCHEMA_VERSION:
        raise MalformedMessage(
            f"schema_version {version!r} is not supported (this consumer reads "
            f"{EVENT_SCHEMA_VERSION})"
        )
    return data


def _validate(data: dict[str, object], model: type[BaseModel]) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'message'}: {e['msg']}" for e in exc.errors()
        )
        raise MalformedMessage(f"invalid {model.__name__}: {problems}") from None


def decode_event(raw: bytes | None) -> Event:
    """Parse one events-topic message. Raises MalformedMessage naming the problem."""
    return _decode(raw, Event)  # type: ignore[return-value]


def decode_catalogue_update(raw: bytes | None) -> CatalogueUpdate:
    """Parse one catalogue-topic message. Raises MalformedMessage naming the problem."""
    return _decode(raw, CatalogueUpdate)  # type: ignore[return-value]


def decode_catalogue_message(raw: bytes | None) -> CatalogueMessage:
    """Parse one catalogue-topic message of any kind: `item_upsert`, `item_retire`, or (no
    `kind`) a price/stock :class:`CatalogueUpdate`. Raises MalformedMessage naming the
    problem (an unknown kind included)."""
    data = _object(raw)
    kind = data.get("kind")
    if "kind" not in data:
        return _validate(data, CatalogueUpdate)  # type: ignore[return-value]
    model = CATALOGUE_KINDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise MalformedMessage(
            f"unknown catalogue message kind {kind!r} (this consumer reads "
            f"{', '.join(sorted(CATALOGUE_KINDS))}, or no kind for a price/stock update)"
        )
    return _validate(data, model)  # type: ignore[return-value]


def decode_impression(raw: bytes | None) -> Impression:
    """Parse one impressions-topic message. Raises MalformedMessage naming the problem."""
    return _decode(raw, Impression)  # type: ignore[return-value]
