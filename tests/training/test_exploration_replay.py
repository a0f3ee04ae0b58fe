"""The exploration replay: propensities on the log, and the IPS sanity row."""

from __future__ import annotations

import numpy as np
import pytest

from training.exploration_replay import (
    epsilon_greedy_target,
    run_exploration_replay,
    value_policies,
)
from training.off_policy import LoggedSlot
from training.shadow_eval import read_impressions_jsonl


def test_epsilon_greedy_target_over_the_logged_choice_set():
    target = epsilon_greedy_target(0.2)
    assert target(("g", 5), "g") == pytest.approx(0.8 + 0.04)
    assert target(("g", 5), "x") == pytest.approx(0.04)
    assert epsilon_greedy_target(0.0)(("g", 5), "x") == 0.0


def test_greedy_value_counts_only_greedy_actions():
    eps, size = 0.5, 4
    logs = [
        LoggedSlot(("g", size), "g", 1 - eps + eps / size, 1.0, "a"),
        LoggedSlot(("g", size), "x", eps / size, 0.0, "b"),
        LoggedSlot(("g", size), "g", 1 - eps + eps / size, 0.0, "c"),
    ]
    logging, _, greedy = value_policies(logs, eps, 0.1, resamples=0)
    assert logging.ips.value == pytest.approx(1 / 3)  # weights all 1: the plain mean
    assert greedy.snips.value == pytest.approx(0.5)  # the greedy impressions' mean reward


def test_replay_logs_propensities_and_the_on_policy_row_is_the_mean(trained_rees46, tmp_path):
    settings, bundle = trained_rees46
    settings = settings.model_copy(update={"reports_dir": tmp_path / "reports"})
    run = run_exploration_replay(
        settings, "rees46", bundle, "explore", sessions=3, slot=5, epsilon=0.5
    )
    written = read_impressions_jsonl(run.outputs["impressions"])
    assert len(written) == len(run.impressions) > 0
    explored = [i for i in written if i.explored_slot is not None]
    assert explored and all(len(i.propensities) == len(i.items) for i in explored)
    for imp in explored:
        greedy = imp.items[5] == imp.greedy_item
        expected = 0.5 * greedy + 0.5 / imp.choice_set_size  # type: ignore[operator]
        assert imp.propensities[5] == pytest.approx(expected)
    rewards = np.mean([s.reward for s in run.logged])
    logging = run.values[0]
    assert logging.ips.value == pytest.approx(rewards) == pytest.approx(run.on_policy_mean)
    assert logging.snips.value == pytest.approx(rewards)
    assert logging.ips.effective_n == pytest.approx(len(run.logged))
    assert (run.folder / "exploration.md").exists() and (run.folder / "exploration.json").exists()
