"""Session (user-tower) features: the one function that turns an event history into tensors.

Training examples, offline evaluation and the online rail request all call
:func:`session_features`, so the user tower sees identical inputs for identical histories.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from railtower.schemas import EventType
from towers.item_features import stable_bucket

# Index 0 is padding in every table below.
EVENT_TYPE_INDEX = {t.value: i + 1 for i, t in enumerate(EventType)}
# Age of an event relative to the newest one in the history, in seconds: bucket upper edges.
AGE_EDGES_S = (1.0, 30.0, 120.0, 600.0, 1800.0, 3600.0, 6 * 3600.0, 86400.0, 7 * 86400.0)
AGE_BUCKETS = len(AGE_EDGES_S) + 2
HOURS = 25  # 0..23, 24 = unknown (data without a clock)
CONTEXT_BUCKETS = 1024


# Context the user tower reads: the first of these columns a data set has, taken from the
# session's first event (one per session: locale on Amazon-M2, country on UCI).
CONTEXT_COLUMNS = ("device", "locale", "country")


class SessionInput(NamedTuple):
    """One input of the session encoder: per event (B, L) or per session (B,)."""

    name: str
    per_event: bool


# The session encoder's inputs, in its argument order: `collate` builds them, the in-process
# tower and Triton take them, and the Triton config's `input` block is generated from them
# (training.triton_export), so a new input is added here once.
SESSION_INPUTS: tuple[SessionInput, ...] = (
    SessionInput("items", per_event=True),  # catalogue rows + 1, 0 = padding
    SessionInput("types", per_event=True),  # EVENT_TYPE_INDEX, 0 = padding
    SessionInput("ages", per_event=True),  # AGE_EDGES_S buckets, 0 = padding
    SessionInput("hour", per_event=False),  # 0..23, 24 = unknown
    SessionInput("context", per_event=False),  # hashed device / locale / country
)
SESSION_INPUT_NAMES: tuple[str, ...] = tuple(i.name for i in SESSION_INPUTS)


def context_column(columns: Sequence[str]) -> str | None:
    return next((c for c in CONTEXT_COLUMNS if c in columns), None)


class HistoryEvent(NamedTuple):
    item_id: str
    event_type: str
    time_s: float  # epoch seconds; ignored where the data has no clock


@dataclass(frozen=True)
class SessionFeatures:
    """User-tower inputs for one session, left-padded to `max_history` (newest last).

    items: catalogue row + 1 (0 = padding); types, ages: table indices; hour, context: ints.
    """

    items: np.ndarray
    types: np.ndarray
    ages: np.ndarray
    hour: int
    context: int


def session_features(
    history: Sequence[HistoryEvent],
    item_row: Mapping[str, int],
    max_history: int,
    has_time: bool,
    context: str | None = None,
) -> SessionFeatures:
    """Features of the last `max_history` known items of a session.

    Args:
        history: the session's events, oldest first. Items outside the catalogue are skipped
            (the tower has no vector for them).
        item_row: catalogue item id -> row of the item table.
        has_time: False for data without a clock: ages and hour are then "unknown".
        context: device / locale / country of the request, if any.
    """
    known = [e for e in history if e.item_id in item_row][-max_history:]
    pad = max_history - len(known)
    items = np.zeros(max_history, np.int64)
    types = np.zeros(max_history, np.int64)
    ages = np.zeros(max_history, np.int64)
    hour = HOURS - 1
    if known:
        items[pad:] = [item_row[e.item_id] + 1 for e in known]
        types[pad:] = [EVENT_TYPE_INDEX.get(e.event_type, EVENT_TYPE_INDEX["view"]) for e in known]
        if has_time:
            newest = known[-1].time_s
            age = np.array([newest - e.time_s for e in known])
            ages[pad:] = 1 + np.searchsorted(AGE_EDGES_S, age, side="right")
            hour = int((newest // 3600) % 24)
        else:
            ages[pad:] = AGE_BUCKETS - 1
    ctx = int(stable_bucket([context], CONTEXT_BUCKETS, "ctx")[0]) if context else 0
    return SessionFeatures(items, types, ages, hour, ctx)


def collate(batch: Sequence[SessionFeatures]) -> dict[str, torch.Tensor]:
    """Stack session features into (B, L) / (B,) int64 tensors."""
    return {
        "items": torch.from_numpy(np.stack([f.items for f in batch])),
        "types": torch.from_numpy(np.stack([f.types for f in batch])),
        "ages": torch.from_numpy(np.stack([f.ages for f in batch])),
        "hour": torch.tensor([f.hour for f in batch], dtype=torch.int64),
        "context": torch.tensor([f.context for f in batch], dtype=torch.int64),
    }


def history_of(
    items: Sequence[str],
    types: Sequence[str],
    times: Sequence[float],
    anchor: str | None = None,
    cart: Sequence[str] = (),
) -> list[HistoryEvent]:
    """The event history a rail request describes: the session, then what the page adds.

    A product page adds its product as the newest view; a cart adds the cart items not
    already in the session as cart events. Missing times (no clock) count as 0.
    """
    when = list(times) if len(times) == len(items) else [0.0] * len(items)
    history = [HistoryEvent(i, t, s) for i, t, s in zip(items, types, when, strict=True)]
    newest = when[-1] if when else 0.0
    seen = set(items)
    history += [HistoryEvent(i, "cart", newest) for i in cart if i not in seen]
    if anchor is not None and (not items or items[-1] != anchor):
        history.append(HistoryEvent(anchor, "view", newest))
    return history
