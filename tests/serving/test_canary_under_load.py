"""The canary ramped 5% -> 25% -> 50% -> 100% through the admin routes while clients keep
asking, against the real stack (Redis, tritonserver, the API under uvicorn as its own
process; benchmarks/canary_harness.py). No request fails, every reply is one of the two
versions and equals that version's offline answer, and after each step a session is served
by the arm its hash gives at that share. A server that cannot start fails the test.
"""

from __future__ import annotations

import pytest

from benchmarks.canary_harness import run_canary, verify_canary
from benchmarks.live_stack import start_stack
from benchmarks.swap_harness import build_probes, prepare_bundles, references, seed_sessions
from railtower.production import current_production, pointer_path
from serving.rail_service import load_rails

pytestmark = pytest.mark.integration

SESSIONS = 80  # x 3 rails: enough sessions for 5% to take a few


@pytest.fixture(scope="module")
def ramped(trained_rees46, tmp_path_factory):
    settings, bundle = trained_rees46
    root = tmp_path_factory.mktemp("canary-load")
    bundles = prepare_bundles(bundle, settings.artifacts_dir, root, settings)
    local = settings.model_copy(update={"artifacts_dir": bundles.artifacts})
    versions = {
        bundles.old_version: load_rails(bundles.old, local),
        bundles.new_version: load_rails(bundles.new, local),
    }
    probes = build_probes(versions[bundles.old_version], SESSIONS, avoid=bundles.pin_item)
    refs = references(versions, probes)
    stack = start_stack(bundles.artifacts, settings.serving.triton_repository, root / "work")
    try:
        seed_sessions(stack.redis_url, probes)
        steps = list(settings.canary.steps)
        run = run_canary(stack, bundles, probes, 3, 3.0, steps, settings.canary.salt)
    finally:
        stack.stop()
    verdict = verify_canary(run, probes, refs, bundles.old_version, bundles.new_version)
    return local, bundles, run, verdict


def test_no_request_fails_while_the_canary_ramps(ramped):
    _, _, run, verdict = ramped
    assert len(run.replies) > 50 and len(run.steps) == 4
    assert [(r.status, r.error) for r in verdict.failed] == []


def test_every_reply_is_its_arms_offline_answer_and_its_sessions_arm(ramped):
    _, bundles, _, verdict = ramped
    assert verdict.unknown_version == []
    assert [(r.probe, r.version) for r in verdict.mismatched] == []
    assert verdict.checked_routes > 50
    assert [(r.probe, r.version) for r in verdict.misrouted] == []


def test_the_challengers_share_rises_step_by_step_and_ends_as_production(ramped):
    local, bundles, _, verdict = ramped
    rows = {row["step"]: row for row in verdict.per_step}
    assert rows["production only"]["challenger_replies"] == 0
    shares = [rows[s]["challenger_sessions"] / rows[s]["sessions"] for s in ("5%", "25%", "50%")]
    assert shares == sorted(shares) and shares[-1] > shares[0]
    assert rows["100%"]["challenger_replies"] == rows["100%"]["replies"]
    pointer = pointer_path(bundles.artifacts, local.promotion, local.serving.dataset)
    assert current_production(pointer) == bundles.new.resolve()
