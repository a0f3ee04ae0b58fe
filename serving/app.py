"""The rails API: `POST /v1/rails/{rail}`, `/healthz`, `/readyz`, `/metrics`.

    uvicorn --factory serving.app:create_app --port 8090      (or `railtower serve`)

The route parses the request and hands it to `serving.service.RailService`, which holds the
served model and runs the stages. Routes are module-level functions on an APIRouter; each
gets the service (and /readyz the background loops) from `app.state` through a FastAPI
dependency, set by `create_app`. A background thread follows the production pointer and
hot-swaps a promoted bundle; a bundle that fails to load leaves the current one serving.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import torch
from anyio import to_thread
from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from railtower.logs import configure_logging, get_logger
from railtower.production import pointer_path
from railtower.settings import Settings, get_settings
from serving.admin import admin_router
from serving.api_models import RailRequest, RailResponse
from serving.canary_routes import canary_router
from serving.console import console_router
from serving.metrics import Metrics
from serving.published_rules import PublishedRules
from serving.request_checks import BadRequest
from serving.security import (
    BodyLimitMiddleware,
    ClientIdentity,
    RateLimitMiddleware,
    TokenBuckets,
    require_admin,
    require_explain_key,
)
from serving.service import RailService
from serving.shadow import ShadowRunner, build_shadow
from serving.shadow_routes import shadow_router
from serving.user_vectors import TritonUserTower
from state.session_store import SessionStore

log = get_logger(__name__)


def production_pointer(settings: Settings) -> Path:
    return pointer_path(settings.artifacts_dir, settings.promotion, settings.serving.dataset)


def build_service(settings: Settings) -> RailService:
    """The service as configured: bundle (or production pointer), Redis, Triton."""
    s = settings.serving
    if s.torch_threads:
        # One request's session transformer is faster on one thread, and idle OpenMP
        # threads spin against the next request's ranker (see serving.torch_threads).
        torch.set_num_threads(s.torch_threads)
    store = SessionStore.from_settings(s)  # one Redis or a cluster (serving.redis_mode)
    triton = (
        TritonUserTower(s.triton_url, s.triton_model, s.budgets.user_vector_ms / 1000)
        if s.triton_url
        else None
    )
    service = RailService(settings, None, store, triton, Metrics())
    service.load(s.bundle or production_pointer(settings))
    if s.bundle is None:  # a live canary's challenger takes its sessions from the first request
        service.follow_canary(production_pointer(settings))
    # the merchandisers' published rule set, if any, before the first request (API, consumer)
    PublishedRules.for_settings(settings, service.metrics).sync(service)
    # every served impression is logged; sampled sessions also get the shadow arms
    # (its challenger first takes every catalogue record production replayed at load)
    shadow = build_shadow(settings, service.metrics)
    service.watch_catalogue(shadow)
    if isinstance(shadow, ShadowRunner):
        service.settle("shadow challenger loaded")  # the second model's objects, once
    return service


def follow_model(
    settings: Settings,
    service: RailService,
    watchers: Watchers,
    rules: PublishedRules | None = None,
) -> None:
    """Start, on `watchers`, the loops that keep `service` on what production is now, in
    an API process or the refresh consumer (which pre-warms rails under the model the API
    serves):

    - catalogue-watch (serving.catalogue_sync_s): price and stock changes, listings and
      retirements other processes published (an item out of stock or retired leaves every
      rail, cached ones included; a new item is encoded and indexed), a canary's start,
      step or end (railtower/canary.py), and a rule set published through any API process;
    - bundle-watch (serving.reload_interval_s): the production pointer, hot-swapped.

    A pinned bundle (serving.bundle) has no pointer and no canary to follow.
    """
    if rules is None:
        rules = PublishedRules.for_settings(settings, service.metrics)
        rules.sync(service)
    pointer = production_pointer(settings)
    pinned = settings.serving.bundle is not None

    def follow_pointer() -> None:
        if service.reload_if_moved(pointer):
            rules.sync(service)  # a published rule set outranks the new bundle's own

    def follow_catalogue() -> None:
        service.sync_catalogue()
        if not pinned:
            service.follow_canary(pointer)
        rules.sync(service)

    watchers.start("catalogue-watch", settings.serving.catalogue_sync_s, follow_catalogue)
    if not pinned:
        watchers.start("bundle-watch", settings.serving.reload_interval_s, follow_pointer)


def create_app(settings: Settings | None = None, service: RailService | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level)
    service = service or build_service(settings)
    stop = threading.Event()
    rules = PublishedRules.for_settings(settings, service.metrics)
    rules.sync(service)
    watchers = Watchers(stop, service.metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # the pool `run_in_threadpool` takes request threads from (one per event loop)
        to_thread.current_default_thread_limiter().total_tokens = settings.serving.request_threads
        follow_model(settings, service, watchers, rules)
        yield
        stop.set()
        if isinstance(service.observer, ShadowRunner):
            service.observer.close()  # flushes the impressions still buffered

    app = FastAPI(title="Railtower rails API", lifespan=lifespan)
    # what the routes' dependencies read (get_service, get_app_settings, get_watchers)
    app.state.service, app.state.settings, app.state.watchers = service, settings, watchers
    # admin routes, all behind the X-API-Key check (serving/admin.py, serving/security.py)
    app.include_router(admin_router(service, rules))
    # the live canary of serving.dataset: start, hold, resume, advance, abort (same guard)
    app.include_router(canary_router(service, settings))
    guard = settings.security
    if guard.rate_limit_per_s > 0 and guard.rate_limit_burst > 0:
        buckets = TokenBuckets(
            guard.rate_limit_per_s, guard.rate_limit_burst, guard.rate_limit_clients
        )
        app.add_middleware(
            RateLimitMiddleware,
            buckets=buckets,
            metrics=service.metrics,
            identify=ClientIdentity.from_settings(guard),
        )
    # added last, so it runs first: an oversized body is refused before anything reads it
    app.add_middleware(BodyLimitMiddleware, max_bytes=guard.max_body_bytes, metrics=service.metrics)
    if isinstance(service.observer, ShadowRunner):
        # shadow control is an admin route like the others: X-API-Key (serving/security.py)
        app.include_router(shadow_router(service.observer), dependencies=[Depends(require_admin)])
    # the merchandising console: /console and /v1/console/... (serving/console.py)
    app.include_router(console_router(service))
    # error mapping: every 4xx in this API's {"error"} shape, counted
    app.add_exception_handler(BadRequest, bad_request)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, invalid)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.include_router(routes)  # /v1/rails/{rail}, /healthz, /readyz, /metrics
    return app


class Watchers:
    """The API's background loops (bundle pointer, catalogue and rules): each survives any
    exception in a pass (logged and counted), and reports when it last completed one, so
    /readyz turns unready while a loop keeps failing instead of staying 200 on a stale model."""

    def __init__(self, stop: threading.Event, metrics: Metrics) -> None:
        self.stop, self.metrics = stop, metrics
        self.passed: dict[str, float] = {}
        self.intervals: dict[str, float] = {}

    def start(self, name: str, interval_s: float, body: Callable[[], object]) -> None:
        self.passed[name], self.intervals[name] = time.monotonic(), interval_s

        def loop() -> None:
            while not self.stop.wait(interval_s):
                try:
                    body()
                except Exception:  # noqa: BLE001 - the loop must outlive any one pass
                    log.exception("background pass failed; retrying", watcher=name)
                    self.metrics.errors.labels(kind=name).inc()
                    continue
                self.passed[name] = time.monotonic()

        threading.Thread(target=loop, name=name, daemon=True).start()

    def stale(self, limit_s: float) -> dict[str, float]:
        """Loops whose last completed pass is older than `limit_s` (at least three of their
        intervals), with its age in seconds."""
        now = time.monotonic()
        return {
            name: now - at
            for name, at in self.passed.items()
            if now - at > max(limit_s, 3 * self.intervals[name])
        }


# ------------------------------------------------------------------ the routes
# Module-level, the service and the watchers reached through FastAPI dependencies on
# app.state (set by create_app); an async dependency runs on the event loop, no thread hop.


async def get_service(request: Request) -> RailService:
    return request.app.state.service  # type: ignore[no-any-return]


async def get_watchers(request: Request) -> Watchers:
    return request.app.state.watchers  # type: ignore[no-any-return]


async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


Service = Annotated[RailService, Depends(get_service)]
routes = APIRouter()


# Unset fields are left out, so a slot carries `provenance` only when explain=true.
@routes.post("/v1/rails/{rail}", response_model=RailResponse, response_model_exclude_unset=True)
async def rails(
    rail: str,
    body: RailRequest,
    request: Request,
    service: Service,
    explain: bool = False,
    x_api_key: Annotated[str | None, Header()] = None,
) -> Response:
    if explain:  # ?explain=true, the same as "explain": true in the body
        body = body.model_copy(update={"explain": True})
    if body.explain:
        require_explain_key(request, x_api_key)
    # The stages are CPU work (numpy, LightGBM, torch): off the event loop.
    answer = await run_in_threadpool(service.serve, rail, body)
    # Serialised once, here: returned as a model, FastAPI would validate what the service
    # just built from validated parts all over again (the schema stays response_model's).
    return Response(answer.model_dump_json(exclude_unset=True), media_type="application/json")


@routes.get("/healthz")
async def healthz(response: Response) -> dict[str, str]:
    # the worker's PID: with several uvicorn workers on one port, says which one answered
    response.headers["X-Railtower-Pid"] = str(os.getpid())
    return {"status": "ok"}


@routes.get("/readyz")
async def readyz(
    service: Service,
    watchers: Annotated[Watchers, Depends(get_watchers)],
    settings: Annotated[Settings, Depends(get_app_settings)],
) -> JSONResponse:
    loaded = service.loaded
    if loaded is None:
        return JSONResponse({"ready": False, "why": "no model loaded"}, status_code=503)
    stale = watchers.stale(settings.serving.watch_stale_s)
    if stale:
        why = "; ".join(
            f"{name} has not completed a pass for {age:.0f} s: promotions, rules and "
            "stock changes are not followed (see the log)"
            for name, age in stale.items()
        )
        return JSONResponse({"ready": False, "why": why}, status_code=503)
    return JSONResponse(
        {
            "ready": True,
            "model_version": loaded.version,
            "index": loaded.towers is not None,
            "rankers": sorted(loaded.pipeline.rankers),
            "rules": None if loaded.pipeline.rule_set is None else loaded.pipeline.rule_set.name,
        }
    )


@routes.get("/metrics")
async def metrics(service: Service) -> Response:
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# ------------------------------------------------------------------ error mapping


async def bad_request(request: Request, exc: BadRequest) -> JSONResponse:
    request.app.state.service.metrics.errors.labels(kind=f"http_{exc.status}").inc()
    return JSONResponse({"error": exc.message}, status_code=exc.status)


async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    request.app.state.service.metrics.errors.labels(kind="http_422").inc()
    problems = [_problem(e) for e in exc.errors()]
    return JSONResponse(
        {"error": "invalid request: " + "; ".join(problems), "problems": problems},
        status_code=422,
    )


async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
    # FastAPI answers a body it cannot decode (not UTF-8) with a bare {"detail"} 400 that
    # names nothing; say which input is wrong, in this API's {"error"} shape.
    if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
        request.app.state.service.metrics.errors.labels(kind="http_400").inc()
        why = "body: cannot be parsed; send UTF-8 JSON"
        return JSONResponse({"error": why, "problems": [why]}, status_code=400)
    return await http_exception_handler(request, exc)


def _problem(error: dict[str, Any]) -> str:
    """One validation error as "<field>: why", the field dotted from its location."""
    if error["type"] == "json_invalid":
        # not JSON at all: FastAPI puts the character offset where the field would be
        why = error.get("ctx", {}).get("error", error["msg"])
        return f"body: not valid JSON at character {error['loc'][-1]} ({why})"
    path = [str(p) for p in error["loc"] if p != "body"]
    if error["type"] == "extra_forbidden" and path:
        # the location is the unexpected key itself: name the object that refused it too
        return f"{'.'.join(path[:-1]) or 'body'}: unknown field {path[-1]!r} is not allowed"
    return f"{'.'.join(path) or 'body'}: {error['msg']}"
