"""Each evaluation case carries what its user bought before, point in time: sessions of the
same user that ended before the case's session began, capped and expired as the serving
memory is, never a later or a concurrent session, and nothing for guests."""

from __future__ import annotations

import pandas as pd

from railtower.settings import DatasetSpec, EvaluationSettings, EventsMapping
from training.past_purchases import PastPurchases
from training.tasks import build_cases

DAY = 86400


def _events() -> pd.DataFrame:
    rows = [
        # user, session, item, day
        ("u1", "b1", "a", 0),
        ("u1", "b1", "b", 0),
        ("u1", "b2", "a", 10),
        ("u1", "b3", "c", 20),
        ("u1", "b3", "d", 20),
        (None, "g1", "a", 15),  # a guest's basket
        ("u2", "x1", "z", 5),
    ]
    return pd.DataFrame(
        {
            "user_id": pd.array([r[0] for r in rows], dtype="string"),
            "session_id": [r[1] for r in rows],
            "item_id": [r[2] for r in rows],
            "event_time": pd.to_datetime([r[3] * DAY for r in rows], unit="s", utc=True),
            "event_type": "purchase",
            "position": range(len(rows)),
        }
    )


def test_only_sessions_that_ended_before_the_request_count():
    past = PastPurchases.from_events(_events(), has_time=True, max_entries=100)
    assert past.before("u1", 0.0) == ()
    assert past.before("u1", 10 * DAY) == ("a", "b")  # b2 ends at its own start: not before
    assert past.before("u1", 10 * DAY + 1) == ("a", "b", "a")
    assert past.before("u1", 30 * DAY) == ("a", "b", "a", "c", "d")
    assert past.before(None, 30 * DAY) == () and past.before("nobody", 30 * DAY) == ()


def test_the_memory_keeps_the_newest_entries_and_expires_after_the_last_purchase():
    capped = PastPurchases.from_events(_events(), True, max_entries=2)
    assert capped.before("u1", 30 * DAY) == ("c", "d")
    expiring = PastPurchases.from_events(_events(), True, max_entries=100, days=15)
    assert expiring.before("u1", 30 * DAY) == ("a", "b", "a", "c", "d")
    assert expiring.before("u1", 36 * DAY) == ()  # 16 days after the last purchase
    assert PastPurchases.from_events(_events(), False, 100).before("u1", 30 * DAY) == ()


def test_cases_carry_their_users_earlier_purchases_and_guests_none():
    events = _events()
    spec = DatasetSpec(
        name="toy",
        events=EventsMapping(path="x", columns={"event_time": "t"}),
        session_kind="basket",
        rails=["cart_upsell"],
        strong_event_types=["purchase"],
    )
    past = PastPurchases.from_events(events, True, 100)
    cases = build_cases("cart_upsell", events, spec, EvaluationSettings(), seed=0, past=past)
    by_session = {c.session_id: c.query.past_purchases for c in cases}
    assert by_session == {"b1": (), "b3": ("a", "b", "a")}  # b2, g1, x1: one item, no case
    without = build_cases("cart_upsell", events, spec, EvaluationSettings(), seed=0)
    assert all(c.query.past_purchases == () for c in without)
