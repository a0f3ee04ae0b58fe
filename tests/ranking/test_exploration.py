"""The exploration slot: what it may show, and that its logged propensities are the truth."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from railtower.settings import ExplorationSettings
from ranking.candidates import Candidate
from ranking.exploration import InMemoryArmStats, explore

RANKED = [Candidate(f"i{k}", 100.0 - k) for k in range(30)]


def test_off_by_default_leaves_the_rail_alone():
    out = explore(RANKED, 12, ExplorationSettings(), np.random.default_rng(0))
    assert [c.item_id for c in out.items] == [c.item_id for c in RANKED[:12]]
    assert out.chosen is None and out.propensities() == [1.0] * 12


@given(
    slot=st.integers(0, 11),
    window=st.integers(1, 20),
    policy=st.sampled_from(["epsilon_greedy", "thompson"]),
    seed=st.integers(0, 10_000),
)
@settings(max_examples=60, deadline=None)
def test_only_the_slot_changes_and_only_to_an_item_below_the_cut(slot, window, policy, seed):
    config = ExplorationSettings(slot=slot, window=window, policy=policy, propensity_draws=64)
    out = explore(RANKED, 12, config, np.random.default_rng(seed))
    ids = [c.item_id for c in out.items]
    assert len(ids) == 12 and len(set(ids)) == 12
    for i in range(12):
        if i != slot:
            assert ids[i] == RANKED[i].item_id
    allowed = {RANKED[slot].item_id} | {c.item_id for c in RANKED[12 : 12 + window]}
    assert ids[slot] in allowed and ids[slot] == out.chosen
    assert sum(out.probabilities.values()) == pytest.approx(1.0)
    assert 0 < out.propensity <= 1


def test_epsilon_greedy_shows_each_item_as_often_as_its_logged_propensity():
    config = ExplorationSettings(slot=11, epsilon=0.3, window=4)
    rng = np.random.default_rng(1)
    runs = [explore(RANKED, 12, config, rng) for _ in range(20_000)]
    shown = Counter(r.chosen for r in runs)
    assert runs[0].probabilities["i11"] == pytest.approx(0.7 + 0.3 / 5)
    assert runs[0].probabilities["i12"] == pytest.approx(0.3 / 5)
    for item, p in runs[0].probabilities.items():
        assert shown[item] / len(runs) == pytest.approx(p, abs=0.01)


def test_thompson_favours_what_clicks_and_a_cold_item_the_towers_like():
    config = ExplorationSettings(slot=11, policy="thompson", window=3, propensity_draws=2000)
    stats = InMemoryArmStats(
        clicks={"i11": 1, "i12": 40, "i13": 0}, impressions={"i11": 200, "i12": 200, "i13": 200}
    )
    out = explore(RANKED, 12, config, np.random.default_rng(2), stats)
    assert out.probabilities["i12"] > 0.9  # 20% click rate against 0.5% and 0%
    # i14 was never shown: its prior follows the tower score
    liked = explore(
        RANKED, 12, config, np.random.default_rng(2), stats, tower_scores={"i14": 1.0}
    ).probabilities["i14"]
    disliked = explore(
        RANKED, 12, config, np.random.default_rng(2), stats, tower_scores={"i14": -1.0}
    ).probabilities["i14"]
    assert liked > disliked


def test_thompson_learns_the_best_arm_in_a_simulated_run():
    config = ExplorationSettings(slot=0, policy="thompson", window=4, propensity_draws=128)
    true_rate = {"i0": 0.02, "i12": 0.02, "i13": 0.15, "i14": 0.02, "i15": 0.02}
    stats = InMemoryArmStats({}, {})
    rng = np.random.default_rng(3)
    for _ in range(1500):
        out = explore(RANKED, 12, config, rng, stats)
        stats.record(out.chosen, rng.random() < true_rate[out.chosen])
    best = max(stats.impressions, key=stats.impressions.get)
    assert best == "i13"


def test_young_items_get_their_share_of_the_slot_from_anywhere_below_the_cut():
    # i25 and i28 were listed after training: far below the window, yet they share half of
    # the slot's draws; the rest keeps epsilon-greedy's proportions; the logs tell the truth.
    config = ExplorationSettings(slot=11, epsilon=0.2, window=4, young_share=0.5, young_window=2)
    rng = np.random.default_rng(3)
    young = {"i25", "i28", "i29"}  # i29 is past young_window: never a choice
    runs = [explore(RANKED, 12, config, rng, young=young) for _ in range(20_000)]
    p = runs[0].probabilities
    assert set(p) == {"i11", "i12", "i13", "i14", "i15", "i25", "i28"}
    assert p["i25"] == pytest.approx(0.25) and p["i28"] == pytest.approx(0.25)
    assert p["i11"] == pytest.approx(0.5 * (0.8 + 0.2 / 5))
    shown = Counter(r.chosen for r in runs)
    for item, share in p.items():
        assert shown[item] / len(runs) == pytest.approx(share, abs=0.01)
    # no young item in the list, or no share: exactly the plain policy
    plain = explore(
        RANKED,
        12,
        config.model_copy(update={"young_share": 0.0}),
        np.random.default_rng(0),
        young=young,
    )
    assert (
        plain.probabilities
        == explore(RANKED, 12, config, np.random.default_rng(0), young=set()).probabilities
    )
    assert "i25" not in plain.probabilities
