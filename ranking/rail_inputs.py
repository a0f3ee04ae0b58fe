"""What each rail reads beyond the session, and what it must never show: declared once.

    homepage_hero   the session                         excludes what the session touched
    pdp_fbt         the session + the product on page   excludes that product
    cart_upsell     the session + the cart              excludes the cart
    deals_for_you   the session                         excludes what the session touched

A product page or cart replaces the session's own exclusions: a shopper on a product page
may be shown an item seen earlier as its complement, but never the product itself. The API's
validation, the evaluator's cases, the warm-up, the fallback and the console all build their
queries here, so no path can show what another would hide.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ranking.retriever import Query


@dataclass(frozen=True)
class RailInputs:
    page_item: bool  # reads the product on the page (required)
    cart: bool  # reads the cart (required; other rails read a cart when one is sent)


RAIL_INPUTS: dict[str, RailInputs] = {
    "homepage_hero": RailInputs(page_item=False, cart=False),
    "pdp_fbt": RailInputs(page_item=True, cart=False),
    "cart_upsell": RailInputs(page_item=False, cart=True),
    "deals_for_you": RailInputs(page_item=False, cart=False),
}


def rail_parts(
    rail: str, page_item: str | None, cart: Iterable[str]
) -> tuple[str | None, tuple[str, ...]]:
    """(anchor, cart) a request of `rail` carries: the page item only where the rail reads
    one, the cart de-duplicated in order."""
    anchor = page_item if RAIL_INPUTS[rail].page_item else None
    return anchor, tuple(dict.fromkeys(cart))


def rail_exclusions(
    anchor: str | None, cart: Sequence[str], session_items: Iterable[str]
) -> frozenset[str]:
    """What a request never gets back: the product on the page, else the cart, else (the
    discovery rails) everything the session touched."""
    if anchor is not None:
        return frozenset([anchor])
    if cart:
        return frozenset(cart)
    return frozenset(session_items)


def rail_query(
    anchor: str | None = None,
    cart: Sequence[str] = (),
    session_items: Sequence[str] = (),
    session_types: Sequence[str] = (),
    session_times: Sequence[float] = (),
    context: str | None = None,
    also_exclude: Iterable[str] = (),
    past_purchases: Sequence[str] = (),
) -> Query:
    """The pipeline's query with the rail's exclusions (plus `also_exclude`: the request's
    own list, purchases in the exclusion window) and the shopper's earlier purchases."""
    return Query(
        session_items=tuple(session_items),
        session_types=tuple(session_types),
        session_times=tuple(session_times),
        context=context,
        anchor=anchor,
        cart=tuple(cart),
        exclude=rail_exclusions(anchor, cart, session_items) | frozenset(also_exclude),
        past_purchases=tuple(past_purchases),
    )
