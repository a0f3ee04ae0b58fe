"""The canary's rule on replayed held-out REES46 sessions through the real service and a real
Redis (training.canary_replay): a challenger worse by construction (a popularity list) is
aborted at the first step, having served about that step's share of sessions; an equal one
(the same answers under another version) is judged by the rule as documented.
A Redis that cannot start fails the test.
"""

from __future__ import annotations

import pytest

from benchmarks.canary_bundles import derive_challengers
from railtower.production import current_production, pointer_path
from training.canary_replay import run_canary_replay

pytestmark = pytest.mark.integration

# A short ramp judged often: the held-out window is the last ~35 minutes of REES46's three
# hours (about 1,000 sessions), enough for one step, and what followed an impression is
# counted over 5 minutes, not the default 30. The worse challenger starts at 10%; the equal
# one at 50%, the most sessions per arm this window gives (the default salt's 10% sample is
# itself unlike the rest under the production model: an A/A difference,
# training.canary_balance).
# A step is judged once each arm has 30 sessions with a matured impression (the default 200
# is a shop's hour, more than this window holds at 10%).
WORSE = {"steps": [0.1, 1.0], "min_impressions": 100, "min_minutes": 4.0, "min_sessions": 30}
EQUAL = {"steps": [0.5, 1.0], "min_impressions": 100, "min_minutes": 4.0, "min_sessions": 30}
HORIZON_MINUTES = 5.0
CHECK_MINUTES = 2.0


@pytest.fixture(scope="module")
def replay(trained_rees46, tmp_path_factory):
    settings, bundle = trained_rees46
    root = tmp_path_factory.mktemp("canary-replay")
    local = settings.model_copy(
        update={"monitor": settings.monitor.model_copy(update={"horizon_minutes": HORIZON_MINUTES})}
    )
    challengers = derive_challengers(bundle, root / "bundles", local)

    def run(challenger, name, canary):  # type: ignore[no-untyped-def]
        local = settings.model_copy(
            update={
                "canary": settings.canary.model_copy(update=canary),
                "monitor": settings.monitor.model_copy(update={"horizon_minutes": HORIZON_MINUTES}),
            }
        )
        return run_canary_replay(local, "rees46", bundle, challenger, root / name, 0, CHECK_MINUTES)

    return local, root, challengers, run


def test_a_worse_challenger_is_aborted_at_the_first_step(replay):
    settings, root, challengers, run = replay
    result = run(challengers.popularity, "worse", WORSE)
    assert result.status == "aborted", [d.reason for d in result.decisions]
    (abort,) = result.moves
    assert abort.action == "abort" and abort.share == WORSE["steps"][0]
    assert abort.difference.high < 0 and abort.relative_drop > settings.canary.max_relative_drop
    # the blast radius: about the first step's share of the sessions it walked
    assert result.challenger_sessions <= 2 * WORSE["steps"][0] * result.sessions
    pointer = pointer_path(root / "worse" / "artifacts", settings.promotion, "rees46")
    assert current_production(pointer).name == "api-rees46-rails"  # production never moved


def test_an_equal_challenger_is_judged_by_the_rule_as_documented(replay):
    """The same answers under another version, on half the sessions. Whatever this little
    data makes of it (early looks have read it 40-50% "below" production on a few dozen
    sessions; on one CI machine's bundle it was aborted at 99%, on another it waited), every
    judgement follows the rule: no abort without a drop beyond the guard and the 99%
    interval below 0, no promotion while the drop is over the guard or the 95% interval is
    below 0, and the pointer moves only on a promotion. (The unit tests ramp an equal
    challenger on thousands of sessions; the README says why this window cannot.)"""
    settings, root, challengers, run = replay
    result = run(challengers.equal, "equal", EQUAL)
    guard = settings.canary.max_relative_drop
    judged = [d for d in result.decisions if d.difference is not None]
    assert judged, [d.reason for d in result.decisions]
    for d in result.decisions:
        if d.action == "abort":
            assert d.relative_drop > guard and d.abort_interval.high < 0, d.reason
        if d.action in ("advance", "promote"):
            assert d.relative_drop <= guard and d.difference.high >= 0, d.reason
    pointer = pointer_path(root / "equal" / "artifacts", settings.promotion, "rees46")
    production = current_production(pointer)
    if result.status == "promoted":
        assert production == challengers.equal.resolve()
    else:
        assert production.name == "api-rees46-rails"  # production never moved
