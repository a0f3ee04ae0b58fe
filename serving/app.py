"""The rails API: `POST /v1/rails/{rail}`, `/healthz`, `/readyz`, `/metrics`.

    uvicorn --factory serving.app:create_app --port 8090      (or `railtower serve`)

The route parses the request and hands it to `serving.service.RailService`, which holds the
served model and runs the stages. A background thread follows the production pointer and
hot-swaps a promoted bundle; a bundle that fails to load leaves the current one serving.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from railtower.logs import configure_logging, get_logger
from railtower.settings import Settings, get_settings
from serving.api_models import RailRequest, RailResponse
from serving.metrics import Metrics
from serving.service import BadRequest, RailService
from serving.session_store import SessionStore
from serving.user_vectors import TritonUserTower

log = get_logger(__name__)


def production_pointer(settings: Settings) -> Path:
    return settings.artifacts_dir / settings.promotion.pointer_dir / settings.serving.dataset


def build_service(settings: Settings) -> RailService:
    """The service as configured: bundle (or production pointer), Redis, Triton."""
    s = settings.serving
    store = SessionStore(
        s.redis_url, s.budgets.redis_ms / 1000, s.session_events, s.state_ttl_s, s.prewarm_ttl_s
    )
    triton = (
        TritonUserTower(s.triton_url, s.triton_model, s.budgets.user_vector_ms / 1000)
        if s.triton_url
        else None
    )
    service = RailService(settings, None, store, triton, Metrics())
    service.load(s.bundle or production_pointer(settings))
    return service


def create_app(settings: Settings | None = None, service: RailService | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level)
    service = service or build_service(settings)
    stop = threading.Event()

    def follow_pointer() -> None:
        pointer = production_pointer(settings)
        while not stop.wait(settings.serving.reload_interval_s):
            service.reload_if_moved(pointer)

    def follow_catalogue() -> None:
        # Price and stock changes published by the consumer reach this process within a
        # second: an item out of stock leaves every rail, cached ones included.
        while not stop.wait(1.0):
            service.sync_catalogue()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=follow_catalogue, name="catalogue-watch", daemon=True).start()
        if settings.serving.bundle is None:
            threading.Thread(target=follow_pointer, name="bundle-watch", daemon=True).start()
        yield
        stop.set()

    app = FastAPI(title="Railtower rails API", lifespan=lifespan)
    app.state.service = service

    @app.exception_handler(BadRequest)
    async def bad_request(_: Request, exc: BadRequest) -> JSONResponse:
        service.metrics.errors.labels(kind=f"http_{exc.status}").inc()
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        service.metrics.errors.labels(kind="http_422").inc()
        problems = [
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
            for e in exc.errors()
        ]
        return JSONResponse(
            {"error": "invalid request: " + "; ".join(problems), "problems": problems},
            status_code=422,
        )

    @app.post("/v1/rails/{rail}", response_model=RailResponse)
    async def rails(rail: str, body: RailRequest) -> RailResponse:
        # The stages are CPU work (numpy, LightGBM, torch): off the event loop.
        return await run_in_threadpool(service.serve, rail, body)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        loaded = service.loaded
        if loaded is None:
            return JSONResponse({"ready": False, "why": "no model loaded"}, status_code=503)
        return JSONResponse(
            {
                "ready": True,
                "model_version": loaded.version,
                "index": loaded.towers is not None,
                "rankers": sorted(loaded.pipeline.rankers),
                "rules": None
                if loaded.pipeline.rule_set is None
                else loaded.pipeline.rule_set.name,
            }
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
