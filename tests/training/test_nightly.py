"""The nightly job on real REES46: promote, refuse a worse model, crash and resume, no rework."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pandas as pd
import pytest
from typer.testing import CliRunner

from railtower.cli import app
from railtower.manifest import Manifest
from railtower.production import history_path, pointer_path
from tests.conftest import toy_events
from tests.training.conftest import NIGHTLY_OVERRIDES, nightly_settings
from training import nightly
from training.nightly import NightlyError, run_lock, run_nightly, select_window

# A model that is worse than the promoted one on the same window: popularity alone feeds a
# one-tree ranker (no towers, so it trains in seconds).
CRIPPLED = {"sources": ["popularity"], "ranker": {"num_trees": 1}, "mmr_lambda_grid": [0.85]}
# Fewer baselines beside it: they do not change the held-out cases the gate compares on.
FEW_BASELINES = {**NIGHTLY_OVERRIDES["evaluation"], "baselines": ["popularity"]}


def _pointer(settings):  # type: ignore[no-untyped-def]
    return pointer_path(settings.artifacts_dir, settings.promotion, "rees46")


def _history(settings) -> list[dict]:  # type: ignore[no-untyped-def]
    path = history_path(_pointer(settings))
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def _forbid_training(monkeypatch):  # type: ignore[no-untyped-def]
    calls: list[str] = []

    def train(*args, **kwargs):  # type: ignore[no-untyped-def]  # noqa: ARG001
        calls.append(args[2])
        raise AssertionError("training ran again")

    monkeypatch.setattr(nightly, "train_and_evaluate", train)
    return calls


def test_select_window_keeps_whole_sessions_starting_inside_it():
    events = toy_events({"old": [("a", "view")] * 3, "new": [("b", "view"), ("c", "cart")]})
    # sessions: "old" 00:00-00:02, "new" 00:03-00:04; a 2.5-minute window starts at 00:01:30
    window, cut = select_window(events, True, 2.5 / 1440)
    assert cut == pd.Timestamp("2024-01-01 00:01:30", tz="UTC")
    assert set(window["session_id"]) == {"new"} and len(window) == 2
    everything, none = select_window(events, True, 0)
    assert none is None and len(everything) == len(events)


def test_second_run_is_refused_while_the_lock_is_held(tmp_path):
    settings = nightly_settings(tmp_path)
    with run_lock(settings.artifacts_dir / settings.nightly.state_dir, "holder"):
        with pytest.raises(NightlyError, match="another nightly run holds .*holder"):
            run_nightly(settings, ["rees46"])


@pytest.mark.slow
def test_first_nightly_promotes_and_the_pointer_names_its_bundle(nightly_rees46):
    settings, result = nightly_rees46
    record = result.state["datasets"]["rees46"]
    assert result.exit_code == 0 and record["outcome"] == "promoted"
    assert list(record["steps"]) == list(nightly.STEPS)
    rails = record["steps"]["train"]["outputs"]["rails_bundle"]
    assert _pointer(settings).resolve() == Path(rails).resolve()
    # serving's artifacts: the HNSW index and the Triton version the tower bundle names
    checked = record["steps"]["verify"]["outputs"]
    # the refit's towers index what was known at their cut (train + validation), not the
    # 4,972 items the REES46 table lists (it names items first seen in later sessions)
    assert 3000 < checked["hnsw_items"] < 4972 and os.path.exists(checked["triton"])
    # the window is in the evaluation manifest and covers all of REES46 (3 hours < 28 days)
    report = record["steps"]["train"]["outputs"]["report"]
    window = Manifest.load(Path(report)).data[0]
    assert window.events == record["window"]["events"] == 12_478
    assert window.files and window.start.startswith("2019-10-01 00:00")
    assert "PROMOTE" in result.report_markdown.read_text()
    assert orjson.loads(result.report_json.read_bytes())["finished"] is True
    assert [h["promote"] for h in _history(settings)] == [True]


@pytest.mark.slow
def test_rerunning_the_same_window_neither_retrains_nor_promotes_again(nightly_rees46, monkeypatch):
    settings, first = nightly_rees46
    calls = _forbid_training(monkeypatch)
    again = run_nightly(settings, ["rees46"])
    assert again.run == first.run and again.exit_code == 0
    other = run_nightly(settings, ["rees46"], run_name="renamed")
    assert other.state["datasets"]["rees46"]["reused_from"] == first.run
    assert calls == [] and len(_history(settings)) == 1
    # the command line says the same, with the exit code of a promotion
    env = {
        "RAILTOWER_ARTIFACTS_DIR": str(settings.artifacts_dir),
        "RAILTOWER_REPORTS_DIR": str(settings.reports_dir),
        "RAILTOWER_SERVING__TRITON_REPOSITORY": str(settings.serving.triton_repository),
        "RAILTOWER_SERVING__REDIS_URL": settings.serving.redis_url,
        "RAILTOWER_EVALUATION__BOOTSTRAP_SAMPLES": "100",
        "RAILTOWER_EVALUATION__MAX_SESSIONS_PER_TASK": "300",
        "RAILTOWER_TRAINING__MAX_EPOCHS": "2",
        "RAILTOWER_RANKING__MMR_LAMBDA_GRID": "[0.85, 1.0]",
        "RAILTOWER_PROMOTION__BOOTSTRAP_SAMPLES": "200",
        "RAILTOWER_LOG_LEVEL": "WARNING",
    }
    out = CliRunner().invoke(app, ["nightly", "-d", "rees46"], env=env)
    assert out.exit_code == 0, out.output
    assert first.run in out.output and calls == []


@pytest.mark.slow
def test_worse_challenger_on_the_same_window_is_refused(nightly_rees46):
    settings, first = nightly_rees46
    production = _pointer(settings).resolve()
    worse = nightly_settings(
        settings.artifacts_dir.parent, ranking=CRIPPLED, evaluation=FEW_BASELINES
    )
    result = run_nightly(worse, ["rees46"])
    record = result.state["datasets"]["rees46"]
    assert result.run != first.run and result.exit_code == 3
    assert record["outcome"] == "refused" and _pointer(settings).resolve() == production
    verdicts = {v["rail"]: v for v in record["steps"]["promote"]["outputs"]["verdicts"]}
    hero = verdicts["homepage_hero"]
    assert not hero["passed"] and hero["high"] < 0 and "below production" in hero["why"]
    assert "REFUSE" in result.report_markdown.read_text()
    assert _history(settings)[-1]["promote"] is False


@pytest.mark.slow
def test_crash_after_training_leaves_production_and_resume_does_not_retrain(
    nightly_rees46, monkeypatch
):
    settings, _ = nightly_rees46
    production = _pointer(settings).resolve()
    decisions = len(_history(settings))
    crippled = nightly_settings(
        settings.artifacts_dir.parent,
        ranking={**CRIPPLED, "ranker": {"num_trees": 2}},
        evaluation=FEW_BASELINES,
    )

    def crash(*args, **kwargs):  # type: ignore[no-untyped-def]  # noqa: ARG001
        raise RuntimeError("injected crash after training")

    with monkeypatch.context() as patch:
        patch.setattr(nightly, "verify_artifacts", crash)
        with pytest.raises(NightlyError, match="step 'verify' failed: injected crash"):
            run_nightly(crippled, ["rees46"])
    assert _pointer(settings).resolve() == production and len(_history(settings)) == decisions
    state_files = list((settings.artifacts_dir / "nightly").glob("*/state.json"))
    crashed = [orjson.loads(p.read_bytes()) for p in state_files]
    crashed = [s for s in crashed if not s["finished"]]
    assert len(crashed) == 1 and list(crashed[0]["datasets"]["rees46"]["steps"]) == [
        "window",
        "train",
    ]

    calls = _forbid_training(monkeypatch)
    resumed = run_nightly(crippled, resume=True)
    assert resumed.run == crashed[0]["run"] and calls == []
    assert resumed.exit_code == 3 and _pointer(settings).resolve() == production
    assert list(resumed.state["datasets"]["rees46"]["steps"]) == list(nightly.STEPS)
