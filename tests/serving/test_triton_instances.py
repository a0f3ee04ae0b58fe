"""Triton instances and dynamic batching come from `serving.triton`, through the export.

The unit tests read the config.pbtxt the export writes. The integration test starts a real
tritonserver on a repository exported with 2 instances and a batching delay, reads the
model config back through tritonclient, counts the backend processes, and checks answers
sent concurrently against the same TorchScript encoder run in process. The encoder is the
real user tower, untrained (its weights do not matter to how Triton runs it); no model is
trained here. A server that cannot start fails the test.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from devstack.local_services import free_port, triton_server
from railtower.settings import TritonModelSettings, load_settings
from serving.user_vectors import TritonUserTower
from towers.user_tower import SessionEncoder, UserTower, UserTowerConfig
from training.export import export_session_encoder
from training.triton_export import TEMPLATE, export_user_tower, render_config

TWO_INSTANCES = TritonModelSettings(
    instances=2, max_queue_delay_us=2000, preferred_batch_sizes=[8, 4]
)


def _encoder(path: Path, n_items: int = 200) -> tuple[Path, int]:
    towers = load_settings().towers
    torch.manual_seed(0)
    vectors = torch.nn.functional.normalize(torch.randn(n_items, towers.dim), dim=-1)
    encoder = SessionEncoder(UserTower(UserTowerConfig.from_settings(towers)), vectors)
    export_session_encoder(encoder, towers.max_history, path)
    return path, towers.max_history


def test_written_config_reflects_the_settings(tmp_path):
    encoder = tmp_path / "session_encoder.pt"
    encoder.write_bytes(b"not loaded by this test")
    version = export_user_tower(encoder, "b1", tmp_path / "repo", "user_tower", TWO_INSTANCES)
    text = (tmp_path / "repo" / "user_tower" / "config.pbtxt").read_text()
    assert version == 1
    assert "instance_group [ { count: 2, kind: KIND_CPU } ]" in text
    assert "max_queue_delay_microseconds: 2000" in text
    assert "preferred_batch_size: [ 4, 8 ]" in text  # sorted, as Triton expects
    # the rest of the template is untouched: inputs, outputs, max batch, version policy
    template = (TEMPLATE / "config.pbtxt").read_text()
    for line in ('name: "user_tower"', "max_batch_size: 128", "version_policy: { all: {} }"):
        assert line in template and line in text
    assert text.count("dynamic_batching {") == 1 and text.count("instance_group [") == 1


def test_defaults_render_the_committed_template_unchanged():
    template = (TEMPLATE / "config.pbtxt").read_text()
    assert render_config(template, TritonModelSettings()) == template


def test_a_new_export_rewrites_the_config_with_new_settings(tmp_path):
    encoder = tmp_path / "session_encoder.pt"
    encoder.write_bytes(b"x")
    repo = tmp_path / "repo"
    export_user_tower(encoder, "b1", repo, "user_tower", TWO_INSTANCES)
    no_delay = TritonModelSettings(instances=1, max_queue_delay_us=0, preferred_batch_sizes=[])
    assert export_user_tower(encoder, "b2", repo, "user_tower", no_delay) == 2
    text = (repo / "user_tower" / "config.pbtxt").read_text()
    assert "count: 1," in text and "max_queue_delay_microseconds: 0" in text
    assert "preferred_batch_size" not in text


def test_preferred_batch_size_above_max_batch_is_refused():
    with pytest.raises(ValueError, match="max_batch_size"):
        TritonModelSettings(preferred_batch_sizes=[256])


def test_template_without_instance_group_is_refused():
    template = (TEMPLATE / "config.pbtxt").read_text()
    broken = "\n".join(line for line in template.splitlines() if "instance_group" not in line)
    with pytest.raises(ValueError, match="instance_group"):
        render_config(broken + "\n", TritonModelSettings())


def _model_instances(server_pid: int) -> list[str]:
    """Instance names of the Python-backend stubs under the server (one process per model
    instance, `user_tower_<group>_<n>`, beside one model-level stub)."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == server_pid and "triton_python_backend_stub" in cmdline:
            out += [arg for arg in cmdline.split() if re.fullmatch(r"user_tower_\d+_\d+", arg)]
    return sorted(out)


@pytest.mark.integration
def test_tritonserver_runs_two_instances_with_dynamic_batching(tmp_path):
    encoder_path, max_history = _encoder(tmp_path / "session_encoder.pt")
    repo = tmp_path / "repo"
    version = export_user_tower(encoder_path, "test-bundle", repo, "user_tower", TWO_INSTANCES)
    grpc = free_port()
    server = triton_server(repo, grpc, free_port(), tmp_path / "work").start()
    try:
        client = TritonUserTower(f"127.0.0.1:{grpc}", "user_tower", 10.0)
        deadline = time.monotonic() + 90
        while not client.ready(str(version)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.ready(str(version)), (tmp_path / "work" / "triton.log").read_text()[-3000:]

        config = client.client.get_model_config("user_tower", str(version), as_json=True)["config"]
        assert [(g["count"], g["kind"]) for g in config["instance_group"]] == [(2, "KIND_CPU")]
        batching = config["dynamic_batching"]
        assert int(batching["max_queue_delay_microseconds"]) == 2000
        assert [int(s) for s in batching["preferred_batch_size"]] == [4, 8]
        pid = server.process.pid  # type: ignore[union-attr]
        assert _model_instances(pid) == ["user_tower_0_0", "user_tower_0_1"]

        # concurrent single-session requests, as the API sends them: the batcher may merge
        # them, and each must still get its own session's vector back
        gen = torch.Generator().manual_seed(1)
        sessions = [
            {
                "items": torch.randint(1, 200, (1, max_history), generator=gen),
                "types": torch.randint(1, 5, (1, max_history), generator=gen),
                "ages": torch.randint(1, 10, (1, max_history), generator=gen),
                "hour": torch.randint(0, 24, (1,), generator=gen),
                "context": torch.randint(0, 1024, (1,), generator=gen),
            }
            for _ in range(32)
        ]
        with ThreadPoolExecutor(8) as pool:
            remote = list(pool.map(lambda s: client.encode(s, str(version)), sessions))
        local = torch.jit.load(str(encoder_path)).eval()
        with torch.inference_mode():
            expected = [
                local(*(s[k] for k in ("items", "types", "ages", "hour", "context")))
                for s in sessions
            ]
        for got, want in zip(remote, expected, strict=True):
            np.testing.assert_allclose(got, want.numpy(), atol=1e-4)
        assert len({np.round(v, 4).tobytes() for v in remote}) == len(sessions)
    finally:
        server.stop()


def test_template_whose_max_batch_differs_from_the_clients_is_refused():
    template = (TEMPLATE / "config.pbtxt").read_text()
    with pytest.raises(ValueError, match="max_batch_size: 128"):
        render_config(template.replace("max_batch_size: 128", "max_batch_size: 32"), TWO_INSTANCES)
