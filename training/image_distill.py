"""Distil a small ViT into the frozen MiniLM text space, using the catalogue's own photos.

No pretrained image weights can be downloaded, so the text encoder is the teacher: each photo's
embedding is pulled toward the MiniLM embedding of its item's text (title, category path,
description) and pushed away from the other texts in the batch (symmetric InfoNCE). The result
is an image embedding that lives in the same 384-d space as the text branch of the item tower.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from tqdm.auto import tqdm

from railtower.logs import get_logger
from railtower.manifest import Manifest, library_versions, now_iso
from railtower.settings import ImageSettings, Settings
from towers.image_encoder import ImageEmbedder, embed_images, load_images, normalise
from towers.text_encoder import TextEncoder

log = get_logger(__name__)

# AdamW weight decay, warm-up share of the steps and gradient-norm clip: usual ViT values.
WEIGHT_DECAY = 0.05
WARMUP_SHARE = 0.05
MAX_GRAD_NORM = 1.0
# Random resized crop keeps most of the garment: the product type must stay visible.
CROP_SCALE = (0.8, 1.0)
CROP_RATIO = (0.9, 1.1)


@dataclass(frozen=True)
class PhotoTextPairs:
    """Decoded photos and the teacher's text vectors of the same items, row-aligned.

    images: (N, 3, S, S) uint8; text: (N, D) float32 unit vectors; text_groups: (N,) int64,
    equal for items whose texts are identical (colour variants), so they are not negatives.
    """

    item_ids: list[str]
    images: torch.Tensor
    text: torch.Tensor
    text_groups: torch.Tensor

    def __len__(self) -> int:
        return len(self.item_ids)


def item_texts(items: pd.DataFrame) -> list[str]:
    """The teacher's input per item: title, category path and description, joined by '. '."""
    columns = [c for c in ("title", "category_path", "description") if c in items.columns]
    parts = items[columns].astype("string").fillna("")
    return [
        ". ".join(p.strip() for p in row if p.strip())
        for row in parts.itertuples(index=False, name=None)
    ]


