"""The item tower on Triton (serving/triton_item_tower.py) against the same TorchScript
tower in process, and the fallback of new-item encoding (serving/new_items.py) when Triton
does not answer.

The integration test exports a real item tower (untrained: its weights do not matter to how
Triton runs it; nothing is trained here) with `training.triton_export.export_item_tower`,
starts a real tritonserver on that repository, and compares a batch and concurrent single
items, warm ids and cold ones (id 0, as a new item is sent), with and without text and
image. A server that cannot start fails the test.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from devstack.local_services import free_port, triton_server
from railtower.settings import TritonModelSettings, load_settings
from ranking.bundle import ITEM_TOWER
from serving.new_items import NewItems
from serving.rail_service import load_rails
from serving.triton_client import channel_args
from serving.triton_item_tower import TritonItemTower
from serving.user_vectors import TritonUserTower
from towers.item_features import CATEGORY_LEVELS, IMAGE_DIM, TEXT_DIM, ItemFeatures
from towers.item_tower import ItemTower, ItemTowerConfig
from training.triton_export import ITEM_TOWER_FILE, export_item_tower

TOLERANCE = 1e-4  # the new-items issue's bound on Triton vs in-process


def _features(n: int, seed: int) -> ItemFeatures:
    cfg = load_settings().towers
    gen = torch.Generator().manual_seed(seed)
    item_id = torch.randint(1, cfg.id_buckets, (n,), generator=gen)
    item_id[::3] = 0  # cold items: content only, as serving sends a new item
    return ItemFeatures(
        item_id=item_id,
        categories=torch.randint(0, cfg.category_buckets, (n, CATEGORY_LEVELS), generator=gen),
        brand=torch.randint(0, cfg.brand_buckets, (n,), generator=gen),
        price_band=torch.randint(0, cfg.price_bands + 1, (n,), generator=gen),
        text=torch.randn(n, TEXT_DIM, generator=gen),
        has_text=torch.rand(n, generator=gen) > 0.2,
        image=torch.randn(n, IMAGE_DIM, generator=gen),
        has_image=torch.rand(n, generator=gen) > 0.5,
    )


def _item_tower(path: Path) -> Path:
    torch.manual_seed(0)
    tower = ItemTower(ItemTowerConfig.from_settings(load_settings().towers)).eval()
    with torch.no_grad():
        traced = torch.jit.trace(tower, _features(16, 0).as_tuple(), check_trace=False)
    traced.save(str(path))
    return path


def test_the_export_writes_the_item_towers_inputs_from_its_spec(tmp_path):
    weights = tmp_path / ITEM_TOWER_FILE
    weights.write_bytes(b"not loaded by this test")
    version = export_item_tower(weights, "b1", tmp_path / "repo", "item_tower")
    model = tmp_path / "repo" / "item_tower"
    text = (model / "config.pbtxt").read_text()
    assert version == 1 and (model / "1" / ITEM_TOWER_FILE).exists()
    assert (model / "1" / "bundle.txt").read_text().strip() == "b1"
    assert '{ name: "categories", data_type: TYPE_INT64, dims: [ 3 ] }' in text
    assert '{ name: "has_image", data_type: TYPE_BOOL, dims: [ 1 ] }' in text
    assert f'{{ name: "text", data_type: TYPE_FP32, dims: [ {TEXT_DIM} ] }}' in text
    assert 'name: "item_tower"' in text


class _Rows:
    """Stands in for the content encoder: features from a frame's row count."""

    def __init__(self, tower: torch.jit.ScriptModule) -> None:
        self.tower, self.in_process = tower, 0

    def features(self, rows: pd.DataFrame) -> ItemFeatures:
        return _features(len(rows), 7)

    def run_tower(self, features: ItemFeatures) -> np.ndarray:
        self.in_process += 1
        with torch.inference_mode():
            return self.tower(*features.as_tuple()).numpy()


def test_a_triton_that_does_not_answer_falls_back_to_the_in_process_tower(tmp_path):
    tower = torch.jit.load(str(_item_tower(tmp_path / ITEM_TOWER_FILE)))
    encoder = _Rows(tower)
    dead = TritonItemTower(f"127.0.0.1:{free_port()}", "item_tower", 0.5)
    new = NewItems(encoder, dead, "1")  # type: ignore[arg-type]
    vectors = new.encode(pd.DataFrame({"item_id": ["a", "b"]}))
    assert vectors.shape == (2, load_settings().towers.dim) and encoder.in_process == 1
    assert new.sources == {"in_process after triton failed": 1}
    # the next listing does not wait on the dead server again until retry_after_s passes
    new.encode(pd.DataFrame({"item_id": ["c"]}))
    assert new.sources["in_process while triton recovers"] == 1 and encoder.in_process == 2


