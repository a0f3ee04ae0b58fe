"""Drift: PSI by hand, the MMD test, real REES46 windows unshifted and shifted, the command."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest
from typer.testing import CliRunner

from railtower.cli import app
from railtower.datasets import load_dataset
from ranking.bundle import TowerBundle
from ranking.item_attributes import ItemAttributes
from ranking.rails_bundle import RailsBundle
from training.drift import (
    EXIT_FLAGGED,
    bundle_vectors,
    compare_windows,
    embedding_shift,
    encode_items,
    feature_psi,
    mmd_permutation_test,
    psi,
)


def test_psi_matches_a_hand_computation():
    # shares .5/.3/.2 -> .3/.3/.4: (.3-.5) ln(.3/.5) + 0 + (.4-.2) ln(.4/.2)
    assert psi(np.array([50, 30, 20]), np.array([30, 30, 40])) == pytest.approx(
        0.2 * np.log(5 / 3) + 0.2 * np.log(2), abs=1e-12
    )
    assert psi(np.array([50, 30, 20]), np.array([30, 30, 40])) == pytest.approx(0.240795, abs=1e-6)
    assert psi(np.array([5, 3, 2]), np.array([50, 30, 20])) == 0.0
    # an empty reference bin is floored at 1e-4: .5 ln 2 + (.5 - 1e-4) ln(.5 / 1e-4)
    assert psi(np.array([1, 0]), np.array([1, 1])) == pytest.approx(4.604318, abs=1e-6)
    with pytest.raises(ValueError, match="same bins"):
        psi(np.array([1, 2]), np.array([1, 2, 3]))


def test_feature_psi_lumps_the_tail_into_one_bin():
    reference = pd.Series(["a"] * 6 + ["b"] * 3 + ["c", "d"])
    recent = pd.Series(["a"] * 6 + ["b"] * 3 + ["d", "d"])
    assert feature_psi(reference, recent, max_bins=3)["psi"] == 0.0  # c and d are "(other)"
    # c vanished (its recent share floored at 1e-4), d doubled
    expected = (1e-4 - 1 / 11) * np.log(1e-4 * 11) + (2 / 11 - 1 / 11) * np.log(2)
    assert feature_psi(reference, recent)["psi"] == pytest.approx(expected, abs=1e-9)


def test_mmd_test_separates_shifted_samples_only():
    rng = np.random.default_rng(0)
    x, same, shifted = (
        rng.normal(size=(150, 8)),
        rng.normal(size=(150, 8)),
        rng.normal(size=(150, 8)),
    )
    shifted[:, 0] += 1.0
    mmd_same, p_same, _ = mmd_permutation_test(x, same, 100, seed=1)
    mmd_shift, p_shift, _ = mmd_permutation_test(x, shifted, 100, seed=1)
    assert p_same > 0.05 and p_shift == pytest.approx(1 / 101)
    assert mmd_shift > 10 * abs(mmd_same)


@pytest.fixture(scope="module")
def drift_inputs(nightly_rees46):
    """The promoted REES46 bundle's training window, catalogue, price bands and vectors."""
    settings, result = nightly_rees46
    record = result.state["datasets"]["rees46"]["steps"]["train"]["outputs"]
    rails = RailsBundle.load(Path(record["rails_bundle"]))
    tower = TowerBundle.load(Path(record["tower_bundle"]))
    window = rails.manifest.data[0]
    events = load_dataset("rees46", settings).events
    reference = events[
        (events["event_time"] >= pd.Timestamp(window.start))
        & (events["event_time"] <= pd.Timestamp(window.end))
    ].reset_index(drop=True)
    bands = ItemAttributes.from_frame(rails.items, settings.towers.price_bands).price_bands
    vectors = bundle_vectors(tower, rails.items, settings)
    return settings, reference, rails.items, bands, vectors, tower


def _compare(drift_inputs, recent):  # type: ignore[no-untyped-def]
    settings, reference, items, bands, vectors, _ = drift_inputs
    return compare_windows(reference, recent, items, bands, vectors, settings.drift, settings.seed)


@pytest.mark.slow
def test_identical_windows_are_not_flagged(drift_inputs):
    reference = drift_inputs[1]
    result = _compare(drift_inputs, reference.copy())
    assert not result["flagged"] and result["reasons"] == []
    assert all(f["psi"] == 0.0 for f in result["features"].values())
    assert result["unseen_share"] == 0.0
    assert result["embedding"]["mean_cosine_distance"] == pytest.approx(0.0, abs=1e-6)
    assert result["embedding"]["mmd2"] < drift_inputs[0].drift.mmd_min


