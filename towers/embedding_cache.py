"""A content-addressed cache of precomputed embeddings (text, image).

Keys are hashes of the encoder's input (the text, the image bytes) plus the encoder's
identity, so a second run re-encodes only what changed, and a changed model never serves
stale vectors.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import numpy as np


def content_key(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


class EmbeddingCache:
    """Vectors by content key, stored as two .npy files under `folder/<namespace>/`."""

    def __init__(self, folder: Path, namespace: str, dim: int) -> None:
        self.path = folder / namespace
        self.dim = dim
        self._vectors: dict[str, np.ndarray] = {}
        keys_file, vectors_file = self.path / "keys.npy", self.path / "vectors.npy"
        if keys_file.exists() and vectors_file.exists():
            keys = np.load(keys_file, allow_pickle=False)
            vectors = np.load(vectors_file, allow_pickle=False)
            if vectors.ndim == 2 and vectors.shape[1] == dim and len(keys) == len(vectors):
                self._vectors = dict(zip(keys.tolist(), vectors, strict=True))

    def __len__(self) -> int:
        return len(self._vectors)

    def missing(self, keys: list[str]) -> list[str]:
        """Keys not cached yet, each once, in first-seen order."""
        return [k for k in dict.fromkeys(keys) if k not in self._vectors]

    def put(self, keys: list[str], vectors: np.ndarray) -> None:
        if vectors.shape != (len(keys), self.dim):
            raise ValueError(f"expected ({len(keys)}, {self.dim}) vectors, got {vectors.shape}")
        self._vectors.update(zip(keys, vectors.astype(np.float32), strict=True))

    def get(self, keys: list[str]) -> np.ndarray:
        """(N, dim) float32 for keys that are all cached."""
        if not keys:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._vectors[k] for k in keys]).astype(np.float32)

    def save(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        keys = np.array(list(self._vectors), dtype="U32")
        vectors = (
            np.stack(list(self._vectors.values()))
            if self._vectors
            else np.zeros((0, self.dim), np.float32)
        )
        # Write-then-rename so a crash mid-save never leaves a half-written cache; the
        # temporary name is the writer's own, so processes that share the cache folder (two
        # trainings started at once) never rename each other's file away. A reader that
        # finds keys and vectors of different writers sees unequal lengths and starts empty.
        writer = f"{os.getpid()}-{threading.get_ident()}"
        for name, array in (("keys", keys), ("vectors", vectors)):
            tmp = self.path / f"{name}.{writer}.tmp.npy"
            np.save(tmp, array, allow_pickle=False)
            tmp.replace(self.path / f"{name}.npy")
