"""The process sheds load: beyond `serving.budgets.ranker_queue` re-ranker jobs in hand a
request is served the fused order at once, and beyond `compute_slots` rails being computed
a request waits at most `admission_ms` and is then served the rules over popular items;
either slot frees when its job ends."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from serving.api_models import RailRequest
from serving.metrics import Metrics
from serving.service import RailService


def _service(trained_rees46, **budgets: float) -> RailService:  # type: ignore[no-untyped-def]
    settings, bundle = trained_rees46
    limits = settings.serving.budgets.model_copy(update=budgets)
    serving = settings.serving.model_copy(update={"budgets": limits, "triton_url": None})
    service = RailService(
        settings.model_copy(update={"serving": serving}), None, None, None, Metrics()
    )
    assert service.load(bundle)
    return service


@contextmanager
def _one_request_held(service: RailService, request: RailRequest) -> Iterator[list]:
    """A pdp_fbt request held inside a re-ranker that waits until the block ends; yields the
    list its response lands in (after the block)."""
    pipeline = service.loaded.pipeline
    real = pipeline.ranker_scores
    started, release = threading.Event(), threading.Event()

    def slow(*args, **kwargs):  # type: ignore[no-untyped-def]
        started.set()
        release.wait(30)
        return real(*args, **kwargs)

    held: list = []
    pipeline.ranker_scores = slow  # type: ignore[method-assign]
    first = threading.Thread(target=lambda: held.append(service.serve("pdp_fbt", request)))
    first.start()
    try:
        assert started.wait(30)  # the held request is inside the re-ranker
        yield held
    finally:
        release.set()
        first.join(30)
        pipeline.ranker_scores = real  # type: ignore[method-assign]


def test_a_request_beyond_the_ranker_queue_gets_the_fused_order_at_once(trained_rees46):
    service = _service(trained_rees46, ranker_ms=5000, ranker_queue=1, compute_slots=2)
    item = str(service.loaded.pipeline.stats.item_ids[0])
    request = RailRequest(session_id="shed", item_id=item)
    with _one_request_held(service, request) as held:  # the one allowed job is in hand
        shed = service.serve("pdp_fbt", request)
        assert any("re-ranker busy" in r for r in shed.reasons), shed.reasons
        assert len(shed.items) == request.slots  # a full rail all the same
    assert held and not any("busy" in r for r in held[0].reasons)
    again = service.serve("pdp_fbt", request)  # the slot is free again
    assert not any("busy" in r for r in again.reasons), again.reasons


def test_a_request_beyond_the_compute_slots_waits_its_admission_time_then_gets_popular_items(
    trained_rees46,
):
    service = _service(trained_rees46, ranker_ms=5000, compute_slots=1, admission_ms=50)
    item = str(service.loaded.pipeline.stats.item_ids[0])
    request = RailRequest(session_id="admit", item_id=item)
    with _one_request_held(service, request) as held:  # the one compute slot is taken
        shed = service.serve("pdp_fbt", request)
        assert shed.served_by == "fallback"
        assert any(r.startswith("over capacity") for r in shed.reasons), shed.reasons
        assert shed.timings_ms["admission"] >= 50  # it waited its admission time, no longer
        assert len(shed.items) == request.slots and item not in [i.item_id for i in shed.items]
    assert held and held[0].served_by == "computed"
    assert not any("capacity" in r for r in held[0].reasons)
    again = service.serve("pdp_fbt", request)  # the slot is free again
    assert again.served_by == "computed" and not any("capacity" in r for r in again.reasons)
