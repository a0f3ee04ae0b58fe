"""Admin routes of the live canary: start a challenger on a share of sessions, hold, resume,
advance or abort it, and read where it stands. Mounted by `serving.app` next to the other
admin routes; every route needs the admin key (`serving.security.require_admin`, header
`X-API-Key`). The data set is the one this API serves (`serving.dataset`).

    GET    /v1/admin/canary            the state, the last 20 moves, what this process serves
    POST   /v1/admin/canary/start      {"bundle", "reason"?}  -> 200 state / 409 refused
                                        (404 no such bundle, 422 bad body or path)
    POST   /v1/admin/canary/hold       {"reason"}             -> 200 state / 409 refused
    POST   /v1/admin/canary/resume     {"reason"}             -> 200 state / 409 refused
    POST   /v1/admin/canary/advance    {"reason"}             -> 200 state / 409 refused
    POST   /v1/admin/canary/abort      {"reason"}             -> 200 state / 409 refused

`/advance` is the operator's manual advance, taken on the operator's word: it checks no
figures. The rule-based advance (enough matured impressions and minutes on the step, the
challenger's hit rate not below production's) is `railtower canary step`, offline code
(`training.canary_decision`) this API never imports. Advancing from the last share below
1.0 promotes the challenger: the production pointer moves, and `railtower rollback` or
`POST /v1/admin/rollback` puts the previous bundle back.

The moves themselves are `railtower.canary` (the state file beside the production pointer,
under the pointer lock). After a move this process follows it at once
(`service.follow_canary`); the other API processes re-read the state file within a second.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.concurrency import run_in_threadpool

from railtower.canary import (
    CanaryRefused,
    CanaryState,
    abort_canary,
    advance_canary,
    canary_history,
    canary_path,
    hold_canary,
    read_canary,
    resume_canary,
    start_canary,
)
from railtower.logs import get_logger
from railtower.production import pointer_path
from railtower.settings import PromotionSettings, Settings
from serving.admin import _bundle_path, _who
from serving.request_checks import BadRequest
from serving.security import require_admin

log = get_logger(__name__)

HISTORY_SHOWN = 20


class ServedCanary(Protocol):
    """What this process serves of the canary (`service.canary`)."""

    @property
    def version(self) -> str: ...

    @property
    def share(self) -> float: ...


class FollowsCanary(Protocol):
    """The part of the rail service these routes use (serving.served_model.ServedModel)."""

    @property
    def canary(self) -> ServedCanary | None: ...

    def follow_canary(self, pointer: Path) -> bool: ...


# ------------------------------------------------------------------------------ bodies


# at least 3 characters besides the blanks around them
Reason = Annotated[str, StringConstraints(strip_whitespace=True, min_length=3, max_length=1000)]


class StartBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bundle: str = Field(
        min_length=1,
        max_length=500,
        description="challenger rails bundle, relative to artifacts_dir",
    )
    reason: Reason = Field("started by an operator", description="why, for the history")


class MoveBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Reason = Field(description="why, for the history")


# ------------------------------------------------------------------------------ routes


def canary_router(service: FollowsCanary, settings: Settings) -> APIRouter:
    """The canary admin routes over `service`; mount with `app.include_router`."""
    router = APIRouter(
        prefix="/v1/admin/canary", tags=["admin", "canary"], dependencies=[Depends(require_admin)]
    )
    dataset = settings.serving.dataset
    # the same pointer serving.app.production_pointer names (that module mounts this one)
    pointer = pointer_path(settings.artifacts_dir, settings.promotion, dataset)

    async def moved(event: str, state: CanaryState, request: Request) -> JSONResponse:
        """Apply the move in this process now, log it, answer with the new state."""
        body: dict[str, Any] = {"moved": event, "dataset": dataset, "state": _state(state)}
        try:
            await run_in_threadpool(service.follow_canary, pointer)
        except Exception as exc:  # the move is on disk; this process retries on its watch
            log.exception("admin: canary move not applied here yet", move=event)
            body["not_applied_here"] = f"{type(exc).__name__}: {exc}"
        log.info(
            "admin: canary " + event,
            dataset=dataset,
            challenger=state.challenger,
            share=state.share,
            status=state.status,
            reason=state.reason,
            client=_who(request),
        )
        body["this_process"] = _this_process(service)
        body["note"] = "the other API processes follow the canary state file within a second"
        return JSONResponse(body)

    def refused(event: str, exc: CanaryRefused, request: Request) -> JSONResponse:
        log.warning("admin: canary " + event + " refused", why=str(exc), client=_who(request))
        return JSONResponse({"moved": False, "error": str(exc)}, status_code=409)

    @router.get("")
    async def status() -> JSONResponse:
        try:
            state = await run_in_threadpool(read_canary, pointer)
        except ValueError as exc:
            # the operator's file, not the request, is wrong: a 500 that names it
            raise BadRequest(
                500,
                f"the canary state file {canary_path(pointer)} of {dataset} is unreadable "
                f"({exc}); rewrite it from the last move in history.jsonl, or delete it to end the "
                "canary (production is whatever the pointer names)",
            ) from None
        history = await run_in_threadpool(canary_history, pointer, HISTORY_SHOWN)
        return JSONResponse(
            {
                "dataset": dataset,
                "state": None if state is None else _state(state),
                "history": history,
                "this_process": _this_process(service),
            }
        )

    @router.post("/start")
    async def start(body: StartBody, request: Request) -> JSONResponse:
        bundle = _bundle_path(settings, body.bundle)  # inside artifacts_dir, and a folder
        try:
            state = await run_in_threadpool(
                start_canary,
                settings.artifacts_dir,
                settings.promotion,
                settings.canary,
                dataset,
                bundle,
                body.reason,
            )
        except CanaryRefused as exc:
            return refused("start", exc, request)
        return await moved("start", state, request)

    moves: dict[str, Callable[[Path, PromotionSettings, str, str], CanaryState]] = {
        "hold": hold_canary,
        "resume": resume_canary,
        "advance": advance_canary,
        "abort": abort_canary,
    }

    def add_move(event: str) -> None:
        move = moves[event]

        async def route(body: MoveBody, request: Request) -> JSONResponse:
            try:
                state = await run_in_threadpool(
                    move, settings.artifacts_dir, settings.promotion, dataset, body.reason
                )
            except CanaryRefused as exc:
                return refused(event, exc, request)
            except ValueError as exc:  # a reason of blanks
                raise BadRequest(422, str(exc)) from None
            return await moved(event, state, request)

        router.add_api_route(f"/{event}", route, methods=["POST"], name=f"canary_{event}")

    for event in moves:
        add_move(event)
    return router


def _state(state: CanaryState) -> dict[str, Any]:
    return {**state.model_dump(mode="json"), "share": state.share}


def _this_process(service: FollowsCanary) -> dict[str, Any] | None:
    served = service.canary
    return None if served is None else {"version": served.version, "share": served.share}
