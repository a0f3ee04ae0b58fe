"""The peer comparison's own plumbing (benchmarks/peers/sasrec.py), without the peer venv:
the files it hands RecBole and reads back, and the report it writes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pandas as pd
import pytest

from ranking.retriever import Catalogue, Query
from tests.conftest import toy_events

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "peers" / "sasrec.py"
_spec = importlib.util.spec_from_file_location("peers_sasrec", SCRIPT)
assert _spec is not None and _spec.loader is not None
peers = importlib.util.module_from_spec(_spec)
sys.modules["peers_sasrec"] = peers  # dataclasses resolve their module by name
_spec.loader.exec_module(peers)


def catalogue(*ids: str) -> Catalogue:
    return Catalogue(pd.DataFrame({"item_id": list(ids)}))


def test_sessions_are_written_in_session_order_whatever_the_row_order(tmp_path):
    events = toy_events(
        {"s2": [("c", "view"), ("a", "view")], "s1": [("x", "view"), ("y", "cart"), ("x", "view")]}
    )
    shuffled = events.sample(frac=1.0, random_state=3).reset_index(drop=True)
    path = tmp_path / "sessions.jsonl"

    assert peers.write_sessions(shuffled, path) == 2

    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [
        {"session": "s1", "items": ["x", "y", "x"]},  # repeats kept: RecBole's own recipe
        {"session": "s2", "items": ["c", "a"]},
    ]


def test_position_decides_the_order_not_the_clock(tmp_path):
    events = toy_events({"s": [("a", "view"), ("b", "view"), ("c", "view")]})
    events["event_time"] = events["event_time"].iloc[0]  # one timestamp for all three
    path = tmp_path / "sessions.jsonl"
    peers.write_sessions(events.iloc[::-1], path)
    assert json.loads(path.read_text())["items"] == ["a", "b", "c"]


def test_a_query_reads_the_session_then_the_cart_then_the_anchor_last(tmp_path):
    hero = Query(session_items=("a", "b"), exclude=frozenset({"a", "b"}))
    pdp = Query(session_items=("a", "b"), anchor="p", exclude=frozenset({"p"}))
    pdp_basket = Query(anchor="p", exclude=frozenset({"p"}))
    cart = Query(session_items=("a", "c1"), cart=("c1", "c2"), exclude=frozenset({"c1", "c2"}))

    assert peers.query_history(hero) == ["a", "b"]
    assert peers.query_history(pdp) == ["a", "b", "p"]
    assert peers.query_history(pdp_basket) == ["p"]
    assert peers.query_history(cart) == ["a", "c1", "c2"]
    assert peers.query_history(Query()) == []

    path = tmp_path / "queries.jsonl"
    peers.write_queries([hero, cart], path)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"items": ["a", "b"], "exclude": ["a", "b"]},
        {"items": ["a", "c1", "c2"], "exclude": ["c1", "c2"]},
    ]


def test_rankings_keep_only_catalogue_items_once_and_at_most_k(tmp_path):
    path = tmp_path / "rankings.jsonl"
    path.write_text(
        "\n".join(
            json.dumps({"items": items})
            for items in (["gone", "a", "b", "a", "c", "d"], [], ["gone", "d"])
        )
        + "\n"
    )
    ranked = peers.read_rankings(path, catalogue("a", "b", "c", "d"), k=3)
    assert ranked == [["a", "b", "c"], [], ["d"]]


def test_a_missing_peer_venv_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr(peers, "PEER_PYTHON", tmp_path / "no-venv" / "bin" / "python")
    model = peers.RecBoleSasRec(tmp_path / "work")
    with pytest.raises(peers.PeerEnvironmentMissing, match="bash benchmarks/peers/install.sh"):
        model.fit(toy_events({"s": [("a", "view"), ("b", "view")]}), catalogue("a", "b"))


def test_recorded_returns_the_lists_of_the_call_with_the_same_queries():
    class Fixed:
        name = "fixed"

        def fit(self, events, catalogue):
            return self

        def recommend(self, queries, k):
            return [[q.session_items[-1]] for q in queries]

    model = peers.Recorded(Fixed())
    model.fit(toy_events({"s": [("a", "view")]}), catalogue("a"))
    first = [Query(session_items=("a",))]
    second = [Query(session_items=("b",)), Query(session_items=("c",))]
    model.recommend(first, 5)
    model.recommend(second, 5)
    assert model.name == "fixed" and model.catalogue is not None
    assert model.ranked_for(second) == [["b"], ["c"]]
    with pytest.raises(KeyError):
        model.ranked_for([Query(session_items=("z",))])


def test_the_table_puts_the_hero_rail_first_with_one_row_per_model(fast_settings):
    e = fast_settings.evaluation
    metric = {"mean": 0.1, "low": 0.05, "high": 0.15}
    metrics = {f"ndcg@{e.slots}": metric, f"recall@{e.slots}": metric}
    metrics[f"recall@{e.candidates}"] = metric

    def task(rail: str, model: str) -> dict[str, object]:
        return {
            "rail": rail,
            "model": model,
            "cases": 10,
            "sessions": 4,
            "metrics": metrics,
            "fit_seconds": 1.5,
            "ran_on": "cpu",
        }

    summary = {
        "dataset": "toy",
        "protocol": "split 'test'",
        "split": {"catalogue": {"known_at_cut": 4}},
        "sasrec": {},
        "skipped": [],
        "tasks": [task("pdp_fbt", "popularity"), task("homepage_hero", "popularity")]
        + [task("homepage_hero", "sasrec_recbole")],
        "paired": [
            {
                "rail": "homepage_hero",
                "metric": f"ndcg@{e.slots}",
                "a": "sasrec_recbole",
                "b": "popularity",
                "b_is_best_baseline": True,
                "a_mean": 0.2,
                "b_mean": 0.1,
                "difference": 0.1,
                "low": 0.02,
                "high": 0.18,
            }
        ],
    }
    text = peers.markdown(summary, fast_settings)
    assert text.index("## homepage_hero") < text.index("## pdp_fbt")
    hero = text[text.index("## homepage_hero") : text.index("## pdp_fbt")]
    assert "| sasrec_recbole | 0.1000 [0.0500, 0.1500] |" in hero
    assert hero.count("| popularity |") == 1
    assert "popularity (best baseline) 0.1000 | +0.1000 [+0.0200, +0.1800] |" in hero


def test_first_touch_keeps_each_item_where_the_session_first_reached_it(tmp_path):
    events = toy_events({"s": [("a", "view"), ("a", "view"), ("b", "view"), ("a", "cart")]})
    path = tmp_path / "sessions.jsonl"
    peers.write_sessions(events, path, first_touch=True)
    assert json.loads(path.read_text())["items"] == ["a", "b"]
