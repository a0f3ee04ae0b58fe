"""Image branch: one preprocessing, a content cache, clear errors, distillation end to end."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from railtower.datasets import load_dataset
from railtower.errors import ConfigError
from railtower.manifest import Manifest
from railtower.settings import ImageSettings, load_settings
from towers.image_encoder import ImageEmbedder, ImageEncoder, preprocess, read_image
from training.image_distill import distill_image_encoder, info_nce, split_items
from training.image_eval import image_neighbour_agreement, product_types

TINY = {"image_size": 32, "patch_size": 8, "batch_size": 16, "epochs": 1}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def hm_items():
    return load_dataset("hm_catalogue", load_settings()).items


@pytest.fixture(scope="module")
def photos(hm_items):
    return hm_items["image_path"].astype(str).head(6).tolist()


def _weights(folder, settings: ImageSettings, seed: int = 0):
    torch.manual_seed(seed)
    path = folder / f"weights-{seed}.pt"
    torch.save(ImageEmbedder(settings).state_dict(), path)
    return path


@pytest.fixture
def tiny_encoder(tmp_path):
    settings = ImageSettings(**TINY)
    settings = settings.model_copy(update={"weights_path": _weights(tmp_path, settings)})
    return ImageEncoder(settings, tmp_path / "cache")


def _count_forwards(encoder: ImageEncoder) -> list[int]:
    calls = [0]
    encoder.model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


# ---------------------------------------------------------------- preprocessing


def test_preprocess_gives_the_same_tensor_for_the_same_file(photos, tmp_path):
    settings = ImageSettings(**TINY)
    copy = tmp_path / "copy.jpg"
    copy.write_bytes(open(photos[0], "rb").read())
    first, again, copied = (preprocess(p, settings) for p in (photos[0], photos[0], copy))
    assert first.shape == (3, 32, 32) and first.dtype == torch.float32
    assert torch.equal(first, again) and torch.equal(first, copied)


def test_letterbox_pads_a_tall_photo_with_white_sides(tmp_path):
    path = tmp_path / "tall.png"
    Image.new("RGB", (20, 40), (255, 0, 0)).save(path)
    image = read_image(path, 16)
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8
    assert image[:, :, 0].eq(255).all()  # left edge is padding: white
    assert image[:, 8, 8].tolist() == [255, 0, 0]  # the centre is the photo: red


# ---------------------------------------------------------------- encoding


def test_missing_none_and_unreadable_images_get_zero_rows(tiny_encoder, photos, tmp_path):
    garbage = tmp_path / "broken.jpg"
    garbage.write_bytes(b"not a jpeg")
    paths = [photos[0], None, str(tmp_path / "missing.jpg"), str(garbage), pd.NA, photos[1]]
    vectors, has_image = tiny_encoder.encode(paths)
    assert vectors.shape == (6, 384) and vectors.dtype == np.float32
    assert has_image.tolist() == [True, False, False, False, False, True]
    assert np.allclose(np.linalg.norm(vectors[has_image], axis=1), 1.0, atol=1e-5)
    assert not vectors[~has_image].any()


def test_second_encode_is_served_from_cache_without_the_model(tiny_encoder, photos, tmp_path):
    calls = _count_forwards(tiny_encoder)
    first, _ = tiny_encoder.encode(photos)
    assert calls[0] == 1 and len(tiny_encoder.cache) == len(set(photos))
    again, _ = tiny_encoder.encode(photos)
    assert calls[0] == 1
    # A fresh encoder on the same weights reads the vectors back from disk.
    reopened = ImageEncoder(tiny_encoder.settings, tmp_path / "cache")
    reopened_calls = _count_forwards(reopened)
    from_disk, _ = reopened.encode(photos)
    assert reopened_calls[0] == 0
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first, from_disk)


def test_new_weights_never_serve_stale_vectors(tiny_encoder, photos, tmp_path):
    old, _ = tiny_encoder.encode(photos)
    settings = tiny_encoder.settings.model_copy(
        update={"weights_path": _weights(tmp_path, tiny_encoder.settings, seed=1)}
    )
    fresh = ImageEncoder(settings, tmp_path / "cache")
    calls = _count_forwards(fresh)
    new, _ = fresh.encode(photos)
    assert calls[0] == 1 and not np.allclose(old, new)


def test_no_weights_configured_is_a_config_error_that_says_to_distil(tmp_path):
    with pytest.raises(ConfigError, match="distil"):
        ImageEncoder(ImageSettings(**TINY), tmp_path)


def test_weights_of_another_image_size_are_a_config_error(tmp_path):
    path = _weights(tmp_path, ImageSettings(**TINY))
    other = ImageSettings(image_size=64, patch_size=8, weights_path=path)
    with pytest.raises(ConfigError, match="image_size 64"):
        ImageEncoder(other, tmp_path / "cache")


def test_timm_state_dict_is_resampled_to_the_configured_size(tmp_path, photos):
    import timm

    path = tmp_path / "timm.pt"
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict(), path)
    encoder = ImageEncoder(ImageSettings(**TINY, weights_path=path), tmp_path / "cache")
    vectors, has_image = encoder.encode(photos[:2])
    assert encoder.dim == 192 and vectors.shape == (2, 192) and has_image.all()


# ---------------------------------------------------------------- distillation


def test_split_keeps_each_product_group_on_one_side(hm_items):
    settings = load_settings(image={"max_images": 2000})
    train, validation = split_items(hm_items, settings)
    assert len(train) + len(validation) == 2000
    assert 0.09 <= len(validation) / 2000 <= 0.12
    assert not set(train["product_group"]) & set(validation["product_group"])
    again, _ = split_items(hm_items, settings)
    assert again["item_id"].tolist() == train["item_id"].tolist()


def test_info_nce_does_not_push_apart_items_with_the_same_text():
    vectors = torch.eye(3)[[0, 0, 1, 2]]  # items 0 and 1 are colour variants: one text
    same_text = torch.tensor([0, 0, 1, 2])
    masked = info_nce(vectors, vectors, same_text, temperature=0.05)
    unmasked = info_nce(vectors, vectors, torch.arange(4), temperature=0.05)
    assert masked.item() < 1e-6
    assert unmasked.item() > 0.3  # log(2) on two of four rows


def test_tiny_distillation_writes_a_bundle_the_encoder_loads(hm_items, tmp_path):
    settings = load_settings(
        artifacts_dir=tmp_path / "artifacts",
        cache_dir=tmp_path / "cache",
        image={**TINY, "max_images": 64},
    )
    weights = distill_image_encoder(settings, hm_items)
    assert weights.name == "weights.pt"
    assert weights.parent.parent == settings.artifacts_dir / "image_encoder"
    manifest = Manifest.load(weights.parent, verify=True)
    assert manifest.kind == "bundle" and "weights.pt" in manifest.files
    assert manifest.metrics["train_items"] + manifest.metrics["validation_items"] == 64

    encoder = ImageEncoder(
        settings.image.model_copy(update={"weights_path": weights}), settings.cache_dir
    )
    vectors, has_image = encoder.encode(hm_items["image_path"].head(4).tolist())
    assert vectors.shape == (4, 384) and has_image.all()
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


# ---------------------------------------------------------------- neighbour agreement


def _toy_clusters():
    # Three tight clusters of sizes 6, 3, 3 on orthogonal axes, labelled by cluster.
    rng = np.random.default_rng(0)
    centres = np.eye(3)[[0] * 6 + [1] * 3 + [2] * 3]
    vectors = centres + 0.01 * rng.standard_normal((12, 3))
    labels = np.array(["dress"] * 6 + ["shoe"] * 3 + ["sock"] * 3)
    return vectors, labels


def test_neighbour_agreement_is_perfect_on_separated_clusters():
    vectors, labels = _toy_clusters()
    result = image_neighbour_agreement(vectors, labels, k=2)
    assert result["precision"] == 1.0 and result["queries"] == 12
    assert result["chance"] == pytest.approx(0.5**2 + 0.25**2 + 0.25**2)
    assert result["lift"] == pytest.approx(1.0 / 0.375)


def test_neighbour_agreement_leaves_out_the_own_product_group():
    vectors, labels = _toy_clusters()
    # Dresses come in three groups, shoes in two, socks all in one group.
    groups = np.array(["a", "a", "b", "b", "c", "c", "s", "t", "t", "u", "u", "u"])
    result = image_neighbour_agreement(vectors, labels, k=2, groups=groups)
    sock_share = 0.0  # every other sock is in the own group, so none is a neighbour
    shoe_share = (1.0 + 0.5 + 0.5) / 3  # "s" finds both "t"s; each "t" finds "s" only
    expected = (6 * 1.0 + 3 * shoe_share + 3 * sock_share) / 12
    assert result["precision"] == pytest.approx(expected)


def test_neighbour_agreement_refuses_items_without_an_image():
    vectors, labels = _toy_clusters()
    vectors[0] = 0.0
    with pytest.raises(ValueError, match="zero rows"):
        image_neighbour_agreement(vectors, labels)


def test_product_type_is_the_last_category_level():
    paths = pd.Series(["Ladieswear > Lingeries/Tights > Socks & Tights > Socks", None])
    assert product_types(paths).tolist() == ["Socks", ""]
