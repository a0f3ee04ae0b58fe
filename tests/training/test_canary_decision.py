"""The canary's rule (training/canary_decision.py) on made-up impressions whose outcomes are
known: each session's served impression is followed by its target item (a hit) or by
another item, at a chosen rate per arm."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from railtower.canary import (
    CANARY_ARM,
    canary_history,
    hold_canary,
    in_canary,
    read_canary,
    start_canary,
)
from railtower.cli import app
from railtower.manifest import Manifest
from railtower.schemas import Impression, encode
from railtower.settings import load_settings
from tests.railtower.test_canary import _values, make_shop
from tests.training.test_promotion import _bundle, record
from training import nightly
from training.canary_balance import balanced_salt
from training.canary_decision import step_canary
from training.shadow_eval import SessionTimelines

T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


@pytest.fixture
def shop(tmp_path):
    return make_shop(tmp_path)


@pytest.fixture
def settings(shop):
    root = shop[0]
    return load_settings(
        artifacts_dir=root,
        canary={"min_impressions": 200, "min_minutes": 30.0},
        evaluation={"bootstrap_samples": 300},
        log_level="WARNING",
    )


def _canary(settings, **changes):  # type: ignore[no-untyped-def]
    """`settings` with some canary.* values changed."""
    return settings.model_copy(update={"canary": settings.canary.model_copy(update=changes)})


def _started(settings, shop_):  # type: ignore[no-untyped-def]
    root, pointer, _, v2 = shop_
    return start_canary(
        root, settings.promotion, settings.canary, "shop", v2, "test", at=T0
    ), pointer


def _traffic(  # type: ignore[no-untyped-def]
    state,
    production_rate: float,
    challenger_rate: float,
    sessions: int = 4000,
    per_session: int = 1,
    rates: dict[str, float] | None = None,
):
    """`per_session` served impressions per session an hour into the step, and what followed
    them: each session hits on all of them or on none (one shopper), at its arm's rate or at
    its own rate in `rates`."""
    rng = np.random.default_rng(0)
    impressions, events = [], []
    served_at = T0 + timedelta(hours=1)
    for n in range(sessions):
        session = f"s{n}"
        canary = in_canary(session, state.share, state.salt)
        arm, version = (
            (CANARY_ARM, state.challenger) if canary else ("production", state.production)
        )
        for k in range(per_session):
            impressions.append(
                Impression(
                    impression_id=f"i{n}-{k}",
                    request_id=f"r{n}-{k}",
                    served_at=served_at + timedelta(seconds=k),
                    session_id=session,
                    rail="homepage_hero",
                    arm=arm,
                    shown=True,
                    model_version=version,
                    items=["target"],
                )
            )
        rate = (rates or {}).get(session, challenger_rate if canary else production_rate)
        item = "target" if rng.random() < rate else "other"
        events.append((session, item, "view", served_at + timedelta(minutes=5)))
    # the events run on for hours: every impression's horizon is over
    events.append(("late", "x", "view", served_at + timedelta(hours=3)))
    frame = pd.DataFrame(events, columns=["session_id", "item_id", "event_type", "event_time"])
    grades = {"view": 1, "cart": 2, "purchase": 3}
    return impressions, SessionTimelines(frame, grades)


def test_a_challenger_worse_beyond_the_guard_and_the_interval_is_aborted(settings, shop):
    state, pointer = _started(settings, shop)
    impressions, timelines = _traffic(state, 0.30, 0.15, sessions=8000)
    decision = step_canary(settings, "shop", impressions, timelines)
    assert decision.action == "abort", decision.reason
    assert decision.relative_drop > 0.4 and decision.difference.high < 0
    assert "below production" in decision.reason and "above" not in decision.reason
    assert read_canary(pointer).status == "aborted" and read_canary(pointer).share == 0.0
    (abort,) = [e for e in canary_history(pointer) if e["event"] == "abort"]
    arms = {a["arm"]: a for a in abort["figures"]["arms"]}
    assert arms[CANARY_ARM]["impressions"] >= 200 and arms["production"]["impressions"] > 4000


def test_an_equal_challenger_advances_to_the_next_share(settings, shop):
    state, pointer = _started(settings, shop)
    impressions, timelines = _traffic(state, 0.30, 0.30, sessions=8000)
    decision = step_canary(settings, "shop", impressions, timelines)
    assert decision.action == "advance", decision.reason
    assert read_canary(pointer).share == settings.canary.steps[1]
    assert decision.difference.low < 0 < decision.difference.high
    # the sign of the relative difference is spelt out, never a negative "drop"
    side = "above" if decision.relative_drop < 0 else "below"
    assert f"% {side} production" in decision.reason and "-" not in decision.reason.split("(")[1]


def test_too_few_impressions_wait_and_the_judgement_is_recorded(settings, shop):
    state, pointer = _started(settings, shop)
    impressions, timelines = _traffic(state, 0.30, 0.0, sessions=1000)  # ~50 canary sessions
    decision = step_canary(settings, "shop", impressions, timelines)
    assert decision.action == "wait" and "too few" in decision.reason
    assert read_canary(pointer).step == 0 and read_canary(pointer).status == "running"
    assert canary_history(pointer)[-1]["verdict"] == "wait"


def test_a_few_sessions_never_abort_however_many_impressions_they_have(settings, shop):
    """The A/A trap: 1,000 sessions, 40 impressions each, the same answers in both arms, and
    the challenger's few sessions happen to be shoppers who click less. Counted in
    impressions it is thousands of rows and a certain drop; counted in sessions it is ~50
    shoppers, below canary.min_sessions (200 by default)."""
    state, pointer = _started(settings, shop)
    ids = [f"s{n}" for n in range(1000)]
    unlucky = {s: 0.05 for s in ids if in_canary(s, state.share, state.salt)}
    impressions, timelines = _traffic(state, 0.3, 0.3, 1000, per_session=40, rates=unlucky)
    decision = step_canary(settings, "shop", impressions, timelines)
    assert decision.action == "wait", decision.reason
    assert "canary.min_sessions = 200" in decision.reason
    canary_arm = next(a for a in decision.arms if a.arm == CANARY_ARM)
    assert canary_arm.impressions >= settings.canary.min_impressions
    assert canary_arm.sessions < settings.canary.min_sessions
    assert read_canary(pointer).status == "running"
    # the same shoppers judged without the session floor: the impressions read as a drop
    bare = _canary(settings, min_sessions=1)
    assert step_canary(bare, "shop", impressions, timelines, dry_run=True).action == (
        "would abort (dry run)"
    )


def test_a_drop_inside_the_aborts_interval_waits_and_a_95_percent_rule_would_abort(settings, shop):
    """Every `canary step` is another look at the step, so the abort needs the difference
    below 0 beyond canary.abort_ci_level (99%), not only beyond the 95% interval an advance
    is judged on; in between the step waits for more sessions."""
    state, pointer = _started(settings, shop)
    impressions, timelines = _traffic(state, 0.30, 0.26, sessions=8000)
    decision = step_canary(settings, "shop", impressions, timelines)
    assert decision.action == "wait", decision.reason
    assert decision.difference.high < 0 <= decision.abort_interval.high
    assert "not beyond the guard" in decision.reason
    assert read_canary(pointer).status == "running"
    at_95 = _canary(settings, abort_ci_level=0.95)
    assert step_canary(at_95, "shop", impressions, timelines, dry_run=True).action == (
        "would abort (dry run)"
    )


def test_an_unresolved_drop_beyond_the_guard_waits_instead_of_advancing(settings, shop):
    """A challenger ~13% below production on ~250 sessions: the interval crosses 0, so it
    is neither aborted nor shown to be equal; it waits for more sessions (an earlier rule
    advanced it, and a popularity list 48% below production went on to 50% that way)."""
    state, pointer = _started(settings, shop)
    impressions, timelines = _traffic(state, 0.30, 0.26, sessions=5000)
    decision = step_canary(settings, "shop", impressions, timelines)
    assert decision.action == "wait", decision.reason
    assert decision.difference.low < 0 < decision.difference.high
    assert decision.relative_drop > settings.canary.max_relative_drop
    assert "waiting for more sessions" in decision.reason
    assert read_canary(pointer).step == 0


def test_a_step_younger_than_min_minutes_waits(settings, shop):
    state, pointer = _started(settings, shop)
    impressions, timelines = _traffic(state, 0.30, 0.30, sessions=8000)
    decision = step_canary(settings, "shop", impressions, timelines, now=T0 + timedelta(minutes=10))
    assert decision.action == "wait" and "min_minutes" in decision.reason
    assert read_canary(pointer).step == 0


def test_impressions_before_the_step_or_of_other_versions_do_not_count(settings, shop):
    state, _ = _started(settings, shop)
    impressions, timelines = _traffic(state, 0.30, 0.30, sessions=8000)
    early = [i.model_copy(update={"served_at": T0 - timedelta(minutes=1)}) for i in impressions]
    other = [i.model_copy(update={"model_version": "someone-else"}) for i in impressions]
    decision = step_canary(settings, "shop", early + other, timelines, dry_run=True)
    assert decision.action == "wait"
    assert [a.impressions for a in decision.arms] == [0, 0]


def test_a_held_canary_never_advances_but_still_aborts(settings, shop):
    state, pointer = _started(settings, shop)
    hold_canary(settings.artifacts_dir, settings.promotion, "shop", "looking at it")
    equal = _traffic(state, 0.30, 0.30, sessions=8000)
    assert step_canary(settings, "shop", *equal).action == "held"
    assert read_canary(pointer).status == "held" and read_canary(pointer).step == 0
    worse = _traffic(state, 0.30, 0.10, sessions=8000)
    assert step_canary(settings, "shop", *worse).action == "abort"


def test_a_dry_run_moves_nothing(settings, shop):
    state, pointer = _started(settings, shop)
    before = canary_history(pointer)
    decision = step_canary(settings, "shop", *_traffic(state, 0.3, 0.1, 8000), dry_run=True)
    assert decision.action == "would abort (dry run)"
    assert read_canary(pointer) == state and canary_history(pointer) == before


def test_the_last_step_promotes(settings, shop):
    root, pointer, _, v2 = shop
    settings = _canary(settings, steps=[0.5, 1.0])
    state, _ = _started(settings, shop)
    decision = step_canary(settings, "shop", *_traffic(state, 0.3, 0.3, 4000))
    assert decision.action == "promote", decision.reason
    assert pointer.resolve() == v2.resolve()
    assert Manifest.load(pointer, verify=False).version == state.challenger


# ------------------------------------------------------------------------------ A/A check


def _production_only(settings, sessions: int):  # type: ignore[no-untyped-def]
    """Production's impressions and events, where the sessions the configured salt would
    send to the canary at the first step already do worse (0.10 vs 0.30) under production."""
    rng = np.random.default_rng(1)
    impressions, events = [], []
    served_at = T0 - timedelta(hours=2)
    share, salt = settings.canary.steps[0], settings.canary.salt
    for n in range(sessions):
        session = f"a{n}"
        rate = 0.10 if in_canary(session, share, salt) else 0.30
        impressions.append(
            Impression(
                impression_id=f"i{n}",
                request_id=f"r{n}",
                served_at=served_at,
                session_id=session,
                rail="homepage_hero",
                arm="production",
                shown=True,
                model_version="v1",
                items=["target"],
            )
        )
        item = "target" if rng.random() < rate else "other"
        events.append((session, item, "view", served_at + timedelta(minutes=5)))
    events.append(("late", "x", "view", served_at + timedelta(hours=3)))
    frame = pd.DataFrame(events, columns=["session_id", "item_id", "event_type", "event_time"])
    return impressions, frame


def _timelines(frame: pd.DataFrame) -> SessionTimelines:
    return SessionTimelines(frame, {"view": 1, "cart": 2, "purchase": 3})


def test_the_aa_check_moves_off_a_salt_whose_sample_is_already_unlike_the_rest(settings):
    impressions, frame = _production_only(settings, 12_000)
    choice = balanced_salt(settings, impressions, _timelines(frame))
    first = choice.trials[0]
    assert first.salt == settings.canary.salt and first.difference.high < 0  # skewed
    assert choice.salt != settings.canary.salt and choice.balanced
    kept = next(t for t in choice.trials if t.salt == choice.salt)
    assert kept.difference.low <= 0 <= kept.difference.high
    assert abs(kept.difference.mean) < abs(first.difference.mean)


def test_the_aa_check_keeps_the_configured_salt_without_enough_impressions(settings):
    impressions, frame = _production_only(settings, 500)
    choice = balanced_salt(settings, impressions, _timelines(frame))
    assert choice.salt == settings.canary.salt and not choice.balanced
    assert "too few" in choice.reason and choice.trials == []


def test_canary_start_with_impressions_starts_on_the_balanced_salt(settings, shop, tmp_path):
    _, pointer, _, v2 = shop
    impressions, frame = _production_only(settings, 12_000)
    logged, events = tmp_path / "impressions.jsonl", tmp_path / "events.csv"
    logged.write_bytes(b"".join(encode(i) + b"\n" for i in impressions))
    frame.to_csv(events, index=False)
    args = ["canary", "start", "-d", "shop", "--bundle", str(v2)]
    args += ["--impressions", str(logged), "--events", str(events)]
    env = {
        "RAILTOWER_ARTIFACTS_DIR": str(settings.artifacts_dir),
        "RAILTOWER_CANARY__MIN_IMPRESSIONS": "200",
    }
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    assert "A/A check" in result.output
    assert read_canary(pointer).salt != settings.canary.salt


# ------------------------------------------------------------------------------ nightly


def test_the_nightly_release_canary_starts_one_instead_of_promoting(settings, shop):
    _, pointer, v1, v2 = shop
    canary_release = settings.model_copy(
        update={"nightly": settings.nightly.model_copy(update={"release": "canary"})}
    )
    outputs = nightly._promote(v2, pointer, canary_release)
    assert outputs["canary"] == Manifest.load(v2, verify=False).version
    assert pointer.resolve() == v1.resolve()  # production untouched
    assert read_canary(pointer).status == "running"
    assert "live canary" in nightly.decision_markdown(outputs)
    # the next run, whatever its release, never moves the pointer under the live canary
    v3 = _bundle(v2.parent / "v3", record(_values(0.2)))
    refused = nightly._promote(v3, pointer, settings)
    assert refused["promote"] is False and "canary" in refused["reasons"][0]
    assert nightly._promote(v2, pointer, canary_release)["canary"] == outputs["canary"]
