"""Split events into train, validation and test without leaking the future into training.

With a clock, each session goes to the split in which it *ends*: every training event then
happens before the validation cut, and validation events before the test cut, while each
session stays whole. Without one (Amazon-M2), a seeded hash of the session id decides.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from railtower.settings import SplitSettings

SplitName = Literal["validation", "test"]


@dataclass(frozen=True)
class Split:
    kind: Literal["time", "session_hash"]
    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame
    validation_cut: pd.Timestamp | None = None
    test_cut: pd.Timestamp | None = None

    def fit_events(self, target: SplitName) -> pd.DataFrame:
        """Events a model may learn from when it is scored on `target`.

        Validation is scored by models fitted on train; test by models refitted on train and
        validation together, so the test split is never seen before its one scoring.
        """
        if target == "validation":
            return self.train
        return pd.concat([self.train, self.validation], ignore_index=True)

    def eval_events(self, target: SplitName) -> pd.DataFrame:
        return self.validation if target == "validation" else self.test

    def summary(self) -> dict[str, object]:
        def describe(frame: pd.DataFrame) -> dict[str, object]:
            return {"events": len(frame), "sessions": int(frame["session_id"].nunique())}

        return {
            "kind": self.kind,
            "validation_cut": None if self.validation_cut is None else str(self.validation_cut),
            "test_cut": None if self.test_cut is None else str(self.test_cut),
            "train": describe(self.train),
            "validation": describe(self.validation),
            "test": describe(self.test),
        }


def split_events(events: pd.DataFrame, has_time: bool, settings: SplitSettings, seed: int) -> Split:
    """Split canonical events by session end time (or by seeded session hash)."""
    if has_time:
        return _time_split(events, settings)
    return _hash_split(events, settings, seed)


def _time_split(events: pd.DataFrame, settings: SplitSettings) -> Split:
    ends = events.groupby("session_id")["event_time"].max().sort_values(kind="stable")
    n = len(ends)
    if n < 10:
        raise ValueError(f"a time split needs at least 10 sessions, got {n}")
    val_cut = ends.iloc[int(n * (1 - settings.validation_share - settings.test_share))]
    test_cut = ends.iloc[int(n * (1 - settings.test_share))]
    end_of = events["session_id"].map(ends)
    return Split(
        "time",
        train=events[end_of < val_cut].reset_index(drop=True),
        validation=events[(end_of >= val_cut) & (end_of < test_cut)].reset_index(drop=True),
        test=events[end_of >= test_cut].reset_index(drop=True),
        validation_cut=val_cut,
        test_cut=test_cut,
    )


def session_bucket(session_ids: pd.Series, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per session id, stable for a given seed."""
    unique = session_ids.unique()
    values = {
        s: int.from_bytes(hashlib.sha1(f"{seed}:{s}".encode()).digest()[:8], "big") / 2**64
        for s in unique
    }
    return session_ids.map(values).to_numpy(dtype=float)


def _hash_split(events: pd.DataFrame, settings: SplitSettings, seed: int) -> Split:
    u = session_bucket(events["session_id"], seed)
    train_end = 1 - settings.validation_share - settings.test_share
    return Split(
        "session_hash",
        train=events[u < train_end].reset_index(drop=True),
        validation=events[(u >= train_end) & (u < 1 - settings.test_share)].reset_index(drop=True),
        test=events[u >= 1 - settings.test_share].reset_index(drop=True),
    )


def holdout(
    events: pd.DataFrame, has_time: bool, share: float, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split events into (fit, holdout) the same way the harness splits: latest sessions by
    end time, or a seeded session hash. Used for early stopping inside a model's fit."""
    if has_time:
        ends = events.groupby("session_id")["event_time"].max().sort_values(kind="stable")
        cut = ends.iloc[int(len(ends) * (1 - share))]
        late = events["session_id"].map(ends) >= cut
    else:
        late = session_bucket(events["session_id"], seed + 1) >= 1 - share
    return events[~late].reset_index(drop=True), events[late].reset_index(drop=True)
