"""Shared fixtures: small settings for fast runs and a toy catalogue whose answers are known."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pandas as pd
import pytest
from hypothesis.configuration import set_hypothesis_home_dir

from railtower.settings import Settings, load_settings


# Where a test that names no folder of its own writes: this run's pytest folder, never the
# project's artifacts/, reports/, .cache/ or triton_models/. Set for the whole session before
# any fixture runs (session- and module-scoped fixtures included, and the subprocesses tests
# start inherit it). The one cache all tests share
# (MiniLM text embeddings, content-hashed) is built once per run there, as a fresh CI checkout
# builds it anyway.
def pytest_configure(config: pytest.Config) -> None:
    # Hypothesis writes its database and constants while tests are collected, before any
    # fixture: a folder of this run's own, not ./.hypothesis in the checkout.
    set_hypothesis_home_dir(tempfile.mkdtemp(prefix="railtower-hypothesis-"))


HERMETIC_FOLDERS = {
    "RAILTOWER_ARTIFACTS_DIR": "artifacts",
    "RAILTOWER_REPORTS_DIR": "reports",
    "RAILTOWER_CACHE_DIR": "cache",
    "RAILTOWER_SERVING__TRITON_REPOSITORY": "triton_models",
}


@pytest.fixture(scope="session", autouse=True)
def _hermetic_folders(tmp_path_factory) -> Iterator[None]:
    base = tmp_path_factory.getbasetemp()
    before = {name: os.environ.get(name) for name in HERMETIC_FOLDERS}
    os.environ.update({name: str(base / folder) for name, folder in HERMETIC_FOLDERS.items()})
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def fast_settings(tmp_path) -> Settings:
    """Real configs, fewer bootstrap resamples and sessions, reports under tmp_path."""
    return load_settings(
        reports_dir=tmp_path / "reports",
        evaluation={"bootstrap_samples": 200, "max_sessions_per_task": 600},
    )


def toy_events(
    sessions: dict[str, list[tuple[str, str]]], start: str = "2024-01-01"
) -> pd.DataFrame:
    """Canonical events from {session: [(item, type), ...]}, one minute apart, in dict order."""
    rows, t = [], pd.Timestamp(start, tz="UTC")
    for session, events in sessions.items():
        for position, (item, kind) in enumerate(events):
            rows.append(
                {
                    "event_id": f"{session}-{position}",
                    "event_time": t,
                    "event_type": kind,
                    "session_id": session,
                    "item_id": item,
                    "position": position,
                    "price": 1.0,
                }
            )
            t += pd.Timedelta(minutes=1)
    frame = pd.DataFrame(rows)
    for col in ("event_id", "event_type", "session_id", "item_id"):
        frame[col] = frame[col].astype("string")
    return frame


@pytest.fixture(scope="session")
def trained_rees46(tmp_path_factory):
    """A REES46 model with towers, trained once per test session (two tower epochs, the full
    ranking pipeline), exported to a temporary Triton repository; (settings, rails bundle).

    Budgets are far above any stage here: tests assert behaviour, never timing (the
    over-budget path has its own test with a budget nothing can meet).
    """
    from training.harness import run_evaluation

    root = tmp_path_factory.mktemp("model")
    settings = load_settings(
        artifacts_dir=root / "artifacts",
        reports_dir=root / "reports",
        # the judged fit itself, so its own test split stays unseen (tests score it there)
        evaluation={"bootstrap_samples": 100, "max_sessions_per_task": 300, "refit": False},
        training={"max_epochs": 2},
        ranking={"mmr_lambda_grid": [0.85, 1.0]},
        serving={
            "triton_repository": root / "triton_models",
            "budgets": {
                "redis_ms": 2000,
                "user_vector_ms": 5000,
                "ranker_ms": 5000,
                "admission_ms": 5000,
            },
        },
        log_level="WARNING",
    )
    run_evaluation(settings, ["rees46"], run_name="api", towers=True)
    return settings, settings.artifacts_dir / "api-rees46-rails"
