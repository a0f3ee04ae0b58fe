"""The on-disk format of a vector index folder, and the checks that refuse a bad one.

A folder holds the data file (`hnsw.bin` or `vectors.npy`), `ids.npy` (fixed-width unicode,
loadable with `allow_pickle=False`) and `index.json` (kind, space, dim, count and, for HNSW,
M, ef_construction and the tuned ef). Every disagreement between them raises
:class:`~railtower.errors.ArtifactMismatch` naming the file and the fix.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from railtower.errors import ArtifactMismatch

META = "index.json"
IDS = "ids.npy"
HNSW_FILE = "hnsw.bin"
VECTORS_FILE = "vectors.npy"
# HnswIndex: the graph node of each item, written only when identical vectors share nodes.
NODES_FILE = "nodes.npy"
SPACE = "ip"

# hnswlib's file header: offsetLevel0, max_elements, count, size_per_element, label_offset,
# offset_data (6 x size_t), maxlevel (int), enterpoint (uint32), maxM, maxM0, M (3 x size_t),
# mult (double), ef_construction (size_t). Read before hnswlib so a bad file cannot crash it.
_HNSW_HEADER = struct.Struct("<6QiI3QdQ")


def write_folder(folder: Path, ids: np.ndarray, meta: dict[str, Any]) -> None:
    """Write ids.npy and index.json; the caller writes its data file beside them."""
    if len(ids) == 0:
        raise RuntimeError("the index is empty; call build() before save()")
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / IDS, ids, allow_pickle=False)
    (folder / META).write_text(json.dumps(meta, indent=2) + "\n")


def read_meta(folder: Path) -> dict[str, Any]:
    """index.json as a dict, or ArtifactMismatch if it is missing or not a JSON object."""
    path = folder / META
    if not path.is_file():
        raise ArtifactMismatch(f"{path} is missing; the index folder is incomplete")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactMismatch(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ArtifactMismatch(f"{path} must hold a JSON object, got {type(meta).__name__}")
    return meta


def read_folder(folder: Path, kind: str, data_file: str) -> tuple[dict[str, Any], np.ndarray]:
    """Read and cross-check index.json and ids.npy; the data file must exist."""
    missing = [name for name in (META, IDS, data_file) if not (folder / name).is_file()]
    if missing:
        raise ArtifactMismatch(f"{folder} lacks {', '.join(missing)}; rebuild or recopy the index")
    meta = read_meta(folder)
    needed = {"dim", "count"} | ({"M", "ef_construction", "ef"} if kind == "hnsw" else set())
    if meta.get("kind") != kind or meta.get("space") != SPACE or needed - meta.keys():
        raise ArtifactMismatch(
            f"{folder / META} describes kind={meta.get('kind')!r}, space={meta.get('space')!r} "
            f"with keys {sorted(meta)}; expected a {kind!r} {SPACE!r} index with {sorted(needed)}"
        )
    ids = load_npy(folder / IDS)
    if ids.shape != (meta["count"],) or ids.dtype.kind != "U":
        raise ArtifactMismatch(
            f"{folder / IDS} holds {ids.shape} {ids.dtype} but {folder / META} says "
            f"count={meta['count']} string ids; rebuild the index"
        )
    return meta, ids


def load_npy(path: Path) -> np.ndarray:
    """A .npy without pickle, or ArtifactMismatch if it is unreadable or needs pickle."""
    try:
        return np.asarray(np.load(path, allow_pickle=False))
    except (ValueError, OSError, EOFError) as exc:
        raise ArtifactMismatch(f"{path} cannot be read as a .npy without pickle: {exc}") from None


def check_hnsw_header(path: Path, meta: dict[str, Any]) -> None:
    """Compare hnswlib's own header with index.json: hnswlib itself never checks dim."""
    with path.open("rb") as fh:
        raw = fh.read(_HNSW_HEADER.size)
    if len(raw) < _HNSW_HEADER.size:
        raise ArtifactMismatch(f"{path} is truncated ({len(raw)} bytes); rebuild the index")
    fields = _HNSW_HEADER.unpack(raw)
    count, label_offset, data_offset, m, ef_construction = (
        fields[2],
        fields[4],
        fields[5],
        fields[10],
        fields[12],
    )
    found = {
        "count": count,
        "dim": (label_offset - data_offset) // np.dtype(np.float32).itemsize,
        "M": m,
        "ef_construction": ef_construction,
    }
    wrong = {key: (meta[key], value) for key, value in found.items() if meta[key] != value}
    if wrong:
        detail = ", ".join(f"{key}: json {a} vs index {b}" for key, (a, b) in wrong.items())
        raise ArtifactMismatch(f"{path} does not match {path.parent / META} ({detail})")
