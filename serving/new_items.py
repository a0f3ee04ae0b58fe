"""Catalogue records applied to one served model: price, stock, margin, retirement, and
items listed after its bundle was trained.

A record is what the catalogue hash in Redis keeps per item (state.session_store), merged
field by field from the catalogue topic's messages (railtower.schemas: a price/stock
`CatalogueUpdate`, an `ItemUpsert`, an `ItemRetire`). Every process applies the same
records (the consumer as it publishes them, API processes when they sync, every model when
it loads: production, the live canary and the shadow challenger), so they all agree.

A new item (an id the model's catalogue lacks, with a listing: title, category path or
brand) gets an attributes row and, where the model has towers, a vector from the bundle's
own item tower (`towers.item_content`, content only, as training treats an unseen item),
put into a small exact index searched beside the HNSW graph (`ranking.ann.DeltaIndex`),
so tower retrieval can return it. The item tower runs on Triton where the bundle exported
it (`serving.triton_item_tower`), in the process otherwise or when Triton fails. Each model
remembers the content it encoded per item, so
re-applying the whole hash on every sync does not encode again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import orjson
import pandas as pd

from railtower.logs import get_logger
from railtower.settings import Settings
from ranking.ann import DeltaIndex
from ranking.bundle import ITEM_TOWER, TowerBundle
from serving.triton_item_tower import TritonItemTower
from towers.embedding_cache import content_key
from towers.item_content import ItemContentEncoder, uncached_texts

if TYPE_CHECKING:
    from serving.rail_service import LoadedRails

log = get_logger(__name__)

# The fields of a record that describe a listing (an item_upsert's content).
LISTING_FIELDS = ("title", "description", "category_path", "brand", "image_path")
# What the item tower reads of a listing (text of title, category and brand; price band).
ENCODED_FIELDS = ("title", "category_path", "brand", "price")


def has_listing(record: Mapping[str, object]) -> bool:
    """Whether the record carries content a new item can be encoded from."""
    return any(
        isinstance(record.get(f), str) and record.get(f)
        for f in ("title", "category_path", "brand")
    )


@dataclass
class NewItems:
    """One model's encoder of new items and what it has encoded (item -> content key).

    With `triton` the item tower runs on Triton (the version exported from the model's
    bundle) and the in-process tower is the fallback."""

    encoder: ItemContentEncoder | None
    triton: TritonItemTower | None = None
    triton_version: str = ""
    encoded: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # where each encoding ran: "triton", "in_process", "in_process after triton failed"
    sources: dict[str, int] = field(default_factory=dict)
    # after a Triton failure, encode in process for this long: a catalogue sync of many
    # listings must not wait out the timeout once per item while Triton is down
    retry_after_s: float = 30.0
    _failed_at: float = float("-inf")

    def encode(self, rows: pd.DataFrame) -> np.ndarray:
        """(N, D) vectors of new catalogue rows: Triton when it answers, else in-process.

        Raises whatever the in-process encoder raises (no encoder: ValueError)."""
        if self.encoder is None:
            raise ValueError("no item-content encoder loaded (see serving.encode_new_items)")
        features = self.encoder.features(rows)
        source = "in_process"
        if self.triton is not None and time.monotonic() - self._failed_at >= self.retry_after_s:
            try:
                vectors = self.triton.encode(features, self.triton_version)
                self._count("triton")
                return vectors
            except Exception as exc:  # noqa: BLE001 - Triton down or slow: encode here
                self._failed_at = time.monotonic()
                log.warning(
                    "item tower on Triton failed; encoding in-process",
                    error=f"{type(exc).__name__}: {exc}",
                    retry_after_s=self.retry_after_s,
                )
                source = "in_process after triton failed"
        elif self.triton is not None:
            source = "in_process while triton recovers"
        vectors = self.encoder.run_tower(features)
        self._count(source)
        return vectors

    def _count(self, source: str) -> None:
        self.sources[source] = self.sources.get(source, 0) + 1


def new_items_for(towers: TowerBundle | None, settings: Settings) -> NewItems | None:
    """The new-item encoder of a model with towers, loaded now (at model load, never on a
    request or a catalogue sync); None without towers or with `serving.encode_new_items`
    off (new items then get attributes but no vector: the towers cannot retrieve them). A
    text model that cannot load leaves the encoder out the same way (logged)."""
    if towers is None or not settings.serving.encode_new_items:
        return None
    try:
        texts = uncached_texts(settings.text.model_path, settings.text.batch_size)
        encoder = ItemContentEncoder(towers.folder / ITEM_TOWER, towers.featurizer, texts)
    except Exception as exc:  # noqa: BLE001 - serving goes on; new items are not retrievable
        log.error("item-content encoder not loaded; new items get no vector", error=str(exc))
        return NewItems(None)
    s = settings.serving
    if not (s.triton_url and towers.triton_item_version):
        return NewItems(encoder)
    triton = TritonItemTower(s.triton_url, s.triton_item_model, s.triton_item_timeout_s)
    return NewItems(encoder, triton, towers.triton_item_version)


def apply_record(loaded: LoadedRails, item_id: str, record: Mapping[str, object]) -> bool:
    """Apply one catalogue record (or one message's fields) to `loaded`.

    Returns False when the model neither knows the item nor gets a listing for it (a price
    or stock change of an item it cannot recommend anyway).
    """
    attributes = loaded.pipeline.attributes
    price, stock, margin = record.get("price"), record.get("stock"), record.get("margin")
    retired = record.get("retired")
    listed = has_listing(record) and item_id not in loaded.catalogue.index
    if listed:
        category, brand = record.get("category_path"), record.get("brand")
        attributes.add(
            item_id,
            category_path=category if isinstance(category, str) else None,
            brand=brand if isinstance(brand, str) else None,
            price=price,  # type: ignore[arg-type]
            stock=stock,  # type: ignore[arg-type]
            margin=margin,  # type: ignore[arg-type]
        )
        if retired:
            attributes.update(item_id, retired=True)
        title = record.get("title")
        if isinstance(title, str) and title:
            loaded.titles[item_id] = title  # responses and explanations name it
        if isinstance(category, str) and category:
            # "more from this category" reads a new product page's category from here
            loaded.catalogue.category_of[item_id] = category
    elif item_id in attributes:
        attributes.update(
            item_id,
            stock=stock,  # type: ignore[arg-type]
            price=price,  # type: ignore[arg-type]
            margin=margin,  # type: ignore[arg-type]
            retired=None if retired is None else bool(retired),
        )
    else:
        return False
    if price is not None:
        # the re-ranker's price features read the item statistics: keep them current too
        # (an item listed after training has no statistics row: its features are missing)
        stats = loaded.pipeline.stats
        row = stats.row.get(item_id)
        if row is not None:
            stats.price[row] = price
    if listed:
        index_new_item(loaded, item_id, record)
    return True


def index_new_item(loaded: LoadedRails, item_id: str, record: Mapping[str, object]) -> bool:
    """Encode a new item's content with the model's item tower and put it into the model's
    delta index (copy-on-write, swapped by one assignment); True when it (re-)encoded.

    Nothing happens without towers or an encoder, for an item the bundle already has a
    vector for, or when the same content was encoded before.
    """
    towers, new = loaded.towers, getattr(loaded, "new_items", None)
    if towers is None or new is None or new.encoder is None or item_id in towers.item_row:
        return False
    content = {f: record.get(f) for f in ENCODED_FIELDS}
    if content["price"] is not None:  # Redis's JSON writes 2.0 as 2: one key for both
        content["price"] = float(content["price"])  # type: ignore[arg-type]
    key = content_key(orjson.dumps(content, option=orjson.OPT_SORT_KEYS))
    with new.lock:
        if new.encoded.get(item_id) == key:
            return False
        try:
            vector = new.encode(pd.DataFrame([{"item_id": item_id, **content}]))
            index = towers.index
            base = index if isinstance(index, DeltaIndex) else DeltaIndex(index)
            towers.index = base.with_items(np.array([item_id]), vector)
        except Exception as exc:  # noqa: BLE001 - one item must not stop a sync or a load
            # not recorded as encoded: the next sync of the hash tries again
            log.error("new item not indexed", item=item_id, error=f"{type(exc).__name__}: {exc}")
            return False
        new.encoded[item_id] = key
    log.info("new item indexed", item=item_id, model=loaded.version)
    return True
