"""Faults under load against the real stack (benchmarks/fault_under_load.py): Redis and
tritonserver are SIGKILLed and restarted while clients ask for every rail.

Redis, tritonserver and the API (uvicorn, its own process) are started here; a server that
cannot start fails the test.
"""

from __future__ import annotations

import pytest

from benchmarks.fault_under_load import PHASES, catalogue_items, markdown, run_faults
from benchmarks.live_stack import private_artifacts, start_stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def faults(trained_rees46, tmp_path_factory):
    settings, bundle = trained_rees46
    root = tmp_path_factory.mktemp("faults")
    artifacts, copy = private_artifacts(bundle, settings.artifacts_dir, root)
    items = catalogue_items(bundle, settings)
    stack = start_stack(artifacts, settings.serving.triton_repository, root / "work", copy)
    try:
        run = run_faults(stack, items, clients=3, phase_s=5.0, down_s=2.0)
    finally:
        stack.stop()
    print(markdown(run, bundle.name))  # the table, in the CI log
    return run


def test_every_phase_ran_under_load(faults):
    rows = {row["phase"]: row for row in faults.table()}
    assert list(rows) == list(PHASES)  # the trained bundle has towers: Triton is killed too
    assert all(row["requests"] >= 10 for row in rows.values())


def test_no_shopper_sees_an_error_or_an_empty_rail_while_parts_die(faults):
    for row in faults.table():
        assert row["server_errors"] == 0, row
        assert row["other_errors"] == 0, row
        assert row["transport_errors"] == 0, row
        assert row["empty"] == 0, row


def test_a_killed_redis_comes_back_with_every_session(faults):
    assert faults.sessions_seeded == 30
    assert faults.sessions_lost == 0


def test_the_rails_are_ranked_again_once_the_parts_are_back(faults):
    rows = {row["phase"]: row for row in faults.table()}
    assert rows["steady"]["degraded_share"] < 0.5
    assert rows["recovered"]["degraded_share"] < 0.5
