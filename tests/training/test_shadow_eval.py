"""Shadow evaluation: known answers by hand, the horizon, paired intervals, the replay."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import orjson
import pandas as pd
import pytest
from typer.testing import CliRunner

from railtower.cli import app
from railtower.schemas import Impression, encode
from railtower.settings import load_settings
from training.shadow_eval import (
    SessionTimelines,
    graded_ndcg_at,
    list_overlap,
    read_impressions_jsonl,
    run_shadow_report,
    score_impressions,
    slot_difference,
    summarise,
)

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
GRADES = {"view": 1, "cart": 2, "purchase": 3}


def events_frame(rows: list[tuple[str, str, str, datetime]]) -> pd.DataFrame:
    """Canonical events from (session, item, type, time) rows."""
    return pd.DataFrame(
        {
            "event_id": [f"e{n}" for n in range(len(rows))],
            "session_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "event_type": [r[2] for r in rows],
            "event_time": pd.to_datetime([r[3] for r in rows], utc=True),
        }
    )


def impression(request: str, session: str, items: list[str], arm: str = "production", at=T0):
    return Impression(
        impression_id=f"{request}:{arm}",
        request_id=request,
        served_at=at,
        session_id=session,
        rail="homepage_hero",
        arm=arm,
        shown=arm == "production",
        model_version="v1" if arm == "production" else arm.split(":")[-1],
        items=items,
    )


@pytest.fixture
def settings(tmp_path):
    return load_settings(reports_dir=tmp_path / "reports", evaluation={"bootstrap_samples": 200})


@pytest.fixture
def hand_built():
    """s1: the impression at T0 is followed by a view of b and a cart of c inside the horizon;
    z (before), e (at served_at) and d (45 min later) must not count. s2: nothing follows."""
    events = events_frame(
        [
            ("s1", "z", "view", T0 - timedelta(minutes=5)),
            ("s1", "e", "view", T0),
            ("s1", "b", "view", T0 + timedelta(minutes=5)),
            ("s1", "c", "cart", T0 + timedelta(minutes=10)),
            ("s1", "b", "remove_from_cart", T0 + timedelta(minutes=11)),
            ("s1", "d", "purchase", T0 + timedelta(minutes=45)),
            ("s2", "q", "view", T0 - timedelta(minutes=1)),
        ]
    )
    impressions = [
        impression("r1", "s1", ["b", "x", "c"]),
        impression("r1", "s1", ["c", "b", "y"], arm="challenger:v2"),
        impression("r2", "s2", ["q"]),
        impression("r2", "s2", ["q"], arm="challenger:v2"),
    ]
    return events, impressions


def test_graded_ndcg_by_hand():
    # gains 2^g - 1: b (view) 1, c (cart) 3; DCG = 1/log2(2) + 3/log2(4) = 2.5
    # ideal: c then b = 3/1 + 1/log2(3)
    expected = 2.5 / (3 + 1 / math.log2(3))
    assert graded_ndcg_at(["b", "x", "c"], {"b": 1, "c": 2}, 12) == pytest.approx(expected)
    assert graded_ndcg_at(["c", "b", "y"], {"b": 1, "c": 2}, 12) == pytest.approx(1.0)
    assert graded_ndcg_at(["x", "b"], {"b": 1}, 1) == 0.0  # beyond k earns nothing
    with pytest.raises(ValueError, match="at least one target"):
        graded_ndcg_at(["a"], {}, 12)


def test_only_events_after_served_at_and_within_the_horizon_count(hand_built):
    events, _ = hand_built
    timelines = SessionTimelines(events, GRADES)
    assert timelines.targets("s1", T0.timestamp(), 30 * 60) == {"b": 1, "c": 2}
    # a longer horizon reaches the purchase of d; the past (z, e at served_at) never counts
    assert timelines.targets("s1", T0.timestamp(), 60 * 60) == {"b": 1, "c": 2, "d": 3}
    assert timelines.targets("s2", T0.timestamp(), 60 * 60) == {}
    assert timelines.targets("unknown", T0.timestamp(), 60 * 60) == {}


def test_slot_difference_and_overlap_by_hand():
    assert slot_difference(["c", "b", "y"], ["b", "x", "c"], 12) == 1.0
    assert list_overlap(["c", "b", "y"], ["b", "x", "c"], 12) == pytest.approx(2 / 3)
    assert slot_difference(["a", "b", "c", "d"], ["a", "b", "d", "c"], 12) == 0.5
    assert slot_difference(["a", "b"], ["a", "b", "c"], 12) == pytest.approx(1 / 3)
    assert slot_difference(["a", "b", "z"], ["a", "b", "c"], 2) == 0.0  # only the first k


def test_report_known_answers(hand_built, settings):
    events, impressions = hand_built
    scored = score_impressions(impressions, SessionTimelines(events, GRADES), 12, 30 * 60)
    report = summarise(
        scored, settings, catalogue_size=10, catalogue_source="test", horizon_minutes=30
    )
    arms = {a.arm: a for a in report.arms}
    production, challenger = arms["production"], arms["challenger:v2"]
    assert [a.arm for a in report.arms] == ["production", "challenger:v2"]  # production first
    assert production.impressions == 2 and production.with_targets == 1
    assert production.hit_rate.mean == 0.5 and challenger.hit_rate.mean == 0.5
    # NDCG only where something followed (s2 has no target)
    assert production.ndcg.mean == pytest.approx(2.5 / (3 + 1 / math.log2(3)))
    assert challenger.ndcg.mean == pytest.approx(1.0)
    assert production.coverage.mean == pytest.approx(4 / 10)  # b, x, c, q
    assert challenger.coverage.mean == pytest.approx(4 / 10)  # c, b, y, q
    (pair,) = report.pairs
    assert pair.pairs == 2 and pair.unpaired == 0
    assert pair.slot_difference.mean == pytest.approx(0.5)  # 1.0 for r1, 0.0 for r2
    assert pair.overlap.mean == pytest.approx((2 / 3 + 1.0) / 2)
    assert pair.hit_rate_diff.mean == 0.0
    assert pair.ndcg_diff.mean == pytest.approx(1.0 - production.ndcg.mean)


def test_a_better_challenger_is_reported_better_beyond_the_interval(settings, tmp_path):
    """Synthetic shop: after each impression the shopper views one item; the challenger's
    list contains it twice as often as production's."""
    rng = np.random.default_rng(3)
    rows, impressions = [], []
    for n in range(300):
        session, target, at = f"s{n}", f"t{n}", T0 + timedelta(minutes=n)
        rows.append((session, target, "view", at + timedelta(minutes=2)))
        filler = [f"f{n}-{k}" for k in range(12)]
        production = filler[:11] + [target] if rng.random() < 0.3 else filler
        challenger = [target] + filler[:11] if rng.random() < 0.6 else filler
        impressions.append(impression(f"r{n}", session, production, at=at))
        impressions.append(impression(f"r{n}", session, challenger, "challenger:v2", at))
    events = events_frame(rows)
    run = run_shadow_report(settings, impressions, events, None, 30, "synthetic")
    (pair,) = run.report.pairs
    assert pair.hit_rate_diff.low > 0 and pair.ndcg_diff.low > 0
    arms = {a.arm: a for a in run.report.arms}
    assert arms["challenger:v2"].hit_rate.mean > arms["production"].hit_rate.mean
    # outputs: JSON, markdown stating the counterfactual bias, both plots
    payload = orjson.loads(run.outputs["json"].read_bytes())
    assert payload["pairs"][0]["hit_rate_diff"]["low"] > 0
    assert sum(payload["pairs"][0]["slot_difference_histogram"]["counts"]) == 300
    text = run.outputs["markdown"].read_text()
    assert "counterfactual" in text and "challenger:v2" in text
    assert run.folder == settings.reports_dir / "synthetic" / "shadow"
    for name in ("homepage_hero_arms.png", "homepage_hero_slot_difference.png"):
        assert (run.outputs["plots"] / name).stat().st_size > 0


