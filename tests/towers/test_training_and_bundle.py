"""Towers train on a known-answer catalogue, export a bundle, and serve from it."""

from __future__ import annotations

import pandas as pd
import pytest

from railtower.errors import ArtifactMismatch
from railtower.settings import DatasetSpec, EventsMapping, load_settings
from ranking.bundle import ITEM_VECTORS, TowerBundle
from ranking.retriever import Catalogue, Query
from tests.conftest import toy_events
from training.tower_model import TowerRetriever

# Two disjoint worlds: TV shoppers go on to cables and mounts, phone shoppers to cases.
# Interleaved in time, so the hour of day tells the worlds apart no better than chance.
SESSIONS: dict[str, list[tuple[str, str]]] = {}
for i in range(60):
    SESSIONS[f"tv{i}"] = [("tv", "view"), ("hdmi", "cart"), ("mount", "purchase")]
    SESSIONS[f"ph{i}"] = [("phone", "view"), ("case", "cart"), ("charger", "view")]
ITEMS = pd.DataFrame(
    {
        "item_id": ["tv", "hdmi", "mount", "phone", "case", "charger", "tv-new"],
        "title": [
            "smart tv",
            "hdmi cable",
            "wall mount",
            "smartphone",
            "phone case",
            "usb charger",
            "smart tv 2026",
        ],
        "category_path": [
            "tv",
            "tv > cable",
            "tv > mount",
            "phone",
            "phone > case",
            "phone > charger",
            "tv",
        ],
    }
)
SPEC = DatasetSpec(
    name="toy", events=EventsMapping(path="x", columns={"event_time": "t"}), rails=["homepage_hero"]
)


@pytest.fixture(scope="module")
def retriever(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    settings = load_settings(
        artifacts_dir=root,
        cache_dir=root / "cache",
        towers={"dim": 32, "id_buckets": 4096, "layers": 1, "heads": 2, "max_history": 5},
        training={
            "max_epochs": 15,
            "batch_size": 32,
            "accelerator": "cpu",
            "patience": 4,
            "learning_rate": 0.01,
        },
        index={"ef_grid": [16, 32, 64]},
        evaluation={"candidates": 3, "mrr_depth": 3, "slots": 2},
        # the export writes a Triton version: into this test's folder, never the repository's
        serving={"triton_repository": root / "triton_models"},
    )
    events = toy_events(SESSIONS)
    model = TowerRetriever(settings, SPEC, ITEMS, version="toy-v1")
    return model.fit(events, Catalogue(ITEMS))


def test_towers_learn_what_follows(retriever):
    tv, phone = retriever.recommend(
        [
            Query(("tv",), ("view",), (0.0,), exclude=frozenset({"tv"})),
            Query(("phone",), ("view",), (0.0,), exclude=frozenset({"phone"})),
        ],
        k=3,
    )
    assert tv[0] == "hdmi" and "mount" in tv  # the third may be tv-new, the TV's twin
    assert phone[:2] == ["case", "charger"]


def test_rails_never_return_excluded_items(retriever):
    (ranked,) = retriever.recommend(
        [Query(("tv",), ("view",), (0.0,), cart=("tv", "hdmi"), exclude=frozenset({"tv", "hdmi"}))],
        k=6,
    )
    assert len(ranked) == 5 and not {"tv", "hdmi"} & set(ranked)


def test_bundle_has_a_verified_manifest_and_training_report(retriever):
    bundle = retriever.bundle
    assert bundle.version == "toy-v1"
    report = bundle.manifest.metrics["training"]
    assert report["examples"] > 0 and report["best_val_recall@3"] > 0
    assert bundle.manifest.metrics["index"]["count"] == len(ITEMS)
    assert {"session_encoder.pt", "index/hnsw.bin", "item_vectors.npy"} <= set(
        bundle.manifest.files
    )


def test_cold_item_has_a_vector_near_its_content_twin(retriever):
    vectors = retriever.bundle.item_vectors
    row = retriever.bundle.item_row
    sims = vectors @ vectors[row["tv-new"]]
    # never seen in training, but its title and category make it closer to the TV than to
    # the phone
    assert sims[row["tv"]] > sims[row["phone"]]


def test_a_tampered_bundle_is_refused(retriever, tmp_path):
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(retriever.bundle.folder, copy)
    TowerBundle.load(copy)  # intact copy loads
    with (copy / ITEM_VECTORS).open("r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\x00\x00\x80\x3f")
    with pytest.raises(ArtifactMismatch, match="does not match its hash"):
        TowerBundle.load(copy)


def test_a_bundle_from_another_feature_definition_is_refused(retriever, tmp_path):
    import shutil

    import orjson

    from railtower.manifest import Manifest

    copy = tmp_path / "bundle"
    shutil.copytree(retriever.bundle.folder, copy)
    meta = orjson.loads((copy / "towers.json").read_bytes())
    meta["towers"]["id_buckets"] = 8192
    (copy / "towers.json").write_bytes(orjson.dumps(meta))
    manifest = Manifest.load(copy, verify=False)
    manifest.write(copy)  # re-hash, so only the feature-spec check can catch it
    with pytest.raises(ArtifactMismatch, match="feature spec"):
        TowerBundle.load(copy)
