"""ViT embeddings of item photos, loaded from a local weights file, cached by content.

One preprocessing serves training and encoding alike: decode → RGB → letterbox onto white →
resize to `image_size` → (3, S, S) uint8, then `normalise` with the architecture's mean/std.
Training augments the uint8 tensors between the two steps; encoding does not. Training
encodes catalogue photos through `ImageEncoder` (content-cached); serving encodes a new
listing's photo through `uncached_images` with the weights its tower bundle ships: the same
decode, model and batching, no cache.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from railtower.errors import ConfigError
from railtower.logs import get_logger
from railtower.manifest import MANIFEST, Manifest
from railtower.settings import ImageSettings
from towers.embedding_cache import EmbeddingCache, content_key
from towers.text_encoder import TEXT_DIM

log = get_logger(__name__)

# Product photos sit on white; padding with white keeps the letterbox invisible to the model.
PAD_COLOUR = (255, 255, 255)
# Bump when preprocessing changes, so cached vectors of the old preprocessing are not served.
PREPROCESS_VERSION = 1


def build_vit(settings: ImageSettings) -> nn.Module:
    """A randomly initialised timm backbone without classifier: (B, 3, S, S) → (B, F)."""
    return timm.create_model(
        settings.architecture,
        pretrained=False,
        num_classes=0,
        img_size=settings.image_size,
        patch_size=settings.patch_size,
    )


class ImageEmbedder(nn.Module):
    """ViT backbone plus an optional linear projection; L2-normalised output.

    The distilled model projects into the 384-d MiniLM text space (`dim=TEXT_DIM`); a plain
    timm backbone (`dim=None`) returns its own normalised features.

    Args:
        settings: architecture, image size and patch size of the backbone.
        dim: output dimension of the projection, or None for none.

    Example:
        >>> model = ImageEmbedder(ImageSettings(image_size=32, patch_size=8))
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 384])
    """

    def __init__(self, settings: ImageSettings, dim: int | None = TEXT_DIM) -> None:
        super().__init__()
        self.backbone = build_vit(settings)
        features = int(self.backbone.num_features)
        self.projection: nn.Module = nn.Linear(features, dim) if dim else nn.Identity()
        self.dim = dim or features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) float32, normalised pixels → (B, dim) float32, unit length."""
        return F.normalize(self.projection(self.backbone(images)), dim=-1)


# ---------------------------------------------------------------- preprocessing


def decode_image(data: bytes, image_size: int) -> torch.Tensor | None:
    """(3, S, S) uint8: the photo letterboxed onto white and resized; None when undecodable."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            image = opened.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    # Pad to a square first so every photo keeps its aspect ratio (H&M photos are ~2:3).
    side = max(image.size)
    square = Image.new("RGB", (side, side), PAD_COLOUR)
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    resized = square.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).contiguous()


def read_image(path: str | Path, image_size: int) -> torch.Tensor | None:
    """`decode_image` of a file; None when it is missing or unreadable."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    return decode_image(data, image_size)


def load_images(paths: list[str], image_size: int) -> tuple[torch.Tensor, np.ndarray]:
    """Decode many files: ((M, 3, S, S) uint8 of the readable ones, (N,) bool readable mask)."""
    decoded = [read_image(p, image_size) for p in paths]
    readable = np.array([d is not None for d in decoded], dtype=bool)
    kept = [d for d in decoded if d is not None]
    if not kept:
        return torch.zeros((0, 3, image_size, image_size), dtype=torch.uint8), readable
    return torch.stack(kept), readable


@lru_cache(maxsize=8)
def _mean_std(architecture: str) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = timm.get_pretrained_cfg(architecture)
    mean = cfg.mean if cfg is not None else (0.5, 0.5, 0.5)
    std = cfg.std if cfg is not None else (0.5, 0.5, 0.5)
    return torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)