@pytest.mark.slow
def test_events_remixed_to_one_category_flag_category_drift(drift_inputs):
    reference, items = drift_inputs[1], drift_inputs[2]
    tops = items["category_path"].str.split(" > ").str[0]
    phones = items.loc[tops == "electronics", "item_id"].astype(str)
    phones = phones[phones.isin(set(reference["item_id"].astype(str)))].to_numpy()
    recent = reference.copy()
    recent["item_id"] = phones[np.arange(len(recent)) % len(phones)]
    result = _compare(drift_inputs, recent)
    assert result["flagged"]
    assert result["features"]["top_category"]["psi"] > drift_inputs[0].drift.psi_threshold
    assert any(r.startswith("event mix: PSI of top_category") for r in result["reasons"])
    assert result["features"]["event_type"]["psi"] == 0.0  # the event types did not move


@pytest.mark.slow
def test_tripled_prices_flag_the_price_bands_and_nothing_else(drift_inputs):
    recent = drift_inputs[1].copy()
    recent["price"] = recent["price"] * 3
    result = _compare(drift_inputs, recent)
    assert result["flagged"] and len(result["reasons"]) == 1
    assert result["reasons"][0].startswith("event mix: PSI of price_band")
    assert result["features"]["top_category"]["psi"] == 0.0


@pytest.mark.slow
def test_perturbed_embeddings_flag_embedding_drift(drift_inputs):
    settings, reference, _, _, vectors, _ = drift_inputs
    direction = np.random.default_rng(3).normal(size=vectors(["x"])[0].shape[1])
    direction /= np.linalg.norm(direction)

    def perturbed(strength: float):  # type: ignore[no-untyped-def]
        def lookup(ids):  # type: ignore[no-untyped-def]
            base, found = vectors([i.removeprefix("moved:") for i in ids])
            moved = np.array([i.startswith("moved:") for i in ids])[:, None]
            out = np.where(moved, base + strength * direction, base)
            return out / np.linalg.norm(out, axis=1, keepdims=True), found

        return lookup

    recent = reference.assign(item_id="moved:" + reference["item_id"].astype(str))
    shifted = embedding_shift(reference, recent, perturbed(0.6), settings.drift, settings.seed)
    assert shifted["mmd_p_value"] < settings.drift.mmd_alpha
    assert shifted["mmd2"] >= settings.drift.mmd_min
    assert shifted["mean_cosine_distance"] > settings.drift.max_mean_cosine_distance
    control = embedding_shift(reference, recent, perturbed(0.0), settings.drift, settings.seed)
    assert control["mmd2"] < settings.drift.mmd_min
    assert control["mean_cosine_distance"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
def test_item_tower_encodes_items_as_the_bundle_did(drift_inputs):
    settings, _, items, _, _, tower = drift_inputs
    # the towers index what was known at their own cut, a subset of the refit's catalogue
    rows = items[items["item_id"].astype(str).isin(tower.item_row)].head(64).reset_index(drop=True)
    encoded = encode_items(tower, rows, settings)
    expected = tower.item_vectors[[tower.item_row[str(i)] for i in rows["item_id"]]]
    np.testing.assert_allclose(encoded, expected, atol=1e-4)
    # an item the bundle has never seen gets a content vector from the item tower
    new = rows.head(1).assign(item_id="brand-new-item")
    matrix, found = bundle_vectors(tower, pd.concat([items, new]), settings)(["brand-new-item"])
    assert found.all() and np.linalg.norm(matrix[0]) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.slow
def test_drift_command_writes_reports_and_exits_4_only_when_flagged(nightly_rees46, tmp_path):
    settings, result = nightly_rees46
    # the judged fit: its window ends before the data does (the refit has seen everything,
    # so nothing newer than its window exists to compare with)
    served = result.state["datasets"]["rees46"]["steps"]["train"]["outputs"]["rails_bundle"]
    bundle = f"{served}-heldout"
    env = {
        "RAILTOWER_ARTIFACTS_DIR": str(settings.artifacts_dir),
        "RAILTOWER_REPORTS_DIR": str(tmp_path / "reports"),
        "RAILTOWER_LOG_LEVEL": "WARNING",
    }
    args = ["drift", "-d", "rees46", "--bundle", bundle]
    strict = {**env, "RAILTOWER_DRIFT__PSI_THRESHOLD": "1e-9"}  # any change at all flags
    out = CliRunner().invoke(app, [*args, "--run-name", "strict"], env=strict)
    assert out.exit_code == EXIT_FLAGGED, out.output
    folder = tmp_path / "reports" / "strict" / "drift"
    payload = orjson.loads((folder / "drift.json").read_bytes())
    assert payload["flagged"] and payload["events"]["recent"] > 0
    assert (folder / "drift.png").stat().st_size > 0 and "FLAGGED" in (
        folder / "drift.md"
    ).read_text()
    lenient = {
        **env,
        "RAILTOWER_DRIFT__PSI_THRESHOLD": "1e9",
        "RAILTOWER_DRIFT__MAX_UNSEEN_SHARE": "1.0",
        "RAILTOWER_DRIFT__MAX_MEAN_COSINE_DISTANCE": "2.0",
        "RAILTOWER_DRIFT__MMD_MIN": "1e9",
    }
    out = CliRunner().invoke(app, [*args, "--run-name", "lenient"], env=lenient)
    assert out.exit_code == 0, out.output
    assert "no drift flagged" in out.output
