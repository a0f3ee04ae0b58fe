"""Fit the two towers on canonical events: features, examples, Lightning, best checkpoint.

One process or several (Lightning DDP, `training.devices` x `training.num_nodes` ranks): the
code is the same. `training.batch_size` is the *global* batch, split evenly across ranks, so a
DDP run takes the same optimiser steps on the same number of examples per step as the
single-process run and its metrics can be compared with it at equal settings. With the full
softmax every rank scores its examples against the whole catalogue; with the sampled one each
rank's softmax still sees the whole global batch as negatives (training.two_tower gathers
every rank's positives). Lightning adds the
DistributedSampler; only rank 0 writes checkpoints and logs. With strategy "ddp" the launcher
re-runs the entry point once per extra rank: such a rank leaves the process once training
returns, so export, evaluation and reports run once, on rank 0.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset

from railtower.logs import get_logger
from railtower.settings import DatasetSpec, Settings, TrainingSettings
from towers.image_encoder import ImageEncoder
from towers.item_features import ItemFeatures, ItemFeaturizer, item_text
from towers.item_tower import ItemTowerConfig
from towers.session_features import collate, history_of, session_features
from towers.text_encoder import TextEncoder
from towers.user_tower import UserTowerConfig
from training.examples import Examples, session_examples, target_log_q
from training.split import holdout
from training.tasks import build_cases
from training.two_tower import TwoTowerModule

log = get_logger(__name__)
MAX_EXCLUDE = 64


@dataclass
class TrainedTowers:
    module: TwoTowerModule
    featurizer: ItemFeaturizer
    features: ItemFeatures
    item_ids: np.ndarray
    report: dict[str, object] = field(default_factory=dict)


class TensorBatches(Dataset):  # type: ignore[type-arg]
    """Row i of every tensor in a dict: the batches of examples a DataLoader draws."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


def catalogue_features(
    catalogue: pd.DataFrame, warm_items: set[str], settings: Settings
) -> tuple[ItemFeaturizer, ItemFeatures]:
    """Fit the featurizer (price bands, warm set) and build features for every item."""
    featurizer = ItemFeaturizer.fit(catalogue, warm_items, settings.towers)
    texts = item_text(catalogue)
    if any(texts):
        encoder = TextEncoder(
            settings.text.model_path, settings.cache_dir, settings.text.batch_size
        )
        text = encoder.encode(texts)
    else:  # ids-only data: nothing to read, and no reason to load the model
        text = np.zeros((len(catalogue), 384), np.float32)
    image, has_image = catalogue_images(catalogue, settings)
    return featurizer, featurizer.transform(catalogue, text, image, has_image)


