"""The canary admin routes (serving/canary_routes.py) over the real app: the key, each move's
status, the state file and history they leave, refusals (409) and bad bodies (422).

The app's service has no model; `follow_canary` is replaced by a spy that records the
pointer it is told to follow and sets `service.canary` from the state file, as the real one
does, so the tests see that each successful move is applied in this process at once."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient

from railtower.canary import canary_history, canary_path, read_canary
from railtower.settings import load_settings
from serving.app import create_app
from serving.metrics import Metrics
from serving.service import RailService
from tests.training.test_promotion import _bundle, record
from training.promotion import promote

KEY = "c" * 32
ADMIN = {"X-API-Key": KEY}
MOVES = ("hold", "resume", "advance", "abort")


def _values(level: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    return {r: np.clip(rng.uniform(0.0, 0.4, size=200) + level, 0, 1) for r in ("pdp_fbt",)}


class Follower:
    """Stands in for ServedModel.follow_canary: what the real one reads, it reads."""

    def __init__(self, service: RailService) -> None:
        self.service, self.calls, self.fail = service, [], False

    def __call__(self, pointer) -> bool:
        self.calls.append(pointer)
        if self.fail:
            raise RuntimeError("challenger failed to load")
        state = read_canary(pointer)
        live = state is not None and state.share > 0
        self.service.canary = (  # type: ignore[attr-defined]
            SimpleNamespace(version=state.challenger, share=state.share, salt=state.salt)
            if live and state is not None
            else None
        )
        return True


@pytest.fixture
def world(tmp_path, monkeypatch):
    """artifacts/v1 in production for `shop`, artifacts/v2 a challenger; the app serves shop."""
    artifacts = tmp_path / "artifacts"
    settings = load_settings(
        artifacts_dir=artifacts,
        serving={"triton_url": None, "dataset": "shop"},
        security={"admin_api_key": KEY},
        log_level="WARNING",
    )
    pointer = artifacts / "production" / "shop"
    v1 = _bundle(artifacts / "v1", record(_values(0.0)))
    assert promote(v1, pointer, settings.promotion, 1).promote
    v2 = _bundle(artifacts / "v2", record(_values(0.1)))
    service = RailService(settings, None, None, None, Metrics())
    follower = Follower(service)
    monkeypatch.setattr(service, "follow_canary", follower, raising=False)
    monkeypatch.setattr(service, "canary", None, raising=False)
    client = TestClient(create_app(settings, service))
    return SimpleNamespace(
        client=client, pointer=pointer, v1=v1, v2=v2, follower=follower, artifacts=artifacts
    )


def _post(world, move: str, headers=ADMIN, **body):
    return world.client.post(f"/v1/admin/canary/{move}", json=body, headers=headers)


# ------------------------------------------------------------------------------ the key


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": KEY[:-1] + "x"}], ids=["none", "wrong"])
def test_every_canary_route_needs_the_admin_key(world, headers):
    assert world.client.get("/v1/admin/canary", headers=headers).status_code in (401, 403)
    answer = _post(world, "start", headers, bundle="v2")
    assert answer.status_code in (401, 403)
    for move in MOVES:
        assert _post(world, move, headers, reason="a reason").status_code in (401, 403), move
    assert read_canary(world.pointer) is None  # nothing moved
    assert world.follower.calls == []


# ------------------------------------------------------------------------------ moves


def test_status_without_a_canary(world):
    answer = world.client.get("/v1/admin/canary", headers=ADMIN)
    assert answer.status_code == 200
    assert answer.json() == {"dataset": "shop", "state": None, "history": [], "this_process": None}


def test_an_unreadable_state_file_is_a_500_that_names_the_file_and_the_way_out(world):
    canary_path(world.pointer).write_text("{not json")
    answer = world.client.get("/v1/admin/canary", headers=ADMIN)
    assert answer.status_code == 500
    error = str(answer.json())
    assert str(canary_path(world.pointer)) in error and "history.jsonl" in error


def test_start_hold_resume_advance_abort_move_the_state_file(world):
    started = _post(world, "start", bundle="v2", reason="try v2")
    assert started.status_code == 200, started.text
    body = started.json()
    assert body["moved"] == "start" and body["dataset"] == "shop"
    assert (body["state"]["challenger"], body["state"]["share"]) == ("v2", 0.05)
    assert body["this_process"] == {"version": "v2", "share": 0.05}  # applied here at once
    assert world.follower.calls == [world.pointer]
    state = read_canary(world.pointer)
    assert state is not None and (state.status, state.reason) == ("running", "try v2")

    held = _post(world, "hold", reason="sale weekend")
    assert held.status_code == 200 and held.json()["state"]["status"] == "held"
    assert read_canary(world.pointer).status == "held"  # type: ignore[union-attr]

    refused = _post(world, "advance", reason="too soon")
    assert refused.status_code == 409
    assert refused.json()["moved"] is False and "resume it first" in refused.json()["error"]

    assert _post(world, "resume", reason="sale over").status_code == 200
    advanced = _post(world, "advance", reason="looks fine")
    assert advanced.status_code == 200
    assert advanced.json()["state"]["share"] == 0.25
    assert advanced.json()["this_process"] == {"version": "v2", "share": 0.25}

    aborted = _post(world, "abort", reason="CTR fell")
    assert aborted.status_code == 200
    assert (aborted.json()["state"]["status"], aborted.json()["state"]["share"]) == ("aborted", 0)
    assert aborted.json()["this_process"] is None
    assert world.pointer.resolve() == world.v1.resolve()  # production never moved
    # five moves applied here, the refusal not
    assert len(world.follower.calls) == 5

    shown = world.client.get("/v1/admin/canary", headers=ADMIN).json()
    assert shown["state"]["status"] == "aborted" and shown["state"]["share"] == 0
    events = [e["event"] for e in shown["history"]]
    assert events == ["start", "hold", "resume", "advance", "abort"]
    assert shown["history"] == canary_history(world.pointer, 20)


def test_advancing_to_the_last_step_promotes_the_challenger(world):
    assert _post(world, "start", bundle="v2").status_code == 200
    shares = [_post(world, "advance", reason=f"step {n}").json()["state"] for n in range(3)]
    assert [(s["share"], s["status"]) for s in shares] == [
        (0.25, "running"),
        (0.5, "running"),
        (0.0, "promoted"),
    ]
    assert world.pointer.resolve() == world.v2.resolve()
    again = _post(world, "advance", reason="more")
    assert again.status_code == 409 and "last one was promoted" in again.json()["error"]


def test_refused_moves_are_409_and_name_why(world):
    for move in MOVES:
        answer = _post(world, move, reason="nothing live")
        assert answer.status_code == 409, move
        assert "none was started" in answer.json()["error"]
    production = _post(world, "start", bundle="v1")
    assert production.status_code == 409 and "production already" in production.json()["error"]
    (world.v2 / "evaluation.json").write_bytes(b"{}")  # no longer what the manifest says
    unverified = _post(world, "start", bundle="v2")
    assert unverified.status_code == 409
    assert "cannot be a challenger" in unverified.json()["error"]
    v3 = _bundle(world.artifacts / "v3", record(_values(0.2)))
    assert _post(world, "start", bundle=v3.name).status_code == 200
    twice = _post(world, "start", bundle="v3")
    assert twice.status_code == 409 and "abort it first" in twice.json()["error"]
    resume = _post(world, "resume", reason="not held")
    assert resume.status_code == 409 and "not held" in resume.json()["error"]
    assert len(world.follower.calls) == 1  # only the start that happened


@pytest.mark.parametrize(
    ("move", "body"),
    [
        ("start", {}),
        ("start", {"bundle": ""}),
        ("start", {"bundle": "v2", "share": 0.5}),
        ("start", {"bundle": "v2", "reason": "  "}),
        ("hold", {}),
        ("hold", {"reason": "no"}),
        ("abort", {"reason": "      "}),
        ("advance", {"reason": "fine", "step": 3}),
        ("resume", {"reason": 7}),
    ],
)
def test_a_bad_body_is_422_and_moves_nothing(world, move, body):
    answer = world.client.post(f"/v1/admin/canary/{move}", json=body, headers=ADMIN)
    assert answer.status_code == 422, answer.text
    assert "error" in answer.json()
    assert read_canary(world.pointer) is None


def test_start_names_only_bundles_inside_artifacts(world, tmp_path):
    outside = _bundle(tmp_path / "outside", record(_values(0.1)))
    escaped = _post(world, "start", bundle=str(outside))
    assert escaped.status_code == 422 and "inside artifacts_dir" in escaped.json()["error"]
    assert _post(world, "start", bundle="../outside").status_code == 422
    missing = _post(world, "start", bundle="v9")
    assert missing.status_code == 404 and "no bundle" in missing.json()["error"]
    assert read_canary(world.pointer) is None


def test_a_move_this_process_cannot_apply_yet_still_answers_200(world):
    world.follower.fail = True
    answer = _post(world, "start", bundle="v2")
    assert answer.status_code == 200  # the move is on disk; the watch loop retries
    assert "challenger failed to load" in answer.json()["not_applied_here"]
    assert read_canary(world.pointer).status == "running"  # type: ignore[union-attr]
