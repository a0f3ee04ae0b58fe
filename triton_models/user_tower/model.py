"""Triton Python-backend model of the user tower; export copies it into each version folder.

It loads that version's `session_encoder.pt` (the TorchScript file of the tower bundle) and
encodes every request of a dynamic batch in one forward pass.
"""

from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend

INPUTS = ("items", "types", "ages", "hour", "context")


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        torch.set_num_threads(1)  # one instance, one core: Triton scales by instances
        folder = Path(args["model_repository"]) / args["model_version"]
        self.encoder = torch.jit.load(str(folder / "session_encoder.pt"), map_location="cpu")
        self.encoder.eval()

    def execute(self, requests: list) -> list:
        arrays = {
            name: [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for r in requests]
            for name in INPUTS
        }
        sizes = [a.shape[0] for a in arrays["items"]]
        batch = {
            name: torch.from_numpy(np.concatenate(parts, axis=0)) for name, parts in arrays.items()
        }
        with torch.inference_mode():
            vectors = (
                self.encoder(
                    batch["items"],
                    batch["types"],
                    batch["ages"],
                    batch["hour"].reshape(-1),
                    batch["context"].reshape(-1),
                )
                .numpy()
                .astype(np.float32)
            )
        responses, start = [], 0
        for size in sizes:
            out = pb_utils.Tensor("vector", vectors[start : start + size])
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            start += size
        return responses
