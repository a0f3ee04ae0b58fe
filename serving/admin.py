"""Admin routes: publish merchandising rules, promote and roll back bundles, delete user data.

Every route needs the admin key (`serving.security.require_admin`, header `X-API-Key`).

    POST   /v1/admin/rules/validate    body: a rule set (JSON text)  -> 200 valid / 422 errors
    POST   /v1/admin/rules             validate, publish, serve it   -> 200 / 422
    GET    /v1/admin/rules             the served rule set and its published version
    POST   /v1/admin/promote           {"bundle"}                    -> 200 / 409 refused
                                        (422 not promotable, 504 the gate timed out)
    POST   /v1/admin/rollback          {"dataset", "reason"}         -> 200 / 409 refused
    DELETE /v1/admin/users/{user_id}   every session of the user, then the user's link set
    DELETE /v1/admin/sessions/{session_id}

The live canary's routes, under /v1/admin/canary (state, start, hold, resume, advance,
abort), are serving/canary_routes.py, behind the same key.

Publishing and serving the rule set (one rename on disk, picked up by every API process
within a second) is serving/published_rules.py; these routes call it.

Promotion runs the offline gate in a child process (`railtower promote --json`, see
`promote_in_child`); rollback moves the pointer in this process (railtower.production),
which needs no evaluation code. This module never imports training/.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson
import redis
import yaml
from fastapi import APIRouter, Depends, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from railtower.errors import RuleSetError
from railtower.logs import get_logger
from railtower.production import RollbackRefused
from railtower.production import rollback as run_rollback
from railtower.settings import PROJECT_ROOT, Settings
from serving.published_rules import PublishedRules, parse_rule_set, rule_errors, rule_summary
from serving.request_checks import BadRequest
from serving.security import require_admin
from serving.service import RailService
from state.session_store import Deletion, SessionStore

log = get_logger(__name__)

# ------------------------------------------------------------------------------ bodies


class PromoteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bundle: str = Field(
        min_length=1, max_length=500, description="rails bundle, relative to artifacts_dir"
    )


class RollbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # default: serving.dataset
    dataset: str | None = Field(None, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
    reason: str = Field(min_length=3, max_length=1000, description="why, for the history")


def _deletion(deletion: Deletion) -> dict[str, Any]:
    return {
        "sessions": len(deletion.sessions),
        "session_ids": deletion.sessions,
        "keys_deleted": deletion.deleted,
        "keys": deletion.keys,
    }


# ------------------------------------------------------------------------------ routes


def admin_router(service: RailService, rules: PublishedRules) -> APIRouter:
    """The admin routes over `service`; mount with `app.include_router`."""
    router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_admin)])
    settings = service.settings

    async def body_text(request: Request) -> str:
        try:
            return (await request.body()).decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise BadRequest(422, f"byte {exc.start}: the body is not UTF-8 text") from None

    @router.post("/rules/validate")
    async def validate_rules(request: Request) -> JSONResponse:
        try:
            rule_set = parse_rule_set(await body_text(request))
        except RuleSetError as exc:
            return JSONResponse({"valid": False, "errors": rule_errors(exc)}, status_code=422)
        return JSONResponse({"valid": True, **rule_summary(rule_set)})

    @router.post("/rules")
    async def publish_rules(request: Request) -> JSONResponse:
        text = await body_text(request)
        try:
            publication = await run_in_threadpool(rules.publish, text)
        except RuleSetError as exc:
            return JSONResponse({"valid": False, "errors": rule_errors(exc)}, status_code=422)
        # This process serves it now; the others on their next watch tick.
        await run_in_threadpool(rules.sync, service)
        log.info("admin: rules published", version=publication.version, client=_who(request))
        return JSONResponse(
            {
                "valid": True,
                "published": True,
                "published_version": publication.version,
                "published_at": publication.published_at,
                **rule_summary(publication.rule_set),
            }
        )

    @router.get("/rules")
    async def current_rules() -> JSONResponse:
        loaded = service.loaded
        if loaded is None:
            raise BadRequest(503, "no model loaded yet; see /readyz")
        served = loaded.pipeline.rule_set
        publication = rules.publication
        published = publication is not None and served is publication.rule_set
        return JSONResponse(
            {
                "source": "published" if published else ("bundle" if served else "none"),
                "published_version": publication.version if published and publication else None,
                "published_at": publication.published_at if published and publication else None,
                "model_version": loaded.version,
                "rule_set": None if served is None else served.model_dump(mode="json"),
            }
        )

    @router.post("/promote")
    async def promote(body: PromoteBody, request: Request) -> JSONResponse:
        bundle = _bundle_path(settings, body.bundle)
        # The gate runs in a child process, waited on from the threadpool: it may re-score
        # the production bundle on the candidate's held-out cases (offline evaluation code,
        # seconds of CPU and hundreds of MB). As a child it neither imports training/ into
        # the API nor holds that memory in an API worker, and the pointer lock
        # (railtower.production) still serialises it with rollbacks and nightly runs.
        answer = await run_in_threadpool(promote_in_child, settings, bundle)
        log.info(
            "admin: promote", bundle=bundle.name, promoted=answer["promoted"], client=_who(request)
        )
        return JSONResponse(answer, status_code=200 if answer["promoted"] else 409)

    @router.post("/rollback")
    async def rollback(body: RollbackBody, request: Request) -> JSONResponse:
        dataset = body.dataset or settings.serving.dataset
        try:
            decision = await run_in_threadpool(
                run_rollback, settings.artifacts_dir, settings.promotion, dataset, body.reason
            )
        except RollbackRefused as exc:
            return JSONResponse({"rolled_back": False, "error": str(exc)}, status_code=409)
        except ValueError as exc:
            raise BadRequest(422, str(exc)) from None
        log.info("admin: rollback", dataset=dataset, to=decision.restored, client=_who(request))
        return JSONResponse(
            {
                "rolled_back": True,
                **asdict(decision),
                "note": "API processes follow the pointer within serving.reload_interval_s "
                f"({settings.serving.reload_interval_s:g} s)",
            }
        )

    @router.delete("/users/{user_id}")
    async def delete_user(
        request: Request, user_id: str = PathParam(min_length=1, max_length=128)
    ) -> dict[str, Any]:
        store = _store(service)
        try:
            deletion = await run_in_threadpool(store.delete_user, user_id)
        except redis.RedisError as exc:
            raise BadRequest(503, f"Redis is not answering ({type(exc).__name__})") from None
        log.info("admin: user deleted", keys=deletion.deleted, client=_who(request))
        return {"user_id": user_id, **_deletion(deletion)}

    @router.delete("/sessions/{session_id}")
    async def delete_session(
        request: Request, session_id: str = PathParam(min_length=1, max_length=128)
    ) -> dict[str, Any]:
        store = _store(service)
        try:
            deletion = await run_in_threadpool(store.delete_sessions, [session_id])
        except redis.RedisError as exc:
            raise BadRequest(503, f"Redis is not answering ({type(exc).__name__})") from None
        log.info("admin: session deleted", keys=deletion.deleted, client=_who(request))
        return {"session_id": session_id, **_deletion(deletion)}

    return router


# ------------------------------------------------------------------------------ promotion


# `railtower promote` exits 0 when the bundle was promoted, 3 when the gate refused it.
_PROMOTED, _REFUSED = 0, 3


def promote_in_child(settings: Settings, bundle: Path) -> dict[str, Any]:
    """Run the promotion gate on `bundle` as `railtower promote <bundle> --json`, in a child
    process with this process's settings; blocks (call it from a thread).

    The child gets the settings this API runs with, whatever they came from (a config file,
    RAILTOWER_ variables, keyword overrides): they are written to a temporary YAML file it
    loads with --config, and its environment is this one without RAILTOWER_ variables
    (already part of that file). The admin key is left out: the gate does not need it.

    Returns:
        The decision: promoted, candidate, production, reasons, verdicts.

    Raises:
        BadRequest: 422 when the child could not gate the bundle (its stderr's last line
            says why), 504 when it ran past `security.admin_promote_timeout_s`.
    """
    timeout = settings.security.admin_promote_timeout_s
    with tempfile.TemporaryDirectory(prefix="railtower-promote-") as work:
        config = Path(work) / "settings.yaml"
        effective = settings.model_dump(mode="json", exclude={"security": {"admin_api_key"}})
        config.write_text(yaml.safe_dump(effective, sort_keys=False), encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAILTOWER_")}
        command = [
            *(sys.executable, "-m", "railtower.cli", "promote", str(bundle)),
            *("--json", "--config", str(config)),
        ]
        try:
            done = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                env=env,
                cwd=PROJECT_ROOT,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            # subprocess.run has killed it; the pointer moves in one rename under its lock,
            # so production is the old bundle or the new one (history.jsonl says which).
            log.error("admin: promotion gate timed out", bundle=bundle.name, timeout_s=timeout)
            raise BadRequest(
                504,
                f"cannot promote {bundle.name}: the gate did not finish within "
                f"security.admin_promote_timeout_s ({timeout:g} s) and was stopped; run "
                "`railtower promote` from a shell, or raise the timeout",
            ) from None
    answer = _decision(done.stdout) if done.returncode in (_PROMOTED, _REFUSED) else None
    if answer is None or answer["promoted"] != (done.returncode == _PROMOTED):
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        why = lines[-1] if lines else f"`railtower promote` exited {done.returncode}"
        log.warning("admin: promotion gate failed", bundle=bundle.name, rc=done.returncode)
        raise BadRequest(422, f"cannot promote {bundle.name}: {why}")
    return answer


def _decision(stdout: str) -> dict[str, Any] | None:
    """The JSON decision `railtower promote --json` printed (its last stdout line)."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    try:
        answer = orjson.loads(lines[-1]) if lines else None
    except orjson.JSONDecodeError:
        return None
    keys = ("promoted", "candidate", "production", "reasons", "verdicts")
    if not isinstance(answer, dict) or not all(key in answer for key in keys):
        return None
    return {key: answer[key] for key in keys}


def _bundle_path(settings: Settings, bundle: str) -> Path:
    """The bundle a body names, which must lie inside artifacts_dir (no path escapes it)."""
    if "\x00" in bundle:  # the file system refuses it; say so instead of failing deep down
        raise BadRequest(422, "bundle: contains a NUL byte; name a folder under artifacts_dir")
    root = settings.artifacts_dir.resolve()
    path = Path(bundle)
    path = (path if path.is_absolute() else root / path).resolve()
    if not path.is_relative_to(root):
        raise BadRequest(422, f"bundle must be inside artifacts_dir ({root}), got {bundle!r}")
    if not path.is_dir():
        raise BadRequest(404, f"no bundle at {path}; name a folder under {root}")
    return path


def _store(service: RailService) -> SessionStore:
    if service.store is None:
        raise BadRequest(503, "no session store configured (serving.redis_url)")
    return service.store


def _who(request: Request) -> str:
    return request.client.host if request.client else "unknown"
