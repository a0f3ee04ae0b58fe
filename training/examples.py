"""Training examples for the towers: (session history so far, the next new item)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from towers.session_features import (
    HistoryEvent,
    SessionFeatures,
    collate,
    context_column,
    session_features,
)


@dataclass
class Examples:
    """Collated user-tower inputs (B, L) / (B,) plus the target catalogue row (B,)."""

    inputs: dict[str, torch.Tensor]
    targets: torch.Tensor

    def __len__(self) -> int:
        return int(self.targets.shape[0])


def session_examples(
    events: pd.DataFrame,
    item_row: Mapping[str, int],
    max_history: int,
    has_time: bool,
    basket: bool,
    seed: int,
    max_examples: int = 0,
) -> Examples:
    """One example per step where a session reaches an item it has not touched before.

    This is the homepage_hero task, so the towers learn what the harness measures. Baskets
    have no order: each is shuffled (seeded) and read as a growing cart; in half of the
    examples the newest item is a view instead, the way a product page presents its
    product (`history_of`), so pdp_fbt requests are not out of distribution.
    """
    rng = np.random.default_rng(seed)
    features: list[SessionFeatures] = []
    targets: list[int] = []
    ordered = events.sort_values(["session_id", "position"], kind="stable")
    times = (ordered["event_time"].astype("int64") / 1e9).to_numpy()
    context = _context_column(ordered)
    sessions = ordered["session_id"].to_numpy()
    items = ordered["item_id"].to_numpy()
    types = ordered["event_type"].to_numpy()
    bounds = np.flatnonzero(np.r_[True, sessions[1:] != sessions[:-1], True])
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        history = [HistoryEvent(items[i], types[i], times[i]) for i in range(start, end)]
        if basket:
            unique = list({e.item_id: e for e in history}.values())
            order = rng.permutation(len(unique))
            history = [HistoryEvent(unique[i].item_id, "cart", unique[i].time_s) for i in order]
        ctx = (context[start] or None) if context is not None else None
        for t in range(1, len(history)):
            target = history[t].item_id
            if target in item_row and all(e.item_id != target for e in history[:t]):
                prefix = history[:t]
                if basket and rng.random() < 0.5:
                    prefix = [*prefix[:-1], prefix[-1]._replace(event_type="view")]
                features.append(session_features(prefix, item_row, max_history, has_time, ctx))
                targets.append(item_row[target])
    if max_examples and len(targets) > max_examples:
        keep = np.sort(rng.choice(len(targets), max_examples, replace=False))
        features = [features[i] for i in keep]
        targets = [targets[i] for i in keep]
    return Examples(collate(features), torch.tensor(targets, dtype=torch.int64))


def _context_column(events: pd.DataFrame) -> np.ndarray | None:
    column = context_column(list(events.columns))
    return None if column is None else events[column].astype("string").fillna("").to_numpy()


def target_log_q(targets: torch.Tensor, catalogue_size: int) -> torch.Tensor:
    """log of each item's share of training targets (add-one smoothed): the logQ term."""
    counts = torch.bincount(targets, minlength=catalogue_size).float() + 1.0
    return torch.log(counts / counts.sum())
