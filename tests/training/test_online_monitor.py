"""The online monitor: rolls production back on a hit-rate drop beyond 3%, and only then."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import orjson
import pandas as pd
import pytest
from typer.testing import CliRunner

from railtower.cli import app
from railtower.schemas import Impression, encode
from railtower.settings import PromotionSettings, load_settings
from tests.training.test_promotion import RAILS, _bundle, record
from training.online_monitor import check_and_rollback, promoted_and_previous
from training.promotion import promote
from training.shadow_eval import SessionTimelines

DAY1 = datetime(2024, 3, 1, tzinfo=UTC)
DAY2 = DAY1 + timedelta(days=1)
GRADES = {"view": 1, "cart": 2, "purchase": 3}


@pytest.fixture
def production(tmp_path):
    """v1 promoted, then v2 promoted over it: the pointer names v2, v1 is previous."""
    rng = np.random.default_rng(7)
    values = {rail: rng.uniform(0.0, 0.6, size=400) for rail in RAILS}
    pointer = tmp_path / "production" / "shop"
    v1 = _bundle(tmp_path / "v1", record(values, dataset="shop"))
    assert promote(v1, pointer, PromotionSettings(), 1).promote
    better = {r: np.clip(v + 0.1, 0, 1) for r, v in values.items()}
    v2 = _bundle(tmp_path / "v2", record(better, dataset="shop"))
    assert promote(v2, pointer, PromotionSettings(), 1).promote
    return pointer, v1, v2


def settings_for(tmp_path, min_impressions=500):
    return load_settings(
        artifacts_dir=tmp_path,
        reports_dir=tmp_path / "reports",
        evaluation={"bootstrap_samples": 200},
        monitor={"min_impressions": min_impressions, "window_minutes": 1440},
    )


def traffic(version: str, start: datetime, n: int, hits: int):
    """`n` served impressions of `version`, one session each, one a minute; the first `hits`
    list the item the shopper viewed two minutes later (an exact hit rate of hits / n)."""
    impressions, rows = [], []
    for k in range(n):
        session, at, target = f"{version}-{k}", start + timedelta(minutes=k), f"t{version}{k}"
        items = (
            [target] + [f"f{j}" for j in range(11)] if k < hits else [f"f{j}" for j in range(12)]
        )
        impressions.append(
            Impression(
                impression_id=f"{session}-i",
                request_id=f"{session}-r",
                served_at=at,
                session_id=session,
                rail="homepage_hero",
                arm="production",
                shown=True,
                model_version=version,
                items=items,
            )
        )
        rows.append((session, target, "view", at + timedelta(minutes=2)))
    return impressions, rows


def log_of(v1_hits: int, v2_hits: int, n: int = 1000):
    """v1 served on day 1, v2 on day 2; a later event makes every impression matured."""
    first, rows1 = traffic("v1", DAY1, n, v1_hits)
    second, rows2 = traffic("v2", DAY2, n, v2_hits)
    rows = rows1 + rows2 + [("tail", "x", "view", DAY2 + timedelta(days=1))]
    events = pd.DataFrame(rows, columns=["session_id", "item_id", "event_type", "event_time"])
    events["event_time"] = pd.to_datetime(events["event_time"], utc=True)
    return first + second, events


def test_previous_model_is_the_one_below_on_the_production_stack(production, tmp_path):
    pointer, _, _ = production
    assert promoted_and_previous(pointer, tmp_path) == ("v2", "v1")
    assert promoted_and_previous(tmp_path / "production" / "other", tmp_path) == (None, None)


def test_a_drop_beyond_3_percent_rolls_back(production, tmp_path):
    pointer, v1, _ = production
    impressions, events = log_of(v1_hits=400, v2_hits=380)  # 0.40 -> 0.38: 5% relative
    settings = settings_for(tmp_path)
    decision = check_and_rollback(settings, "shop", impressions, SessionTimelines(events, GRADES))
    assert decision.rolls_back, decision.reason
    assert decision.relative_drop == pytest.approx(0.05)
    assert pointer.resolve() == v1.resolve()  # production moved back
    last = orjson.loads((pointer.parent / "history.jsonl").read_bytes().splitlines()[-1])
    assert last["action"] == "rollback" and last["restored"] == "v1"
    assert "online monitor" in last["reason"]
    windows = {w.version: w for w in decision.windows}
    assert windows["v1"].hit_rate.mean == pytest.approx(0.40)
    assert windows["v2"].hit_rate.mean == pytest.approx(0.38)
    assert windows["v2"].hit_rate.low < 0.38 < windows["v2"].hit_rate.high
    assert "ROLLBACK" in decision.to_markdown()


def test_a_2_percent_drop_keeps_production(production, tmp_path):
    pointer, _, v2 = production
    impressions, events = log_of(v1_hits=400, v2_hits=392)  # 2% relative
    decision = check_and_rollback(
        settings_for(tmp_path), "shop", impressions, SessionTimelines(events, GRADES)
    )
    assert decision.action == "keep"
    assert decision.relative_drop == pytest.approx(0.02)
    assert pointer.resolve() == v2.resolve()


def test_too_few_impressions_never_roll_back(production, tmp_path):
    pointer, _, v2 = production
    impressions, events = log_of(v1_hits=40, v2_hits=10, n=100)  # a 75% drop, 100 each
    decision = check_and_rollback(
        settings_for(tmp_path, min_impressions=500),
        "shop",
        impressions,
        SessionTimelines(events, GRADES),
    )
    assert decision.action == "no decision" and "too few" in decision.reason
    assert pointer.resolve() == v2.resolve()


def test_impressions_whose_horizon_is_not_over_are_left_out(production, tmp_path):
    pointer, _, v2 = production
    impressions, events = log_of(v1_hits=400, v2_hits=100)
    events = events[events["session_id"] != "tail"]  # the log ends minutes after v2's last
    decision = check_and_rollback(
        settings_for(tmp_path, min_impressions=990),
        "shop",
        impressions,
        SessionTimelines(events, GRADES),
    )
    # the last 30 min of v2 traffic has not matured: fewer than 990 v2 impressions count
    assert decision.immature > 0
    assert decision.action == "no decision"
    assert pointer.resolve() == v2.resolve()


def test_cli_dry_run_reports_and_a_real_run_rolls_back(production, tmp_path, monkeypatch):
    pointer, v1, v2 = production
    impressions, events = log_of(v1_hits=400, v2_hits=300)
    (tmp_path / "imp.jsonl").write_bytes(b"".join(encode(i) + b"\n" for i in impressions))
    events.to_parquet(tmp_path / "events.parquet")
    monkeypatch.setenv("RAILTOWER_ARTIFACTS_DIR", str(tmp_path))
    monkeypatch.setenv("RAILTOWER_MONITOR__MIN_IMPRESSIONS", "500")
    monkeypatch.setenv("RAILTOWER_EVALUATION__BOOTSTRAP_SAMPLES", "100")
    args = ["monitor", "-d", "shop", "--impressions", str(tmp_path / "imp.jsonl")]
    args += ["--events", str(tmp_path / "events.parquet")]
    dry = CliRunner().invoke(app, [*args, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "WOULD ROLL BACK" in dry.output
    assert pointer.resolve() == v2.resolve()
    real = CliRunner().invoke(app, args)
    assert real.exit_code == 0, real.output
    assert pointer.resolve() == v1.resolve()
    # v1 is now the first production bundle: nothing below it, so no second rollback
    again = CliRunner().invoke(app, args)
    assert pointer.resolve() == v1.resolve()
    assert "NO DECISION" in again.output
