"""Exclusions, blocks and out-of-stock hold on every path a rail can take (property-based).

Hypothesis draws a rail, a path, a shopper session (real REES46 items, some purchased), a
random rule set (pins, boosts, buries, blocks, margin floors), a random stock state and a
random `exclude` list, then asks the real trained bundle for the rail through one of:

- cache: a real Redis; the consumer's `prewarm` warms the hero rail first, then the rules and
  stock change and the request excludes some of the warmed items;
- computed: a real Redis, the rail computed in-process;
- redis_down: a session store pointed at a closed port (real connection errors);
- triton_down: a Triton client pointed at a closed port (real gRPC errors);
- compute_failed: a candidate source that raises, so the popular-under-rules fallback serves
  (the one injected fault: nothing real fails there on demand).

Every answer must hold no excluded (request, page, cart, purchased in the window), blocked,
below-margin-floor or out-of-stock item, and at least min(slots, eligible items) slots.
The catalogue gets seeded margins and a known stock for every item, so margin floors and
stock changes bite and each example's stock can be restored.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from devstack.local_services import free_port, redis_server
from railtower.settings import RAILS, ExclusionSettings
from ranking.item_attributes import ItemAttributes
from ranking.rule_set import BlockRule, MarginFloorRule, RuleSet
from serving.api_models import RailRequest
from serving.metrics import Metrics
from serving.rail_service import LoadedRails, load_rails
from serving.service import RailService
from serving.stages import build_query
from serving.user_vectors import TritonUserTower
from state.session_store import SessionStore
from towers.session_features import HistoryEvent

pytestmark = pytest.mark.integration

PATHS = ("cache", "computed", "redis_down", "triton_down", "compute_failed")
WINDOW_H = 1.0  # serving.exclusions.purchased_window_h in these tests
STOCK = 5  # every item's stock unless an example sets it to 0
T0 = 1569890000.0


class _BrokenSource:
    """A candidate source whose backend is gone: every call raises."""

    name = "covisitation"

    def candidates(self, queries, k):  # type: ignore[no-untyped-def]  # noqa: ARG002
        raise ConnectionError("co-visitation store unreachable")


@pytest.fixture(scope="module")
def world(trained_rees46, tmp_path_factory):
    """One loaded model shared by a service per path; yields (services, loaded, pools)."""
    settings, bundle = trained_rees46
    plain = settings
    exclusions = ExclusionSettings(
        purchased_window_h=WINDOW_H, rails=["homepage_hero", "cart_upsell"]
    )
    serving = settings.serving.model_copy(update={"exclusions": exclusions})
    settings = settings.model_copy(update={"serving": serving})
    loaded = load_rails(bundle, settings)
    loaded.pipeline.attributes = _with_margins_and_stock(loaded, settings.towers.price_bands)
    port = free_port()
    server = redis_server(port, tmp_path_factory.mktemp("redis")).start()
    store = SessionStore(f"redis://127.0.0.1:{port}/0", 2.0, 50, 600, 600)
    dead_store = SessionStore(f"redis://127.0.0.1:{free_port()}/0", 0.2, 50, 600, 600)
    dead_triton = TritonUserTower(f"127.0.0.1:{free_port()}", "user_tower", 0.5)
    broken = dataclasses.replace(
        loaded,
        pipeline=dataclasses.replace(
            loaded.pipeline, sources={**loaded.pipeline.sources, "covisitation": _BrokenSource()}
        ),
    )
    services = {
        "cache": RailService(settings, loaded, store, None, Metrics()),
        "computed": RailService(settings, loaded, store, None, Metrics()),
        "redis_down": RailService(settings, loaded, dead_store, None, Metrics()),
        "triton_down": RailService(settings, loaded, store, dead_triton, Metrics()),
        "compute_failed": RailService(settings, broken, store, None, Metrics()),
        # the shipped default: no purchased-items exclusion
        "plain": RailService(plain, loaded, store, None, Metrics()),
    }
    popular = loaded.pipeline.stats.item_ids[
        np.argsort(-loaded.pipeline.stats.popularity, kind="stable")
    ].tolist()
    items = loaded.pipeline.attributes
    categories = sorted(
        {i.category_path for i in map(items.get, popular[:300]) if i and i.category_path}
    )
    brands = sorted({i.brand for i in map(items.get, popular[:300]) if i and i.brand})
    yield (
        services,
        loaded,
        broken,
        {"items": popular[:150], "categories": categories, "brands": brands},
    )
    server.stop()


def _with_margins_and_stock(loaded: LoadedRails, price_bands: int) -> ItemAttributes:
    frame = loaded.rails.items.copy()
    rng = np.random.default_rng(11)
    frame["margin"] = rng.uniform(0.0, 0.6, len(frame)).round(3)
    frame["stock"] = STOCK
    return ItemAttributes.from_frame(frame, price_bands)


# ------------------------------------------------------------------------------ strategies


@st.composite
def rule_sets(draw, pools) -> RuleSet:  # type: ignore[no-untyped-def]
    item = st.sampled_from(pools["items"])
    target = st.one_of(
        item.map(lambda i: {"item_id": i}),
        st.sampled_from(pools["categories"]).map(lambda c: {"category": c}),
        st.sampled_from(pools["brands"]).map(lambda b: {"brand": b}),
    )
    rules = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["pin", "boost", "bury", "block", "margin_floor"]))
        if kind == "pin":
            rules.append({"kind": "pin", "item_id": draw(item), "slot": draw(st.integers(1, 14))})
        elif kind == "boost":
            rules.append({"kind": "boost", "factor": draw(st.floats(1.1, 5.0)), **draw(target)})
        elif kind == "bury":
            rules.append({"kind": "bury", "factor": draw(st.floats(0.1, 0.9)), **draw(target)})
        elif kind == "block":
            rules.append({"kind": "block", **draw(target)})
        else:
            rules.append({"kind": "margin_floor", "min_margin": draw(st.floats(0.0, 0.5))})
    # pins may not share a slot or an item (validation refuses it): keep the first of each
    seen_slots, seen_items, kept = set(), set(), []
    for rule in rules:
        if rule["kind"] == "pin":
            if rule["slot"] in seen_slots or rule["item_id"] in seen_items:
                continue
            seen_slots.add(rule["slot"])
            seen_items.add(rule["item_id"])
        kept.append(rule)
    rails = draw(st.sets(st.sampled_from(RAILS), min_size=1))
    return RuleSet.model_validate(
        {"name": "random", "version": "1", "rails": sorted(rails), "rules": kept}
    )


@st.composite
def sessions(draw, pools) -> list[HistoryEvent]:  # type: ignore[no-untyped-def]
    n = draw(st.integers(0, 6))
    items = draw(st.lists(st.sampled_from(pools["items"][:80]), min_size=n, max_size=n))
    kinds = draw(st.lists(st.sampled_from(["view", "cart", "purchase"]), min_size=n, max_size=n))
    gaps = draw(st.lists(st.floats(0.0, 2.0 * 3600), min_size=n, max_size=n))
    times = list(itertools.accumulate(gaps, initial=T0))[1:]
    return [HistoryEvent(i, k, t) for i, k, t in zip(items, kinds, times, strict=True)]


# ------------------------------------------------------------------------------ helpers

_counter = itertools.count()


def _forbidden(loaded, rail, request, events, rule_set) -> set[str]:  # type: ignore[no-untyped-def]
    """Every item the answer must not hold, judged here from the rules' own definitions
    (the random rules carry no validity window, so every rule is active). `events` is the
    session state the service could read (none when Redis is down)."""
    attributes = loaded.pipeline.attributes
    out = set(request.exclude) | set(request.cart)
    if rail == "pdp_fbt":
        out.add(request.item_id)
    if rail in ("homepage_hero", "cart_upsell") and events:
        since = max(e.time_s for e in events) - WINDOW_H * 3600
        out |= {e.item_id for e in events if e.event_type == "purchase" and e.time_s >= since}
    active = list(rule_set.rules) if rail in rule_set.rails else []
    for item in attributes:
        info = attributes.get(item)
        if info.out_of_stock:
            out.add(item)
        for rule in active:
            if isinstance(rule, BlockRule) and rule.targets(item, info):
                out.add(item)
            if isinstance(rule, MarginFloorRule) and info.margin is not None:
                if info.margin < rule.min_margin:
                    out.add(item)
    return out


def _set_rules(world_, rule_set: RuleSet) -> None:
    services, loaded, broken, _ = world_
    loaded.pipeline.rule_set = rule_set
    broken.pipeline.rule_set = rule_set


# ------------------------------------------------------------------------------ the properties

EXAMPLES = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _serve_and_check(world_, path, rail, request, events, rule_set, out_of_stock):  # type: ignore[no-untyped-def]
    """Serve under `rule_set` with `out_of_stock` at 0 units, restore the stock, and assert
    the two properties. Returns the response."""
    services, loaded, _, _ = world_
    _set_rules(world_, rule_set)
    attributes = loaded.pipeline.attributes
    for item in out_of_stock:
        attributes.update(item, stock=0)
    try:
        response = services[path].serve(rail, request)
        readable = [] if path == "redis_down" else events  # what the service could read
        forbidden = _forbidden(loaded, rail, request, readable, rule_set)
    finally:
        for item in out_of_stock:
            attributes.update(item, stock=STOCK)
    shown = [i.item_id for i in response.items]
    event(f"{path} -> {response.served_by}")  # --hypothesis-show-statistics: paths taken
    assert len(shown) == len(set(shown))
    assert not set(shown) & forbidden, (path, response.served_by, set(shown) & forbidden)
    eligible = sum(1 for item in loaded.pipeline.stats.item_ids.tolist() if item not in forbidden)
    slots = request.slots
    assert min(slots, eligible) <= len(shown) <= slots, (path, response.served_by, response.reasons)
    return response


def _seed_session(service: RailService, events: list[HistoryEvent]) -> str:
    session_id = f"x{next(_counter)}"
    seeded = [(f"{session_id}-{n}", e, None) for n, e in enumerate(events)]
    service.store.append_events(session_id, seeded)
    return session_id


@settings(EXAMPLES, max_examples=250)
@given(data=st.data())
def test_no_path_shows_an_excluded_blocked_or_out_of_stock_item(world, data):
    services, loaded, _, pools = world
    path = data.draw(st.sampled_from(PATHS[1:]), label="path")
    rail = data.draw(st.sampled_from(RAILS), label="rail")
    events = data.draw(sessions(pools), label="session")
    # seeded in the real Redis; the redis_down service's store points at a closed port
    session_id = _seed_session(services["computed"], events)
    rule_set = data.draw(rule_sets(pools), label="rules")
    out_of_stock = data.draw(st.sets(st.sampled_from(pools["items"]), max_size=25), label="oos")
    exclude = data.draw(
        st.lists(st.sampled_from([*pools["items"], "no-such-item"]), max_size=20), label="exclude"
    )
    cart = data.draw(st.lists(st.sampled_from(pools["items"]), min_size=1, max_size=4))
    request = RailRequest(
        session_id=session_id,
        slots=data.draw(st.integers(1, 24), label="slots"),
        exclude=exclude,
        item_id=data.draw(st.sampled_from(pools["items"])) if rail == "pdp_fbt" else None,
        cart=cart if rail == "cart_upsell" else [],
    )
    response = _serve_and_check(world, path, rail, request, events, rule_set, out_of_stock)
    assert response.served_by == ("fallback" if path == "compute_failed" else "computed")
    if path == "redis_down":
        assert any(r.startswith("redis unavailable") for r in response.reasons)
    if path == "triton_down" and loaded.towers is not None:
        assert response.vector_source == "in_process", response.reasons


@settings(EXAMPLES, max_examples=120)
@given(data=st.data())
def test_a_pre_warmed_rail_never_shows_an_excluded_blocked_or_out_of_stock_item(world, data):
    """The consumer warms the hero rail; then rules, stock and the request change, aimed at
    the warmed items, and the cached answer (or its recomputation) must follow them."""
    services, loaded, _, pools = world
    service = services["cache"]
    events = data.draw(sessions(pools), label="session")
    session_id = _seed_session(service, events)
    _set_rules(world, RuleSet(name="warm", version="1"))
    assert service.prewarm([session_id]) == 1
    snapshot = service.store.snapshot(session_id, loaded.version, "homepage_hero")
    warmed = [i["item_id"] for i in snapshot.rail["items"]]
    recent = max((e.time_s for e in events), default=T0) - WINDOW_H * 3600
    bought = {e.item_id for e in events if e.event_type == "purchase" and e.time_s >= recent}
    assert not bought & set(warmed), "a pre-warmed rail holds a purchased item"
    rules = data.draw(rule_sets(pools), label="rules")
    blocked = data.draw(st.lists(st.sampled_from(warmed), max_size=2), label="blocked")
    rule_set = rules.model_copy(
        update={
            "rails": tuple(sorted({*rules.rails, "homepage_hero"})),
            "rules": (*rules.rules, *(BlockRule(kind="block", item_id=i) for i in blocked)),
        }
    )
    out_of_stock = data.draw(st.sets(st.sampled_from(warmed), max_size=2), label="oos")
    exclude = data.draw(st.lists(st.sampled_from([*warmed, "no-such-item"]), max_size=3))
    request = RailRequest(
        session_id=session_id, slots=data.draw(st.integers(1, 12), label="slots"), exclude=exclude
    )
    response = _serve_and_check(
        world, "cache", "homepage_hero", request, events, rule_set, out_of_stock
    )
    assert response.served_by in ("cache", "computed")


def test_the_cache_path_is_taken_and_filters_what_the_request_excludes(world):
    """The property above may recompute; this pins the cache path itself: a warmed rail
    filtered by the request's `exclude` is still served from the cache when enough remain."""
    services, loaded, _, pools = world
    service = services["cache"]
    _set_rules(world, RuleSet(name="warm", version="1"))
    session_id = f"x{next(_counter)}"
    events = [
        HistoryEvent(pools["items"][3], "view", T0),
        HistoryEvent(pools["items"][5], "cart", T0 + 60),
    ]
    service.store.append_events(
        session_id, [(f"{session_id}-{n}", e, None) for n, e in enumerate(events)]
    )
    assert service.prewarm([session_id]) == 1
    warmed = [
        i["item_id"]
        for i in service.store.snapshot(session_id, loaded.version, "homepage_hero").rail["items"]
    ]
    plain = service.serve("homepage_hero", RailRequest(session_id=session_id, slots=4))
    assert plain.served_by == "cache" and [i.item_id for i in plain.items] == warmed[:4]
    excluded = service.serve(
        "homepage_hero", RailRequest(session_id=session_id, slots=4, exclude=warmed[:2])
    )
    assert excluded.served_by == "cache"
    assert [i.item_id for i in excluded.items] == warmed[2:6]
    # too few left for the slots asked: recomputed, never short
    full = service.serve(
        "homepage_hero",
        RailRequest(session_id=session_id, slots=len(warmed), exclude=warmed[:1]),
    )
    assert full.served_by == "computed" and len(full.items) == len(warmed)
    assert warmed[0] not in {i.item_id for i in full.items}
    # the request-specific rail was not cached over the session's plain one
    again = service.serve("homepage_hero", RailRequest(session_id=session_id, slots=4))
    assert again.served_by == "cache" and [i.item_id for i in again.items] == warmed[:4]