@pytest.mark.integration
def test_triton_item_tower_equals_the_in_process_tower(tmp_path):
    weights = _item_tower(tmp_path / ITEM_TOWER_FILE)
    repo = tmp_path / "repo"
    batching = TritonModelSettings(max_queue_delay_us=2000, preferred_batch_sizes=[8])
    version = str(export_item_tower(weights, "test-bundle", repo, "item_tower", batching))
    grpc = free_port()
    server = triton_server(repo, grpc, free_port(), tmp_path / "work").start()
    try:
        client = TritonItemTower(f"127.0.0.1:{grpc}", "item_tower", 10.0)
        deadline = time.monotonic() + 90
        while not client.ready(version) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.ready(version), (tmp_path / "work" / "triton.log").read_text()[-3000:]
        local = torch.jit.load(str(weights)).eval()

        batch = _features(300, 1)  # over max_batch_size: the client chunks it
        with torch.inference_mode():
            want = local(*batch.as_tuple()).numpy()
        got = client.encode(batch, version)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= TOLERANCE

        # single items sent concurrently, as catalogue syncs send them: the batcher may merge
        # them, and each must get its own vector back
        singles = [_features(1, seed) for seed in range(10, 34)]
        with ThreadPoolExecutor(8) as pool:
            remote = list(pool.map(lambda f: client.encode(f, version), singles))
        for features, vector in zip(singles, remote, strict=True):
            with torch.inference_mode():
                expected = local(*features.as_tuple()).numpy()
            assert np.abs(vector - expected).max() <= TOLERANCE

        # through the new-item path: Triton answers, the in-process tower is not run
        encoder = _Rows(local)
        new = NewItems(encoder, client, version)  # type: ignore[arg-type]
        vectors = new.encode(pd.DataFrame({"item_id": ["x", "y", "z"]}))
        assert new.sources == {"triton": 1} and encoder.in_process == 0
        assert np.abs(vectors - encoder.run_tower(encoder.features(vectors))).max() <= TOLERANCE
    finally:
        server.stop()


def test_both_tower_clients_reconnect_to_a_restarted_server_within_half_a_second(monkeypatch):
    """gRPC's default reconnect backoff grows to minutes; after tritonserver came back the
    API kept answering from the in-process tower for seconds (the fault benchmark's
    recovered phase: 28% degraded, 0% with these options). The clients keep
    tritonclient's message limits."""
    args = dict(channel_args())
    assert args["grpc.max_reconnect_backoff_ms"] <= 500
    assert args["grpc.initial_reconnect_backoff_ms"] <= args["grpc.max_reconnect_backoff_ms"]
    assert args["grpc.max_receive_message_length"] == 2**31 - 1
    import tritonclient.grpc._client as triton_grpc

    opened = []
    real = triton_grpc.grpc.insecure_channel

    def spy(url, options=None, **kwargs):  # type: ignore[no-untyped-def]
        opened.append(dict(options or []))
        return real(url, options=options, **kwargs)

    monkeypatch.setattr(triton_grpc.grpc, "insecure_channel", spy)
    TritonItemTower("127.0.0.1:1", "item_tower", 1.0)
    TritonUserTower("127.0.0.1:1", "user_tower", 1.0)
    assert opened == [args, args]


@pytest.mark.integration
def test_a_trained_bundles_item_tower_on_triton_encodes_listings_as_the_bundle_does(
    trained_rees46, tmp_path
):
    """The main job's export wrote the trained item tower into the Triton repository beside
    the user tower and recorded its version; a real tritonserver on that repository encodes
    catalogue rows sent as new items (content only, MiniLM in process) as the bundle's own
    in-process tower does."""
    settings, bundle = trained_rees46
    loaded = load_rails(bundle, settings)
    towers = loaded.towers
    assert towers is not None and towers.triton_item_version
    model = settings.serving.triton_item_model
    exported = settings.serving.triton_repository / model / towers.triton_item_version
    assert (exported / ITEM_TOWER_FILE).read_bytes() == (towers.folder / ITEM_TOWER).read_bytes()
    assert (exported / "bundle.txt").read_text().strip() == towers.version
    assert loaded.new_items is not None and loaded.new_items.encoder is not None
    encoder = loaded.new_items.encoder
    items = loaded.rails.items.head(40).copy()
    items["item_id"] = [f"listed-{n}" for n in range(len(items))]  # ids it never saw
    grpc = free_port()
    repository = settings.serving.triton_repository
    server = triton_server(repository, grpc, free_port(), tmp_path / "work").start()
    try:
        client = TritonItemTower(f"127.0.0.1:{grpc}", model, 10.0)
        deadline = time.monotonic() + 120
        while not client.ready(towers.triton_item_version) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.ready(towers.triton_item_version), (
            tmp_path / "work" / "triton.log"
        ).read_text()[-3000:]
        new = NewItems(encoder, client, towers.triton_item_version)
        remote = new.encode(items)
        assert new.sources == {"triton": 1}
        local = encoder.encode(items)
        assert remote.shape == local.shape == (len(items), towers.item_vectors.shape[1])
        assert np.abs(remote - local).max() <= TOLERANCE
    finally:
        server.stop()
