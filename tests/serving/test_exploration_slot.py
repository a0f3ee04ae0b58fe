"""The exploration slot on the served path: it obeys every rule, keeps the slot count, and
logs propensities that match how often each choice is actually shown."""

from __future__ import annotations

import orjson
import pytest

from railtower.settings import ShadowSettings
from ranking.candidates import Candidate
from ranking.exploration import Explored
from ranking.rule_set import load_rule_set
from serving.api_models import RailRequest
from serving.impressions import MemoryImpressionSink
from serving.metrics import Metrics
from serving.rail_cache import rail_payload, stored_exploration
from serving.rail_service import load_rails
from serving.service import RailService
from serving.shadow import ShadowRunner

PAGE = "1005115"  # a REES46 phone with co-cart neighbours
SLOTS, SLOT, EPSILON, WINDOW = 8, 3, 0.6, 5


def _service(trained_rees46, slot: int | None) -> RailService:
    settings, bundle = trained_rees46
    exploration = settings.ranking.exploration.model_copy(
        update={"slot": slot, "epsilon": EPSILON, "window": WINDOW}
    )
    settings = settings.model_copy(
        update={"ranking": settings.ranking.model_copy(update={"exploration": exploration})}
    )
    service = RailService(settings, None, None, None, Metrics())
    service.loaded = load_rails(bundle, settings)  # its own copy: the tests change its rules
    return service


def _logged(service: RailService, requests: int) -> list:  # type: ignore[type-arg]
    sink = MemoryImpressionSink(Metrics(), keep=10**6)
    runner = ShadowRunner(ShadowSettings(share=0.0), sink, service.metrics).start()
    service.observer = runner
    try:
        for n in range(requests):
            request = RailRequest(session_id=f"explore-{n}", item_id=PAGE, slots=SLOTS)
            assert len(service.serve("pdp_fbt", request).items) == SLOTS
        assert sink.flush()
        return sink.impressions()
    finally:
        service.observer = None
        runner.close()


@pytest.fixture(scope="module")
def explored_service(trained_rees46):
    return _service(trained_rees46, SLOT)


def test_off_by_default_logs_no_propensities(trained_rees46):
    logged = _logged(_service(trained_rees46, None), 3)
    assert logged and all(i.propensities is None and i.explored_slot is None for i in logged)


def test_logged_propensities_match_the_observed_choice_frequency(explored_service):
    logged = _logged(explored_service, 300)
    for imp in logged:
        assert imp.explored_slot == SLOT and len(imp.propensities) == SLOTS
        assert [p for n, p in enumerate(imp.propensities) if n != SLOT] == [1.0] * (SLOTS - 1)
    size = logged[0].choice_set_size
    assert size == WINDOW + 1  # enough eligible items below the cut of this page
    greedy_p = 1 - EPSILON + EPSILON / size
    shown_greedy = [i.items[SLOT] == i.greedy_item for i in logged]
    for imp, greedy in zip(logged, shown_greedy, strict=True):
        expected = greedy_p if greedy else EPSILON / size
        assert imp.propensities[SLOT] == pytest.approx(expected)
    # the draw is seeded per request, so 300 sessions are 300 independent draws
    assert sum(shown_greedy) / len(logged) == pytest.approx(greedy_p, abs=0.08)


def test_explored_items_obey_blocks_stock_and_exclusions(explored_service):
    loaded = explored_service.loaded
    explored = {i.items[SLOT] for i in _logged(explored_service, 40)} - {None}
    greedy = _logged(explored_service, 1)[0].greedy_item
    blocked, sold_out = sorted(explored - {greedy})[:2]
    loaded.pipeline.rule_set = load_rule_set(
        orjson.dumps(
            {
                "name": "block-one",
                "version": "1",
                "rails": ["pdp_fbt"],
                "rules": [{"kind": "block", "item_id": blocked}],
            }
        ).decode()
    )
    loaded.pipeline.attributes.update(sold_out, stock=0)
    for imp in _logged(explored_service, 80):
        assert len(imp.items) == SLOTS
        assert not {blocked, sold_out, PAGE} & set(imp.items)
        assert imp.propensities is not None and imp.explored_slot == SLOT


def test_a_cached_rail_keeps_its_draw():
    items = [Candidate(f"i{n}", 1.0 - n / 10) for n in range(4)]
    drawn = Explored(items, 2, ["g", "i2", "x"], "i2", {"g": 0.6, "i2": 0.2, "x": 0.2})
    payload = rail_payload("m", items, drawn)
    back = stored_exploration(payload, 4)
    assert back is not None and (back.slot, back.chosen) == (2, "i2")
    assert back.probabilities == drawn.probabilities
    assert stored_exploration(payload, 3) is None  # warmed for another cut: recompute
    assert stored_exploration(rail_payload("m", items, None), 4) is None