def split_items(items: pd.DataFrame, settings: Settings) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The items distillation uses, as (train, validation), both seeded.

    Usable items have an image path and a non-empty text; `image.max_images` caps them (a
    seeded sample). Validation takes whole product groups until it holds
    `image.validation_share` of the items, so colour variants of one product never sit on
    both sides.

    Raises:
        ValueError: no image_path column, or fewer than two product groups to split.
    """
    cfg = settings.image
    if "image_path" not in items.columns:
        raise ValueError("items need an image_path column (map one in the data set's YAML)")
    has_text = np.array([bool(t) for t in item_texts(items)], dtype=bool)
    usable = items[items["image_path"].notna().to_numpy() & has_text]
    rng = np.random.default_rng(settings.seed)
    if cfg.max_images and len(usable) > cfg.max_images:
        usable = usable.iloc[np.sort(rng.choice(len(usable), cfg.max_images, replace=False))]
    # Items without a product group are groups of their own.
    ids = usable["item_id"].astype("string")
    groups = usable["product_group"].astype("string") if "product_group" in usable else ids
    groups = groups.fillna(ids)
    sizes = groups.value_counts()
    if len(sizes) < 2:
        raise ValueError(f"need at least two product groups with photos, got {len(sizes)}")
    order = rng.permutation(np.array(sorted(sizes.index), dtype=object))
    filled = sizes.reindex(order).cumsum().to_numpy()
    n_groups = int(np.searchsorted(filled, cfg.validation_share * len(usable))) + 1
    held = groups.isin(set(order[: min(n_groups, len(order) - 1)])).to_numpy()
    return usable[~held], usable[held]


def info_nce(
    image_vectors: torch.Tensor,
    text_vectors: torch.Tensor,
    text_groups: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Symmetric InfoNCE (image→text and text→image) over in-batch negatives.

    Args:
        image_vectors: (B, D) float32 unit vectors.
        text_vectors: (B, D) float32 unit vectors of the same items, row-aligned.
        text_groups: (B,) int64; equal ids mark identical texts.
        temperature: softmax temperature.
    Returns:
        () float32, the mean of both directions' cross-entropy.
    """
    logits = image_vectors @ text_vectors.T / temperature
    # Colour variants share one text: that pair is not a negative, so it leaves both softmaxes.
    same = text_groups[:, None] == text_groups[None, :]
    same.fill_diagonal_(False)
    logits = logits.masked_fill(same, float("-inf"))
    target = torch.arange(len(logits))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def augment(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) uint8 → the same, each flipped and cropped at random on its own."""
    transform = _augmenter(images.shape[-1])
    return torch.stack([transform(image) for image in images])


@lru_cache(maxsize=4)
def _augmenter(image_size: int) -> v2.Compose:
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(),
            v2.RandomResizedCrop(image_size, scale=CROP_SCALE, ratio=CROP_RATIO, antialias=True),
        ]
    )


def distill_image_encoder(settings: Settings, items: pd.DataFrame) -> Path:
    """Train ViT + projection so photos embed next to their item's MiniLM text; save a bundle.

    Args:
        settings: `image` gives the model and schedule, `text` the teacher, `artifacts_dir`
            where the bundle goes, `seed` the split, initialisation and augmentation.
        items: canonical catalogue (item_id, title, description, category_path, image_path,
            product_group).
    Returns:
        `<artifacts_dir>/image_encoder/<version>/weights.pt`, a state_dict of
        `towers.image_encoder.ImageEmbedder`, with `manifest.json` beside it; set
        `image.weights_path` to it for `ImageEncoder`.
    Raises:
        ValueError: too few usable photos to train on.
    """
    cfg = settings.image
    torch.manual_seed(settings.seed)
    train_items, validation_items = split_items(items, settings)
    teacher = TextEncoder(settings.text.model_path, settings.cache_dir, settings.text.batch_size)
    train = _pairs(train_items, teacher, cfg)
    validation = _pairs(validation_items, teacher, cfg)
    if len(train) < 2:
        raise ValueError(f"need at least 2 readable photos with text to distil, got {len(train)}")
    log.info("distilling image encoder", train=len(train), validation=len(validation))

    model = ImageEmbedder(cfg, dim=int(train.text.shape[1]))
    metrics = _fit(model, train, validation, cfg)
    return _save(model, settings, metrics)


def _pairs(items: pd.DataFrame, teacher: TextEncoder, cfg: ImageSettings) -> PhotoTextPairs:
    images, readable = load_images(items["image_path"].astype(str).tolist(), cfg.image_size)
    if not readable.all():
        log.warning("unreadable photos skipped", count=int((~readable).sum()))
    texts = [t for t, ok in zip(item_texts(items), readable, strict=True) if ok]
    _, groups = np.unique(np.array(texts, dtype=object), return_inverse=True)
    return PhotoTextPairs(
        item_ids=items["item_id"].astype(str)[readable].tolist(),
        images=images,
        text=torch.from_numpy(teacher.encode(texts)) if texts else torch.zeros((0, 1)),
        text_groups=torch.from_numpy(groups.astype(np.int64)),
    )


def _fit(
    model: ImageEmbedder, train: PhotoTextPairs, validation: PhotoTextPairs, cfg: ImageSettings
) -> dict[str, float | int]:
    batch = min(cfg.batch_size, len(train))
    # Drop the ragged last batch: a batch of one has no negatives.
    steps_per_epoch = len(train) // batch
    total_steps = cfg.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.learning_rate, weight_decay=WEIGHT_DECAY
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(total_steps))
    metrics: dict[str, float | int] = {
        "train_items": len(train),
        "validation_items": len(validation),
    }
    seconds, seen = 0.0, 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = torch.randperm(len(train))
        losses = []
        started = time.perf_counter()
        bar = tqdm(range(steps_per_epoch), desc=f"distil {epoch}/{cfg.epochs}", unit="batch")
        for step in bar:
            rows = order[step * batch : (step + 1) * batch]
            images = normalise(augment(train.images[rows]), cfg)
            loss = info_nce(
                model(images), train.text[rows], train.text_groups[rows], cfg.temperature
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        seconds += time.perf_counter() - started
        seen += steps_per_epoch * batch
        scores = _validate(model, validation, cfg)
        log.info("distil epoch", epoch=epoch, train_loss=round(float(np.mean(losses)), 4), **scores)
        metrics.update(train_loss=float(np.mean(losses)), **scores)
    metrics.update(
        epochs=cfg.epochs,
        train_seconds=round(seconds, 2),
        train_images_per_s=round(seen / seconds, 2) if seconds else 0.0,
    )
    return metrics


def _warmup_cosine(total_steps: int):  # type: ignore[no-untyped-def]
    warmup = max(1, int(WARMUP_SHARE * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _validate(
    model: ImageEmbedder, validation: PhotoTextPairs, cfg: ImageSettings
) -> dict[str, float]:
    """Photo→text retrieval among the held-out items: recall@1 and @10 of the item's own text."""
    if len(validation) < 2:
        return {}
    images = torch.from_numpy(embed_images(model, validation.images, cfg))
    scores = images @ validation.text.T
    top = scores.topk(min(10, len(validation)), dim=1).indices
    # Identical texts count as the own text: they cannot be told apart by the teacher either.
    hit = validation.text_groups[top] == validation.text_groups[:, None]
    return {
        "val_text_recall@1": round(float(hit[:, 0].float().mean()), 4),
        "val_text_recall@10": round(float(hit.any(dim=1).float().mean()), 4),
    }


def _save(model: ImageEmbedder, settings: Settings, metrics: dict[str, float | int]) -> Path:
    # No git call here: the settings fingerprint identifies what was trained.
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    version = f"image-{stamp}-{settings.fingerprint()[:8]}"
    root = settings.artifacts_dir / "image_encoder"
    folder, n = root / version, 1
    while folder.exists():
        folder, n = root / f"{version}-{n}", n + 1
    folder.mkdir(parents=True)
    weights = folder / "weights.pt"
    torch.save(model.state_dict(), weights)
    Manifest(
        kind="bundle",
        version=folder.name,
        created_at=now_iso(),
        git_commit=None,
        settings_fingerprint=settings.fingerprint(),
        metrics={**metrics, "dim": model.dim},
        libraries=library_versions(),
    ).write(folder)
    log.info("image encoder saved", path=str(weights), **metrics)
    return weights
