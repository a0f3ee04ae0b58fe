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
through the admin routes (`serving/admin.py`) and reads the shadow report
(`serving/shadow.py`) where those exist. The comparison runs each sampled session through
the served stages once, up to MMR, then applies both rule sets to the same ranked list, so
the only difference it shows is the rules'.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import redis
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from railtower.errors import RuleSetError
from railtower.schemas import CATEGORY_SEPARATOR
from ranking.engine import rerule
from ranking.item_attributes import ItemInfo
from ranking.rail_inputs import RAIL_INPUTS, rail_parts
from ranking.retriever import Query as RailQuery
from ranking.rules import RuleSet
from serving.api_models import RailRequest
from serving.impressions import items_without_impressions
from serving.published_rules import parse_rule_set, rule_errors
from serving.rail_service import LoadedRails
from serving.request_checks import BadRequest
from serving.security import require_admin
from serving.service import RailService
from serving.stages import Ranker, Trace, build_query, in_process_vector, run_stages
from towers.session_features import HistoryEvent

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
}
# The rails a session's own events define (its page: last item; its cart: carted items).
PREVIEW_RAILS = ("homepage_hero", "pdp_fbt", "cart_upsell")
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


class SessionView(BaseModel):
    session_id: str
    events: int
    last_event_at: datetime | None
    # what the pdp_fbt and cart_upsell previews and the comparison use for this session
    last_item: str | None
    cart: list[str]


class CompareRequest(BaseModel):
    """A candidate rule set as typed (so error lines match the editor) and the sessions."""

    rules_text: str = Field(min_length=1, max_length=65_536)
    session_ids: list[str] = Field(default_factory=list, max_length=200)
    # recent sessions added after the named ones, up to this many sessions in all
    sample: int = Field(20, ge=1, le=200)
    slots: int | None = Field(None, ge=1, le=100)


class Moved(BaseModel):
    item_id: str
    current_slot: int
    proposed_slot: int


class SessionDiff(BaseModel):
    session_id: str
    rail: str
    current: list[str]
    proposed: list[str]
    added: list[str]
    removed: list[str]
    moved: list[Moved]


class ItemCount(BaseModel):
    item_id: str
    sessions: int


class RailSummary(BaseModel):
    rail: str
    sessions: int
    sessions_changed: int
    slots: int
    slots_changed: int
    # slots_changed / slots: how much of what shoppers see on this rail would differ
    changed_share: float
    added: list[ItemCount]
    removed: list[ItemCount]


class Skipped(BaseModel):
    session_id: str
    why: str


class CompareResponse(BaseModel):
    current: str
    proposed: str
    model_version: str
    sessions: list[str]
    skipped: list[Skipped]
    rails: list[RailSummary]
    # only the (session, rail) pairs whose slots differ
    changes: list[SessionDiff]


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
        loaded = _loaded(service)
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
        loaded = _loaded(service)
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
        rule_set = _loaded(service).pipeline.rules
        return {"label": _label(rule_set), "text": rule_set_text(rule_set)}

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
        loaded, store = _loaded(service), service.store
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


def _loaded(service: RailService) -> LoadedRails:
    loaded = service.loaded
    if loaded is None:
        raise BadRequest(503, "no model loaded yet; see /readyz")
    return loaded


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


# ------------------------------------------------------------------------------ sessions


def session_targets(
    events: Sequence[HistoryEvent], index: dict[str, int]
) -> tuple[str | None, list[str]]:
    """The product page and cart a session stands for: its last item, its carted items.

    A session without a cart event previews cart_upsell with its last item in the cart.
    """
    known = [e for e in events if e.item_id in index]
    last = known[-1].item_id if known else None
    cart = list(dict.fromkeys(e.item_id for e in known if e.event_type == "cart"))
    return last, cart or ([last] if last else [])


def recent_sessions(service: RailService, limit: int) -> list[SessionView]:
    """Sessions with state in Redis, the most recent last event first.

    Reads at most 20 x `limit` session keys (a SCAN, never KEYS), so a large store stays
    responsive; the newest of those are returned.
    """
    loaded, store = _loaded(service), service.store
    if store is None:
        raise BadRequest(503, "no Redis configured: sessions live there")
    try:
        sessions = store.scan_sessions(20 * limit)
    except redis.RedisError as exc:
        raise BadRequest(503, f"Redis is not answering ({type(exc).__name__})") from None
    views = []
    for session_id, history in sessions:
        last, cart = session_targets(history, loaded.catalogue.index)
        newest = max(e.time_s for e in history)
        views.append(
            SessionView(
                session_id=session_id,
                events=len(history),
                last_event_at=datetime.fromtimestamp(newest, UTC) if newest > 0 else None,
                last_item=last,
                cart=cart,
            )
        )
    views.sort(key=lambda v: v.last_event_at or datetime.min.replace(tzinfo=UTC), reverse=True)
    return views[:limit]


# ------------------------------------------------------------------------------ rules


def rule_set_text(rule_set: RuleSet) -> str:
    """A rule set as the JSON a merchandiser edits: each rule's kind first, unset fields out."""
    data = rule_set.model_dump(mode="json", exclude_none=True)
    data["rules"] = [
        {"kind": rule["kind"], **{k: v for k, v in rule.items() if k != "kind"}}
        for rule in data["rules"]
    ]
    return json.dumps(data, indent=2, ensure_ascii=False)


