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
so tower retrieval can return it. So does a listed item the model's catalogue knows but
its towers have no vector for: the nightly job folds listings into the item table
(training.catalogue_fold), and one listed after the towers' cut (the end of their
retrieval window) reaches the bundle's attributes but not its HNSW graph. A listing's
photo (`image_path`) goes through the image encoder the bundle ships
(`ranking.bundle.IMAGE_ENCODER`, loaded with the model), as the export embedded the
catalogue's photos; a bundle trained without photos, or a photo that is missing or
unreadable, gets the tower's "no image" input (logged). The item tower runs on
Triton where the bundle exported it (`serving.triton_item_tower`), in the process otherwise
or when Triton fails.

Many records at once (a catalogue sync, the replay at model load) are applied with
`apply_records`: the new listings among them are encoded in one batch and added to the
delta index by one copy-on-write swap, so listing n items costs O(n), not n rebuilds. Each
model remembers the content it encoded per item (photo file included), so re-applying the
whole hash on every sync does not encode again.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import orjson
import pandas as pd

from railtower.logs import get_logger
from railtower.schemas import has_listing
from railtower.settings import Settings
from ranking.ann import DeltaIndex
from ranking.bundle import ITEM_TOWER, TowerBundle
from serving.triton_item_tower import TritonItemTower
from towers.embedding_cache import content_key
from towers.image_encoder import PhotoEmbedder, uncached_images
from towers.item_content import ItemContentEncoder, uncached_texts

if TYPE_CHECKING:
    from serving.rail_service import LoadedRails

log = get_logger(__name__)

# The fields of a record that describe a listing (an item_upsert's content).
LISTING_FIELDS = ("title", "description", "category_path", "brand", "image_path")
# What the item tower reads of a listing (text of title, category and brand; price band;
# the photo, where the bundle ships an image encoder).
ENCODED_FIELDS = ("title", "category_path", "brand", "price", "image_path")
# How many item ids a log line of a batch names.
LOGGED_IDS = 10


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
        self._log_photos_left_out(rows, features.has_image.numpy())
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

    def _log_photos_left_out(self, rows: pd.DataFrame, has_image: np.ndarray) -> None:
        """Say why a listing's photo did not reach the tower (it gets "no image" instead)."""
        if "image_path" not in rows.columns:
            return
        left_out: dict[str, list[str]] = {}
        for item_id, path, used in zip(rows["item_id"], rows["image_path"], has_image, strict=True):
            if isinstance(path, str) and path and not used:
                left_out.setdefault(self._why_not(path), []).append(str(item_id))
        for reason, items in left_out.items():
            log.warning(
                "listing photo not used; encoded with the 'no image' input",
                reason=reason,
                count=len(items),
                items=items[:LOGGED_IDS],
            )

    def _why_not(self, path: str) -> str:
        if self.encoder is None or self.encoder.photos is None:
            return "the model's bundle ships no image encoder"
        return "photo unreadable" if Path(path).is_file() else "photo file not found"


def new_items_for(towers: TowerBundle | None, settings: Settings) -> NewItems | None:
    """The new-item encoder of a model with towers, loaded now (at model load, never on a
    request or a catalogue sync); None without towers or with `serving.encode_new_items`
    off (new items then get attributes but no vector: the towers cannot retrieve them). A
    text model that cannot load leaves the encoder out the same way (logged)."""
    if towers is None or not settings.serving.encode_new_items:
        return None
    try:
        texts = uncached_texts(settings.text.model_path, settings.text.batch_size)
        encoder = ItemContentEncoder(
            towers.folder / ITEM_TOWER, towers.featurizer, texts, _photos_of(towers)
        )
    except Exception as exc:  # noqa: BLE001 - serving goes on; new items are not retrievable
        log.error("item-content encoder not loaded; new items get no vector", error=str(exc))
        return NewItems(None)
    s = settings.serving
    if not (s.triton_url and towers.triton_item_version):
        return NewItems(encoder)
    triton = TritonItemTower(s.triton_url, s.triton_item_model, s.triton_item_timeout_s)
    return NewItems(encoder, triton, towers.triton_item_version)


def _photos_of(towers: TowerBundle) -> PhotoEmbedder | None:
    """The image encoder the bundle ships, loaded now; None when it ships none (trained
    without photos) or it does not load (logged: new items are then encoded without their
    photos, not left out)."""
    image = towers.image
    if image is None or image.weights_path is None:
        return None
    try:
        return uncached_images(image, image.weights_path)
    except Exception as exc:  # noqa: BLE001 - text and ids still place a new item
        log.error("image encoder not loaded; new items are encoded without photos", error=str(exc))
        return None


def apply_record(loaded: LoadedRails, item_id: str, record: Mapping[str, object]) -> bool:
    """Apply one catalogue record (or one message's fields) to `loaded`.

    Returns False when the model neither knows the item nor gets a listing for it (a price
    or stock change of an item it cannot recommend anyway).
    """
    return apply_records(loaded, {item_id: record}) == 1


