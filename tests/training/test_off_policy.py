"""IPS / SNIPS recover a known policy value from simulated exploration logs."""

from __future__ import annotations

import numpy as np
import pytest

from training.off_policy import (
    LoggedSlot,
    SimulatedBandit,
    as_target,
    epsilon_greedy_matrix,
    importance_weights,
    ips,
    snips,
)


@pytest.fixture(scope="module")
def world():
    bandit = SimulatedBandit.random(contexts=40, actions=8, seed=3)
    rng = np.random.default_rng(4)
    logging = epsilon_greedy_matrix(rng.normal(size=bandit.click.shape), epsilon=0.4)
    # The target knows better than the logger: greedy on the true click rates, a little noise.
    target = epsilon_greedy_matrix(bandit.click, epsilon=0.1)
    return bandit, logging, target


def test_target_policy_really_differs_from_the_logging_policy(world):
    bandit, logging, target = world
    assert bandit.value(target) > bandit.value(logging) + 0.1


@pytest.mark.parametrize("estimator", [ips, snips])
def test_estimator_recovers_the_true_value_within_its_interval(world, estimator):
    bandit, logging, target = world
    logs = bandit.log(logging, n=20_000, seed=5)
    estimate = estimator(logs, as_target(target))
    truth = bandit.value(target)
    assert estimate.low <= truth <= estimate.high
    # ...and the interval is tight enough to say something: it excludes the logger's value.
    assert estimate.low > bandit.value(logging)
    assert estimate.high - estimate.low < 0.1


@pytest.mark.parametrize("estimator", [ips, snips])
def test_interval_covers_the_truth_at_about_its_nominal_rate(world, estimator):
    bandit, logging, target = world
    truth = bandit.value(target)
    covered = [
        (e := estimator(bandit.log(logging, n=2_000, seed=seed), as_target(target))).low
        <= truth
        <= e.high
        for seed in range(40)
    ]
    assert np.mean(covered) >= 0.85


def test_session_bootstrap_interval_also_covers_the_truth(world):
    bandit, logging, target = world
    logs = bandit.log(logging, n=6_000, seed=11)
    estimate = snips(logs, as_target(target), resamples=300)
    assert estimate.low <= bandit.value(target) <= estimate.high
    assert estimate.low < estimate.value < estimate.high


def test_evaluating_the_logging_policy_itself_gives_unit_weights(world):
    bandit, logging, _ = world
    logs = bandit.log(logging, n=500, seed=1)
    weights = importance_weights(logs, as_target(logging))
    np.testing.assert_allclose(weights, 1.0)
    on_policy = float(np.mean([log.reward for log in logs]))
    assert ips(logs, as_target(logging)).value == pytest.approx(on_policy)
    assert snips(logs, as_target(logging)).effective_n == pytest.approx(500)


def test_hand_computed_ips_and_snips():
    logs = [
        LoggedSlot("x", "a", 0.5, 1.0),
        LoggedSlot("x", "b", 0.25, 0.0),
        LoggedSlot("x", "a", 0.5, 0.0),
        LoggedSlot("x", "c", 0.25, 1.0),
    ]
    target = {"a": 0.2, "b": 0.3, "c": 0.5}

    def pi(_context, action):
        return target[action]

    # weights 0.4, 1.2, 0.4, 2.0; rewards 1, 0, 0, 1
    assert ips(logs, pi).value == pytest.approx((0.4 + 2.0) / 4)
    assert snips(logs, pi).value == pytest.approx((0.4 + 2.0) / 4.0)
    assert snips(logs, pi).max_weight == pytest.approx(2.0)
    assert snips(logs, pi).effective_n == pytest.approx(4.0**2 / (0.16 + 1.44 + 0.16 + 4.0))


def test_a_missing_propensity_is_refused_with_the_reason():
    logs = [LoggedSlot("x", "a", 0.0, 1.0)]
    with pytest.raises(ValueError, match="propensity"):
        ips(logs, lambda _x, _a: 1.0)


def test_a_target_that_never_shows_a_logged_action_is_refused():
    logs = [LoggedSlot("x", "a", 0.5, 1.0)]
    with pytest.raises(ValueError, match="probability 0"):
        snips(logs, lambda _x, _a: 0.0)
