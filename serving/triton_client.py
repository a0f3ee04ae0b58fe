"""A gRPC client of one model on a Triton server, with a per-call timeout: what the user
tower's client (serving.user_vectors) and the item tower's (serving.triton_item_tower) share."""

from __future__ import annotations

from typing import Any

import numpy as np

OUTPUT_NAME = "vector"  # both towers' one output (triton_models/*/config.pbtxt)


class TritonModelClient:
    def __init__(self, url: str, model: str, timeout_s: float) -> None:
        import tritonclient.grpc as grpcclient  # imported here: optional at serving time

        self._grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(url)
        self.model, self.timeout_s = model, timeout_s

    def ready(self, version: str = "") -> bool:
        try:
            return bool(self.client.is_model_ready(self.model, version, client_timeout=1.0))
        except Exception:  # noqa: BLE001 - any transport error means "not ready"
            return False

    def infer(self, arrays: list[tuple[str, np.ndarray, str]], version: str) -> np.ndarray:
        """The model's (B, D) output for named input arrays (name, array, Triton dtype).

        Raises tritonclient's InferenceServerException on error or timeout.
        """
        tensors: list[Any] = []
        for name, array, dtype in arrays:
            tensor = self._grpc.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        result = self.client.infer(
            self.model,
            tensors,
            model_version=version,
            outputs=[self._grpc.InferRequestedOutput(OUTPUT_NAME)],
            client_timeout=self.timeout_s,
        )
        return np.asarray(result.as_numpy(OUTPUT_NAME), dtype=np.float32)
