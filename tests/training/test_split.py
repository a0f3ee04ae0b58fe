"""The split is by time (or seeded session hash), keeps sessions whole, and leaks nothing."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from railtower.datasets import load_dataset
from railtower.settings import SplitSettings, load_settings
from ranking.covisitation import CovisitationRetriever
from ranking.popularity import PopularityRetriever
from ranking.retriever import Catalogue
from training.split import split_events


@pytest.fixture(scope="module")
def rees46():
    settings = load_settings()
    return settings, load_dataset("rees46", settings)


def test_time_split_is_by_time_and_keeps_sessions_whole(rees46):
    settings, data = rees46
    split = split_events(data.events, True, settings.split, settings.seed)
    assert split.kind == "time"
    assert split.train["event_time"].max() < split.validation_cut
    assert split.fit_events("test")["event_time"].max() < split.test_cut
    ids = [set(f["session_id"]) for f in (split.train, split.validation, split.test)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert sum(map(len, (split.train, split.validation, split.test))) == len(data.events)
    # the latest sessions are the test ones: every test session ends at or after the cut
    ends = split.test.groupby("session_id")["event_time"].max()
    assert (ends >= split.test_cut).all()
    assert split.test["session_id"].nunique() == pytest.approx(
        data.events["session_id"].nunique() * settings.split.test_share, rel=0.1
    )


def test_no_test_event_reaches_training_features(rees46):
    settings, data = rees46
    split = split_events(data.events, True, settings.split, settings.seed)
    fit = split.fit_events("test")
    assert not set(fit["event_id"]) & set(split.test["event_id"])
    catalogue = Catalogue(data.items)
    popularity = PopularityRetriever(settings.baselines.popularity, settings.event_weights)
    popularity.fit(fit, catalogue)
    only_in_test = set(split.test["item_id"]) - set(fit["item_id"])
    assert only_in_test, "the sample should have items first seen in the test window"
    for item in only_in_test:
        assert popularity.scores[catalogue.index[item]] == 0.0
    covisit = CovisitationRetriever(
        settings.baselines.covisitation,
        settings.event_weights,
        settings.baselines.popularity,
        basket=False,
    ).fit(fit, catalogue)
    rows, cols = covisit.matrix.nonzero()
    touched = {catalogue.ids[i] for i in np.r_[rows, cols]}
    assert not touched & only_in_test


def test_hash_split_is_seeded_disjoint_and_whole():
    events = pd.DataFrame(
        {
            "session_id": pd.array([f"s{i // 3}" for i in range(3000)], dtype="string"),
            "item_id": pd.array([str(i % 50) for i in range(3000)], dtype="string"),
        }
    )
    shares = SplitSettings(validation_share=0.1, test_share=0.2)
    a = split_events(events, False, shares, seed=1)
    b = split_events(events, False, shares, seed=1)
    c = split_events(events, False, shares, seed=2)
    assert a.kind == "session_hash"
    assert a.test["session_id"].tolist() == b.test["session_id"].tolist()
    assert set(a.test["session_id"]) != set(c.test["session_id"])
    assert not set(a.train["session_id"]) & set(a.test["session_id"])
    assert len(a.train) + len(a.validation) + len(a.test) == len(events)
    assert a.test["session_id"].nunique() / 1000 == pytest.approx(0.2, abs=0.05)
    assert (a.test.groupby("session_id").size() == 3).all()  # whole sessions


def test_time_split_refuses_tiny_data():
    events = pd.DataFrame(
        {
            "session_id": ["a", "b"],
            "event_time": pd.to_datetime(["2024-01-01", "2024-01-02"], utc=True),
        }
    )
    with pytest.raises(ValueError, match="at least 10 sessions"):
        split_events(events, True, SplitSettings(), seed=0)
