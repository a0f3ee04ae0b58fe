"""The live canary's moves (railtower/canary.py) on small real bundles: what starts, what is
refused, the ramp to the promotion, hold/resume/abort, the session hash, the history, and
the `railtower canary` commands."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from typer.testing import CliRunner

from railtower.canary import (
    CanaryRefused,
    abort_canary,
    advance_canary,
    canary_history,
    canary_path,
    hold_canary,
    in_canary,
    read_canary,
    resume_canary,
    start_canary,
)
from railtower.cli import app
from railtower.production import production_stack, rollback, switch
from railtower.settings import CanarySettings, PromotionSettings
from serving.shadow import in_shadow
from tests.training.test_promotion import _bundle, record
from training.promotion import promote

RAILS = ("homepage_hero", "pdp_fbt")
PROMOTION = PromotionSettings()
CANARY = CanarySettings()


def _values(level: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    return {rail: np.clip(rng.uniform(0.0, 0.4, size=300) + level, 0, 1) for rail in RAILS}


def make_shop(root):  # type: ignore[no-untyped-def]
    """v1 promoted to production/shop; v2, a verified and evaluated challenger, beside it."""
    pointer = root / "production" / "shop"
    v1 = _bundle(root / "v1", record(_values(0.0)))
    assert promote(v1, pointer, PROMOTION, 1).promote
    v2 = _bundle(root / "v2", record(_values(0.1)))
    return root, pointer, v1, v2


@pytest.fixture
def shop(tmp_path):
    return make_shop(tmp_path)


def _history(pointer) -> list[dict]:
    path = pointer.parent / "history.jsonl"
    return [orjson.loads(line) for line in path.read_text().splitlines()]


def _canary_lines(pointer) -> list[dict]:
    return [e for e in _history(pointer) if e.get("action") == "canary"]


def _start(root, bundle, reason="first canary"):
    return start_canary(root, PROMOTION, CANARY, "shop", bundle, reason)


# ------------------------------------------------------------------------------ start


def test_start_refuses_without_production(tmp_path):
    v2 = _bundle(tmp_path / "v2", record(_values(0.1)))
    with pytest.raises(CanaryRefused, match="no production bundle"):
        _start(tmp_path, v2)
    assert read_canary(tmp_path / "production" / "shop") is None


def test_start_refuses_the_production_bundle_itself(shop):
    root, pointer, v1, _ = shop
    with pytest.raises(CanaryRefused, match="production already"):
        _start(root, v1)
    with pytest.raises(CanaryRefused, match="production already"):
        _start(root, pointer)  # the pointer resolves to v1 too
    assert read_canary(pointer) is None
    assert _canary_lines(pointer) == []


def test_start_refuses_an_unverified_or_unevaluated_bundle(shop):
    root, pointer, _, v2 = shop
    (v2 / "evaluation.json").write_bytes(b'{"dataset": "shop", "rails": {}}')  # altered
    with pytest.raises(CanaryRefused, match="cannot be a challenger"):
        _start(root, v2)
    never = _bundle(root / "v3", record(_values(0.1)))
    (never / "evaluation.json").unlink()
    with pytest.raises(CanaryRefused, match="cannot be a challenger"):
        _start(root, never)
    with pytest.raises(CanaryRefused, match="cannot be a challenger"):
        _start(root, root / "missing")
    assert read_canary(pointer) is None


def test_start_refuses_while_one_is_live_and_starts_again_after_an_abort(shop):
    root, pointer, _, v2 = shop
    v3 = _bundle(root / "v3", record(_values(0.2)))
    _start(root, v2)
    with pytest.raises(CanaryRefused, match="v2 is running at 5%.*abort it first"):
        _start(root, v3)
    hold_canary(root, PROMOTION, "shop", "looking at it")
    with pytest.raises(CanaryRefused, match="v2 is held"):
        _start(root, v3)
    abort_canary(root, PROMOTION, "shop", "make way for v3")
    state = _start(root, v3, "v3 now")
    assert (state.challenger, state.status, state.share) == ("v3", "running", 0.05)
    assert read_canary(pointer) == state


def test_start_writes_the_plan_against_the_current_production(shop):
    root, pointer, v1, v2 = shop
    state = start_canary(root, PROMOTION, CanarySettings(salt="s1"), "shop", v2.relative_to(root))
    assert state.challenger == "v2" and state.challenger_path == str(v2.resolve())
    assert state.production == "v1" and state.production_path == str(v1.resolve())
    assert state.steps == [0.05, 0.25, 0.5, 1.0] and state.step == 0
    assert (state.status, state.share, state.next_share, state.salt) == (
        "running",
        0.05,
        0.25,
        "s1",
    )
    assert canary_path(pointer) == pointer.parent / "shop.canary.json"
    assert read_canary(pointer) == state
    assert pointer.resolve() == v1.resolve()  # production did not move


# ------------------------------------------------------------------------------ the ramp


def test_advance_walks_the_steps_then_promotes_and_rollback_undoes_it(shop):
    root, pointer, v1, v2 = shop
    shares = [_start(root, v2).share]
    for n in range(2):
        state = advance_canary(root, PROMOTION, "shop", f"step {n}", {"hit_rate": 0.1})
        shares.append(state.share)
        assert state.status == "running" and pointer.resolve() == v1.resolve()
    assert shares == [0.05, 0.25, 0.5]

    promoted = advance_canary(root, PROMOTION, "shop", "all good", {"hit_rate": 0.2})
    assert (promoted.status, promoted.step, promoted.share) == ("promoted", 3, 0.0)
    assert pointer.resolve() == v2.resolve()
    assert read_canary(pointer) == promoted
    promotions = [e for e in _history(pointer) if e.get("action") == "promote"]
    last = promotions[-1]
    assert last["promote"] is True and last["by"] == "canary"
    assert (last["candidate"], last["production"]) == ("v2", "v1")
    assert last["candidate_path"] == str(v2.resolve()) and last["reasons"] == ["all good"]
    events = [e["event"] for e in _canary_lines(pointer)]
    assert events == ["start", "advance", "advance", "promote"]
    # the canary lines do not disturb the replay: v1, then v2 promoted by the canary
    assert production_stack(pointer, root) == [v1, v2]

    with pytest.raises(CanaryRefused, match="last one was promoted"):
        advance_canary(root, PROMOTION, "shop", "once more")
    restored = rollback(root, PROMOTION, "shop", "canary promotion regretted")
    assert (restored.previous, restored.restored) == ("v2", "v1")
    assert pointer.resolve() == v1.resolve()
    assert production_stack(pointer, root) == [v1]


def test_hold_blocks_advance_until_resume(shop):
    root, pointer, _, v2 = shop
    _start(root, v2)
    with pytest.raises(CanaryRefused, match="running, not held"):
        resume_canary(root, PROMOTION, "shop", "nothing to resume")
    held = hold_canary(root, PROMOTION, "shop", "sale weekend")
    assert (held.status, held.share) == ("held", 0.05)  # the share stays
    with pytest.raises(CanaryRefused, match="held: resume it first"):
        advance_canary(root, PROMOTION, "shop", "too soon")
    assert read_canary(pointer) == held
    resumed = resume_canary(root, PROMOTION, "shop", "sale over")
    assert (resumed.status, resumed.share) == ("running", 0.05)
    assert advance_canary(root, PROMOTION, "shop", "go").share == 0.25


def test_abort_sends_everyone_back_and_leaves_the_pointer(shop):
    root, pointer, v1, v2 = shop
    _start(root, v2)
    advance_canary(root, PROMOTION, "shop", "go")
    aborted = abort_canary(root, PROMOTION, "shop", "CTR fell 4%", {"drop": 0.04})
    assert (aborted.status, aborted.share, aborted.step) == ("aborted", 0.0, 1)
    assert pointer.resolve() == v1.resolve()
    assert read_canary(pointer) == aborted
    last = _canary_lines(pointer)[-1]
    assert (last["event"], last["share"], last["figures"]) == ("abort", 0.0, {"drop": 0.04})
    for move in (advance_canary, hold_canary, abort_canary):
        with pytest.raises(CanaryRefused, match="last one was aborted"):
            move(root, PROMOTION, "shop", "again")
    with pytest.raises(ValueError, match="reason is empty"):
        abort_canary(root, PROMOTION, "shop", "   ")


def test_advance_refuses_when_production_was_moved_by_someone_else(shop):
    root, pointer, v1, v2 = shop
    _start(root, v2)
    v3 = _bundle(root / "v3", record(_values(0.3)))
    assert promote(v3, pointer, PROMOTION, 1).promote  # the nightly gate, meanwhile
    with pytest.raises(CanaryRefused, match="no longer v1 \\(now v3\\)"):
        advance_canary(root, PROMOTION, "shop", "go")
    state = read_canary(pointer)
    assert state is not None and (state.step, state.status) == (0, "running")
    assert pointer.resolve() == v3.resolve()
    switch(pointer, v1)  # put back by hand: the canary may go on
    assert advance_canary(root, PROMOTION, "shop", "go").share == 0.25


def test_no_move_without_a_canary(shop):
    root, _, _, _ = shop
    for move in (advance_canary, hold_canary, resume_canary, abort_canary):
        with pytest.raises(CanaryRefused, match="none was started"):
            move(root, PROMOTION, "shop", "why not")


def test_every_move_appends_one_canary_line_and_a_refusal_none(shop):
    root, pointer, _, v2 = shop
    moves = [
        lambda: _start(root, v2),
        lambda: advance_canary(root, PROMOTION, "shop", "a"),
        lambda: hold_canary(root, PROMOTION, "shop", "h"),
        lambda: resume_canary(root, PROMOTION, "shop", "r"),
        lambda: advance_canary(root, PROMOTION, "shop", "b"),
        lambda: abort_canary(root, PROMOTION, "shop", "x"),
    ]
    for n, move in enumerate(moves, start=1):
        before = len(_history(pointer))
        state = move()
        lines = _history(pointer)
        assert len(lines) == before + 1
        assert lines[-1]["action"] == "canary" and lines[-1]["pointer"] == "shop"
        assert (lines[-1]["share"], lines[-1]["status"]) == (state.share, state.status)
        assert len(canary_history(pointer)) == n
    before = len(_history(pointer))
    with pytest.raises(CanaryRefused):
        advance_canary(root, PROMOTION, "shop", "refused")
    assert len(_history(pointer)) == before
    assert [e["event"] for e in canary_history(pointer, 3)] == ["resume", "advance", "abort"]
    assert production_stack(pointer, root) == [root / "v1"]  # no canary line is a promotion


def test_canary_history_is_per_pointer(shop):
    root, pointer, _, v2 = shop
    other = root / "production" / "other"
    w1 = _bundle(root / "w1", record(_values(0.0), dataset="other"))
    assert promote(w1, other, PROMOTION, 1).promote
    w2 = _bundle(root / "w2", record(_values(0.1), dataset="other"))
    start_canary(root, PROMOTION, CANARY, "other", w2)
    _start(root, v2)
    assert [e["challenger"] for e in canary_history(pointer)] == ["v2"]
    assert [e["challenger"] for e in canary_history(other)] == ["w2"]


# ------------------------------------------------------------------------------ routing


IDS = [f"session-{n}" for n in range(20_000)]


def test_in_canary_is_stable_nested_and_near_the_share():
    picked = {share: {s for s in IDS if in_canary(s, share, "canary")} for share in CANARY.steps}
    assert picked[0.05] <= picked[0.25] <= picked[0.5] <= picked[1.0] == set(IDS)
    for share in (0.05, 0.25, 0.5):
        assert abs(len(picked[share]) / len(IDS) - share) < 0.015, share
    # the same answer every time, and nobody at 0
    assert {s for s in IDS if in_canary(s, 0.25, "canary")} == picked[0.25]
    assert not any(in_canary(s, 0.0, "canary") for s in IDS[:1000])
    # another salt, another sample of about the same size
    other = {s for s in IDS if in_canary(s, 0.25, "other-salt")}
    assert abs(len(other & picked[0.25]) / len(IDS) - 0.25**2) < 0.015


@pytest.mark.parametrize("share", [0.05, 0.25, 0.5])
def test_in_canary_is_independent_of_the_shadow_sample(share):
    canary = {s for s in IDS if in_canary(s, share, CANARY.salt)}
    shadow = {s for s in IDS if in_shadow(s, share)}
    assert abs(len(shadow) / len(IDS) - share) < 0.015
    overlap = len(canary & shadow) / len(IDS)
    assert abs(overlap - share**2) < 0.015, (share, overlap)  # not `share`: other sessions
    assert overlap < share * 0.6


# ------------------------------------------------------------------------------ the CLI


def test_cli_canary_start_status_abort(shop, monkeypatch):
    root, pointer, v1, _ = shop
    monkeypatch.setenv("RAILTOWER_ARTIFACTS_DIR", str(root))
    runner = CliRunner()
    empty = runner.invoke(app, ["canary", "status", "-d", "shop"])
    assert empty.exit_code == 0, empty.output
    assert "no canary of shop" in empty.output

    started = runner.invoke(
        app, ["canary", "start", "-d", "shop", "--bundle", "v2", "--reason", "try v2"]
    )
    assert started.exit_code == 0, started.output
    assert "v2 running at 5%" in started.output
    state = read_canary(pointer)
    assert state is not None and (state.challenger, state.reason) == ("v2", "try v2")

    again = runner.invoke(app, ["canary", "start", "-d", "shop", "--bundle", "v2"])
    assert again.exit_code == 1
    assert "abort it first" in again.output

    shown = runner.invoke(app, ["canary", "status", "-d", "shop"])
    assert shown.exit_code == 0, shown.output
    assert "v2 running at 5%" in shown.output and "try v2" in shown.output
    assert "start" in shown.output  # the history table's one move

    aborted = runner.invoke(app, ["canary", "abort", "-d", "shop", "--reason", "enough"])
    assert aborted.exit_code == 0, aborted.output
    assert "aborted at 0%" in aborted.output
    state = read_canary(pointer)
    assert state is not None and (state.status, state.share) == ("aborted", 0.0)
    assert pointer.resolve() == v1.resolve()
    assert [e["event"] for e in canary_history(pointer)] == ["start", "abort"]

    refused = runner.invoke(app, ["canary", "advance", "-d", "shop", "--reason", "go"])
    assert refused.exit_code == 1 and "no live canary" in refused.output


def test_cli_canary_start_without_production_exits_1(tmp_path, monkeypatch):
    _bundle(tmp_path / "v2", record(_values(0.1)))
    monkeypatch.setenv("RAILTOWER_ARTIFACTS_DIR", str(tmp_path))
    result = CliRunner().invoke(app, ["canary", "start", "-d", "shop", "--bundle", "v2"])
    assert result.exit_code == 1
    assert "no production bundle" in result.output
