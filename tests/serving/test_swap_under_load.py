"""Promotion and rollback under load against the real stack: no failed request, no reply
that mixes two models, and the switch takes effect (benchmarks/swap_harness.py).

Redis, tritonserver and the API (uvicorn, its own process) are started here; a server that
cannot start fails the test. The new bundle is the trained one with a pin rule set
(`derive_pinned_bundle`), so the two versions' answers differ and a mixed reply shows.
"""

from __future__ import annotations

import pytest

from benchmarks.live_stack import start_stack
from benchmarks.swap_harness import (
    PIN_SLOT,
    build_probes,
    prepare_bundles,
    references,
    run_swap,
    seed_sessions,
    verify,
)
from serving.rail_service import load_rails

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def swapped(trained_rees46, tmp_path_factory):
    settings, bundle = trained_rees46
    root = tmp_path_factory.mktemp("swap")
    bundles = prepare_bundles(bundle, settings.artifacts_dir, root, settings)
    local = settings.model_copy(update={"artifacts_dir": bundles.artifacts})
    versions = {
        bundles.old_version: load_rails(bundles.old, local),
        bundles.new_version: load_rails(bundles.new, local),
    }
    probes = build_probes(versions[bundles.old_version], 12, avoid=bundles.pin_item)
    refs = references(versions, probes)
    stack = start_stack(bundles.artifacts, settings.serving.triton_repository, root / "work")
    try:
        seed_sessions(stack.redis_url, probes)
        run = run_swap(stack, bundles, probes, clients=3, phase_s=5.0)
    finally:
        stack.stop()
    return bundles, probes, refs, run


def test_no_request_fails_during_promote_and_rollback(swapped):
    _, _, _, run = swapped
    assert len(run.replies) > 30  # the load really ran across both switches
    failed = [(r.status, r.error) for r in run.replies if r.status != 200]
    assert failed == []


def test_every_reply_is_one_version_and_equals_its_offline_answer(swapped):
    bundles, probes, refs, run = swapped
    verdict = verify(run, refs)
    assert verdict.unknown_version == []
    assert set(verdict.versions) == {bundles.old_version, bundles.new_version}
    # the pin makes the versions tell apart on most requests, so a mix could not hide
    assert verdict.distinguishable_probes >= len(probes) // 2
    assert all(r[PIN_SLOT - 1] == bundles.pin_item for r in refs[bundles.new_version])
    assert verdict.checked_in_windows > 0
    mismatched = [(probes[r.probe].rail, r.version, r.items) for r in verdict.mismatched]
    assert mismatched == []


def test_the_new_version_serves_after_promote_and_the_old_after_rollback(swapped):
    bundles, probes, refs, run = swapped
    promoted, rolled_back = run.switches
    assert promoted.answer["promoted"] is True and promoted.to_version == bundles.new_version
    assert rolled_back.answer["restored"] == bundles.old.name
    assert verify(run, refs).stale == []
    after_promote = [
        r.version for r in run.replies if promoted.served < r.started < rolled_back.called
    ]
    after_rollback = [r.version for r in run.replies if r.started > rolled_back.served]
    assert after_promote and set(after_promote) == {bundles.new_version}
    assert after_rollback and set(after_rollback) == {bundles.old_version}
