"""Load a trained bundle (`artifacts/<version>/`) through its manifest, never loose files.

A bundle holds the exported user tower (TorchScript, with the catalogue's item vectors
inside), the item tower (for new items), the item vectors, the HNSW index and the item
featurizer's state; a bundle trained on photos also ships the image encoder that embedded
them (`image_encoder.pt`, its settings in `towers.json`), so a new item's photo is embedded
by the same weights wherever the bundle is served. Loading verifies every file hash and the
feature-spec hash of the running code, so a corrupt or mismatched bundle is refused with a
clear error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import torch

from railtower.errors import ArtifactMismatch
from railtower.manifest import Manifest
from railtower.settings import ImageSettings, TowerSettings
from ranking.ann import DeltaIndex, HnswIndex, load_index
from towers.item_features import ItemFeaturizer, item_feature_specs, spec_hash
from towers.session_features import HistoryEvent, collate, session_features

SESSION_ENCODER = "session_encoder.pt"
ITEM_TOWER = "item_tower.pt"
ITEM_VECTORS = "item_vectors.npy"
ITEM_IDS = "item_ids.npy"
FEATURIZER = "featurizer.json"
TOWERS = "towers.json"
INDEX_DIR = "index"
IMAGE_ENCODER = "image_encoder.pt"
# the ImageSettings fields that decide a photo's vector (recorded beside the weights)
IMAGE_FIELDS = ("architecture", "image_size", "patch_size")


@dataclass
class TowerBundle:
    folder: Path
    manifest: Manifest
    towers: TowerSettings
    has_time: bool
    item_ids: np.ndarray
    item_row: dict[str, int]
    item_vectors: np.ndarray
    session_encoder: torch.jit.ScriptModule
    # the trained HNSW graph; a DeltaIndex around it once items are listed after training
    index: HnswIndex | DeltaIndex
    featurizer: ItemFeaturizer
    # the Triton user-tower version exported from this bundle ("" = none recorded)
    triton_version: str = ""
    # the Triton item-tower version exported from this bundle ("" = none recorded)
    triton_item_version: str = ""
    # the image encoder the item tower was trained with, weights_path inside the bundle
    # (None: trained without photos, or exported before bundles shipped it)
    image: ImageSettings | None = None

    @property
    def version(self) -> str:
        return self.manifest.version

    @classmethod
    def load(cls, folder: Path) -> TowerBundle:
        """Load and verify a bundle folder.

        Raises:
            ArtifactMismatch: a file is missing or altered, or the bundle's feature
                definition differs from this code's.
        """
        manifest = Manifest.load(folder, verify=True)
        meta = orjson.loads((folder / TOWERS).read_bytes())
        towers = TowerSettings.model_validate(meta["towers"])
        expected = spec_hash(item_feature_specs(towers))
        if meta.get("feature_spec") != expected:
            raise ArtifactMismatch(
                f"{folder} was built with item feature spec {meta.get('feature_spec')}, this "
                f"code has {expected}; retrain the bundle with this version"
            )
        ids = np.load(folder / ITEM_IDS, allow_pickle=False)
        index = load_index(folder / INDEX_DIR)
        if not isinstance(index, HnswIndex):
            raise ArtifactMismatch(f"{folder / INDEX_DIR} is not an HNSW index")
        encoder = torch.jit.load(str(folder / SESSION_ENCODER), map_location="cpu")
        encoder.eval()
        featurizer = ItemFeaturizer.from_state(
            orjson.loads((folder / FEATURIZER).read_bytes()), towers
        )
        return cls(
            folder,
            manifest,
            towers,
            bool(meta["has_time"]),
            ids,
            {item: i for i, item in enumerate(ids.tolist())},
            np.load(folder / ITEM_VECTORS, allow_pickle=False),
            encoder,
            index,
            featurizer,
            str(meta.get("triton", {}).get("version", "")),
            str(meta.get("triton", {}).get("item_version", "")),
            _image_settings(folder, meta.get("image")),
        )

    def pair_weights(self, seeds: Sequence[str], items: Sequence[str]) -> np.ndarray:
        """(len(seeds), len(items)) cosine of each item's vector with each seed's (the
        vectors are L2-normalised); NaN where the bundle has no vector for either."""
        seed_rows = np.array([self.item_row.get(i, -1) for i in seeds], dtype=np.int64)
        item_rows = np.array([self.item_row.get(i, -1) for i in items], dtype=np.int64)
        vectors = self.item_vectors
        out = vectors[np.maximum(seed_rows, 0)] @ vectors[np.maximum(item_rows, 0)].T
        out[seed_rows < 0] = np.nan
        out[:, item_rows < 0] = np.nan
        return out

    def session_inputs(
        self, histories: Sequence[Sequence[HistoryEvent]], contexts: Sequence[str | None]
    ) -> dict[str, torch.Tensor]:
        """The session encoder's (B, L) / (B,) int64 inputs, built as training built them."""
        feats = [
            session_features(h, self.item_row, self.towers.max_history, self.has_time, c)
            for h, c in zip(histories, contexts, strict=True)
        ]
        return collate(feats)

    def encode_inputs(self, inputs: dict[str, torch.Tensor]) -> np.ndarray:
        """(B, D) float32 session vectors from prepared inputs (the in-process encoder)."""
        with torch.inference_mode():
            out = self.session_encoder(
                inputs["items"], inputs["types"], inputs["ages"], inputs["hour"], inputs["context"]
            )
        return out.numpy().astype(np.float32)

    def encode_sessions(
        self, histories: Sequence[Sequence[HistoryEvent]], contexts: Sequence[str | None]
    ) -> np.ndarray:
        """(B, D) float32 session vectors, the same way training built its inputs."""
        return self.encode_inputs(self.session_inputs(histories, contexts))


def _image_settings(folder: Path, recorded: object) -> ImageSettings | None:
    """The shipped image encoder's settings, weights_path in `folder`; None when the bundle
    records none. Raises ArtifactMismatch when it records one but lacks the weights."""
    if recorded is None:
        return None
    if not isinstance(recorded, dict) or not (folder / IMAGE_ENCODER).is_file():
        raise ArtifactMismatch(
            f"{folder / TOWERS} records an image encoder but {IMAGE_ENCODER} is missing or the "
            "record is malformed; rebuild the bundle"
        )
    fields = {f: recorded[f] for f in IMAGE_FIELDS if f in recorded}
    return ImageSettings(**fields, weights_path=(folder / IMAGE_ENCODER).resolve())
