"""The rails endpoint's answer: the response body from the served items (titles and
categories from the served model, provenance when asked) and the request's metrics
(latency per rail and served_by, per stage)."""

from __future__ import annotations

import time

from ranking.candidates import Candidate
from serving.api_models import Provenance, RailItem, RailRequest, RailResponse, ServedBy
from serving.metrics import Metrics
from serving.rail_service import LoadedRails
from serving.stages import Trace


def respond(
    metrics: Metrics,
    rail: str,
    request: RailRequest,
    loaded: LoadedRails,
    served: ServedBy,
    items: list[Candidate],
    trace: Trace,
    provenance: list[Provenance] | None = None,
) -> RailResponse:
    """The response for `items`, its total time on the trace and in the metrics."""
    attributes = loaded.pipeline.attributes
    titles = loaded.titles
    total = time.perf_counter() - trace.started
    trace.timings["total"] = round(total * 1000, 3)
    metrics.requests.labels(rail=rail, served_by=served).observe(total)
    for stage, ms in trace.timings.items():
        if stage != "total":
            metrics.stages.labels(stage=stage).observe(ms / 1000)
    # model_construct: every value comes from the validated request and the loaded model;
    # validating each item again was about 3% of a cached read's interpreter time
    rail_items = [
        RailItem.model_construct(
            item_id=c.item_id,
            score=float(c.score),
            title=titles.get(c.item_id),
            category=getattr(attributes.get(c.item_id), "category_path", None),
        )
        for c in items
    ]
    for item, explained in zip(rail_items, provenance or [], strict=False):
        item.provenance = explained  # set only here: unset, the route omits the key
    return RailResponse(
        rail=rail,
        session_id=request.session_id,
        model_version=loaded.version,
        served_by=served,
        reasons=trace.reasons,
        vector_source=trace.vector_source,
        items=rail_items,
        timings_ms=trace.timings,
    )