def apply_records(loaded: LoadedRails, records: Mapping[str, Mapping[str, object]]) -> int:
    """Apply many catalogue records (item -> record: a sync, a replay) to `loaded`: each
    record's attributes, then every new listing among them encoded in one batch and added
    to the delta index by one swap. Returns how many records the model applied."""
    applied, listings = 0, {}  # type: tuple[int, dict[str, Mapping[str, object]]]
    for item_id, record in records.items():
        outcome = _apply_attributes(loaded, item_id, record)
        applied += outcome is not None
        if outcome or (outcome is False and has_listing(record)):
            # new, or known without a trained vector (see the module docstring):
            # index_new_items encodes only items the towers lack
            listings[item_id] = record
    index_new_items(loaded, listings)
    return applied


def _apply_attributes(
    loaded: LoadedRails, item_id: str, record: Mapping[str, object]
) -> bool | None:
    """One record's attributes, titles, shelves and price statistics; True when it lists a
    new item (to be indexed), False when it updates a known one, None when neither."""
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
        return None
    if price is not None:
        # the re-ranker's price features read the item statistics: keep them current too
        # (an item listed after training has no statistics row: its features are missing)
        stats = loaded.pipeline.stats
        row = stats.row.get(item_id)
        if row is not None:
            stats.price[row] = price
    return listed


def index_new_items(loaded: LoadedRails, listings: Mapping[str, Mapping[str, object]]) -> int:
    """Encode new items' content with the model's item tower in one batch and put them into
    the model's delta index by one copy-on-write swap; returns how many it (re-)encoded.

    Nothing happens without towers or an encoder, for an item the bundle already has a
    vector for, or for one whose content (photo file included) was encoded before.
    """
    towers, new = loaded.towers, getattr(loaded, "new_items", None)
    if towers is None or new is None or new.encoder is None or not listings:
        return 0
    photos = new.encoder.photos is not None
    contents = {
        item_id: _content(record)
        for item_id, record in listings.items()
        if item_id not in towers.item_row
    }
    keys = {item_id: _content_key(content, photos) for item_id, content in contents.items()}
    with new.lock:
        todo = [item_id for item_id, key in keys.items() if new.encoded.get(item_id) != key]
        if not todo:
            return 0
        rows = pd.DataFrame([{"item_id": item_id, **contents[item_id]} for item_id in todo])
        ids, vectors = _encode_batch(new, rows)
        if not ids:
            return 0
        try:
            index = towers.index
            base = index if isinstance(index, DeltaIndex) else DeltaIndex(index)
            # built aside, then one assignment: readers see the old index or the whole new one
            towers.index = base.with_items(np.array(ids, dtype=str), vectors)
        except Exception as exc:  # noqa: BLE001 - a listing must not stop a sync or a load
            # not recorded as encoded: the next sync of the hash tries again
            log.error("new items not indexed", count=len(ids), error=f"{type(exc).__name__}: {exc}")
            return 0
        new.encoded.update({item_id: keys[item_id] for item_id in ids})
    log.info("new items indexed", count=len(ids), items=ids[:LOGGED_IDS], model=loaded.version)
    return len(ids)


def _encode_batch(new: NewItems, rows: pd.DataFrame) -> tuple[list[str], np.ndarray]:
    """The ids encoded and their (M, D) vectors: the whole batch in one call; when that
    fails, item by item, so one bad listing does not keep the others out of the index."""
    ids = rows["item_id"].astype(str).tolist()
    try:
        return ids, new.encode(rows)
    except Exception as exc:  # noqa: BLE001 - retried item by item below
        log.error(
            "new items not encoded as a batch", count=len(ids), error=f"{type(exc).__name__}: {exc}"
        )
        if len(ids) == 1:  # not recorded as encoded: the next sync tries again
            return [], np.zeros((0, 0), np.float32)
    kept, vectors = [], []
    for i, item_id in enumerate(ids):
        try:
            vectors.append(new.encode(rows.iloc[[i]].reset_index(drop=True)))
        except Exception as exc:  # noqa: BLE001 - this listing waits for the next sync
            log.error("new item not encoded", item=item_id, error=f"{type(exc).__name__}: {exc}")
            continue
        kept.append(item_id)
    return kept, np.concatenate(vectors) if vectors else np.zeros((0, 0), np.float32)


def _content(record: Mapping[str, object]) -> dict[str, object]:
    content = {f: record.get(f) for f in ENCODED_FIELDS}
    if content["price"] is not None:  # Redis's JSON writes 2.0 as 2: one key for both
        content["price"] = float(content["price"])  # type: ignore[arg-type]
    return content


def _content_key(content: Mapping[str, object], photos: bool) -> str:
    """What decides an item's vector. With an image encoder that includes the photo file's
    size and mtime: a photo that appears, or is replaced, under the same path is encoded."""
    photo = _photo_stamp(content.get("image_path")) if photos else None
    blob = orjson.dumps({**content, "photo": photo}, option=orjson.OPT_SORT_KEYS)
    return content_key(blob)


def _photo_stamp(path: object) -> list[int] | None:
    if not isinstance(path, str) or not path:
        return None
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]
