"""A new listing's photo goes through the image encoder its bundle was trained with.

A toy bundle is trained on a catalogue with photos (generated PNGs) and a tiny randomly
initialised image encoder (32 px, patch 8: the real ViT and a real distillation would cost
minutes; the weights do not matter to parity, only that serving uses the same ones). The
export ships the encoder in the bundle; a new item listed through the catalogue path with
the same content and photo as a catalogue item the events never showed (so the export gave
it no id embedding either) must get the vector the export stored for that item, and the
same listing without its photo, or with a photo that is not there, the "no image" vector.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from railtower.settings import DatasetSpec, EventsMapping, ImageSettings, load_settings
from ranking.ann import DeltaIndex
from ranking.bundle import IMAGE_ENCODER, TowerBundle
from ranking.retriever import Catalogue
from serving.new_items import NewItems, apply_record, new_items_for
from tests.conftest import toy_events
from towers.image_encoder import ImageEmbedder
from training.tower_model import TowerRetriever

TOLERANCE = 1e-4  # the bound on a new item's vector against the export's
COLOURS = {
    "tv": (20, 20, 20),
    "hdmi": (200, 200, 30),
    "mount": (120, 120, 120),
    "phone": (30, 30, 200),
    "case": (200, 30, 30),
    "charger": (250, 250, 250),
    "tv-new": (60, 160, 60),
}
SESSIONS = {}
for i in range(20):
    SESSIONS[f"tv{i}"] = [("tv", "view"), ("hdmi", "cart"), ("mount", "purchase")]
    SESSIONS[f"ph{i}"] = [("phone", "view"), ("case", "cart"), ("charger", "view")]
SPEC = DatasetSpec(
    name="toy", events=EventsMapping(path="x", columns={"event_time": "t"}), rails=["homepage_hero"]
)
IMAGE = {"image_size": 32, "patch_size": 8, "batch_size": 16}


def _photo(folder, name: str, colour: tuple[int, int, int]) -> str:
    """A 40x60 product shot: a coloured block with a darker stripe, on white."""
    image = Image.new("RGB", (40, 60), (255, 255, 255))
    image.paste(colour, (5, 5, 35, 55))
    image.paste(tuple(c // 2 for c in colour), (5, 25, 35, 35))
    path = folder / f"{name}.png"
    image.save(path)
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(settings, bundle, catalogue): towers trained on photos with a tiny image encoder."""
    root = tmp_path_factory.mktemp("photo-towers")
    photos = root / "photos"
    photos.mkdir()
    torch.manual_seed(0)
    weights = root / "image-weights.pt"
    torch.save(ImageEmbedder(ImageSettings(**IMAGE)).state_dict(), weights)
    items = pd.DataFrame(
        {
            "item_id": list(COLOURS),
            "title": ["smart tv", "hdmi cable", "wall mount", "smartphone", "phone case"]
            + ["usb charger", "smart tv 2026"],
            "category_path": ["tv", "tv > cable", "tv > mount", "phone", "phone > case"]
            + ["phone > charger", "tv"],
            "price": [500.0, 10.0, 40.0, 300.0, 15.0, 20.0, 600.0],
            "image_path": [_photo(photos, name, colour) for name, colour in COLOURS.items()],
        }
    )
    settings = load_settings(
        artifacts_dir=root,
        cache_dir=root / "cache",
        towers={"dim": 32, "id_buckets": 4096, "layers": 1, "heads": 2, "max_history": 5},
        training={"max_epochs": 2, "batch_size": 32, "accelerator": "cpu", "patience": 2},
        index={"ef_grid": [16, 32]},
        evaluation={"candidates": 3, "mrr_depth": 3, "slots": 2},
        image={**IMAGE, "weights_path": weights},
        # in-process item tower only; the export's Triton version goes to this test's folder
        serving={"triton_url": None, "triton_repository": root / "triton_models"},
    )
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # two cores shared with other work: keep the fit small
    try:
        model = TowerRetriever(settings, SPEC, items, version="photo-v1")
        model.fit(toy_events(SESSIONS), Catalogue(items))
    finally:
        torch.set_num_threads(before)
    assert model.bundle is not None
    return settings, model.bundle, items