def catalogue_images(
    catalogue: pd.DataFrame, settings: Settings
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Image embeddings where the catalogue has photos and image weights are configured."""
    if "image_path" not in catalogue.columns or not catalogue["image_path"].notna().any():
        return None, None
    if settings.image.weights_path is None:
        log.warning(
            "photos present but image.weights_path is not set: the image branch "
            "uses its 'no image' vector; run `railtower distill-images` first"
        )
        return None, None
    paths = [p if isinstance(p, str) else None for p in catalogue["image_path"]]
    return ImageEncoder(settings.image, settings.cache_dir).encode(paths)


def validation_inputs(
    events: pd.DataFrame,
    spec: DatasetSpec,
    item_row: dict[str, int],
    settings: Settings,
    has_time: bool,
) -> dict[str, torch.Tensor]:
    """Held-out cases as user-tower inputs + target + excluded rows, one row per target.

    Click sessions validate on homepage_hero (what the towers are trained for); baskets,
    whose order means nothing, on cart_upsell. With one row per target, the mean hit rate
    over rows is Recall@K over targets.
    """
    rail = "cart_upsell" if spec.session_kind == "basket" else "homepage_hero"
    feats, targets, exclude = [], [], []
    for case in build_cases(rail, events, spec, settings.evaluation, settings.seed):
        q = case.query
        history = history_of(q.session_items, q.session_types, q.session_times, q.anchor, q.cart)
        features = session_features(
            history, item_row, settings.towers.max_history, has_time, q.context
        )
        rows = [item_row[i] for i in q.exclude if i in item_row][:MAX_EXCLUDE]
        for target in sorted(case.targets & item_row.keys()):
            feats.append(features)
            targets.append(item_row[target])
            exclude.append(rows + [-1] * (MAX_EXCLUDE - len(rows)))
    inputs = collate(feats)
    inputs["target"] = torch.tensor(targets, dtype=torch.int64)
    inputs["exclude"] = torch.tensor(exclude, dtype=torch.int64).reshape(-1, MAX_EXCLUDE)
    return inputs


def train_towers(
    events: pd.DataFrame,
    catalogue: pd.DataFrame,
    spec: DatasetSpec,
    settings: Settings,
    workdir: Path,
) -> TrainedTowers:
    """Train both towers; early-stop on Recall@K of held-out sessions; keep the best epoch.

    The latest `split.validation_share` of the given sessions are held out for early
    stopping only, so nothing after the caller's cut is ever seen.
    """
    started = time.perf_counter()
    pl.seed_everything(settings.seed, workers=True)
    has_time = spec.has_time
    basket = spec.session_kind == "basket"
    fit, held = holdout(events, has_time, settings.split.validation_share, settings.seed)
    item_ids = catalogue["item_id"].astype(str).to_numpy()
    item_row = {item: i for i, item in enumerate(item_ids)}
    featurizer, features = catalogue_features(catalogue, set(fit["item_id"]), settings)
    examples: Examples = session_examples(
        fit,
        item_row,
        settings.towers.max_history,
        has_time,
        basket,
        settings.seed,
        settings.training.max_examples,
    )
    val = validation_inputs(held, spec, item_row, settings, has_time)
    if rank_zero_only.rank == 0:  # a re-executed DDP rank would repeat every line
        log.info(
            "tower data",
            dataset=spec.name,
            examples=len(examples),
            validation=len(val["target"]),
            catalogue=len(item_ids),
            warm_items=len(featurizer.warm_items),
        )
    module = TwoTowerModule(
        ItemTowerConfig.from_settings(settings.towers),
        UserTowerConfig.from_settings(settings.towers),
        settings.training,
        settings.towers.id_dropout,
        features,
        target_log_q(examples.targets, len(item_ids)),
        settings.evaluation.candidates,
    )
    monitor = f"val_recall@{settings.evaluation.candidates}"
    checkpoint = ModelCheckpoint(
        dirpath=workdir / "checkpoints", monitor=monitor, mode="max", save_top_k=1, filename="best"
    )
    trainer = build_trainer(settings.training, workdir, monitor, checkpoint)
    per_rank = per_rank_batch(settings.training.batch_size, trainer.world_size)
    train_data = {**examples.inputs, "target": examples.targets}
    trainer.fit(
        module,
        DataLoader(TensorBatches(train_data), batch_size=per_rank, shuffle=True),
        DataLoader(TensorBatches(val), batch_size=1024),
    )
    if trainer.global_rank > 0:
        # This rank was re-executed by the DDP launcher and has done its share; export,
        # evaluation and reports belong to rank 0, and running them twice would race on files.
        raise SystemExit(0)
    best = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)
    module.load_state_dict(best["state_dict"])
    module.eval()
    seconds = time.perf_counter() - started
    report = {
        "examples": len(examples),
        "validation_cases": int(len(val["target"])),
        "epochs": trainer.current_epoch,
        "best_epoch": best.get("epoch"),
        f"best_{monitor}": float(checkpoint.best_model_score or 0.0),
        "train_seconds": round(seconds, 1),
        "sequences_per_second": round(len(examples) * max(trainer.current_epoch, 1) / seconds, 1),
        "warm_items": len(featurizer.warm_items),
        # how it was trained: DDP runs are compared with single-process ones on these
        "world_size": trainer.world_size,
        "strategy": type(trainer.strategy).__name__,
        "accelerator": type(trainer.accelerator).__name__,
        "global_batch": per_rank * trainer.world_size,
        "per_rank_batch": per_rank,
    }
    log.info("towers trained", dataset=spec.name, **report)
    return TrainedTowers(module.cpu(), featurizer, features, item_ids, report)


def build_trainer(
    training: TrainingSettings, workdir: Path, monitor: str, checkpoint: ModelCheckpoint
) -> pl.Trainer:
    """The Lightning trainer: placement (accelerator, devices, strategy, nodes) from config.

    Nothing here names a device type: `accelerator: auto` with `strategy: ddp` runs one rank
    per GPU over NCCL on a GPU machine and one CPU process per device over gloo elsewhere.
    """
    return pl.Trainer(
        max_epochs=training.max_epochs,
        accelerator=training.accelerator,
        devices=training.devices,
        strategy=training.strategy,
        num_nodes=training.num_nodes,
        callbacks=[EarlyStopping(monitor, mode="max", patience=training.patience), checkpoint],
        logger=CSVLogger(workdir, name="logs"),
        enable_model_summary=False,
        log_every_n_steps=10,
        deterministic=True,
    )


def per_rank_batch(batch_size: int, world_size: int) -> int:
    """Each rank's share of the global batch; refuses a batch the ranks cannot split evenly."""
    if batch_size % world_size:
        raise ValueError(
            f"training.batch_size={batch_size} is the global batch and must split evenly over "
            f"{world_size} ranks (devices x num_nodes); use a multiple of {world_size}"
        )
    return batch_size // world_size