def _label(rule_set: RuleSet) -> str:
    return f"{rule_set.name}@{rule_set.version}"


def compare_rules(service: RailService, proposed: RuleSet, body: CompareRequest) -> CompareResponse:
    """Each rail of each sampled session under the served rules and under `proposed`.

    Sessions are the named ones, then the most recent others, up to `body.sample`. Each
    (session, rail) is ranked once through the served stages (towers, fusion, re-ranker,
    MMR); both rule sets then go through the served rules stage over that same list, with
    the request's exclusions and the popular fill, so a difference is the rules' alone.
    """
    loaded = _loaded(service)  # one model for the whole comparison
    store = service.store
    if store is None:
        raise BadRequest(503, "no Redis configured: the sessions to compare on live there")
    slots = body.slots or service.settings.evaluation.slots
    named = list(dict.fromkeys(body.session_ids))
    wanted = named + [
        v.session_id for v in recent_sessions(service, body.sample) if v.session_id not in named
    ]
    wanted = wanted[: max(body.sample, len(named))]
    current = loaded.pipeline.rules
    # Served rules explicitly: a publish during the comparison does not change its baseline.
    served_model = replace(loaded, pipeline=loaded.pipeline.with_rules(current))
    proposed_pipeline = loaded.pipeline.with_rules(proposed)

    summaries, changes, skipped = [], [], []
    diffs: dict[str, list[SessionDiff]] = {rail: [] for rail in PREVIEW_RAILS}
    for session_id in wanted:
        try:
            snapshot = store.snapshot(session_id, loaded.version, None)
        except redis.RedisError as exc:
            raise BadRequest(503, f"Redis is not answering ({type(exc).__name__})") from None
        last, cart = session_targets(snapshot.events, loaded.catalogue.index)
        if last is None:
            skipped.append(Skipped(session_id=session_id, why="no events of catalogue items"))
            continue
        for rail in PREVIEW_RAILS:
            # the page product and cart only where the rail reads them (ranking.rail_inputs)
            parts = rail_parts(rail, last, cart if RAIL_INPUTS[rail].cart else ())
            request = RailRequest(
                session_id=session_id,
                user_id=None,
                item_id=parts[0],
                cart=list(parts[1]),
                slots=slots,
                context=None,
            )
            # The served stages (serving/stages.py), under the served rules; the proposed
            # rules then judge the very list the served rules stage read.
            query = build_query(request, snapshot, parts, rail, service.settings.serving.exclusions)
            served = run_stages(
                served_model,
                rail,
                query,
                slots,
                in_process_vector(loaded, query),
                _ranker(loaded, rail, query),
                Trace(),
            )
            after = rerule(proposed_pipeline, rail, served.before_rules, query, slots)
            old, new = [c.item_id for c in served.slots], [c.item_id for c in after]
            diffs[rail].append(_diff(session_id, rail, old, new))
    for rail, rail_diffs in diffs.items():
        summaries.append(_summary(rail, rail_diffs))
        changes += [d for d in rail_diffs if d.current != d.proposed]
    return CompareResponse(
        current=_label(current),
        proposed=_label(proposed),
        model_version=loaded.version,
        sessions=[s for s in wanted if s not in {k.session_id for k in skipped}],
        skipped=skipped,
        rails=summaries,
        changes=changes,
    )


def _ranker(loaded: LoadedRails, rail: str, query: RailQuery) -> Ranker:
    """The re-ranker without the served path's time budget: a comparison waits for it, so a
    slow moment cannot show a difference that is the budget's and not the rules'."""
    return lambda table: loaded.pipeline.ranker_scores(rail, table, [query])


def _diff(session_id: str, rail: str, old: list[str], new: list[str]) -> SessionDiff:
    return SessionDiff(
        session_id=session_id,
        rail=rail,
        current=old,
        proposed=new,
        added=[i for i in new if i not in old],
        removed=[i for i in old if i not in new],
        moved=[
            Moved(item_id=i, current_slot=old.index(i) + 1, proposed_slot=new.index(i) + 1)
            for i in new
            if i in old and old.index(i) != new.index(i)
        ],
    )


def _summary(rail: str, diffs: Sequence[SessionDiff]) -> RailSummary:
    slots = sum(max(len(d.current), len(d.proposed)) for d in diffs)
    changed = sum(
        sum(
            1
            for k in range(max(len(d.current), len(d.proposed)))
            if k >= len(d.current) or k >= len(d.proposed) or d.current[k] != d.proposed[k]
        )
        for d in diffs
    )
    added = Counter(i for d in diffs for i in d.added)
    removed = Counter(i for d in diffs for i in d.removed)
    return RailSummary(
        rail=rail,
        sessions=len(diffs),
        sessions_changed=sum(d.current != d.proposed for d in diffs),
        slots=slots,
        slots_changed=changed,
        changed_share=changed / slots if slots else 0.0,
        added=[ItemCount(item_id=i, sessions=n) for i, n in added.most_common()],
        removed=[ItemCount(item_id=i, sessions=n) for i, n in removed.most_common()],
    )