def test_purchases_within_the_window_leave_cart_upsell(world):
    """Items bought in the last hour leave the rail; the shipped default (off) keeps them."""
    services, _, _, pools = world
    _set_rules(world, RuleSet(name="none", version="1"))
    cart = [pools["items"][0]]
    probe = services["plain"].serve(
        "cart_upsell", RailRequest(session_id="probe", cart=cart, slots=8)
    )
    bought = [i.item_id for i in probe.items][:6]
    session_id = f"x{next(_counter)}"
    events = [HistoryEvent(item, "purchase", T0 + 7200 + n) for n, item in enumerate(bought)]
    events.insert(0, HistoryEvent(pools["items"][1], "purchase", T0))  # 2 h before: kept
    seeded = [(f"{session_id}-{n}", e, None) for n, e in enumerate(events)]
    services["computed"].store.append_events(session_id, seeded)
    request = RailRequest(session_id=session_id, cart=cart, slots=8)
    off = [i.item_id for i in services["plain"].serve("cart_upsell", request).items]
    on = [i.item_id for i in services["computed"].serve("cart_upsell", request).items]
    assert set(off) & set(bought), "premise: without the exclusion the bought items still rank"
    assert not set(on) & set(bought) and len(on) == 8
    # the same as excluding them by request: one concept, one place (build_query)
    by_request = RailRequest(session_id=session_id, cart=cart, slots=8, exclude=bought)
    assert on == [i.item_id for i in services["plain"].serve("cart_upsell", by_request).items]


