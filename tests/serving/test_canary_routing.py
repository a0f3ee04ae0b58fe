"""Live canary routing in one API process: the trained REES46 model as production, a copy of
it with a pin rule set as the challenger (so the two arms' answers tell apart), the canary
state file moved by railtower.canary, followed by `RailService.follow_canary`.
In-process (no Redis, no Triton); tests/serving/test_canary_under_load.py runs the real stack.
"""

from __future__ import annotations

import threading
import time

import pytest

from benchmarks.swap_harness import PIN_SLOT, Probe, offline_items, prepare_bundles
from devstack.local_services import free_port, redis_server
from railtower.canary import (
    CANARY_ARM,
    abort_canary,
    advance_canary,
    in_canary,
    read_canary,
    start_canary,
)
from railtower.production import current_production, pointer_path
from railtower.settings import ShadowSettings
from serving.api_models import RailRequest
from serving.app import Watchers, follow_model
from serving.impressions import MemoryImpressionSink
from serving.metrics import Metrics
from serving.rail_service import load_rails
from serving.service import RailService
from serving.shadow import ShadowRunner
from state.session_store import SessionStore
from towers.session_features import HistoryEvent

PAGE = "1005115"  # a REES46 phone with co-cart neighbours


@pytest.fixture(scope="module")
def canaried(trained_rees46, tmp_path_factory):
    """(settings, bundles, pointer, service): production served, no canary yet."""
    settings, bundle = trained_rees46
    root = tmp_path_factory.mktemp("canary")
    bundles = prepare_bundles(bundle, settings.artifacts_dir, root, settings)
    local = settings.model_copy(update={"artifacts_dir": bundles.artifacts})
    pointer = pointer_path(bundles.artifacts, local.promotion, local.serving.dataset)
    service = RailService(local, None, None, None, Metrics())
    assert service.load(pointer)
    return local, bundles, pointer, service


@pytest.fixture
def logged(canaried):
    """A memory impression sink on the service for one test."""
    service = canaried[3]
    sink = MemoryImpressionSink(service.metrics)
    runner = ShadowRunner(ShadowSettings(), sink, service.metrics).start()
    service.observer = runner
    yield sink
    service.observer = None
    runner.close()


def _start(settings, bundles):  # type: ignore[no-untyped-def]
    return start_canary(
        settings.artifacts_dir,
        settings.promotion,
        settings.canary,
        settings.serving.dataset,
        bundles.new,
        "test",
    )


def _pdp(session: str) -> RailRequest:
    return RailRequest(session_id=session, item_id=PAGE)


def test_sessions_follow_the_share_and_each_arm_answers_as_its_model_offline(canaried, logged):
    settings, bundles, pointer, service = canaried
    state = _start(settings, bundles)
    try:
        assert service.follow_canary(pointer)
        assert service.canary is not None and service.canary.version == bundles.new_version
        sessions = [f"s-{n}" for n in range(400)]
        answers = {s: service.serve("pdp_fbt", _pdp(s)) for s in sessions}
        expected = {s: in_canary(s, state.share, state.salt) for s in sessions}
        assert 5 <= sum(expected.values()) <= 40  # about 5% of 400
        for s, answer in answers.items():
            version = bundles.new_version if expected[s] else bundles.old_version
            assert answer.model_version == version, s
        # each arm's answer is its own bundle's offline answer for the same request
        references = {
            v: offline_items(load_rails(b, settings), Probe("pdp_fbt", _pdp("x").model_dump(), ()))
            for v, b in ((bundles.old_version, bundles.old), (bundles.new_version, bundles.new))
        }
        assert references[bundles.new_version][PIN_SLOT - 1] == bundles.pin_item
        assert references[bundles.new_version] != references[bundles.old_version]
        for s, answer in answers.items():
            items = tuple(i.item_id for i in answer.items)
            assert items == references[answer.model_version], s
        # every impression says which arm and version served it
        assert service.observer.drain()
        assert logged.flush()
        by_session = {i.session_id: i for i in logged.impressions()}
        for s in sessions:
            impression = by_session[s]
            assert impression.shown
            assert impression.arm == (CANARY_ARM if expected[s] else "production")
            assert impression.model_version == answers[s].model_version
    finally:
        abort_canary(settings.artifacts_dir, settings.promotion, settings.serving.dataset, "end")
        service.follow_canary(pointer)


