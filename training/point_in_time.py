"""The point-in-time catalogue: what a model fitted at a cut may know of the item table.

REES46 and UCI list only items that got an event somewhere in the log, so the full item
table leaks the future: an item with no history before the cut is an item that will be
wanted after it. A model (and its candidate sources, its re-ranker features and the
catalogue it ranks) fitted on a window may therefore know only

- items with an event in that window (whole sessions ending before the cut), and
- items whose listing time (`first_seen`, where the catalogue maps one) precedes the cut:
  the genuinely new products a shop lists before anyone has looked at them.

Targets outside that catalogue are misses for every model and are reported as their own
share (no model could have known them). Without a clock (Amazon-M2's seeded hash split)
the published item table is the catalogue: nothing in it is dated, and it is not derived
from the events. Every offline cut goes through `catalogue_at`: the harness, the
re-ranker's window, `evaluate --bundle`, the nightly job and the gate's re-scoring.
"""

from __future__ import annotations

import pandas as pd

from railtower.logs import get_logger

log = get_logger(__name__)


def catalogue_at(
    items: pd.DataFrame, fit_events: pd.DataFrame, has_time: bool, enabled: bool = True
) -> pd.DataFrame:
    """The rows of `items` a model fitted on `fit_events` may know, in the table's order.

    Args:
        items: the canonical item table (optionally with a `first_seen` listing time).
        fit_events: the events the model is fitted on; the cut is just after the last.
        has_time: whether the events carry a clock (no clock: the whole table).
        enabled: False keeps the whole table (only to reproduce the leaky protocol side by
            side; `evaluation.point_in_time_catalogue`).
    """
    if not enabled or not has_time:
        return items
    known = items["item_id"].astype(str).isin(set(fit_events["item_id"].astype(str))).to_numpy()
    if "first_seen" in items.columns and len(fit_events):
        listed = pd.to_datetime(items["first_seen"], utc=True)
        known |= (listed.notna() & (listed <= fit_events["event_time"].max())).to_numpy()
    kept = items[known]
    log.info(
        "point-in-time catalogue",
        items=len(items),
        known=len(kept),
        cut=str(fit_events["event_time"].max()) if len(fit_events) else None,
    )
    return kept.reset_index(drop=True)
