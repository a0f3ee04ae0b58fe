"""Triton Python-backend model of the item tower; export copies it into each version folder.

It loads that version's `item_tower.pt` (the TorchScript item tower of the tower bundle) and
encodes every request of a dynamic batch in one forward pass.
"""

import json
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        torch.set_num_threads(1)  # one instance, one core: Triton scales by instances
        folder = Path(args["model_repository"]) / args["model_version"]
        self.tower = torch.jit.load(str(folder / "item_tower.pt"), map_location="cpu")
        self.tower.eval()
        # the tower's inputs in argument order, as the export rendered them into the config
        # from towers.item_features.ITEM_TOWER_INPUTS; one-wide inputs are (N,) to the tower
        config = json.loads(args["model_config"])
        self.inputs = [(i["name"], [int(d) for d in i["dims"]] == [1]) for i in config["input"]]

    def execute(self, requests: list) -> list:
        arrays = {
            name: [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for r in requests]
            for name, _ in self.inputs
        }
        sizes = [a.shape[0] for a in arrays[self.inputs[0][0]]]
        batch = [torch.from_numpy(np.concatenate(arrays[name], axis=0)) for name, _ in self.inputs]
        batch = [
            t.reshape(-1) if scalar else t
            for t, (_, scalar) in zip(batch, self.inputs, strict=True)
        ]
        with torch.inference_mode():
            vectors = self.tower(*batch).numpy().astype(np.float32)
        responses, start = [], 0
        for size in sizes:
            out = pb_utils.Tensor("vector", vectors[start : start + size])
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            start += size
        return responses