def test_a_rising_share_keeps_every_canary_session_and_an_abort_returns_them_all(canaried):
    settings, bundles, pointer, service = canaried
    dataset = settings.serving.dataset
    _start(settings, bundles)
    sessions = [f"r-{n}" for n in range(300)]
    service.follow_canary(pointer)
    at_first = {
        s
        for s in sessions
        if service.serve("pdp_fbt", _pdp(s)).model_version == bundles.new_version
    }
    advance_canary(settings.artifacts_dir, settings.promotion, dataset, "step")
    assert service.follow_canary(pointer) and service.canary.share == 0.25
    at_second = {
        s
        for s in sessions
        if service.serve("pdp_fbt", _pdp(s)).model_version == bundles.new_version
    }
    assert at_first < at_second  # nested: no challenger session goes back as the share rises
    assert 40 <= len(at_second) <= 110
    abort_canary(settings.artifacts_dir, settings.promotion, dataset, "bad")
    assert service.follow_canary(pointer) and service.canary is None
    versions = {service.serve("pdp_fbt", _pdp(s)).model_version for s in sessions}
    assert versions == {bundles.old_version}


def test_stock_changes_reach_the_challenger(canaried):
    settings, bundles, pointer, service = canaried
    _start(settings, bundles)
    try:
        service.follow_canary(pointer)
        challenger = next(f"c-{n}" for n in range(10_000) if service.canary.takes(f"c-{n}"))
        served = service.serve("pdp_fbt", _pdp(challenger))
        assert served.model_version == bundles.new_version
        assert served.items[PIN_SLOT - 1].item_id == bundles.pin_item
        service.apply_catalogue_change(bundles.pin_item, None, 0)
        after = service.serve("pdp_fbt", _pdp(challenger))
        assert bundles.pin_item not in [i.item_id for i in after.items]
    finally:
        service.apply_catalogue_change(bundles.pin_item, None, 100)
        abort_canary(settings.artifacts_dir, settings.promotion, settings.serving.dataset, "end")
        service.follow_canary(pointer)


@pytest.mark.integration
def test_the_consumers_prewarm_warms_each_session_under_the_model_that_serves_it(
    canaried, tmp_path
):
    settings, bundles, pointer, _ = canaried
    server = redis_server(free_port(), tmp_path).start()  # fails the test if it cannot start
    try:
        store = SessionStore(f"redis://127.0.0.1:{server.port}/0", 2.0, 50, 3600, 3600)
        service = RailService(settings, None, store, None, Metrics())
        assert service.load(pointer)
        _start(settings, bundles)
        assert service.follow_canary(pointer)
        sessions = [f"w-{n}" for n in range(60)]
        for s in sessions:
            store.append_events(s, [(f"{s}-0", HistoryEvent(PAGE, "view", 1.0), None)])
        assert service.prewarm(sessions) == len(sessions)
        for s in sessions:
            own = bundles.new_version if service.canary.takes(s) else bundles.old_version
            other = ({bundles.new_version, bundles.old_version} - {own}).pop()
            assert store.snapshot(s, own, "homepage_hero").rail is not None, s
            assert store.snapshot(s, other, "homepage_hero").rail is None, s
        assert any(service.canary.takes(s) for s in sessions)
    finally:
        abort_canary(settings.artifacts_dir, settings.promotion, settings.serving.dataset, "end")
        server.stop()


def test_follow_model_keeps_a_process_on_the_canary_and_the_pointer(canaried):
    """The refresh consumer runs the same loops as an API process (serving.app.follow_model),
    so it pre-warms under the model the API serves, canary included."""
    settings, bundles, pointer, _ = canaried
    quick = settings.model_copy(
        update={"serving": settings.serving.model_copy(update={"reload_interval_s": 0.2})}
    )
    service = RailService(quick, None, None, None, Metrics())
    assert service.load(pointer)
    stop = threading.Event()
    follow_model(quick, service, Watchers(stop, service.metrics))
    try:
        _start(settings, bundles)
        assert _within(5.0, lambda: service.canary is not None)
        assert service.canary.version == bundles.new_version
        abort_canary(settings.artifacts_dir, settings.promotion, settings.serving.dataset, "x")
        assert _within(5.0, lambda: service.canary is None)
    finally:
        stop.set()


def _within(seconds: float, condition) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


# last: it leaves the challenger as production
def test_the_last_step_promotes_and_the_process_serves_the_challenger_to_everyone(canaried):
    settings, bundles, pointer, service = canaried
    dataset = settings.serving.dataset
    _start(settings, bundles)
    service.follow_canary(pointer)
    for _ in settings.canary.steps[1:]:
        advance_canary(settings.artifacts_dir, settings.promotion, dataset, "step")
    assert read_canary(pointer).status == "promoted"
    assert current_production(pointer) == bundles.new.resolve()
    assert service.follow_canary(pointer)
    assert service.canary is None and service.loaded.version == bundles.new_version
    versions = {service.serve("pdp_fbt", _pdp(f"p-{n}")).model_version for n in range(50)}
    assert versions == {bundles.new_version}
