"""Fold the catalogue topic's records into a data set's item table before the nightly trains.

Between nightly runs items are listed, repriced and retired on the catalogue topic; the
consumer keeps each item's latest merged record in Redis (state.session_store,
`catalogue_changes`), and serving lists a new item in a small exact index beside the
bundle's HNSW graph (serving.new_items). Training reads the data set's files only, so
without this fold a new item would never reach a bundle: not its item table, its HNSW
index, its attributes nor the towers' training catalogue.

Per record (item id -> record; item ids are compared as strings):

- an item the table lacks, whose record carries a listing (`railtower.schemas.has_listing`,
  serving's rule): a new row with the content columns the table has, its price, stock and
  margin, and `first_seen` = its `listed_at` (UTC), else the snapshot's time;
- an item the table has: the record's price, stock and margin (a null keeps the table's
  value); content only fills cells the table leaves empty (see `_fill_content`);
- `retired: True`: stock 0. The item keeps its row and its history (its events are real
  training signal), and serving re-retires it from Redis when it loads the bundle anyway;
- an item the table lacks and whose record lists nothing (a price or stock change of an
  item no listing introduced): ignored, and counted.

Point in time (training.point_in_time): a listed item without events enters a fit's
catalogue only if its `first_seen` precedes that fit's cut, exactly as an item the data
set's own table dates. One listed after the last training event stays in serving's delta
index until a later night's window covers its listing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import orjson
import pandas as pd
import redis
from redis.exceptions import RedisClusterException

from railtower.logs import get_logger
from railtower.schemas import has_listing
from railtower.settings import Settings
from state.redis_client import connect
from state.session_store import SessionStore

log = get_logger(__name__)

# The listing's content columns, copied into a new row where the table has the column:
# which of them a data set maps decides what its towers read (a table without photos must
# not gain an image column because a listing brought one).
CONTENT_COLUMNS = ("title", "description", "category_path", "brand", "image_path")
# Business fields every record may carry, with the canonical nullable dtype
# (railtower.schemas.ITEM_COLUMNS) a column gets when the table lacks it. An absent column
# and an all-null one read the same everywhere (ranking.item_attributes, business_features).
BUSINESS_COLUMNS = {"price": "Float64", "stock": "Int64", "margin": "Float64"}
# Socket timeout of the offline read: the whole hash in one HGETALL, not a request's budget.
READ_TIMEOUT_S = 10.0
# How many item ids a log line names.
LOGGED_IDS = 10


@dataclass(frozen=True)
class CatalogueSnapshot:
    """Every catalogue record in Redis at one version (a millisecond clock, see
    state.session_store `_CATALOGUE_UPDATE`)."""

    version: int
    records: Mapping[str, Mapping[str, object]]

    @cached_property
    def digest(self) -> str:
        """What identifies the records: a hash of them with sorted keys."""
        blob = orjson.dumps(dict(self.records), option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(blob).hexdigest()[:12]

    @property
    def changed_at(self) -> pd.Timestamp:
        """When the catalogue last changed (the version is that write's Redis clock): no
        record in the snapshot was listed later."""
        return pd.Timestamp(self.version, unit="ms", tz="UTC")


@dataclass(frozen=True)
class FoldedCatalogue:
    """The item table with the records folded in, and the ids by what the fold did.

    `listed`: new rows. `updated`: known items whose price, stock, margin or missing
    content changed (retirements aside). `retired`: items put out of stock by a retire
    record, known or listed in this fold. `ignored`: unknown items without a listing.
    """

    items: pd.DataFrame
    listed: tuple[str, ...]
    updated: tuple[str, ...]
    retired: tuple[str, ...]
    ignored: tuple[str, ...]

    def counts(self) -> dict[str, int]:
        return {
            "listed": len(self.listed),
            "updated": len(self.updated),
            "retired": len(self.retired),
            "ignored": len(self.ignored),
        }


def fold_catalogue(
    items: pd.DataFrame, records: Mapping[str, Mapping[str, object]], now: pd.Timestamp
) -> FoldedCatalogue:
    """`items` with `records` folded in (see the module docstring): the table's rows in
    their order (nothing a fit reads in table order moves when no item is listed), then the
    new items by id.

    Args:
        items: a canonical item table (railtower.schemas.ITEM_COLUMNS), one row per item.
        records: item id -> the item's latest merged catalogue record.
        now: the listing time of a new item whose record has no `listed_at`.
    """
    known = {item_id: row for row, item_id in enumerate(items["item_id"].astype(str))}
    new_ids = [i for i in sorted(records) if i not in known and has_listing(records[i])]
    # the new items go in NA rows at the end (nullable columns keep their dtypes)
    rows = {**known, **{item_id: len(items) + k for k, item_id in enumerate(new_ids)}}
    frame = _with_columns(items, records, bool(new_ids)).reindex(range(len(rows)))
    updated, retired, ignored = [], [], []
    for item_id in sorted(records):
        record, row = records[item_id], rows.get(item_id)
        if row is None:
            ignored.append(item_id)
            continue
        if item_id not in known:
            frame.at[row, "item_id"] = item_id
            _set_listing_time(frame, row, record, now)
        else:
            _fill_listing_time(frame, row, record)
        changed = _fill_content(frame, row, record) | _apply_business(frame, row, record)
        if record.get("retired") is True:
            retired.append(item_id)
        elif changed and item_id in known:  # a new row is listed, not updated
            updated.append(item_id)
    return FoldedCatalogue(frame, tuple(new_ids), tuple(updated), tuple(retired), tuple(ignored))


def _with_columns(
    items: pd.DataFrame, records: Mapping[str, Mapping[str, object]], lists: bool
) -> pd.DataFrame:
    """A copy of `items` with the columns the fold writes: a business column some record
    sets (stock for a retirement) and `first_seen` when the fold lists an item (every
    listed item has a listing time); NA for the table's rows. `first_seen` becomes UTC."""
    frame = items.reset_index(drop=True).copy()
    for column, dtype in BUSINESS_COLUMNS.items():
        needed = any(
            r.get(column) is not None or (column == "stock" and r.get("retired") is True)
            for r in records.values()
        )
        if column not in frame.columns and needed:
            frame[column] = pd.Series(pd.NA, index=frame.index, dtype=dtype)
    if "first_seen" in frame.columns:
        frame["first_seen"] = pd.to_datetime(frame["first_seen"], utc=True)
    elif lists:
        frame["first_seen"] = pd.Series(pd.NaT, index=frame.index, dtype="datetime64[ns, UTC]")
    return frame


def _apply_business(frame: pd.DataFrame, row: int, record: Mapping[str, object]) -> bool:
    """The record's non-null price, stock and margin (stock 0 when retired) on `row`;
    whether a value changed."""
    values = {
        "price": _number(record.get("price")),
        "stock": _count(record.get("stock")),
        "margin": _number(record.get("margin")),
    }
    if record.get("retired") is True:
        values["stock"] = 0
    changed = False
    for column, value in values.items():
        if value is None or column not in frame.columns:
            continue
        changed |= _set(frame, row, column, value)
    return changed


def _fill_content(frame: pd.DataFrame, row: int, record: Mapping[str, object]) -> bool:
    """The record's content into `row`'s empty content cells; whether one was filled.

    A cell the table fills is left alone even when a re-listing brings other text: the
    data set's table is what its events were recorded against and what the towers were
    trained and validated on, and serving keeps a known item's trained vector too (it
    encodes listings only for items its towers lack), so bundle and serving agree. An
    empty cell is a gap, not trained content: an item that arrived in the table only
    through its events (railtower.datasets joins those without attributes) gets its
    listing's title, category and brand, which serving would otherwise never apply to it
    once a bundle knows it.
    """
    filled = False
    for column in CONTENT_COLUMNS:
        value = _text(record.get(column))
        if value is None or column not in frame.columns or not pd.isna(frame.at[row, column]):
            continue
        # the canonical table's brands are lower-cased (railtower.validation)
        frame.at[row, column] = value.lower() if column == "brand" else value
        filled = True
    return filled


def _set_listing_time(
    frame: pd.DataFrame, row: int, record: Mapping[str, object], now: pd.Timestamp
) -> None:
    listed = _time(record.get("listed_at"))
    if listed is None:  # a naive `now` is taken as UTC, as a record's time is
        listed = now.tz_localize("UTC") if now.tzinfo is None else now.tz_convert("UTC")
    frame.at[row, "first_seen"] = listed


def _fill_listing_time(frame: pd.DataFrame, row: int, record: Mapping[str, object]) -> None:
    """A known item's missing `first_seen` from its record's `listed_at`, where the table
    dates items at all (an item known from its events needs no invented listing time)."""
    listed = _time(record.get("listed_at"))
    if listed is None or "first_seen" not in frame.columns:
        return
    if pd.isna(frame.at[row, "first_seen"]):
        frame.at[row, "first_seen"] = listed


def _set(frame: pd.DataFrame, row: int, column: str, value: object) -> bool:
    before = frame.at[row, column]
    if not pd.isna(before) and before == value:
        return False
    frame.at[row, column] = value
    return True


def _number(value: object) -> float | None:
    # Redis's JSON writes 2.0 as 2; a bool is no price
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _count(value: object) -> int | None:
    number = _number(value)
    return None if number is None or number != int(number) else int(number)


def _text(value: object) -> str | None:
    text = value.strip() if isinstance(value, str) else ""
    return text or None


def _time(value: object) -> pd.Timestamp | None:
    """A record's ISO time in UTC (a naive one is taken as UTC); None when absent or
    unreadable."""
    if not isinstance(value, str) or not value:
        return None
    stamp = pd.to_datetime(value, utc=True, errors="coerce")
    return None if pd.isna(stamp) else stamp


# ------------------------------------------------------------------ reading Redis


def read_catalogue(settings: Settings) -> CatalogueSnapshot | None:
    """Every catalogue record in the Redis serving uses (`serving.redis_url`, one Redis or
    a cluster), or None when it cannot be reached (logged): the nightly then trains on the
    data set's table alone, and serving still lists the new items from Redis."""
    serving = settings.serving
    try:
        client = connect(serving, READ_TIMEOUT_S)
        store = SessionStore(
            client,
            READ_TIMEOUT_S,
            serving.session_events,
            serving.state_ttl_s,
            serving.prewarm_ttl_s,
            catalogue_ttl_s=serving.catalogue_ttl_s,
        )
        try:
            version, records = store.catalogue_changes(-1)
        finally:
            client.close()
    except (redis.RedisError, RedisClusterException) as exc:
        log.warning(
            "catalogue not folded into the nightly: Redis unreachable",
            redis_mode=serving.redis_mode,
            error=f"{type(exc).__name__}: {exc}",
        )
        return None
    log.info("catalogue read", version=version, records=len(records))
    return CatalogueSnapshot(version, records)