def test_a_users_purchases_in_another_session_leave_hero_and_cart_until_the_user_is_deleted(
    world,
):
    """Purchase memory across sessions: what the user bought in one session never shows on
    the hero or cart rail of the next one, computed or pre-warmed; deleting the user forgets."""
    services, loaded, _, pools = world
    _set_rules(world, RuleSet(name="none", version="1"))
    computed = services["computed"]
    store = SessionStore(computed.store.client, 2.0, 50, 600, 600, purchase_ttl_s=3600)
    service = RailService(computed.settings, loaded, store, None, Metrics())
    user, old, new = f"u{next(_counter)}", f"x{next(_counter)}", f"x{next(_counter)}"
    views = [HistoryEvent(item, "view", T0 + 100 + n) for n, item in enumerate(pools["items"][:3])]
    store.append_events(new, [(f"{new}-{n}", e, None) for n, e in enumerate(views)], [user])
    cart = [pools["items"][0]]
    guest = service.serve("homepage_hero", RailRequest(session_id=new, slots=8))
    guest_cart = service.serve("cart_upsell", RailRequest(session_id=new, cart=cart, slots=8))
    bought = [i.item_id for i in guest.items][:3] + [i.item_id for i in guest_cart.items][:3]
    purchases = [HistoryEvent(item, "purchase", T0 + 50) for item in bought]
    store.append_events(old, [(f"{old}-{n}", e, None) for n, e in enumerate(purchases)], [user])

    def shown(rail: str, **body) -> tuple[str, list[str]]:  # type: ignore[no-untyped-def]
        reply = service.serve(rail, RailRequest(session_id=new, user_id=user, slots=8, **body))
        return reply.served_by, [i.item_id for i in reply.items]

    # the guest's hero rail is pre-warmed with the bought items: the cache must drop them
    served_by, hero = shown("homepage_hero")
    assert not set(hero) & set(bought) and len(hero) == 8
    _, cart_items = shown("cart_upsell", cart=cart)
    assert not set(cart_items) & set(bought) and len(cart_items) == 8
    # warmed for the user by the consumer's path, then served from that cache
    assert service.prewarm([new], {new: user}) == 1
    served_by, warmed = shown("homepage_hero")
    assert served_by == "cache" and not set(warmed) & set(bought) and len(warmed) == 8

    deletion = store.delete_user(user)
    assert deletion.keys.get("user_purchases") == 1
    assert store.snapshot(new, loaded.version, None, user).purchased == {}


