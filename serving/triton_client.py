"""A gRPC client of one model on a Triton server, with a per-call timeout: what the user
tower's client (serving.user_vectors) and the item tower's (serving.triton_item_tower) share."""

from __future__ import annotations

from typing import Any

import numpy as np

OUTPUT_NAME = "vector"  # both towers' one output (triton_models/*/config.pbtxt)
_MAX_MESSAGE = 2**31 - 1  # tritonclient's own default message limit


def channel_args() -> list[tuple[str, int]]:
    """tritonclient's default channel options, plus a short reconnect backoff.

    gRPC retries a lost server with an exponential backoff (1 s, 1.6 s, ... up to 120 s), so
    a tritonserver restarted after a few seconds down stayed unreachable for seconds more
    and answers kept falling back to the in-process tower (the fault benchmark's recovered
    phase). Retrying every 0.1-0.5 s costs a connection attempt per retry while it is down."""
    keepalive = _keepalive()
    return [
        ("grpc.max_send_message_length", _MAX_MESSAGE),
        ("grpc.max_receive_message_length", _MAX_MESSAGE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", int(keepalive.keepalive_permit_without_calls)),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 500),
    ]


def _keepalive():  # type: ignore[no-untyped-def]
    from tritonclient.grpc import KeepAliveOptions  # optional at serving time

    return KeepAliveOptions()


class TritonModelClient:
    def __init__(self, url: str, model: str, timeout_s: float) -> None:
        import tritonclient.grpc as grpcclient  # imported here: optional at serving time

        self._grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(url, channel_args=channel_args())
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
