"""The rail engine is the one composition of the stages, and its views agree with it."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from ranking.engine import compute, fallback, rerule
from ranking.retriever import Query
from ranking.rules import RuleSet
from tests.ranking.test_rails import OUT_OF_STOCK, pipeline

ROOT = Path(__file__).resolve().parents[2]
# RailPipeline's stage methods: a function that calls two of them chains stages, which is
# the engine's job alone.
STAGE_METHODS = {"candidate_table", "ranker_scores", "diversify", "explain_rules"}
PRODUCT = ("ranking", "serving", "streaming", "training", "railtower", "benchmarks", "scripts")
# Where the stages are defined and composed.
ALLOWED = {ROOT / "ranking" / "engine.py", ROOT / "ranking" / "rails.py"}
QUERIES = [
    Query(),
    Query(session_items=("it05",), session_types=("view",), exclude=frozenset({"it05"})),
    Query(anchor="it02", exclude=frozenset({"it02"})),
]
RULES = RuleSet(
    name="t",
    version="1",
    rules=[
        {"kind": "pin", "item_id": "it23", "slot": 2},
        {"kind": "boost", "item_id": "it04", "factor": 100.0},
    ],
)


@pytest.fixture
def pipe():
    return pipeline(
        [f"it{k:02d}" for k in range(0, 20, 2)],
        [f"it{k:02d}" for k in range(1, 24, 3)],
        rule_set=RULES,
    )


def _compositions(path: Path) -> list[str]:
    """Functions in `path` that call more than one stage method (nested functions count
    towards the function that defines them)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        called = {
            call.func.attr
            for call in ast.walk(node)
            if isinstance(call, ast.Call)
            and isinstance(call.func, ast.Attribute)
            and call.func.attr in STAGE_METHODS
        }
        if len(called) > 1:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} {sorted(called)}")
    return found


def test_the_stage_order_is_written_once():
    modules = [p for folder in PRODUCT for p in (ROOT / folder).rglob("*.py")]
    assert len(modules) > 50  # the scan found the code base
    compositions = [c for p in modules if p not in ALLOWED for c in _compositions(p)]
    assert compositions == [], "stages chained outside ranking/engine.py: " + "; ".join(
        compositions
    )


def test_the_scan_sees_a_composition(tmp_path):
    # the check above can fail: a function chaining two stages is reported
    module = tmp_path / "second_engine.py"
    module.write_text(
        "def rail(p, q):\n    t = p.candidate_table(q)\n    return p.diversify(t.ranked(), 1.0)\n"
    )
    tree_root = ROOT
    try:
        globals()["ROOT"] = tmp_path
        assert _compositions(module) == ["second_engine.py:1 rail ['candidate_table', 'diversify']"]
    finally:
        globals()["ROOT"] = tree_root


def test_run_is_a_view_of_the_engine(pipe):  # noqa: F811
    for rail in ("homepage_hero", "pdp_fbt", "cart_upsell"):
        viewed = pipe.run(rail, QUERIES)
        done = compute(pipe, rail, QUERIES)
        assert viewed["ranker"] == done.ranked
        assert viewed["mmr"] == done.diversified
        assert viewed["rules"] == [r.outcome.candidates for r in done.ruled]


def test_engine_stops_where_asked_and_times_each_stage(pipe):  # noqa: F811
    timings: dict[str, float] = {}
    done = compute(pipe, "homepage_hero", QUERIES[:1], until="mmr", timings=timings)
    assert done.ranked is not None and done.diversified is not None and done.ruled is None
    assert list(timings) == ["candidates", "ranker", "mmr"]
    assert all(ms >= 0 for ms in timings.values())


def test_a_given_rank_replaces_the_re_ranker(pipe):  # noqa: F811
    # the served path passes its budgeted re-ranker; one that reverses the table must show
    def reverse(table, _queries):
        return np.arange(len(table.frame), dtype=float)

    query = QUERIES[:1]
    plain = compute(pipe, "homepage_hero", query, until="ranker")
    flipped = compute(pipe, "homepage_hero", query, until="ranker", rank=reverse)
    rows = plain.table.frame["item_id"].tolist()
    assert [c.item_id for c in flipped.ranked[0]] == rows[::-1]


def test_rerule_and_fallback_are_the_rules_stage(pipe):  # noqa: F811
    query = QUERIES[0]
    done = compute(pipe, "homepage_hero", [query], slots=3, length=3)
    assert rerule(pipe, "homepage_hero", done.diversified[0], query, 3) == (
        done.ruled[0].outcome.candidates
    )
    popular = fallback(pipe, "homepage_hero", Query(exclude=frozenset()), 3)
    shown = [c.item_id for c in popular.outcome.candidates]
    # popular items under the rules: the pin holds its (1-based) slot, the rest is the fill
    assert len(shown) == 3 and shown[1] == "it23"
    assert {shown[0], shown[2]} <= popular.filled and not set(shown) & OUT_OF_STOCK


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