def normalise(images: torch.Tensor, settings: ImageSettings) -> torch.Tensor:
    """(B, 3, S, S) uint8 → float32 scaled with the architecture's pretrained mean and std."""
    mean, std = _mean_std(settings.architecture)
    return (images.float() / 255.0 - mean) / std


def preprocess(path: str | Path, settings: ImageSettings) -> torch.Tensor | None:
    """(3, S, S) float32 model input of one file, as encoding sees it; None if unreadable."""
    image = read_image(path, settings.image_size)
    return None if image is None else normalise(image[None], settings)[0]


@torch.inference_mode()
def embed_images(model: nn.Module, images: torch.Tensor, settings: ImageSettings) -> np.ndarray:
    """(N, 3, S, S) uint8 → (N, D) float32 unit vectors, in batches of `settings.batch_size`."""
    model.eval()
    out = [
        model(normalise(images[start : start + settings.batch_size], settings))
        for start in range(0, len(images), settings.batch_size)
    ]
    return torch.cat(out).numpy().astype(np.float32) if out else np.zeros((0, 0), np.float32)


# ---------------------------------------------------------------- weights


def load_image_embedder(settings: ImageSettings, weights_path: Path) -> ImageEmbedder:
    """An ImageEmbedder holding the weights of a distilled checkpoint or a timm state_dict.

    A distilled checkpoint (keys `backbone.*` and `projection.*`) keeps its projection into
    the text space; a timm state_dict fills the backbone only (its pos/patch embeddings are
    resampled to `image_size` / `patch_size`) and the output is the backbone's features.

    Raises:
        ConfigError: the file is missing, not a state_dict, or does not fit the settings.
    """
    if not weights_path.is_file():
        raise ConfigError(f"image.weights_path {weights_path} does not exist")
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is one config problem
        raise ConfigError(
            f"image.weights_path {weights_path} is not a torch state_dict: {exc}"
        ) from None
    if not isinstance(state, dict):
        raise ConfigError(f"image.weights_path {weights_path} holds a {type(state).__name__}")
    if "projection.weight" in state:
        model = ImageEmbedder(settings, dim=int(state["projection.weight"].shape[0]))
    else:
        model = ImageEmbedder(settings, dim=None)
        state = {f"backbone.{k}": v for k, v in _timm_backbone_state(state, model).items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(
            f"weights {weights_path} do not fit image settings (architecture "
            f"{settings.architecture}, image_size {settings.image_size}, patch_size "
            f"{settings.patch_size}); use the settings they were trained with. {exc}"
        ) from None
    return model.eval()


def _timm_backbone_state(state: dict, model: ImageEmbedder) -> dict:
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    # A pretrained ViT has other pos/patch embedding sizes; timm's own filter resamples them.
    if isinstance(model.backbone, VisionTransformer):
        state = checkpoint_filter_fn(state, model.backbone)
    # The classifier is not part of an encoder built with num_classes=0.
    return {k: v for k, v in state.items() if not k.startswith("head.")}


# ---------------------------------------------------------------- encoder

# photo paths -> ((N, D) float32 unit vectors, zero rows where unreadable; (N,) bool has_image)
PhotoEmbedder = Callable[[Sequence[str | None]], tuple[np.ndarray, np.ndarray]]


def uncached_images(settings: ImageSettings, weights_path: Path) -> PhotoEmbedder:
    """Photo embeddings straight from `weights_path` (loaded now, once per model load), with
    no embedding-cache reads or writes: what an API process uses for a new listing's photo.

    The same decode, normalisation and batching as `ImageEncoder.encode`, so a photo gets the
    vector training gave it. Raises ConfigError as `load_image_embedder` does.
    """
    model = load_image_embedder(settings, weights_path)

    def embed(paths: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
        blobs = [_read_bytes(p) for p in paths]
        decoded = [None if b is None else decode_image(b, settings.image_size) for b in blobs]
        has_image = np.array([d is not None for d in decoded], dtype=bool)
        vectors = np.zeros((len(paths), model.dim), np.float32)
        if has_image.any():
            images = torch.stack([d for d in decoded if d is not None])
            vectors[has_image] = embed_images(model, images, settings)
        return vectors, has_image

    return embed


class ImageEncoder:
    """Encodes item photos with a local ViT, never touching a hub; vectors cached by content.

    The cache namespace holds the weights file's hash and the preprocessing, so new weights
    never serve stale vectors. Missing, None or unreadable images get a zero row and
    `has_image` False (the item tower learns a "no image" vector for them).

    Args:
        settings: the `image` section; `weights_path` must name a local weights file.
        cache_dir: folder of the embedding caches.

    Example:
        >>> enc = ImageEncoder(settings.image, settings.cache_dir)
        >>> vectors, has_image = enc.encode(["/data/0111565001.jpg", None])
        >>> vectors.shape, has_image.tolist()
        ((2, 384), [True, False])
    """

    def __init__(self, settings: ImageSettings, cache_dir: Path) -> None:
        if settings.weights_path is None:
            raise ConfigError(
                "image.weights_path is not set: distil an image encoder first "
                "(training.image_distill.distill_image_encoder, or "
                "`python benchmarks/image_encoder.py`), then set image.weights_path "
                "(or RAILTOWER_IMAGE__WEIGHTS_PATH) to the weights.pt it writes"
            )
        weights_path = Path(settings.weights_path)
        # A distilled bundle carries a manifest; refuse weights that differ from it.
        if (weights_path.parent / MANIFEST).exists():
            Manifest.load(weights_path.parent, verify=True)
        self.settings = settings
        self.model = load_image_embedder(settings, weights_path)
        self.dim = self.model.dim
        weights_key = content_key(weights_path.read_bytes())[:12]
        namespace = (
            f"image-{settings.architecture}-{settings.image_size}-{settings.patch_size}"
            f"-p{PREPROCESS_VERSION}-{weights_key}"
        )
        self.cache = EmbeddingCache(cache_dir, namespace, self.dim)

    def encode(self, paths: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
        """(N, D) float32 unit vectors (zeros where there is no image) and (N,) bool has_image."""
        # Read every file once: its bytes are both the cache key and the model input.
        blobs: list[bytes | None] = [_read_bytes(p) for p in paths]
        keys = [content_key(b) if b is not None else None for b in blobs]
        present = [k for k in keys if k is not None]
        todo = self.cache.missing(present)
        if todo:
            by_key = {k: b for k, b in zip(keys, blobs, strict=True) if k is not None}
            self._encode_missing(todo, by_key)
        vectors = np.zeros((len(paths), self.dim), dtype=np.float32)
        rows = [i for i, k in enumerate(keys) if k is not None]
        if rows:
            vectors[rows] = self.cache.get(present)
        # Undecodable bytes are cached as zero rows, so the mask comes from the vectors.
        has_image = np.linalg.norm(vectors, axis=1) > 0
        return vectors, has_image

    def _encode_missing(self, todo: list[str], by_key: dict[str, bytes | None]) -> None:
        decoded = [decode_image(by_key[k] or b"", self.settings.image_size) for k in todo]
        ok = [i for i, d in enumerate(decoded) if d is not None]
        bad = [todo[i] for i, d in enumerate(decoded) if d is None]
        log.info("encoding images", count=len(ok), unreadable=len(bad), cached=len(self.cache))
        if ok:
            images = torch.stack([decoded[i] for i in ok])  # type: ignore[misc]
            self.cache.put([todo[i] for i in ok], embed_images(self.model, images, self.settings))
        if bad:
            self.cache.put(bad, np.zeros((len(bad), self.dim), np.float32))
        self.cache.save()


def _read_bytes(path: object) -> bytes | None:
    if not isinstance(path, str | Path) or not str(path):
        return None
    try:
        return Path(path).read_bytes()
    except OSError:
        return None
