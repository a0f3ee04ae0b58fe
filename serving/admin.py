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

Publishing writes `<artifacts>/rules/<serving.dataset>/published.json` in one rename (every
version is also kept under `history/`), so every API process on these artifacts picks it up
from the file within a second (`PublishedRules.sync`, called by serving.app's watch loop).
A published rule set replaces the bundle's own rules, including in bundles promoted later.
Pre-warmed rails computed under other rules are not served once it is in force: the rules'
version is part of the rail marker (state.session_store), so they are recomputed.

Promotion runs the offline gate in a child process (`railtower promote --json`, see
`promote_in_child`); rollback moves the pointer in this process (railtower.production),
which needs no evaluation code. This module never imports training/.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
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
from ranking.rule_set import RuleSet, load_rule_set
from serving.metrics import Metrics
from serving.request_checks import BadRequest
from serving.security import require_admin
from serving.service import RailService
from state.session_store import Deletion, SessionStore

log = get_logger(__name__)

PUBLISHED = "published.json"
# "line 12, rules[3].slot: why" and "line 2, column 5: not valid JSON: why", as
# ranking.rule_set.load_rule_set words its problems.
_JSON_PROBLEM = re.compile(r"^line (\d+), (column \d+: .*)$", re.DOTALL)
_PROBLEM = re.compile(r"^line (\d+), (.+?): (.*)$", re.DOTALL)


# ------------------------------------------------------------------------------ rule sets


def parse_rule_set(text: str) -> RuleSet:
    """Validate rule-set JSON text (never a path: a request body must not name a file).

    Raises:
        RuleSetError: the text is not a JSON object or breaks the schema (line/field/why).
    """
    if not text.lstrip().startswith(("{", "[")):
        why = "a rule set is a JSON object with name, version, rails and rules"
        raise RuleSetError("<request body>", [f"line 1, rule set: {why}"])
    return load_rule_set(text)


def rule_errors(exc: RuleSetError) -> list[dict[str, Any]]:
    """The problems of a refused rule set as `{"line", "field", "why"}` (field None for
    the document as a whole)."""
    errors: list[dict[str, Any]] = []
    for problem in exc.problems:
        json_problem, match = _JSON_PROBLEM.match(problem), _PROBLEM.match(problem)
        if json_problem is not None:
            errors.append({"line": int(json_problem[1]), "field": None, "why": json_problem[2]})
        elif match is not None:
            field = None if match[2] == "rule set" else match[2]
            errors.append({"line": int(match[1]), "field": field, "why": match[3]})
        else:  # a wording this parser does not know: keep the whole text
            errors.append({"line": None, "field": None, "why": problem})
    return errors


def rule_summary(rule_set: RuleSet) -> dict[str, Any]:
    kinds: dict[str, int] = {}
    for rule in rule_set.rules:
        kinds[rule.kind] = kinds.get(rule.kind, 0) + 1
    return {
        "name": rule_set.name,
        "version": rule_set.version,
        "rails": list(rule_set.rails),
        "rules": len(rule_set.rules),
        "kinds": kinds,
    }


@dataclass(frozen=True)
class Publication:
    """A published rule set: its text's hash is its version, the same in every process."""

    version: str
    published_at: str
    rule_set: RuleSet
    path: Path


class PublishedRules:
    """The published rule set of one data set, on disk, and the one each process serves.

    Args:
        folder: `<artifacts>/rules/<data set>`: `published.json` and `history/`.
        metrics: counts a published file that fails to load (`errors{kind="rules_load"}`).
    """

    def __init__(self, folder: Path, metrics: Metrics) -> None:
        self.folder, self.metrics = folder, metrics
        self.path, self.history = folder / PUBLISHED, folder / "history"
        self._lock = threading.Lock()
        self._signature: tuple[int, int, int] | None = None
        self._publication: Publication | None = None
        self._applied: tuple[int, str | None] | None = None  # (id of the model, version)

    @classmethod
    def for_settings(cls, settings: Settings, metrics: Metrics) -> PublishedRules:
        return cls(settings.artifacts_dir / "rules" / settings.serving.dataset, metrics)

    @property
    def publication(self) -> Publication | None:
        """The publication this process last read (None: nothing published)."""
        return self._publication

    def publish(self, text: str) -> Publication:
        """Validate `text` and make it the published rule set, atomically.

        The version is kept under `history/` first, then `published.json` is replaced in
        one rename: a reader sees the old file or the new one, never half of one.

        Raises:
            RuleSetError: the text is not a valid rule set (nothing is written).
        """
        rule_set = parse_rule_set(text)
        version = hashlib.sha256(text.encode()).hexdigest()[:16]
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        self.history.mkdir(parents=True, exist_ok=True)
        _write_atomically(self.history / f"{stamp}-{version}.json", text)
        _write_atomically(self.path, text)
        log.info("rule set published", version=version, name=rule_set.name, path=str(self.path))
        return Publication(version, _mtime_iso(self.path), rule_set, self.path)

    def sync(self, service: RailService) -> bool:
        """Serve the published rule set in `service` if it, or the served model, changed.

        Cheap when nothing changed (one stat). A published file that fails to load is
        logged and counted, and the last good rules keep serving. Without a published
        file the bundle's own rules serve. Returns True when the served rules changed.
        """
        with self._lock:
            loaded = service.loaded
            if loaded is None:
                return False
            self._read_if_changed()
            publication = self._publication
            version = None if publication is None else publication.version
            if self._applied == (id(loaded), version):
                return False
            # One attribute assignment: a request reads the rule set once (the engine's rules
            # stage), so it uses the old rules or the new ones, never a mix.
            loaded.pipeline.rule_set = (
                loaded.rails.rule_set if publication is None else publication.rule_set
            )
            if service.store is not None:
                # Rules first, then the marker: a rail whose snapshot carries the new epoch
                # was ranked under the new rules. The model version is part of the epoch,
                # so rails a newly loaded bundle warmed under its own rules expire too.
                epoch = None if version is None else f"{version}/{loaded.version}"
                service.store.rules_epoch = epoch
            self._applied = (id(loaded), version)
            rule_set = loaded.pipeline.rule_set
            log.info(
                "serving rule set",
                published_version=version,
                name=None if rule_set is None else rule_set.name,
                model_version=loaded.version,
            )
            return True

    def _read_if_changed(self) -> None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._signature, self._publication = None, None
            return
        # A publish is a rename, so the inode changes even within one mtime tick.
        signature = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if signature == self._signature:
            return
        self._signature = signature
        try:
            text = self.path.read_text(encoding="utf-8-sig")
            rule_set = parse_rule_set(text)
        except (OSError, UnicodeDecodeError, RuleSetError) as exc:
            self.metrics.errors.labels(kind="rules_load").inc()
            log.error("published rule set not loaded; keeping the current rules", error=str(exc))
            return
        version = hashlib.sha256(text.encode()).hexdigest()[:16]
        self._publication = Publication(version, _mtime_iso(self.path), rule_set, self.path)


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with temporary.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(temporary, path)


def _mtime_iso(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat(timespec="seconds")


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
