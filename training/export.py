"""Write trained towers as one versioned bundle: TorchScript, vectors, index, manifest, and
the image encoder that embedded the catalogue's photos when the towers were trained on any.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import orjson
import torch

from railtower.errors import ArtifactMismatch
from railtower.manifest import DataWindow, Manifest, git_commit, library_versions, now_iso
from railtower.settings import Settings
from ranking.ann import build_hnsw
from ranking.bundle import (
    FEATURIZER,
    IMAGE_ENCODER,
    IMAGE_FIELDS,
    INDEX_DIR,
    ITEM_IDS,
    ITEM_TOWER,
    ITEM_VECTORS,
    SESSION_ENCODER,
    TOWERS,
)
from towers.item_features import item_feature_specs, spec_hash
from towers.user_tower import SessionEncoder
from training.fit_towers import TrainedTowers
from training.triton_export import export_item_tower, export_user_tower

PARITY_TOLERANCE = 1e-4


def export_session_encoder(encoder: SessionEncoder, max_history: int, path: Path) -> None:
    """Trace the session encoder to TorchScript and prove it matches the eager module.

    `nn.TransformerEncoder`'s fast path differs between calls, which fails trace's own
    check, so the check is done here on fresh inputs instead.
    """
    encoder.eval()
    gen = torch.Generator().manual_seed(0)
    n_items = encoder.item_table.shape[0]

    def sample(batch: int) -> tuple[torch.Tensor, ...]:
        items = torch.randint(0, n_items, (batch, max_history), generator=gen)
        items[:, : max_history // 2] = 0  # some padding, as real sessions have
        types = torch.where(items > 0, torch.randint(1, 5, items.shape, generator=gen), 0)
        ages = torch.where(items > 0, torch.randint(1, 10, items.shape, generator=gen), 0)
        return (
            items,
            types,
            ages,
            torch.randint(0, 25, (batch,), generator=gen),
            torch.randint(0, 1024, (batch,), generator=gen),
        )

    with torch.no_grad():
        traced = torch.jit.trace(encoder, sample(8), check_trace=False)
        probe = sample(33)
        diff = (traced(*probe) - encoder(*probe)).abs().max().item()
    if diff > PARITY_TOLERANCE:
        raise ArtifactMismatch(f"traced session encoder differs from eager by {diff:.2e}")
    traced.save(str(path))


def ship_image_encoder(trained: TrainedTowers, settings: Settings, folder: Path) -> dict | None:
    """Copy the image encoder into the bundle when the towers saw any photo; returns what
    towers.json records of it (None: trained without photos).

    Serving embeds a new listing's photo with these weights: copied, not referenced, so a
    later distillation writing other weights cannot change what this bundle's photos mean.

    Raises:
        ArtifactMismatch: photos were embedded but `image.weights_path` names no file.
    """
    if not bool(trained.features.has_image.any()):
        return None
    weights = settings.image.weights_path
    if weights is None or not Path(weights).is_file():
        raise ArtifactMismatch(
            f"the towers were trained on photos but image.weights_path {weights} is not a "
            "file: the bundle cannot ship the image encoder new items need"
        )
    shutil.copyfile(weights, folder / IMAGE_ENCODER)
    return {f: getattr(settings.image, f) for f in IMAGE_FIELDS}


def write_bundle(
    trained: TrainedTowers,
    settings: Settings,
    folder: Path,
    version: str,
    data: list[DataWindow],
    has_time: bool,
) -> Path:
    """Export towers, item vectors, the HNSW index and (trained on photos) the image encoder
    into `folder` with its manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    image = ship_image_encoder(trained, settings, folder)
    module = trained.module.eval()
    item_vectors = module.catalogue_vectors().numpy().astype(np.float32)
    np.save(folder / ITEM_VECTORS, item_vectors, allow_pickle=False)
    np.save(folder / ITEM_IDS, trained.item_ids.astype(str), allow_pickle=False)
    encoder = SessionEncoder(module.user_tower, torch.from_numpy(item_vectors))
    export_session_encoder(encoder, settings.towers.max_history, folder / SESSION_ENCODER)
    triton_version = export_user_tower(
        folder / SESSION_ENCODER,
        version,
        settings.serving.triton_repository,
        settings.serving.triton_model,
        settings.serving.triton,
    )
    with torch.no_grad():
        sample = trained.features.take(torch.arange(min(16, len(trained.features))))
        item_tower = torch.jit.trace(module.item_tower, sample.as_tuple(), check_trace=False)
    item_tower.save(str(folder / ITEM_TOWER))
    triton_item_version = export_item_tower(
        folder / ITEM_TOWER,
        version,
        settings.serving.triton_repository,
        settings.serving.triton_item_model,
        settings.serving.triton,
    )
    index, index_report = build_hnsw(
        trained.item_ids.astype(str),
        item_vectors,
        settings.index,
        settings.evaluation.candidates,
        settings.seed,
    )
    index.save(folder / INDEX_DIR)
    (folder / FEATURIZER).write_bytes(orjson.dumps(trained.featurizer.state()))
    (folder / TOWERS).write_bytes(
        orjson.dumps(
            {
                "towers": settings.towers.model_dump(mode="json"),
                "feature_spec": spec_hash(item_feature_specs(settings.towers)),
                "has_time": has_time,
                "image": image,
                "triton": {
                    "model": settings.serving.triton_model,
                    "version": triton_version,
                    "item_model": settings.serving.triton_item_model,
                    "item_version": triton_item_version,
                },
            },
            option=orjson.OPT_INDENT_2,
        )
    )
    Manifest(
        kind="bundle",
        version=version,
        created_at=now_iso(),
        git_commit=git_commit(),
        settings_fingerprint=settings.fingerprint(),
        data=data,
        metrics={"training": trained.report, "index": index_report},
        libraries=library_versions(),
    ).write(folder)
    return folder
