"""The promotion gate: refuses a worse model, accepts a better one, switches atomically."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from typer.testing import CliRunner

from railtower.cli import app
from railtower.errors import ArtifactMismatch
from railtower.manifest import Manifest
from railtower.settings import PromotionSettings
from ranking.rails_bundle import EVALUATION
from training.promotion import gate, promote

STAGE = PromotionSettings().stage
RAILS = ("homepage_hero", "pdp_fbt")


def record(ndcg_by_rail, coverage=0.5, fingerprint="cases-v1", dataset="shop"):
    """An evaluation record as the harness writes it, from per-case NDCG arrays."""
    rails = {}
    for rail, values in ndcg_by_rail.items():
        values = np.asarray(values, dtype=float)
        rails[rail] = {
            "fingerprint": fingerprint,
            "coverage_ceiling": 1.0,
            "sessions": [f"s{i // 2}" for i in range(len(values))],  # two cases per session
            "models": {
                STAGE: {
                    "ndcg": float(values.mean()),
                    "coverage": coverage,
                    "per_case_ndcg": values.tolist(),
                }
            },
        }
    return {"dataset": dataset, "split": "test", "rails": rails}


@pytest.fixture
def production_values():
    rng = np.random.default_rng(7)
    return {rail: rng.uniform(0.0, 0.6, size=400) for rail in RAILS}


def test_gate_refuses_a_worse_model_and_says_which_rail(production_values):
    worse = dict(production_values)
    worse["pdp_fbt"] = np.clip(production_values["pdp_fbt"] - 0.1, 0.0, None)
    decision = gate(record(worse), record(production_values), PromotionSettings(), seed=1)
    assert not decision.promote
    failed = [v for v in decision.verdicts if not v.passed]
    assert [v.rail for v in failed] == ["pdp_fbt"]
    assert failed[0].high < 0
    assert any("pdp_fbt" in r and "below production" in r for r in decision.reasons)


def test_gate_accepts_a_better_model_and_an_equal_one(production_values):
    better = {r: np.clip(v + 0.05, 0.0, 1.0) for r, v in production_values.items()}
    assert gate(record(better), record(production_values), PromotionSettings(), 1).promote
    # identical quality: the difference's interval contains 0, which is not "worse"
    same = gate(record(production_values), record(production_values), PromotionSettings(), 1)
    assert same.promote
    assert all(v.low <= 0 <= v.high for v in same.verdicts)


def test_gate_refuses_results_from_another_window(production_values):
    candidate = record(production_values, fingerprint="cases-v2")
    decision = gate(candidate, record(production_values), PromotionSettings(), 1)
    assert not decision.promote
    assert all("different held-out cases" in v.why for v in decision.verdicts)


def test_gate_enforces_the_coverage_floor(production_values):
    narrow = record(production_values, coverage=0.01)
    decision = gate(narrow, record(production_values), PromotionSettings(), 1)
    assert not decision.promote
    assert all("coverage share" in v.why for v in decision.verdicts)
    # without production (and no baseline in the record), coverage alone decides
    assert gate(record(production_values), None, PromotionSettings(), 1).promote
    assert not gate(narrow, None, PromotionSettings(), 1).promote


def with_baselines(candidate, baselines):
    """`candidate` with baseline rows on the same cases, as the harness records them."""
    for rail, data in candidate["rails"].items():
        data["baselines"] = sorted(baselines)
        for name, values in baselines.items():
            data["models"][name] = {
                "ndcg": float(np.mean(values[rail])),
                "coverage": 0.5,
                "per_case_ndcg": np.asarray(values[rail], dtype=float).tolist(),
            }
    return candidate


def test_gate_refuses_a_rail_that_loses_to_the_best_baseline(production_values):
    ours = production_values
    knn = {r: np.clip(v + 0.08, 0.0, 1.0) for r, v in ours.items()}
    knn["homepage_hero"] = ours["homepage_hero"]  # level on the hero rail
    weak = {r: np.clip(v - 0.2, 0.0, 1.0) for r, v in ours.items()}
    candidate = with_baselines(record(ours), {"session_knn": knn, "popularity": weak})
    # with no production the baselines decide; with one, they still apply
    for production in (None, record(ours)):
        decision = gate(candidate, production, PromotionSettings(), 1)
        verdicts = {v.rail: v for v in decision.verdicts}
        assert not decision.promote
        assert verdicts["homepage_hero"].passed and verdicts["homepage_hero"].baseline_low <= 0
        pdp = verdicts["pdp_fbt"]
        assert not pdp.passed and pdp.baseline == "session_knn" and pdp.baseline_high < 0
        assert "session_knn wins" in pdp.why
        assert "| session_knn" in decision.to_markdown()
    # a candidate level with the best baseline passes; the switch turns the check off
    level = with_baselines(record(ours), {"session_knn": ours, "popularity": weak})
    assert gate(level, None, PromotionSettings(), 1).promote
    off = PromotionSettings(beat_baselines=False)
    assert gate(candidate, None, off, 1).promote


def _bundle(folder, evaluation):
    folder.mkdir(parents=True)
    (folder / EVALUATION).write_bytes(orjson.dumps(evaluation))
    Manifest(
        kind="rails",
        version=folder.name,
        created_at="2026-01-01T00:00:00+00:00",
        git_commit=None,
        settings_fingerprint="test",
    ).write(folder)
    return folder


def test_promote_switches_the_pointer_only_on_a_pass(tmp_path, production_values):
    pointer = tmp_path / "production" / "shop"
    first = _bundle(tmp_path / "v1", record(production_values))
    assert promote(first, pointer, PromotionSettings(), 1).promote
    assert pointer.resolve() == first.resolve()

    worse = {r: v * 0.5 for r, v in production_values.items()}
    second = _bundle(tmp_path / "v2", record(worse))
    decision = promote(second, pointer, PromotionSettings(), 1)
    assert not decision.promote and decision.production == "v1"
    assert pointer.resolve() == first.resolve()  # production untouched

    better = {r: np.clip(v + 0.1, 0, 1) for r, v in production_values.items()}
    third = _bundle(tmp_path / "v3", record(better))
    assert promote(third, pointer, PromotionSettings(), 1).promote
    assert pointer.resolve() == third.resolve()
    history = (pointer.parent / "history.jsonl").read_text().splitlines()
    assert [orjson.loads(line)["promote"] for line in history] == [True, False, True]


def test_promote_refuses_an_altered_bundle(tmp_path, production_values):
    bundle = _bundle(tmp_path / "v1", record(production_values))
    (bundle / EVALUATION).write_bytes(orjson.dumps(record({"homepage_hero": [1.0] * 10})))
    with pytest.raises(ArtifactMismatch, match="does not match its hash"):
        promote(bundle, tmp_path / "production" / "shop", PromotionSettings(), 1)


def test_cli_exits_3_on_refusal_and_leaves_production(tmp_path, monkeypatch, production_values):
    monkeypatch.setenv("RAILTOWER_ARTIFACTS_DIR", str(tmp_path))
    runner = CliRunner()
    good = _bundle(tmp_path / "good", record(production_values))
    bad = _bundle(tmp_path / "bad", record({r: v * 0.3 for r, v in production_values.items()}))
    assert runner.invoke(app, ["promote", str(good)]).exit_code == 0
    result = runner.invoke(app, ["promote", str(bad)])
    assert result.exit_code == 3, result.output
    assert "REFUSE" in result.output
    assert (tmp_path / "production" / "shop").resolve() == good.resolve()


def test_cli_json_prints_the_decision_and_puts_errors_on_stderr(
    tmp_path, monkeypatch, production_values
):
    monkeypatch.setenv("RAILTOWER_ARTIFACTS_DIR", str(tmp_path))
    runner = CliRunner()
    good = _bundle(tmp_path / "good", record(production_values))
    bad = _bundle(tmp_path / "bad", record({r: v * 0.3 for r, v in production_values.items()}))
    first = runner.invoke(app, ["promote", str(good), "--json"])
    assert first.exit_code == 0, first.output
    decision = orjson.loads(first.stdout)
    assert decision["promoted"] is True and decision["candidate"] == "good"
    assert list(decision) == ["promoted", "candidate", "production", "reasons", "verdicts"]
    # no production record on the first promotion: its NDCG is NaN, written as null
    assert decision["verdicts"][0]["production_ndcg"] is None
    refused = runner.invoke(app, ["promote", str(bad), "--json"])
    assert refused.exit_code == 3
    assert orjson.loads(refused.stdout)["promoted"] is False
    again = runner.invoke(app, ["promote", str(good), "--json"])
    assert again.exit_code == 1 and again.stdout == ""
    assert again.stderr.splitlines()[-1].endswith("good is already production")
