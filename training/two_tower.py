"""Lightning training of the two towers: full softmax over the catalogue, or sampled softmax.

The towers are plain modules (`towers/`); this module owns the loss, the negatives, ID
dropout, the optimiser and the validation metric (Recall@K against the full catalogue).

`training.loss: full` scores every example against every catalogue item's vector, computed
afresh by the item tower each step: the cross-entropy SASRec-style models train with
(published ablations show in-batch negatives alone can let a sequential model settle on
popular items). `sampled` (the default: in-batch negatives with logQ correction, optionally
plus uniform negatives) costs half as much per epoch on CPU and, at the 12 epochs a CPU run
affords, ranked as well on Amazon-M2; it is also what catalogues too big to embed every step
get (`training.full_softmax_max_items`).

Under DDP each rank's softmax still sees the whole global batch: positives are gathered from
every rank (gradients flow back to the rank that computed them), so W ranks of B examples
train on the same negatives and the same gradient as one process drawing W*B examples.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_only

from railtower.logs import get_logger
from railtower.settings import TrainingSettings
from towers.item_features import ItemFeatures
from towers.item_tower import ItemTower, ItemTowerConfig
from towers.user_tower import UserTower, UserTowerConfig

log = get_logger(__name__)


class TwoTowerModule(pl.LightningModule):
    """Trains an item tower and a user tower into one space.

    Args:
        item_cfg, user_cfg: tower shapes.
        training: loss, optimiser and negatives settings.
        id_dropout: probability of hiding an item's id embedding (cold-start robustness).
        catalogue: item features of the whole catalogue (row = catalogue index).
        log_q: (N,) log sampling probability of each item as a target.
    """

    def __init__(
        self,
        item_cfg: ItemTowerConfig,
        user_cfg: UserTowerConfig,
        training: TrainingSettings,
        id_dropout: float,
        catalogue: ItemFeatures,
        log_q: torch.Tensor,
        recall_k: int = 120,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            {
                "item": asdict(item_cfg),
                "user": asdict(user_cfg),
                "training": training.model_dump(),
                "id_dropout": id_dropout,
            }
        )
        self.item_tower = ItemTower(item_cfg)
        self.user_tower = UserTower(user_cfg)
        self.training_cfg = training
        self.id_dropout = id_dropout
        self.catalogue = catalogue
        self.register_buffer("log_q", log_q, persistent=False)
        self.recall_k = recall_k
        self._table: torch.Tensor | None = None
        self._started = time.perf_counter()
        self._on_device: ItemFeatures | None = None

    # ----------------------------------------------------------------- vectors

    def item_vectors(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(R,) catalogue rows (None = all) -> (R, D) item vectors; ID dropout while training."""
        if rows is None:
            features = self._device_catalogue()
            rows = torch.arange(len(self.catalogue), device=self.device)
        else:
            features = self.catalogue.take(rows.cpu()).to(self.device)
        if self.training and self.id_dropout > 0:
            # Only items with some content lose their id: for an ids-only item there is
            # nothing else to learn from, and hiding its id would make it a blank.
            has_content = (
                features.has_text
                | features.has_image
                | (features.brand > 0)
                | (features.categories > 0).any(dim=1)
            )
            hide = has_content & (torch.rand(len(rows), device=self.device) < self.id_dropout)
            features = replace(
                features,
                item_id=torch.where(hide, torch.zeros_like(features.item_id), features.item_id),
            )
        return self.item_tower(*features.as_tuple())

    def _device_catalogue(self) -> ItemFeatures:
        """The whole catalogue's features on this module's device, copied once."""
        if self._on_device is None or self._on_device.item_id.device != self.device:
            self._on_device = self.catalogue.to(self.device)
        return self._on_device

    @torch.no_grad()
    def catalogue_vectors(self, batch_size: int = 8192) -> torch.Tensor:
        """(N, D) vectors of every catalogue item, in eval mode."""
        was_training = self.training
        self.eval()
        rows = torch.arange(len(self.catalogue))
        out = torch.cat(
            [self.item_vectors(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
        )
        self.train(was_training)
        return out

    def user_vectors(self, inputs: dict[str, torch.Tensor], table: torch.Tensor) -> torch.Tensor:
        """Session inputs + an (N, D) item table -> (B, D) user vectors."""
        padded = torch.cat([torch.zeros_like(table[:1]), table])
        return self.user_tower(
            padded[inputs["items"]],
            inputs["types"],
            inputs["ages"],
            inputs["hour"],
            inputs["context"],
        )

    # ----------------------------------------------------------------- training

    def full_softmax_fits(self) -> bool:
        """Whether this run trains with the full softmax (the configured loss, and a
        catalogue small enough to embed every step)."""
        cfg = self.training_cfg
        return cfg.loss == "full" and len(self.catalogue) <= cfg.full_softmax_max_items

    def training_step(self, batch: dict[str, torch.Tensor], _batch_idx: int) -> torch.Tensor:
        targets = batch.pop("target")
        if self.full_softmax_fits():
            loss = self.full_softmax(batch, targets)
        else:
            loss = self.in_batch_step(batch, targets)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(targets))
        return loss

    def full_softmax(self, batch: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of each example's target against every catalogue item.

        Items already in the example's session are masked out (never its target: examples
        target an item the session has not touched), as they are at validation and serving,
        so the model spends nothing on ranking what a rail never shows.
        """
        table = self.item_vectors()
        users = self.user_vectors(batch, table)
        logits = users @ table.T / self.training_cfg.temperature
        history = batch["items"]
        seen = history > 0
        batch_rows = torch.arange(len(targets), device=self.device)
        in_session = torch.zeros_like(logits, dtype=torch.bool)
        in_session[batch_rows.unsqueeze(1).expand_as(history)[seen], history[seen] - 1] = True
        in_session[batch_rows, targets] = False
        return F.cross_entropy(logits.masked_fill(in_session, float("-inf")), targets)

    def in_batch_step(self, batch: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        """Sampled softmax over the global batch's positives (+ uniform negatives)."""
        history = batch["items"]
        # Only items this batch touches go through the item tower: cheap on big catalogues.
        rows = torch.unique(torch.cat([history[history > 0] - 1, targets]))
        vectors = self.item_vectors(rows)
        position = torch.full((len(self.catalogue),), -1, dtype=torch.long, device=self.device)
        position[rows] = torch.arange(len(rows), device=self.device)
        table = torch.zeros(len(self.catalogue), vectors.shape[1], device=self.device)
        table = table.index_copy(0, rows, vectors)
        users = self.user_vectors(batch, table)
        positives, candidate_targets, offset = self.global_batch(
            vectors[position[targets]], targets
        )
        return self.sampled_softmax(users, positives, targets, candidate_targets, offset)

    def global_batch(
        self, positives: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Every rank's (B, D) positives and (B,) targets -> (W*B, D), (W*B,), own offset.

        DistributedSampler pads every rank to the same number of examples, so batch i has
        the same size B on every rank; this rank's rows sit at offset rank*B.
        """
        if self.trainer.world_size == 1:
            return positives, targets, 0
        gathered = self.all_gather(positives, sync_grads=True)
        gathered_targets = self.all_gather(targets)
        return gathered.flatten(0, 1), gathered_targets.flatten(), self.global_rank * len(targets)

    def sampled_softmax(
        self,
        users: torch.Tensor,
        positives: torch.Tensor,
        targets: torch.Tensor,
        candidate_targets: torch.Tensor | None = None,
        offset: int = 0,
    ) -> torch.Tensor:
        """In-batch softmax; logQ-corrected; an item repeated in the batch is no negative.

        Args:
            users: (B, D) this rank's user vectors; targets: (B,) their catalogue rows.
            positives: (C, D) candidate vectors, the global batch's positives (C = W*B).
            candidate_targets: (C,) rows of the candidates (default: targets, C = B).
            offset: index of this rank's first row among the candidates.
        """
        cfg = self.training_cfg
        candidate_targets = targets if candidate_targets is None else candidate_targets
        logits = users @ positives.T / cfg.temperature
        if cfg.logq_correction:
            logits = logits - self.log_q[candidate_targets].unsqueeze(0)
        labels = torch.arange(len(targets), device=self.device) + offset
        columns = torch.arange(len(candidate_targets), device=self.device)
        same = targets.unsqueeze(1) == candidate_targets.unsqueeze(0)
        own = labels.unsqueeze(1) == columns.unsqueeze(0)
        logits = logits.masked_fill(same & ~own, float("-inf"))
        if cfg.random_negatives:
            sampled = torch.randint(
                len(self.catalogue), (cfg.random_negatives,), device=self.device
            )
            extra = users @ self.item_vectors(sampled).T / cfg.temperature
            # uniform sampling: every random negative has the same correction, log(1/N)
            if cfg.logq_correction:
                extra = extra + torch.log(torch.tensor(float(len(self.catalogue))))
            extra = extra.masked_fill(sampled.unsqueeze(0) == targets.unsqueeze(1), float("-inf"))
            logits = torch.cat([logits, extra], dim=1)
        return F.cross_entropy(logits, labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.parameters(),
            lr=self.training_cfg.learning_rate,
            weight_decay=self.training_cfg.weight_decay,
        )

    # ----------------------------------------------------------------- validation

    def on_validation_epoch_start(self) -> None:
        self._table = self.catalogue_vectors()

    def validation_step(self, batch: dict[str, torch.Tensor], _batch_idx: int) -> None:
        assert self._table is not None
        targets = batch.pop("target")
        exclude = batch.pop("exclude")  # (B, E) catalogue rows, -1 = none
        users = self.user_vectors(batch, self._table)
        scores = users @ self._table.T
        valid = exclude >= 0
        rows = torch.arange(len(targets), device=self.device).unsqueeze(1).expand_as(exclude)
        scores[rows[valid], exclude[valid]] = float("-inf")
        top = scores.topk(min(self.recall_k, scores.shape[1]), dim=1).indices
        hits = (top == targets.unsqueeze(1)).any(dim=1).float()
        self.log(
            f"val_recall@{self.recall_k}",
            hits.mean(),
            prog_bar=True,
            sync_dist=True,
            batch_size=len(targets),
        )

    def on_validation_epoch_end(self) -> None:
        self._table = None
        if self.trainer.sanity_checking or rank_zero_only.rank != 0:
            return
        # Progress in the log, not only on a terminal's progress bar: a nightly run on a
        # machine nobody watches must say how far it got and whether it still improves.
        metrics = self.trainer.callback_metrics
        log.info(
            "tower epoch",
            epoch=self.current_epoch,
            of=self.trainer.max_epochs,
            train_loss=_rounded(metrics.get("train_loss")),
            **{f"val_recall@{self.recall_k}": _rounded(metrics.get(f"val_recall@{self.recall_k}"))},
            seconds=round(time.perf_counter() - self._started, 1),
        )

    def on_train_start(self) -> None:
        self._started = time.perf_counter()


def _rounded(value: torch.Tensor | None) -> float | None:
    return None if value is None else round(float(value), 4)
