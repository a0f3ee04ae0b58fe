"""Rollback: the pointer goes back one promotion at a time, refuses when it cannot, and
leaves a history that later promotions and rollbacks build on."""

from __future__ import annotations

import shutil

import numpy as np
import orjson
import pytest
from typer.testing import CliRunner

from railtower.cli import app
from railtower.production import RollbackRefused, production_stack, rollback
from railtower.settings import PromotionSettings
from tests.training.test_promotion import _bundle, record
from training.promotion import promote

RAILS = ("homepage_hero", "pdp_fbt")


def _values(level: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {rail: np.clip(rng.uniform(0.0, 0.4, size=300) + level, 0, 1) for rail in RAILS}


@pytest.fixture
def three_promoted(tmp_path):
    """v1, v2, v3 promoted in turn (each better) on the pointer production/shop."""
    pointer = tmp_path / "production" / "shop"
    bundles = []
    for n, level in enumerate((0.0, 0.1, 0.2), start=1):
        bundle = _bundle(tmp_path / f"v{n}", record(_values(level)))
        assert promote(bundle, pointer, PromotionSettings(), 1).promote
        bundles.append(bundle)
    return tmp_path, pointer, bundles


def _history(pointer):
    return [orjson.loads(x) for x in (pointer.parent / "history.jsonl").read_text().splitlines()]


def test_rollback_restores_the_previous_bundle_then_the_one_before(three_promoted):
    root, pointer, (v1, v2, v3) = three_promoted
    first = rollback(root, PromotionSettings(), "shop", "hit rate fell 8%")
    assert (first.previous, first.restored) == ("v3", "v2")
    assert pointer.resolve() == v2.resolve()
    second = rollback(root, PromotionSettings(), "shop", "still low")
    assert (second.previous, second.restored) == ("v2", "v1")
    assert pointer.resolve() == v1.resolve()
    entries = [e for e in _history(pointer) if e.get("action") == "rollback"]
    assert [(e["previous"], e["restored"], e["reason"]) for e in entries] == [
        ("v3", "v2", "hit rate fell 8%"),
        ("v2", "v1", "still low"),
    ]
    # rollbacks never look like promotions to readers of the history (the online monitor)
    assert not any(e.get("promote") for e in entries)


def test_rollback_refuses_at_the_first_bundle_and_records_the_refusal(three_promoted):
    root, pointer, (v1, _, _) = three_promoted
    rollback(root, PromotionSettings(), "shop", "one")
    rollback(root, PromotionSettings(), "shop", "two")
    with pytest.raises(RollbackRefused, match="first production bundle"):
        rollback(root, PromotionSettings(), "shop", "three")
    assert pointer.resolve() == v1.resolve()
    last = _history(pointer)[-1]
    assert last["action"] == "rollback" and last["rolled_back"] is False
    assert "first production bundle" in last["refused"]


def test_a_promotion_after_a_rollback_stacks_on_the_restored_bundle(three_promoted):
    root, pointer, (v1, v2, _) = three_promoted
    rollback(root, PromotionSettings(), "shop", "bad release")
    v4 = _bundle(root / "v4", record(_values(0.3)))
    decision = promote(v4, pointer, PromotionSettings(), 1)
    assert decision.promote and decision.production == "v2"
    assert [p.name for p in production_stack(pointer, root)] == ["v1", "v2", "v4"]
    assert rollback(root, PromotionSettings(), "shop", "again").restored == "v2"
    assert pointer.resolve() == v2.resolve()


def test_rollback_refuses_when_the_previous_bundle_is_gone_or_altered(three_promoted):
    root, pointer, (_, v2, v3) = three_promoted
    (v2 / "evaluation.json").write_bytes(b'{"dataset": "shop", "rails": {}}')
    with pytest.raises(RollbackRefused, match="cannot be restored"):
        rollback(root, PromotionSettings(), "shop", "try")
    shutil.rmtree(v2)
    with pytest.raises(RollbackRefused, match="cannot be restored"):
        rollback(root, PromotionSettings(), "shop", "try again")
    assert pointer.resolve() == v3.resolve()  # production untouched


def test_rollback_refuses_without_a_pointer_or_when_it_was_moved_by_hand(tmp_path):
    with pytest.raises(RollbackRefused, match="no production pointer"):
        rollback(tmp_path, PromotionSettings(), "shop", "nothing there")
    pointer = tmp_path / "production" / "shop"
    v1 = _bundle(tmp_path / "v1", record(_values(0.0)))
    other = _bundle(tmp_path / "other", record(_values(0.0)))
    promote(v1, pointer, PromotionSettings(), 1)
    pointer.unlink()
    pointer.symlink_to(other)
    with pytest.raises(RollbackRefused, match="moved by hand"):
        rollback(tmp_path, PromotionSettings(), "shop", "?")
    assert pointer.resolve() == other.resolve()


def test_rollback_rejects_a_blank_reason_and_a_path_as_dataset(tmp_path):
    with pytest.raises(ValueError, match="reason is empty"):
        rollback(tmp_path, PromotionSettings(), "shop", "  ")
    with pytest.raises(ValueError, match="not a data set name"):
        rollback(tmp_path, PromotionSettings(), "../etc", "why")


def test_cli_rollback_exits_0_then_3_when_nothing_is_left(three_promoted, monkeypatch):
    root, pointer, (v1, v2, _) = three_promoted
    monkeypatch.setenv("RAILTOWER_ARTIFACTS_DIR", str(root))
    runner = CliRunner()
    ok = runner.invoke(app, ["rollback", "-d", "shop", "--reason", "canary failed"])
    assert ok.exit_code == 0, ok.output
    assert "back to v2" in ok.output and pointer.resolve() == v2.resolve()
    assert runner.invoke(app, ["rollback", "-d", "shop", "--reason", "x2"]).exit_code == 0
    refused = runner.invoke(app, ["rollback", "-d", "shop", "--reason", "x3"])
    assert refused.exit_code == 3, refused.output
    assert "rollback refused" in refused.output and pointer.resolve() == v1.resolve()
    missing = runner.invoke(app, ["rollback", "-d", "shop"])
    assert missing.exit_code == 2  # --reason is required
