"""Faults under load against the real stack (benchmarks/fault_under_load.py): Redis,
tritonserver, the broker and the refresh consumer are SIGKILLed and restarted while clients
ask for every rail and events stream in.

Redis, tritonserver, the API (uvicorn, its own process), a Kafka-protocol broker and a
`railtower consume` process are started here; a server that cannot start fails the test.
"""

from __future__ import annotations

import pytest

from benchmarks.fault_stream import EventStream
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
    local = settings.model_copy(update={"artifacts_dir": artifacts})
    stream = EventStream(local, copy, stack.redis_url, root / "stream", items)
    try:
        stream.start()
        run = run_faults(stack, items, clients=3, phase_s=5.0, down_s=2.0, stream=stream)
    finally:
        stream.stop()
        stack.stop()
    print(markdown(run, bundle.name))  # the table, in the CI log
    return run


def test_every_phase_ran_under_load(faults):
    rows = {row["phase"]: row for row in faults.table()}
    # the trained bundle has towers (Triton is killed too) and the events stream in
    assert list(rows) == list(PHASES)
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


def test_every_acknowledged_event_is_applied_once_or_its_loss_explained(faults):
    """Idempotence makes redelivery harmless; the only losses are the local broker's memory
    (tansu keeps its log in memory here) and Redis's last unsynced second."""
    events = faults.events
    assert events["produced"] >= 100
    assert events["acknowledged"] >= 0.5 * events["produced"], events
    assert events["duplicated"] == 0, events
    assert events["lost_other"] == 0, events
    assert events["applied"] >= events["acknowledged"] - events["lost"], events
    phases = {row["phase"]: row for row in events["per_phase"]}
    # what is sent once the broker and the consumer are back is applied, all of it
    assert phases["recovered"]["acknowledged"] > 0
    assert phases["recovered"]["lost"] == 0, phases


def test_the_consumer_survives_and_comes_back_after_each_kill(faults):
    events = faults.events
    # no consumer exited by itself (the SIGKILLed one reads -9; the one alive, None)
    assert all(code in (None, -9) for code in events["consumer_exits"]), events
    assert events["recovery_s"]["broker"] is not None, events
    assert events["recovery_s"]["consumer"] is not None, events
