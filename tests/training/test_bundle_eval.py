"""Scoring a trained bundle on any window without retraining, and the gate that uses it."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest
from typer.testing import CliRunner

from railtower.cli import app
from railtower.datasets import Dataset, load_dataset
from ranking.rails_bundle import RailsBundle, load_evaluation
from tests.training.test_nightly import CRIPPLED, FEW_BASELINES
from training.bundle_eval import evaluate_bundle, rebuild_cases
from training.evaluate import evaluate_dataset
from training.fit_pipeline import staged_evaluation
from training.promotion import gated, promote
from training.records import cases_fingerprint, sessions_within

pytestmark = pytest.mark.slow


def _fit_bundle(settings, dataset: Dataset, name: str):  # type: ignore[no-untyped-def]
    """A rails bundle through the harness functions (no towers: seconds, not minutes)."""
    folder = settings.artifacts_dir / f"{name}-rees46-rails"
    staged = staged_evaluation(dataset, settings, "test", None, folder)
    evaluate_dataset(dataset, settings, {}, "test", staged)
    return folder


def _without_towers(settings, **ranking):  # type: ignore[no-untyped-def]
    sources = [s for s in settings.ranking.sources if s != "two_tower"]
    return settings.model_copy(
        update={
            "ranking": settings.ranking.model_copy(update={"sources": sources, **ranking}),
            "evaluation": settings.evaluation.model_copy(update={"baselines": ["popularity"]}),
        }
    )


@pytest.fixture(scope="module")
def rees46(trained_rees46) -> Dataset:  # type: ignore[no-untyped-def]
    return load_dataset("rees46", trained_rees46[0])


@pytest.fixture(scope="module")
def early_rees46(trained_rees46, rees46):  # type: ignore[no-untyped-def]
    """(settings, bundle) fitted only on the sessions `trained_rees46` trained on: a
    production bundle from an older window, whose own test split lies inside that window."""
    settings, rails = trained_rees46
    window = RailsBundle.load(rails).manifest.data[0]
    early = sessions_within(rees46.events, window.start, window.end)
    cheap = _without_towers(settings)
    windowed = Dataset(rees46.spec, early, rees46.items, rees46.reports)
    return cheap, _fit_bundle(cheap, windowed, "early")


def test_bundle_on_its_own_test_window_reproduces_the_harness_ndcg(trained_rees46, rees46):
    settings, rails = trained_rees46
    recorded = load_evaluation(rails)
    scored = evaluate_bundle(rails, rees46, settings, write=False)
    assert set(scored.record["rails"]) == set(recorded["rails"])
    for rail, mine in scored.record["rails"].items():
        theirs = recorded["rails"][rail]
        assert mine["fingerprint"] == theirs["fingerprint"]
        assert mine["sessions"] == theirs["sessions"]
        for model, row in theirs["models"].items():
            ours = mine["models"][model]
            assert abs(ours["ndcg"] - row["ndcg"]) <= 1e-9, (rail, model)
            diff = np.abs(np.subtract(ours["per_case_ndcg"], row["per_case_ndcg"]))
            assert diff.max() <= 1e-9, (rail, model)
    # the baselines beside it are refitted on the bundle's own training window
    assert {t.model for t in scored.result.tasks} >= {"popularity", "+ranker+mmr+rules"}
    assert (
        scored.result.split["baseline_fit_events"]
        == RailsBundle.load(rails).manifest.data[0].events
    )
    # the recorded held-out window rebuilds the very same cases
    rebuilt = rebuild_cases(rees46, recorded["held_out"], settings.serving.purchase_memory)
    assert {r: cases_fingerprint(c) for r, c in rebuilt.items()} == {
        r: v["fingerprint"] for r, v in recorded["rails"].items()
    }


def test_later_window_gives_other_cases_and_a_cold_share(early_rees46, rees46):
    settings, early = early_rees46
    own = load_evaluation(early)
    window = RailsBundle.load(early).manifest.data[0]
    later = evaluate_bundle(early, rees46, settings, run_name="early-later")
    for rail, record in later.record["rails"].items():
        # a rail its own (earlier) test split had no case for has nothing to differ from
        assert record["fingerprint"] != own["rails"].get(rail, {}).get("fingerprint")
        assert 0.0 < later.cold_share[rail] < 1.0
        task = next(t for t in later.result.tasks if t.rail == rail and t.model == "+ranker")
        assert task.cold_cases == round(later.cold_share[rail] * task.cases)
    # every held-out case comes from a session that ends after the training window
    ends = rees46.events.groupby("session_id")["event_time"].max()
    sessions = {s for r in later.record["rails"].values() for s in r["sessions"]}
    assert (ends.loc[list(sessions)] > window.end).all()
    assert (later.folder / "results.json").exists() and (later.folder / "results.md").exists()


def test_listing_new_items_lets_the_towers_reach_targets_the_catalogue_lacked(
    trained_rees46, rees46
):
    # The bundle's point-in-time catalogue lacks items first seen after its window; listed
    # through the serving path (content only), the towers retrieve some of those targets.
    settings, rails = trained_rees46
    window = RailsBundle.load(rails).manifest.data[0]
    held_out = load_evaluation(rails)["held_out"]
    known = set(RailsBundle.load(rails).items["item_id"].astype(str))
    cases = rebuild_cases(rees46, held_out, settings.serving.purchase_memory)["homepage_hero"]
    wanted = {t for c in cases for t in c.targets} - known
    listed = rees46.items[rees46.items["item_id"].astype(str).isin(wanted)]
    assert len(listed) > 0, f"every target of {window} is in the catalogue: nothing to list"

    def towers_cold_recall(scored) -> float:  # type: ignore[no-untyped-def]
        task = next(
            t for t in scored.result.tasks if t.rail == "homepage_hero" and t.model == "two_tower"
        )
        return task.cold["recall@120"].mean

    plain = evaluate_bundle(rails, rees46, settings, held_out, write=False)
    with_new = evaluate_bundle(rails, rees46, settings, held_out, write=False, listed=listed)
    assert with_new.result.split["listed_items"] == len(listed)
    assert towers_cold_recall(plain) == 0.0 < towers_cold_recall(with_new)


def _crippled(settings):  # type: ignore[no-untyped-def]
    """Popularity as the only source and a one-tree ranker: worse than any real model."""
    crippled = _without_towers(
        settings, **{k: v for k, v in CRIPPLED.items() if k != "ranker"}
    ).model_copy(update={"evaluation": settings.evaluation.model_copy(update=FEW_BASELINES)})
    ranker = crippled.ranking.ranker.model_copy(update={"num_trees": 1})
    return crippled.model_copy(
        update={"ranking": crippled.ranking.model_copy(update={"ranker": ranker})}
    )


def _pointer_at(tmp_path, bundle):  # type: ignore[no-untyped-def]
    pointer = tmp_path / "production" / "rees46"
    pointer.parent.mkdir(parents=True)
    pointer.symlink_to(bundle.resolve())
    return pointer


def test_gate_rescores_production_on_the_challengers_window(trained_rees46, rees46, tmp_path):
    settings, challenger = trained_rees46
    # production: a crippled bundle from the older window, so the challenger is not worse
    # by construction (whether two real models tie depends on training, not on the gate)
    window = RailsBundle.load(challenger).manifest.data[0]
    early = sessions_within(rees46.events, window.start, window.end)
    older = Dataset(rees46.spec, early, rees46.items, rees46.reports)
    production = _fit_bundle(_crippled(settings), older, "weak-early")
    pointer = _pointer_at(tmp_path, production)
    # this test is about pairing with production; the baseline bar has tests of its own
    # (a two-epoch test model may well lose to session-kNN on a rail)
    gate_settings = settings.promotion.model_copy(update={"beat_baselines": False})
    # without the settings the gate cannot pair them and refuses, as before
    blind = promote(challenger, pointer, gate_settings, settings.seed)
    assert not blind.promote and "different held-out cases" in " ".join(blind.reasons)
    decision = promote(challenger, pointer, gate_settings, settings.seed, rescore=settings)
    assert decision.promote, decision.to_markdown()
    assert "re-scored on the candidate's held-out window" in decision.reasons[0]
    assert all(math.isfinite(v.production_ndcg) for v in decision.verdicts)
    assert pointer.resolve() == challenger.resolve()
    history = (pointer.parent / "history.jsonl").read_bytes().splitlines()
    assert [orjson.loads(h)["promote"] for h in history] == [False, True]


def test_gate_refuses_a_crippled_challenger_against_rescored_production(
    trained_rees46, early_rees46, rees46, tmp_path
):
    settings, _ = trained_rees46
    _, production = early_rees46
    candidate = _fit_bundle(_crippled(settings), rees46, "crippled")
    pointer = _pointer_at(tmp_path, production)
    decision = promote(candidate, pointer, settings.promotion, settings.seed, rescore=settings)
    assert not decision.promote and pointer.resolve() == production.resolve()
    assert "re-scored" in decision.reasons[0]
    failed = [v for v in decision.verdicts if not v.passed]
    assert failed and all(v.high < 0 and "below production" in v.why for v in failed)


def test_gate_refuses_when_the_rebuilt_cases_differ_from_the_record(trained_rees46, early_rees46):
    settings, challenger = trained_rees46
    _, production = early_rees46
    candidate = load_evaluation(challenger)
    candidate["held_out"] = {**candidate["held_out"], "seed": candidate["held_out"]["seed"] + 1}
    decision = gated(
        candidate, production, settings.promotion, settings.seed, "tampered", rescore=settings
    )
    assert not decision.promote
    assert (
        "fingerprint" in decision.reasons[0] and "re-evaluate the candidate" in decision.reasons[0]
    )


def test_cli_evaluate_bundle_scores_a_later_events_file(early_rees46, rees46, tmp_path):
    settings, early = early_rees46
    window = RailsBundle.load(early).manifest.data[0]
    trained = set(sessions_within(rees46.events, window.start, window.end)["session_id"])
    later = rees46.events[~rees46.events["session_id"].isin(trained)]
    path = tmp_path / "later.parquet"
    later.drop(columns=["position"]).to_parquet(path, index=False)
    env = {
        "RAILTOWER_ARTIFACTS_DIR": str(settings.artifacts_dir),
        "RAILTOWER_REPORTS_DIR": str(tmp_path / "reports"),
        "RAILTOWER_EVALUATION__BOOTSTRAP_SAMPLES": "100",
        "RAILTOWER_EVALUATION__MAX_SESSIONS_PER_TASK": "300",
        "RAILTOWER_LOG_LEVEL": "WARNING",
    }
    args = ["evaluate", "--bundle", str(early), "--events", str(path), "--run-name", "later"]
    out = CliRunner().invoke(app, args, env=env)
    assert out.exit_code == 0, out.output
    assert "cold share" in out.output and "+ranker+mmr+rules" in out.output
    payload = orjson.loads((tmp_path / "reports" / "later" / "results.json").read_bytes())
    (result,) = payload["datasets"]
    assert result["split"]["bundle"] == early.name and result["tasks"]
    assert (tmp_path / "reports" / "later" / "results.md").exists()
    bad = CliRunner().invoke(app, ["evaluate", "--events", str(path)], env=env)
    assert bad.exit_code != 0
