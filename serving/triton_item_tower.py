"""The item tower on Triton: encodes items listed after the bundle was trained.

The API and the consumer embed a new item's text with MiniLM in-process and send the item
tower's inputs (`towers.item_features.ITEM_TOWER_INPUTS`) to the `item_tower` model the
export step wrote beside the user tower. The bundle's in-process tower is the fallback
(serving/new_items.py), so a Triton outage delays nothing.
"""

from __future__ import annotations

import numpy as np
import torch

from railtower.settings import TRITON_MAX_BATCH
from serving.triton_client import TritonModelClient
from towers.item_features import ITEM_TOWER_INPUTS, ItemFeatures

_NUMPY = {"INT64": np.int64, "FP32": np.float32, "BOOL": np.bool_}


class TritonItemTower(TritonModelClient):
    """gRPC client of the item tower on a Triton server, with a per-call timeout."""

    def encode(self, features: ItemFeatures, version: str = "") -> np.ndarray:
        """(N, D) vectors, in chunks of the model's max batch size.

        Raises tritonclient's InferenceServerException on error or timeout.
        """
        size = len(features)
        if size > TRITON_MAX_BATCH:
            return np.concatenate(
                [
                    self.encode(
                        features.take(torch.arange(i, min(i + TRITON_MAX_BATCH, size))), version
                    )
                    for i in range(0, size, TRITON_MAX_BATCH)
                ]
            )
        arrays = []
        for spec in ITEM_TOWER_INPUTS:
            array = getattr(features, spec.name).numpy().astype(_NUMPY[spec.dtype])
            # one-wide inputs travel as [N, 1]: Triton batches along dim 0
            arrays.append((spec.name, array.reshape(size, spec.dims), spec.dtype))
        return self.infer(arrays, version)
