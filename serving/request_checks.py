"""Whether a parsed request can be served by the model in hand: a known rail, slots within
`serving.max_slots`, the page item or cart its rail reads (`ranking.rail_inputs`), and only
items the served catalogue knows or that were listed since. Anything else is a
`BadRequest`: a 4xx naming the problem (serving.app maps it to the response), never a
fallback rail.
"""

from __future__ import annotations

from collections.abc import Mapping

from railtower.settings import RAILS
from ranking.rail_inputs import RAIL_INPUTS, rail_parts
from serving.api_models import RailRequest
from serving.rail_service import LoadedRails


class BadRequest(Exception):
    """A request the API answers with a 4xx: `status` and a message naming the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def check_request(
    rail: str, request: RailRequest, loaded: LoadedRails, max_slots: int
) -> tuple[str | None, tuple[str, ...]]:
    """The rail's (anchor, cart) for a valid request; raises BadRequest otherwise."""
    if rail not in RAILS:
        raise BadRequest(404, f"unknown rail {rail!r}; rails: {', '.join(RAILS)}")
    if request.slots > max_slots:
        raise BadRequest(
            422,
            f"slots={request.slots} exceeds serving.max_slots ({max_slots})",
        )
    index = loaded.catalogue.index
    reads = RAIL_INPUTS[rail]
    if reads.page_item:
        if request.item_id is None:
            raise BadRequest(422, f"{rail} needs item_id: the product on the page")
        if not _listed(request.item_id, index, loaded):
            raise BadRequest(
                404,
                f"item_id {request.item_id!r} is not in the catalogue of {loaded.version} "
                "nor listed since (catalogue topic: item_upsert)",
            )
    if reads.cart and not request.cart:
        raise BadRequest(422, f"{rail} needs a non-empty cart (item ids)")
    unknown = [i for i in request.cart if not _listed(i, index, loaded)]
    if unknown:
        raise BadRequest(
            404, f"cart items not in the catalogue of {loaded.version}: {unknown[:10]}"
        )
    return rail_parts(rail, request.item_id, request.cart)


def _listed(item_id: str, index: Mapping[str, int], loaded: LoadedRails) -> bool:
    """In the bundle's catalogue, or listed after it was trained (serving.new_items gave it
    an attributes row): a new product's page and a cart holding it get rails too."""
    return item_id in index or item_id in loaded.pipeline.attributes
