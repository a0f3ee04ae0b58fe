"""The merchandising console: one page, and the read and compare routes behind it.

    GET  /console                             the page (serving/console/index.html)
    GET  /v1/console/features                 which optional admin routes this API has
    GET  /v1/console/items?ids=a,b            title, category, price, brand, stock per item
    GET  /v1/console/items/{item_id}/image    the catalogue's photo of one item
    GET  /v1/console/sessions?limit=20        recent sessions with state in Redis     (admin)
    GET  /v1/console/rules/current            the served rule set as editable JSON    (admin)
    POST /v1/console/rules/compare            candidate vs served rules on sessions   (admin)
    GET  /v1/console/zero-impressions?days=7  catalogue items nobody was shown        (admin)

The page previews rails through the public `POST /v1/rails/{rail}`, validates and publishes
through the admin routes (`serving/admin.py`), reads the shadow report
(`serving/shadow.py`) and shows the live canary with its history, hold and abort
(`serving/canary_routes.py`) where those exist. The comparison runs each sampled session through
the served stages once, up to MMR, then applies both rule sets to the same ranked list, so
the only difference it shows is the rules' (serving/rules_compare.py); the session list is
serving/console_sessions.py. This module keeps the routes and the catalogue views.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import redis
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from railtower.errors import RuleSetError
from railtower.schemas import CATEGORY_SEPARATOR
from ranking.item_attributes import ItemInfo
from ranking.rules import RuleSet
from serving.console_sessions import SessionView, loaded_model, recent_sessions
from serving.impressions import items_without_impressions
from serving.published_rules import parse_rule_set, rule_errors
from serving.rail_service import LoadedRails
from serving.request_checks import BadRequest
from serving.rules_compare import CompareRequest, CompareResponse, compare_rules, rule_set_label
from serving.security import require_admin
from serving.service import RailService

PAGE = Path(__file__).parent / "console" / "index.html"
# Only files that are pictures leave the server, whatever a catalogue row says.
IMAGE_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
}
# Optional routes written elsewhere; the page calls them only when this API has them.
OPTIONAL_ROUTES = {
    "validate": ("POST", "/v1/admin/rules/validate"),
    "publish": ("POST", "/v1/admin/rules"),
    "shadow_report": ("GET", "/v1/admin/shadow/report"),
    "shadow_rules": ("POST", "/v1/admin/shadow/rules"),
    "canary": ("GET", "/v1/admin/canary"),
}
_NUMERIC_CATEGORY = re.compile(r"^(category-)?\d+$")


# ------------------------------------------------------------------------------ the bodies


class ItemView(BaseModel):
    item_id: str
    # what the page calls the item: its title, else brand and leaf category (REES46 has no
    # titles), else its id
    name: str
    title: str | None
    category: str | None
    brand: str | None
    price: float | None
    stock: int | None
    has_image: bool


class ItemsResponse(BaseModel):
    items: list[ItemView]
    # ids the served catalogue does not have (a typo, or a delisted item)
    unknown: list[str]


# ------------------------------------------------------------------------------ the routes


def console_router(service: RailService) -> APIRouter:
    """The console's routes over the served model; mount with `app.include_router`."""
    router = APIRouter()
    admin = [Depends(require_admin)]

    @router.get("/console", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(PAGE, media_type="text/html")

    @router.get("/v1/console/features")
    async def features(request: Request) -> dict[str, bool]:
        # The OpenAPI paths, not app.routes: FastAPI keeps included routers nested there.
        paths = request.app.openapi()["paths"]
        return {
            name: method.lower() in paths.get(path, {})
            for name, (method, path) in OPTIONAL_ROUTES.items()
        }

    @router.get("/v1/console/items", response_model=ItemsResponse)
    async def items(ids: str = Query(min_length=1, max_length=20_000)) -> ItemsResponse:
        loaded = loaded_model(service)
        wanted = list(dict.fromkeys(i.strip() for i in ids.split(",") if i.strip()))
        if len(wanted) > 200:
            raise BadRequest(422, f"at most 200 ids per request, got {len(wanted)}")
        known = [i for i in wanted if i in loaded.catalogue.index]
        return ItemsResponse(
            items=[item_view(loaded, i) for i in known],
            unknown=[i for i in wanted if i not in loaded.catalogue.index],
        )

    @router.get("/v1/console/items/{item_id}/image", include_in_schema=False)
    async def image(item_id: str) -> FileResponse:
        loaded = loaded_model(service)
        if item_id not in loaded.catalogue.index:
            raise BadRequest(404, f"item {item_id!r} is not in the catalogue")
        path = image_file(loaded, item_id)
        if path is None:
            raise BadRequest(404, f"item {item_id!r} has no image in the catalogue")
        return FileResponse(path, media_type=IMAGE_TYPES[path.suffix.lower()])

    @router.get("/v1/console/sessions", response_model=list[SessionView], dependencies=admin)
    async def sessions(limit: int = Query(20, ge=1, le=200)) -> list[SessionView]:
        return await run_in_threadpool(recent_sessions, service, limit)

    @router.get("/v1/console/rules/current", dependencies=admin)
    async def current_rules() -> dict[str, str]:
        rule_set = loaded_model(service).pipeline.rules
        return {"label": rule_set_label(rule_set), "text": rule_set_text(rule_set)}

    @router.post("/v1/console/rules/compare", response_model=CompareResponse, dependencies=admin)
    async def compare(body: CompareRequest) -> CompareResponse | JSONResponse:
        try:
            proposed = parse_rule_set(body.rules_text)  # text only: never a path on this server
        except RuleSetError as exc:
            # The same shape as POST /v1/admin/rules/validate, so the page shows both alike.
            return JSONResponse({"valid": False, "errors": rule_errors(exc)}, status_code=422)
        return await run_in_threadpool(compare_rules, service, proposed, body)

    @router.get("/v1/console/zero-impressions", dependencies=admin)
    async def zero_impressions(
        days: int = Query(7, ge=1, le=90), limit: int = Query(200, ge=1, le=5000)
    ) -> dict[str, object]:
        loaded, store = loaded_model(service), service.store
        if store is None:
            raise BadRequest(503, "no Redis configured: impressions are counted there")
        ids = [str(i) for i in loaded.catalogue.ids]
        try:
            unseen = await run_in_threadpool(
                items_without_impressions, store.client, ids, days, datetime.now(UTC)
            )
        except redis.RedisError as exc:
            raise BadRequest(503, f"Redis is not answering ({type(exc).__name__})") from None
        return {
            "days": days,
            "catalogue": len(ids),
            "total": len(unseen),
            "items": [item_view(loaded, i).model_dump() for i in unseen[:limit]],
        }

    return router


# ------------------------------------------------------------------------------ items


def item_view(loaded: LoadedRails, item_id: str) -> ItemView:
    """What the page shows about one catalogue item (None where the catalogue does not say)."""
    info = loaded.pipeline.attributes.get(item_id)
    title = loaded.titles.get(item_id)
    return ItemView(
        item_id=item_id,
        name=display_name(item_id, title, info),
        title=title,
        category=None if info is None else info.category_path,
        brand=None if info is None else info.brand,
        price=None if info is None else info.price,
        stock=None if info is None else info.stock,
        has_image=image_file(loaded, item_id) is not None,
    )


def display_name(item_id: str, title: str | None, info: ItemInfo | None) -> str:
    """A name a merchandiser recognises: the title, else e.g. "Samsung smartphone".

    Example:
        >>> display_name("42", None, None)
        'Item 42'
    """
    if title:
        return title
    brand = (info.brand or "").strip() if info is not None else ""
    path = (info.category_path or "") if info is not None else ""
    leaf = path.split(CATEGORY_SEPARATOR)[-1].strip()
    if _NUMERIC_CATEGORY.match(leaf):  # REES46's numeric category ids say nothing to a person
        leaf = ""
    words = " ".join(w for w in (brand.title(), leaf) if w)
    return words or f"Item {item_id}"


_IMAGES: dict[int, dict[str, str]] = {}


def image_file(loaded: LoadedRails, item_id: str) -> Path | None:
    """The catalogue's image file of an item, if it names one that exists and is a picture.

    The path comes from the served catalogue only, never from the request, so the route
    cannot be pointed at any other file.
    """
    frame = loaded.rails.items
    if "image_path" not in frame.columns:
        return None
    # One dict per served catalogue frame (H&M has ~100k rows: no scan per request).
    paths = _IMAGES.get(id(frame))
    if paths is None:
        paths = {
            str(i): p
            for i, p in zip(frame["item_id"], frame["image_path"], strict=True)
            if isinstance(p, str) and p
        }
        _IMAGES.clear()  # the previous model's catalogue is no longer served
        _IMAGES[id(frame)] = paths
    raw = paths.get(item_id)
    if raw is None:
        return None
    path = Path(raw)
    return path if path.suffix.lower() in IMAGE_TYPES and path.is_file() else None


# ------------------------------------------------------------------------------ rules


def rule_set_text(rule_set: RuleSet) -> str:
    """A rule set as the JSON a merchandiser edits: each rule's kind first, unset fields out."""
    data = rule_set.model_dump(mode="json", exclude_none=True)
    data["rules"] = [
        {"kind": rule["kind"], **{k: v for k, v in rule.items() if k != "kind"}}
        for rule in data["rules"]
    ]
    return json.dumps(data, indent=2, ensure_ascii=False)
