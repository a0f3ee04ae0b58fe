"""The rails API benchmark's pure helpers (benchmarks/rails_api.py), no servers: the cache-hit
check of a "cached" row, the issue-21 goals, the open-loop schedule and the report."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from benchmarks import rails_api as bench


def row(concurrency: int, served: dict[str, int], errors: int = 0, **stats: float) -> dict:
    n = sum(served.values()) + errors
    base = {"p50": 2.0, "p95": 5.0, "p99": 10.0, "throughput_rps": 100.0}
    return (
        {
            "concurrency": concurrency,
            "requests": n,
            "served_by": served,
            "served_by_ms": {
                k: {"p50": 1.0, "p95": 2.0, "p99": 3.0, "n": v} for k, v in served.items()
            },
            "degraded_share": 0.0,
            "errors": errors,
        }
        | base
        | stats
    )


def test_a_cached_row_is_valid_only_with_99_percent_cache_hits():
    good = bench.cache_check(row(1, {"cache": 990, "computed": 10}))
    assert good["valid"] and good["cache_hits"] == 990 and good["cache_misses"] == 10
    assert good["cache_hit_ms"]["p99"] == 3.0
    assert "reason" not in good

    mixed = bench.cache_check(row(1, {"cache": 980, "computed": 20}))
    assert not mixed["valid"] and "98.0% cache hits" in mixed["reason"]


def test_errors_count_as_misses_and_an_empty_row_is_invalid():
    assert not bench.cache_check(row(1, {"cache": 98}, errors=2))["valid"]
    assert bench.cache_check(row(1, {"cache": 98}, errors=2))["cache_misses"] == 2
    assert not bench.cache_check(row(1, {}))["valid"]


def result(cached: list[dict]) -> dict:
    floor = {"p50": 5.0, "p95": 6.0, "p99": 7.0, "n": 200, "stages_p50_ms": {"encoder": 1.0}}
    return {
        "bundle": "b-1",
        "commit": "abc1234+dirty",
        "command": "python benchmarks/rails_api.py",
        "machine": {"cpus": 2},
        "compute_floor_ms": {"homepage_hero": floor, "pdp_fbt": floor | {"p50": 8.0}},
        "physical_floor_ms": {"session encoder": {"p50": 1.0, "p95": 1.0, "p99": 1.0}},
        "computed": [
            row(1, {"computed": 500}, throughput_rps=60.0),
            row(4, {"computed": 900}, throughput_rps=90.0),
            row(16, {"computed": 1500}, throughput_rps=150.0, degraded_share=0.2),
        ][: len(cached)],
        "sustained": {
            "offered_rps": 45.0,
            "achieved_rps": 44.0,
            "seconds": 16.0,
            "max_in_flight": 64,
            "not_sent": 0,
            "send_lag_p99_ms": 1.0,
            "p50": 9.0,
            "p95": 15.0,
            "p99": 20.0,
            "degraded_share": 0.0,
            "errors": 0,
        },
        "cache_warming": {"sessions": 300, "confirmed": 300, "passes": 2, "seconds": 9.0},
        "cached": [r | bench.cache_check(r) for r in cached],
        "spike": {
            "before": row(4, {"computed": 900}),
            "during": row(20, {"computed": 900}, errors=1, p99=300.0),
        },
        "parsers": [
            {"parser": p, "concurrency": 1, "throughput_rps": rps, "p50_ms": 9.0}
            | {"p99_ms": 12.0, "degraded": 0.0}
            for p, rps in (("httptools", 110.0), ("h11", 80.0))
        ],
    }


def test_goals_are_evaluated_against_the_issue_targets():
    cached = [row(1, {"cache": 1000}, p50=2.5), row(4, {"cache": 1000}), row(16, {"cache": 1000})]
    r = result(cached)
    goals = {g["goal"]: g for g in bench.evaluate_goals(r)}

    assert goals["compute floor p50, homepage_hero"]["passed"] is True
    assert goals["compute floor p50, pdp_fbt"]["passed"] is False
    computed = goals["computed over HTTP: most req/s at <= 5% degraded"]
    assert computed["measured"] == 90.0 and computed["passed"] is False  # 150 was 20% degraded
    sustained = goals["50% load (open loop): p99 / compute floor p50, pdp_fbt"]
    assert sustained["measured"] == pytest.approx(2.5) and sustained["passed"] is True
    assert goals["5x spike (4 -> 20 clients): errors"]["passed"] is False
    assert goals["5x spike (4 -> 20 clients): degraded"]["passed"] is True
    assert goals["5x spike (4 -> 20 clients): p99"]["passed"] is False
    assert goals["cached read (>= 99% hits), concurrency 1, p50"]["passed"] is True
    assert goals["cached read (>= 99% hits), concurrency 16, p99"]["passed"] is True


def test_a_cached_goal_fails_on_an_invalid_row_and_is_na_when_not_run():
    r = result([row(1, {"cache": 50, "computed": 50}, p50=1.0), row(4, {"cache": 100})])
    goals = {g["goal"]: g for g in bench.evaluate_goals(r)}
    c1 = goals["cached read (>= 99% hits), concurrency 1, p50"]
    assert c1["passed"] is False and c1["note"].startswith("row invalid")
    assert goals["cached read (>= 99% hits), concurrency 16, p99"]["passed"] is None


def test_the_report_shows_goals_commit_and_a_failed_cached_row():
    r = result([row(1, {"cache": 50, "computed": 50}), row(4, {"cache": 100})])
    r["goals"] = bench.evaluate_goals(r)
    text = bench.markdown(r)
    assert "Commit `abc1234+dirty`" in text and "`python benchmarks/rails_api.py`" in text
    assert text.index("## Goals") < text.index("compute floor p50 ms")
    assert "| cached **FAIL** | 1 |" in text and "**FAIL**: 50.0% cache hits" in text
    assert "| n/a |" in text  # the concurrency-16 goal was not run
    assert "| httptools | 1 | 110 | 9.0 | 12.0 | 0.0% |" in text  # the parsers side by side
    assert "| h11 | 1 | 80 |" in text


def test_open_loop_arrivals_follow_the_rate_within_the_window():
    times = bench.arrivals(200.0, 10.0, seed=1)
    assert np.all(np.diff(times) >= 0) and 0.0 <= times[0] and times[-1] < 10.0
    assert len(times) == 2000  # the offered rate exactly
    assert np.diff(times).std() > 0.5 * np.diff(times).mean()  # bursty, not evenly spaced


def test_git_revision_marks_a_dirty_tree(tmp_path):
    assert bench.git_revision(tmp_path) == "unknown"

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "f").write_text("a")
    git("add", "f")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    clean = bench.git_revision(tmp_path)
    assert clean and "+" not in clean
    (tmp_path / "f").write_text("b")
    assert bench.git_revision(tmp_path) == clean + "+dirty"


def test_frame_shares_counts_a_frame_once_per_stack_and_drops_line_numbers():
    from benchmarks.profile_rails import frame_shares

    collapsed = "\n".join(
        [
            "main (app.py:1);serve (service.py:10);rank (rails.py:5) 3",
            "main (app.py:1);serve (service.py:12);serve (service.py:40) 1",
            "main (app.py:1);idle (loop.py:3) 4",
            "not a stack line",
        ]
    )
    shares = frame_shares(collapsed)
    inclusive = {row["frame"]: row["share"] for row in shares["inclusive"]}
    own = {row["frame"]: row["share"] for row in shares["self"]}
    assert shares["samples"] == 8
    assert inclusive["main (app.py)"] == 1.0
    assert inclusive["serve (service.py)"] == 0.5  # the recursive stack counts once
    assert own == {"idle (loop.py)": 0.5, "rank (rails.py)": 0.375, "serve (service.py)": 0.125}
