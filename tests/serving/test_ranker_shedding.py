"""The re-ranker sheds load: beyond `serving.budgets.ranker_queue` jobs in hand a request is
served the fused order at once, and the slot frees when a job ends."""

from __future__ import annotations

import threading

from serving.api_models import RailRequest
from serving.metrics import Metrics
from serving.service import RailService


def test_a_request_beyond_the_ranker_queue_gets_the_fused_order_at_once(trained_rees46):
    settings, bundle = trained_rees46
    budgets = settings.serving.budgets.model_copy(update={"ranker_ms": 5000, "ranker_queue": 1})
    serving = settings.serving.model_copy(update={"budgets": budgets, "triton_url": None})
    service = RailService(
        settings.model_copy(update={"serving": serving}), None, None, None, Metrics()
    )
    assert service.load(bundle)
    pipeline = service.loaded.pipeline
    real = pipeline.ranker_scores
    started, release = threading.Event(), threading.Event()

    def slow(*args, **kwargs):  # type: ignore[no-untyped-def]
        started.set()
        release.wait(30)
        return real(*args, **kwargs)

    item = str(pipeline.stats.item_ids[0])
    request = RailRequest(session_id="shed", item_id=item)
    held: list = []
    pipeline.ranker_scores = slow  # type: ignore[method-assign]
    first = threading.Thread(target=lambda: held.append(service.serve("pdp_fbt", request)))
    first.start()
    try:
        assert started.wait(30)  # the one allowed job is in hand
        shed = service.serve("pdp_fbt", request)
        assert any("re-ranker busy" in r for r in shed.reasons), shed.reasons
        assert len(shed.items) == request.slots  # a full rail all the same
    finally:
        release.set()
        first.join(30)
        pipeline.ranker_scores = real  # type: ignore[method-assign]
    assert held and not any("busy" in r for r in held[0].reasons)
    again = service.serve("pdp_fbt", request)  # the slot is free again
    assert not any("busy" in r for r in again.reasons), again.reasons
