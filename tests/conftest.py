"""Shared fixtures: small settings for fast runs and a toy catalogue whose answers are known."""

from __future__ import annotations

import pandas as pd
import pytest

from railtower.settings import Settings, load_settings


@pytest.fixture(autouse=True)
def _private_model_repository(tmp_path_factory, monkeypatch):
    """Tower exports from tests write Triton versions to a temporary repository, never to
    the project's triton_models/."""
    repo = tmp_path_factory.getbasetemp() / "triton_models"
    monkeypatch.setenv("RAILTOWER_SERVING__TRITON_REPOSITORY", str(repo))


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
