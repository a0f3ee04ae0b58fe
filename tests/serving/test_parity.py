"""Parity proofs on real REES46 held-out sessions, against a real tritonserver and Redis.

(a) Triton's user tower equals the in-process TorchScript tower within 1e-4, and the item
vectors retrieval uses equal a fresh in-process item-tower encoding (only the user tower is
hosted on Triton). (b) For a frozen state (bundle, index, rules, session events in Redis)
the HTTP endpoint serves the evaluator's top-12. (c) The tensors training builds for a real
session prefix equal those serving builds from the same events read back from Redis.
The helpers are training/parity.py's, shared with benchmarks/parity.py.
"""

from __future__ import annotations

import time

import pytest
import torch
from fastapi.testclient import TestClient

from devstack.local_services import LocalServer, free_port, redis_server, triton_server
from railtower.datasets import load_dataset
from railtower.settings import ExclusionSettings
from serving.api_models import RailRequest
from serving.app import create_app
from serving.rail_service import load_rails
from serving.stages import build_query, query_history
from serving.user_vectors import TritonUserTower
from state.session_store import SessionStore
from towers.session_features import HistoryEvent
from training.examples import session_examples
from training.parity import (
    TOLERANCE,
    held_out_cases,
    item_tower_parity,
    load_sessions,
    rail_parity,
    user_tower_parity,
)
from training.records import held_out_events

pytestmark = pytest.mark.integration

MIN_SESSIONS = {"homepage_hero": 200, "pdp_fbt": 50}


@pytest.fixture(scope="module")
def trained(trained_rees46):
    return trained_rees46


@pytest.fixture(scope="module")
def loaded(trained):
    settings, bundle = trained
    return load_rails(bundle, settings)


@pytest.fixture(scope="module")
def cases(trained, loaded):
    return held_out_cases(loaded, trained[0], per_rail=300)


@pytest.fixture(scope="module")
def triton(trained, tmp_path_factory):
    settings, _ = trained
    grpc = free_port()
    work = tmp_path_factory.mktemp("triton-parity")
    server = triton_server(settings.serving.triton_repository, grpc, free_port(), work).start()
    client = TritonUserTower(f"127.0.0.1:{grpc}", "user_tower", 10.0)
    deadline = time.monotonic() + 60
    while not client.ready() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.ready(), (work / "triton.log").read_text()[-2000:]
    yield server, client, f"127.0.0.1:{grpc}"
    server.stop()


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    port = free_port()
    server: LocalServer = redis_server(port, tmp_path_factory.mktemp("redis-parity")).start()
    yield f"redis://127.0.0.1:{port}/0"
    server.stop()


def _store(trained, url: str) -> SessionStore:
    """The store the API builds from the same settings (its order memory too), on `url`."""
    serving = trained[0].serving.model_copy(update={"redis_url": url})
    return SessionStore.from_settings(serving, timeout_s=5.0)


def test_triton_user_tower_equals_the_in_process_tower_on_real_sessions(loaded, cases, triton):
    for rail, rail_cases in cases.items():
        figures, _ = user_tower_parity(loaded.towers, triton[1], [c.query for c in rail_cases])
        assert figures["sessions"] >= MIN_SESSIONS[rail], (rail, figures)
        assert figures["max_abs_diff"] <= TOLERANCE, (rail, figures)
        assert figures["max_abs_diff_one_per_call"] <= TOLERANCE, (rail, figures)
    assert len(cases["homepage_hero"]) >= 300


def test_stored_item_vectors_equal_a_fresh_item_tower_encoding(trained, loaded):
    settings, _ = trained
    catalogue = load_dataset(loaded.rails.evaluation["dataset"], settings).items
    figures = item_tower_parity(loaded.towers, catalogue, settings, n=400)
    assert figures["items"] >= 300, figures
    assert figures["max_abs_diff"] <= TOLERANCE, figures
    # the HNSW graph holds exactly the bundle's vectors (float32 stored as given)
    assert figures["index_max_abs_diff"] == 0.0, figures


