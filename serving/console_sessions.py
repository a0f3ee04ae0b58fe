"""The console's sessions: the sessions with state in Redis (a bounded SCAN, never KEYS), the
page item and cart each stands for, and the served model the console reads (503 without
one). Read by the console's session list and by the rule comparison (serving.rules_compare).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import redis
from pydantic import BaseModel

from serving.rail_service import LoadedRails
from serving.request_checks import BadRequest
from serving.service import RailService
from towers.session_features import HistoryEvent


class SessionView(BaseModel):
    session_id: str
    events: int
    last_event_at: datetime | None
    # what the pdp_fbt and cart_upsell previews and the comparison use for this session
    last_item: str | None
    cart: list[str]


def loaded_model(service: RailService) -> LoadedRails:
    loaded = service.loaded
    if loaded is None:
        raise BadRequest(503, "no model loaded yet; see /readyz")
    return loaded


def session_targets(
    events: Sequence[HistoryEvent], index: dict[str, int]
) -> tuple[str | None, list[str]]:
    """The product page and cart a session stands for: its last item, its carted items.

    A session without a cart event previews cart_upsell with its last item in the cart.
    """
    known = [e for e in events if e.item_id in index]
    last = known[-1].item_id if known else None
    cart = list(dict.fromkeys(e.item_id for e in known if e.event_type == "cart"))
    return last, cart or ([last] if last else [])


def recent_sessions(service: RailService, limit: int) -> list[SessionView]:
    """Sessions with state in Redis, the most recent last event first.

    Reads at most 20 x `limit` session keys (a SCAN, never KEYS), so a large store stays
    responsive; the newest of those are returned.
    """
    loaded, store = loaded_model(service), service.store
    if store is None:
        raise BadRequest(503, "no Redis configured: sessions live there")
    try:
        sessions = store.scan_sessions(20 * limit)
    except redis.RedisError as exc:
        raise BadRequest(503, f"Redis is not answering ({type(exc).__name__})") from None
    views = []
    for session_id, history in sessions:
        last, cart = session_targets(history, loaded.catalogue.index)
        newest = max(e.time_s for e in history)
        views.append(
            SessionView(
                session_id=session_id,
                events=len(history),
                last_event_at=datetime.fromtimestamp(newest, UTC) if newest > 0 else None,
                last_item=last,
                cart=cart,
            )
        )
    views.sort(key=lambda v: v.last_event_at or datetime.min.replace(tzinfo=UTC), reverse=True)
    return views[:limit]
