"""The request-thread benchmark's pure helpers (benchmarks/request_threads.py), no servers."""

from __future__ import annotations

from benchmarks import request_threads as bench


def _round(p99: float) -> dict:
    closed = {"throughput_rps": 100.0, "p50": 10.0, "p99": p99, "degraded_share": 0.0}
    return {"computed c16": closed, "open loop": closed | {"achieved_rps": 88.0}}


def test_the_warm_up_round_is_left_out_of_the_medians():
    rounds = [_round(900.0), _round(100.0), _round(140.0), _round(120.0)]
    assert bench.summary(rounds)["computed c16"]["p99"] == 120.0
    assert bench.summary(rounds[:1])["computed c16"]["p99"] == 900.0  # one round: itself


def test_the_table_has_a_row_per_pool_and_step():
    result = {
        "bundle": "b",
        "commit": "abc1234",
        "command": "python benchmarks/request_threads.py",
        "rounds": 3,
        "summary": {"4": bench.summary([_round(1.0)]), "40": bench.summary([_round(2.0)])},
    }
    text = bench.markdown(result)
    assert "| 4 | computed c16 | 100 | 10.0 | 1.0 | 0.0% |" in text
    assert "| 40 | open loop |" in text and "Commit `abc1234`" in text