def test_a_returning_users_earlier_purchases_reach_the_pool_through_the_buy_again_source(world):
    """The order memory feeds the buy-again source: what the user bought in earlier
    sessions (not this one) enters the product page's candidates with its evidence."""
    services, loaded, _, pools = world
    store = SessionStore(services["computed"].store.client, 2.0, 50, 600, 600, 3600)
    user, old, new = f"u{next(_counter)}", f"x{next(_counter)}", f"x{next(_counter)}"
    anchor, *bought = pools["items"][:4]
    purchases = [HistoryEvent(item, "purchase", T0 + n) for n, item in enumerate(bought)]
    store.append_events(old, [(f"{old}-{n}", e, None) for n, e in enumerate(purchases)], [user])
    store.append_events(new, [(f"{new}-0", HistoryEvent(anchor, "view", T0 + 99), None)], [user])
    snapshot = store.snapshot(new, loaded.version, None, user)
    request = RailRequest(session_id=new, user_id=user, item_id=anchor)
    query = build_query(request, snapshot, (anchor, ()), "pdp_fbt", ExclusionSettings())
    assert query.past_purchases == tuple(bought)
    table = loaded.pipeline.candidate_table([query]).frame
    evidence = table.set_index("item_id")["buy_again_score"]
    assert set(bought) <= set(evidence.dropna().index)
    guest = build_query(
        RailRequest(session_id=new, item_id=anchor),
        store.snapshot(new, loaded.version, None),
        (anchor, ()),
        "pdp_fbt",
        ExclusionSettings(),
    )
    guest_table = loaded.pipeline.candidate_table([guest]).frame
    assert guest.past_purchases == () and guest_table["buy_again_score"].isna().all()