def test_malformed_impression_lines_are_skipped_but_an_empty_log_is_an_error(tmp_path):
    good = impression("r1", "s1", ["a"])
    path = tmp_path / "imp.jsonl"
    path.write_bytes(encode(good) + b"\n" + b"{not json\n" + b'{"schema_version": 9}\n')
    assert read_impressions_jsonl(path) == [good]
    path.write_bytes(b"{not json\n")
    with pytest.raises(ValueError, match="no valid impression"):
        read_impressions_jsonl(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_impressions_jsonl(tmp_path / "missing.jsonl")


def test_cli_shadow_report_from_files(hand_built, tmp_path, monkeypatch):
    events, impressions = hand_built
    events.to_parquet(tmp_path / "events.parquet")
    (tmp_path / "imp.jsonl").write_bytes(b"".join(encode(i) + b"\n" for i in impressions))
    monkeypatch.setenv("RAILTOWER_REPORTS_DIR", str(tmp_path / "reports"))
    monkeypatch.setenv("RAILTOWER_EVALUATION__BOOTSTRAP_SAMPLES", "100")
    args = ["shadow-report", "--impressions", str(tmp_path / "imp.jsonl")]
    args += ["--events", str(tmp_path / "events.parquet"), "--run-name", "cli"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    payload = orjson.loads((tmp_path / "reports/cli/shadow/shadow.json").read_bytes())
    assert payload["catalogue_source"] == "items seen in the events and impressions"
    assert {a["arm"] for a in payload["arms"]} == {"production", "challenger:v2"}
    bad = CliRunner().invoke(app, ["shadow-report", "--impressions", "nope.jsonl", "--events", "x"])
    assert bad.exit_code == 1 and "does not exist" in bad.output


def test_shadow_replay_logs_both_arms_per_request(trained_rees46, tmp_path):
    from training.shadow_replay import held_out_sessions, run_shadow_replay

    settings, bundle = trained_rees46
    settings = settings.model_copy(update={"reports_dir": tmp_path / "reports"})
    rules = tmp_path / "no_pins.json"
    rules.write_text('{"name": "no-pins", "version": "1"}')  # the candidate: no rules at all
    out = tmp_path / "impressions.jsonl"
    result = run_shadow_replay(
        settings, "rees46", bundle, out, challenger_rules=rules, sessions=3, run_name="replay"
    )
    logged = read_impressions_jsonl(out)
    assert len(logged) == result.impressions > 0
    by_arm: dict[str, dict[str, Impression]] = {}
    for imp in logged:
        by_arm.setdefault(imp.arm, {})[imp.request_id] = imp
    assert set(by_arm) == {"production", "rules:no-pins"}
    production, shadow = by_arm["production"], by_arm["rules:no-pins"]
    assert set(shadow) == set(production)  # every request has both arms, one request id
    assert all(p.shown and not shadow[r].shown for r, p in production.items())
    assert {p.rail for p in production.values()} == {"homepage_hero", "pdp_fbt"}
    for request_id, p in production.items():
        s = shadow[request_id]
        assert (s.session_id, s.rail, s.served_at) == (p.session_id, p.rail, p.served_at)
        assert len(p.items) == settings.evaluation.slots
    # served_at is each event's own time, in the held-out sessions
    events = held_out_sessions(settings, "rees46", 3)
    times = set(pd.to_datetime(events["event_time"], utc=True))
    assert {pd.Timestamp(p.served_at) for p in production.values()} <= times
    assert {p.session_id for p in production.values()} == set(events["session_id"].astype(str))
    assert result.shadow is not None
    assert (result.shadow.folder / "shadow.md").exists()
    assert {a.arm for a in result.shadow.report.arms} == {"production", "rules:no-pins"}


def test_held_out_sessions_after_a_cut_are_every_session_ending_after_it(settings):
    """A later-window bundle's replay: every session that ends after the cut, whole (the
    part before the cut included), in time order; and more of them than the test split."""
    from training.shadow_replay import held_out_sessions

    cut = pd.Timestamp("2019-10-01 02:36:18", tz="UTC")
    later = held_out_sessions(settings, "rees46", 0, after=cut)
    times = pd.to_datetime(later["event_time"], utc=True)
    ends = times.groupby(later["session_id"]).max()
    assert (ends > cut).all() and (times < cut).any()
    assert times.is_monotonic_increasing
    assert (later.groupby("session_id").size() >= 2).all()
    test_split = held_out_sessions(settings, "rees46", 0)
    assert later["session_id"].nunique() > test_split["session_id"].nunique()


def test_shadow_replay_needs_exactly_one_challenger(settings, tmp_path):
    from training.shadow_replay import run_shadow_replay

    with pytest.raises(ValueError, match="exactly one challenger"):
        run_shadow_replay(settings, "rees46", tmp_path / "prod", tmp_path / "out.jsonl")
    with pytest.raises(ValueError, match="exactly one challenger"):
        run_shadow_replay(
            settings,
            "rees46",
            tmp_path / "prod",
            tmp_path / "out.jsonl",
            challenger=tmp_path / "a",
            challenger_rules=tmp_path / "b.json",
        )
