"""The hand-off after a request is answered: what the served path computed, passed to the
observer (impression logging and the shadow arms, serving.shadow.ShadowRunner), which reuses
it instead of reading Redis again. A failing observer never fails the served rail.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from railtower.logs import get_logger
from ranking.candidates import Candidate
from ranking.exploration import Explored
from ranking.retriever import Query
from serving.api_models import RailRequest, ServedBy
from serving.metrics import Metrics
from serving.rail_service import LoadedRails
from serving.served_model import CatalogueWatcher
from serving.stages import Answer
from state.session_store import SessionSnapshot

log = get_logger(__name__)


@dataclass(frozen=True)
class ServedRequest:
    """What the served path computed for one request: the hand-off to impression logging
    and the shadow arms, which reuse it instead of reading Redis again."""

    rail: str
    request: RailRequest
    loaded: LoadedRails
    snapshot: SessionSnapshot | None
    query: Query
    served_by: ServedBy
    items: list[Candidate]
    # the list the rules stage read (MMR output) when the rail was computed, else None
    before_rules: list[Candidate] | None
    # the production session vector the rail used; None when cached or without towers
    vector: np.ndarray | None
    # the exploration slot's draw (ranking.exploration) when it filled a slot of this rail
    explored: Explored | None = None
    # who served it: "production", or "canary" (the live canary's challenger, `loaded`)
    arm: str = "production"


class ServedObserver(CatalogueWatcher, Protocol):
    """Sees every served request after its answer is computed (serving.shadow.ShadowRunner).

    `observe` runs on the request thread: it must only hand work off, never compute.
    """

    def observe(self, served: ServedRequest) -> None: ...


def hand_off(
    observer: ServedObserver,
    metrics: Metrics,
    rail: str,
    request: RailRequest,
    query: Query,
    snapshot: SessionSnapshot | None,
    loaded: LoadedRails,
    answer: Answer,
    arm: str,
) -> None:
    """Give the observer the served request; its failure is logged and counted, not raised."""
    served = ServedRequest(
        rail=rail,
        request=request,
        loaded=loaded,
        snapshot=snapshot,
        query=query,
        served_by=answer.served_by,
        items=answer.items,
        before_rules=answer.before_rules,
        vector=answer.vector,
        explored=answer.explored,
        arm=arm,
    )
    try:
        observer.observe(served)
    except Exception:  # noqa: BLE001 - logging and shadow never fail the served rail
        metrics.errors.labels(kind="observer").inc()
        log.exception("impression / shadow hand-off failed; the rail is still served")
