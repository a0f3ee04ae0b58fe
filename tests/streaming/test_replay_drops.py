"""Injected price drops for replays: which items, when, at what price, and that the events
after a drop show it (the mechanics are measured on these, never passed off as real data)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from streaming.replay import inject_drops
from tests.conftest import toy_events


def _priced() -> pd.DataFrame:
    # ten items, each viewed in four sessions; item k costs 10 + k
    frame = toy_events({f"s{s}": [(f"i{k}", "view") for k in range(10)] for s in range(4)})
    frame["price"] = frame["item_id"].str[1:].astype(int) + 10.0
    frame.loc[frame["item_id"] == "i9", "price"] = np.nan  # unpriced: never eligible
    return frame


def test_a_share_of_priced_items_drops_and_later_events_show_the_drop():
    frame = _priced()
    out, updates = inject_drops(frame, share=0.5, drop=0.25, seed=3)
    items = {u.item_id for u in updates}
    assert len(updates) == 4 and "i9" not in items  # half of the 9 priced items, rounded
    for update in updates:
        level = 10.0 + int(update.item_id[1:])
        assert update.price == pytest.approx(level * 0.75)
        rows = out["item_id"] == update.item_id
        at = pd.Timestamp(update.time)
        first = frame.loc[rows, "event_time"].min()
        assert at > first  # the item had a level before its drop
        after = rows & (out["event_time"] >= at)
        before = rows & (out["event_time"] < at)
        assert (out.loc[after, "price"] == level * 0.75).all() and after.any()
        assert (out.loc[before, "price"] == level).all() and before.any()
    untouched = ~out["item_id"].isin(items)
    pd.testing.assert_series_equal(out.loc[untouched, "price"], frame.loc[untouched, "price"])
    assert [u.time for u in updates] == sorted(u.time for u in updates)


def test_the_same_seed_injects_the_same_drops():
    a = inject_drops(_priced(), 0.4, 0.3, seed=7)[1]
    b = inject_drops(_priced(), 0.4, 0.3, seed=7)[1]
    assert a == b


@pytest.mark.parametrize(
    ("share", "drop", "message"),
    [(0.0, 0.3, "share must be in"), (0.5, 1.0, "--drop must be a fraction"), (1.5, 0.2, "share")],
)
def test_out_of_range_arguments_say_which(share, drop, message):
    with pytest.raises(ValueError, match=message):
        inject_drops(_priced(), share, drop, seed=0)


def test_events_without_prices_cannot_drop():
    with pytest.raises(ValueError, match="no prices to drop"):
        inject_drops(_priced().drop(columns="price"), 0.5, 0.2, seed=0)