def test_http_top12_equals_the_evaluator_on_real_sessions(
    trained, loaded, cases, triton, redis_url
):
    settings, bundle = trained
    assert settings.ranking.exploration.slot is None  # a bandit slot would differ by design
    serving = settings.serving.model_copy(
        update={
            "bundle": bundle,
            "redis_url": redis_url,
            "triton_url": triton[2],
            "request_encoder": "triton",  # the Triton request path is what this proves
        }
    )
    # load test: one client is many shoppers (every held-out case, one after another); the
    # per-client rate limit (on by default) is off
    security = settings.security.model_copy(update={"rate_limit_per_s": 0.0})
    app = create_app(settings.model_copy(update={"serving": serving, "security": security}))
    store = _store(trained, redis_url)
    results = {}
    with TestClient(app) as client:

        def post(path: str, body: dict) -> tuple[int, dict]:
            reply = client.post(path, json=body)
            return reply.status_code, reply.json()

        for rail, rail_cases in cases.items():
            load_sessions(store, rail, rail_cases)
            _, vectors = user_tower_parity(loaded.towers, triton[1], [c.query for c in rail_cases])
            results[rail] = rail_parity(loaded, rail, rail_cases, post, vectors, alone=True)
    for rail, result in results.items():
        assert result.compared >= MIN_SESSIONS[rail], result.as_dict()
        assert result.degraded == 0, result.differences[:3]
        assert result.vector_sources == {"triton": result.compared}, result.vector_sources
        # A request is a batch of one: scored alone, the evaluator's path serves the same
        # list every time. Scored in its batches (the harness's way) a case may differ where
        # the batch changes the HNSW fetch depth and that flips a tie (reported, bounded).
        assert result.identical_alone == result.compared, result.differences[:3]
        assert all(d["same_when_scored_alone"] for d in result.differences)
        assert result.share_identical >= 0.95, result.differences[:5]


def test_training_examples_equal_serving_inputs_read_back_from_redis(trained, loaded, redis_url):
    """Real held-out sessions: every hero example session_examples builds for training equals
    the inputs the served path builds from the same prefix after a Redis round trip."""
    settings, _ = trained
    towers = loaded.towers
    data = load_dataset(loaded.rails.evaluation["dataset"], settings)
    events = held_out_events(data.events, data.has_time, loaded.rails.evaluation["held_out"])
    store = _store(trained, redis_url)
    sessions = [
        frame.sort_values("position", kind="stable")
        for _, frame in events.groupby("session_id", sort=True)
        if len(frame) >= 3
    ][:40]
    checked = 0
    for s, frame in enumerate(sessions):
        items, types = frame["item_id"].tolist(), frame["event_type"].tolist()
        times = (frame["event_time"].astype("int64") / 1e9).tolist()
        steps = [
            t
            for t in range(1, len(items))
            if items[t] in towers.item_row and items[t] not in items[:t]
        ]
        if not steps:
            continue  # nothing new the towers know: no training example to compare
        examples = session_examples(
            frame, towers.item_row, towers.towers.max_history, towers.has_time, False, seed=0
        )
        assert len(steps) == len(examples.targets)
        for i, t in enumerate(steps):
            sid = f"features-{s}-{t}"
            store.append_events(
                sid,
                [
                    (f"{sid}-{k}", HistoryEvent(items[k], types[k], times[k]), None)
                    for k in range(t)
                ],
            )
            query = build_query(
                RailRequest(session_id=sid),
                store.snapshot(sid, loaded.version, None),
                (None, ()),
                "homepage_hero",
                ExclusionSettings(),
            )
            served = towers.session_inputs([query_history(query)], [query.context])
            for name, tensor in served.items():
                assert torch.equal(tensor[0], examples.inputs[name][i]), (sid, name)
            checked += 1
    assert checked >= 50
