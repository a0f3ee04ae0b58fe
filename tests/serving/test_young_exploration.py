"""Young items on the served path: which ruled items count as young, how deep the rules must
run for them, and that the request's exploration draw gives them their share."""

from __future__ import annotations

from types import SimpleNamespace

from railtower.settings import ExplorationSettings, load_settings
from ranking.candidates import Candidate
from serving.api_models import RailRequest
from serving.stages import explore_request, rules_length, young_items

RULED = [Candidate(f"old{k}", 50.0 - k) for k in range(40)] + [Candidate("listed-today", -9.0)]
LOADED = SimpleNamespace(
    pipeline=SimpleNamespace(stats=SimpleNamespace(row={f"old{k}": k for k in range(40)}))
)


def test_young_means_no_statistics_row():
    assert young_items(LOADED, RULED) == frozenset({"listed-today"})  # type: ignore[arg-type]


def test_the_rules_run_over_the_whole_pool_only_when_young_items_have_a_share():
    plain = ExplorationSettings(slot=3, window=12)
    assert rules_length(plain, 12, 300) == 24
    assert rules_length(plain.model_copy(update={"young_share": 0.2}), 12, 300) == 300
    assert rules_length(ExplorationSettings(), 12, 300) == 12  # no slot, no window


def test_a_young_item_far_below_the_cut_takes_the_slot_with_its_logged_share():
    settings = load_settings(log_level="WARNING")
    exploration = ExplorationSettings(slot=3, epsilon=0.0, window=4, young_share=1.0)
    settings = settings.model_copy(
        update={"ranking": settings.ranking.model_copy(update={"exploration": exploration})}
    )
    young = young_items(LOADED, RULED)  # type: ignore[arg-type]
    out = explore_request(
        settings, "homepage_hero", RailRequest(session_id="s"), None, RULED, None, young
    )
    assert out is not None and out.chosen == "listed-today" and out.propensity == 1.0
    assert [c.item_id for c in out.items][3] == "listed-today"
    # without the young set (or with share 0) the greedy item keeps the slot (epsilon 0)
    plain = explore_request(settings, "homepage_hero", RailRequest(session_id="s"), None, RULED)
    assert plain is not None and plain.chosen == "old3"