def _model(bundle: TowerBundle, new: NewItems | None) -> SimpleNamespace:
    """The parts of a served model `apply_record` touches, around the real bundle."""
    from ranking.item_attributes import ItemAttributes

    ids = bundle.item_ids.tolist()
    return SimpleNamespace(
        version=bundle.version,
        titles={},
        pipeline=SimpleNamespace(
            attributes=ItemAttributes.from_frame(pd.DataFrame({"item_id": ids})),
            stats=SimpleNamespace(row={}, price=np.zeros(0)),
        ),
        catalogue=SimpleNamespace(index={i: n for n, i in enumerate(ids)}, category_of={}),
        towers=bundle,
        new_items=new,
    )


def _listing(items: pd.DataFrame, item: str, **change: object) -> dict[str, object]:
    row = items.set_index("item_id").loc[item]
    listing = {f: row[f] for f in ("title", "category_path", "price", "image_path")}
    return {**listing, "brand": None, "stock": 3, **change}


def test_the_bundle_ships_the_image_encoder_it_was_trained_with(trained):
    settings, bundle, _ = trained
    assert bundle.image is not None and bundle.image.weights_path == bundle.folder / IMAGE_ENCODER
    assert (bundle.image.image_size, bundle.image.patch_size) == (32, 8)
    assert IMAGE_ENCODER in bundle.manifest.files  # verified with the rest of the bundle
    assert (bundle.folder / IMAGE_ENCODER).read_bytes() == settings.image.weights_path.read_bytes()


def test_a_listing_with_a_photo_gets_the_vector_the_export_gave_its_twin(trained):
    settings, bundle, items = trained
    assert "tv-new" not in bundle.featurizer.warm_items  # the export gave it no id either
    new = new_items_for(bundle, settings)
    assert new is not None and new.encoder is not None and new.encoder.photos is not None
    model = _model(TowerBundle.load(bundle.folder), new)  # its own index, not the fixture's
    exported = bundle.item_vectors[bundle.item_row["tv-new"]]

    assert apply_record(model, "listed-with-photo", _listing(items, "tv-new"))  # type: ignore[arg-type]
    assert apply_record(model, "listed-without", _listing(items, "tv-new", image_path=None))  # type: ignore[arg-type]
    index = model.towers.index
    assert isinstance(index, DeltaIndex)
    with_photo, without = index.vector("listed-with-photo"), index.vector("listed-without")
    assert np.abs(with_photo - exported).max() <= TOLERANCE
    assert np.abs(without - exported).max() > 100 * TOLERANCE  # the photo moved it

    # a photo path that is not there: the "no image" input, as if it had none
    gone = _listing(items, "tv-new", image_path=str(bundle.folder / "no-such-photo.png"))
    assert apply_record(model, "listed-photo-missing", gone)  # type: ignore[arg-type]
    missing = model.towers.index.vector("listed-photo-missing")
    assert np.abs(missing - without).max() <= TOLERANCE

    # the photo is part of the content key: the same listing gaining its photo is re-encoded
    assert apply_record(model, "listed-without", _listing(items, "tv-new"))  # type: ignore[arg-type]
    assert np.abs(model.towers.index.vector("listed-without") - exported).max() <= TOLERANCE


class RecordingTriton:
    """Stands in for the Triton item tower: records what it is sent, answers as the
    in-process tower would."""

    def __init__(self, tower: torch.jit.ScriptModule) -> None:
        self.tower, self.sent = tower, []

    def encode(self, features, version: str = "") -> np.ndarray:  # type: ignore[no-untyped-def]
        self.sent.append(features)
        with torch.inference_mode():
            return self.tower(*features.as_tuple()).numpy()


def test_triton_is_sent_the_photo_the_in_process_tower_reads(trained):
    settings, bundle, items = trained
    local = new_items_for(bundle, settings)
    assert local is not None and local.encoder is not None
    triton = RecordingTriton(local.encoder.tower)
    remote = NewItems(local.encoder, triton, "1")  # type: ignore[arg-type]
    rows = pd.DataFrame([{"item_id": "listed", **_listing(items, "tv-new")}])
    sent = remote.encode(rows)
    assert remote.sources == {"triton": 1} and bool(triton.sent[0].has_image[0])
    assert np.abs(sent - local.encoder.run_tower(local.encoder.features(rows))).max() <= TOLERANCE
