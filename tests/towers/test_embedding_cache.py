"""The embedding cache's save is safe when several writers share its folder."""

from __future__ import annotations

import threading

import numpy as np

from towers.embedding_cache import EmbeddingCache


def test_writers_sharing_a_folder_never_rename_each_others_files(tmp_path):
    # Two trainings started at once share the cache folder; with one fixed temporary name
    # one writer renamed the other's file away (FileNotFoundError in CI's DDP test).
    errors: list[BaseException] = []

    def write(seed: int) -> None:
        cache = EmbeddingCache(tmp_path, "text-x", 4)
        keys = [f"k{i}" for i in range(50)]
        cache.put(keys, np.random.default_rng(seed).standard_normal((50, 4)))
        try:
            for _ in range(40):
                cache.save()
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    reread = EmbeddingCache(tmp_path, "text-x", 4)
    assert len(reread) == 50  # one writer's complete keys and vectors
    assert not list((tmp_path / "text-x").glob("*.tmp.npy"))
