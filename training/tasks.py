"""One evaluation task per rail: turn held-out sessions into (query, targets) cases.

- homepage_hero: given a session prefix, the next item the shopper touches that is not in
  the prefix (the data set's published target where it has one). Items already seen are
  excluded: the hero rail is for discovery, not for "recently viewed".
- pdp_fbt: given a product the shopper looked at, the items carted or bought later in the
  same session (baskets: the rest of the basket); where the data set allows it, later views
  stand in when a session has no cart or purchase.
- cart_upsell: given the cart, the items carted or bought later that are not in it
  (baskets: a seeded cut of the basket into cart and rest).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from railtower.settings import DatasetSpec, EvaluationSettings, RailName
from ranking.rail_inputs import rail_query
from ranking.retriever import Query
from towers.session_features import context_column
from training.past_purchases import PastPurchases


@dataclass(frozen=True)
class EvalCase:
    session_id: str
    query: Query
    targets: frozenset[str]
    # prefix length (hero), session position of the anchor (pdp), cart size (cart): the
    # breakdown axis of the "metric by session length" plot
    length: int
    # every item the shopper touched after the request (excluded items aside) with the
    # strongest event type on it: the re-ranker's graded labels (purchase > cart > view)
    followed: Mapping[str, str] = field(default_factory=dict)


_STRENGTH = {"remove_from_cart": 0, "view": 1, "cart": 2, "purchase": 3}


def strongest(items: list[str], types: list[str], exclude: frozenset[str]) -> dict[str, str]:
    """Each item not in `exclude` with the strongest event type it got."""
    out: dict[str, str] = {}
    for item, kind in zip(items, types, strict=True):
        if item in exclude or kind == "remove_from_cart":
            continue
        if item not in out or _STRENGTH.get(kind, 0) > _STRENGTH.get(out[item], 0):
            out[item] = kind
    return out


def build_cases(
    rail: RailName,
    events: pd.DataFrame,
    spec: DatasetSpec,
    settings: EvaluationSettings,
    seed: int,
    past: PastPurchases | None = None,
) -> list[EvalCase]:
    """Cases for `rail` from held-out events, over a seeded sample of sessions; with
    `past`, each case carries its user's purchases from sessions that ended before its own
    began (what serving's order memory would hold)."""
    rng = np.random.default_rng(seed)
    sessions = _sample_sessions(events, settings.max_sessions_per_task, rng)
    builder = {
        "homepage_hero": _hero_cases,
        "pdp_fbt": _pdp_cases,
        "cart_upsell": _cart_cases,
    }[rail]
    cases: list[EvalCase] = []
    for session_id, frame in sessions:
        built = builder(session_id, frame, spec, settings, rng)
        bought = _bought_before(past, frame)
        if bought:
            built = (replace(c, query=replace(c.query, past_purchases=bought)) for c in built)
        cases.extend(built)
    return cases


def _bought_before(past: PastPurchases | None, frame: pd.DataFrame) -> tuple[str, ...]:
    if past is None or "user_id" not in frame.columns:
        return ()
    user = frame["user_id"].iloc[0]
    if not isinstance(user, str) or not user:
        return ()
    return past.before(user, frame["event_time"].iloc[0].value / 1e9)


def _times(frame: pd.DataFrame) -> list[float]:
    return (frame["event_time"].astype("int64") / 1e9).tolist()


def _context(frame: pd.DataFrame) -> str | None:
    column = context_column(list(frame.columns))
    value = None if column is None else frame[column].iloc[0]
    return str(value) if isinstance(value, str) and value else None


def _sample_sessions(
    events: pd.DataFrame, limit: int, rng: np.random.Generator
) -> Iterator[tuple[str, pd.DataFrame]]:
    ordered = events.sort_values(["session_id", "position"], kind="stable")
    ids = ordered["session_id"].unique()
    if len(ids) > limit:
        ids = np.sort(rng.choice(ids, size=limit, replace=False))
    chosen = ordered[ordered["session_id"].isin(set(ids))]
    for session_id, frame in chosen.groupby("session_id", sort=True):
        yield str(session_id), frame


def _hero_cases(
    session_id: str,
    frame: pd.DataFrame,
    spec: DatasetSpec,
    _s: EvaluationSettings,
    _rng: np.random.Generator,
) -> Iterator[EvalCase]:
    items = frame["item_id"].tolist()
    base = Query(session_times=tuple(_times(frame)), context=_context(frame))
    types = frame["event_type"].tolist()
    if spec.events is not None and spec.events.target_column:
        # The published target closes the session; everything before it is the prefix.
        is_target = frame["is_target"].to_numpy()
        if is_target.sum() != 1 or not is_target[-1]:
            return
        if len(items) > 1 and items[-1] not in items[:-1]:
            yield _hero_case(session_id, base, items, types, len(items) - 1)
        return
    for t in range(1, len(items)):
        if items[t] not in items[:t]:
            yield _hero_case(session_id, base, items, types, t)


def _hero_case(
    session_id: str, base: Query, items: list[str], types: list[str], t: int
) -> EvalCase:
    seen = frozenset(items[:t])
    query = rail_query(
        session_items=items[:t],
        session_types=types[:t],
        session_times=base.session_times[:t],
        context=base.context,
    )
    followed = strongest(items[t:], types[t:], seen)
    return EvalCase(session_id, query, frozenset([items[t]]), len(seen), followed)


def _pdp_cases(
    session_id: str,
    frame: pd.DataFrame,
    spec: DatasetSpec,
    settings: EvaluationSettings,
    rng: np.random.Generator,
) -> Iterator[EvalCase]:
    items = frame["item_id"].tolist()
    types = frame["event_type"].tolist()
    strong = set(spec.strong_event_types)
    first_seen = list(dict.fromkeys(items))
    candidates: list[tuple[str, frozenset[str], int]] = []
    for anchor in first_seen:
        if spec.session_kind == "basket":
            targets = frozenset(first_seen) - {anchor}
            at = 0
        else:
            at = items.index(anchor)
            later = list(zip(items[at + 1 :], types[at + 1 :], strict=True))
            targets = frozenset(i for i, t in later if t in strong) - {anchor}
            if not targets and spec.fallback_to_views:
                targets = frozenset(i for i, _ in later) - {anchor}
        if targets:
            candidates.append((anchor, targets, at))
    if len(candidates) > settings.pdp_anchors_per_session:
        pick = rng.choice(len(candidates), settings.pdp_anchors_per_session, replace=False)
        candidates = [candidates[i] for i in sorted(pick)]
    times, context = _times(frame), _context(frame)
    for anchor, targets, at in candidates:
        sequence = spec.session_kind == "sequence"
        cut = at if sequence else 0
        query = rail_query(anchor, (), items[:cut], types[:cut], times[:cut], context)
        later = (items[at + 1 :], types[at + 1 :]) if sequence else (items, types)
        followed = strongest(*later, frozenset([anchor]))
        yield EvalCase(
            session_id, query, targets, at + 1, {**followed, **_at_least(targets, followed)}
        )


def _cart_cases(
    session_id: str,
    frame: pd.DataFrame,
    spec: DatasetSpec,
    _s: EvaluationSettings,
    rng: np.random.Generator,
) -> Iterator[EvalCase]:
    items = frame["item_id"].tolist()
    types = frame["event_type"].tolist()
    if spec.session_kind == "basket":
        basket = list(dict.fromkeys(items))
        if len(basket) < 2:
            return
        cut = int(rng.integers(1, len(basket)))
        cart = tuple(basket[:cut])
        when = (_times(frame)[0],) * len(cart)
        query = rail_query(None, cart, cart, ("cart",) * len(cart), when, _context(frame))
        followed = strongest(items, types, frozenset(cart))
        yield EvalCase(session_id, query, frozenset(basket[cut:]), len(cart), followed)
        return
    strong = set(spec.strong_event_types)
    times, context = _times(frame), _context(frame)
    cart: list[str] = []
    for t, (item, kind) in enumerate(zip(items, types, strict=True)):
        if kind == "remove_from_cart" and item in cart:
            cart.remove(item)
        elif kind in strong and item not in cart:
            cart.append(item)
            later = {i for i, k in zip(items[t + 1 :], types[t + 1 :], strict=True) if k in strong}
            targets = frozenset(later - set(cart))
            if targets:
                query = rail_query(
                    None, cart, items[: t + 1], types[: t + 1], times[: t + 1], context
                )
                followed = strongest(items[t + 1 :], types[t + 1 :], frozenset(cart))
                yield EvalCase(session_id, query, targets, len(cart), followed)


def _at_least(targets: frozenset[str], followed: Mapping[str, str]) -> dict[str, str]:
    """Targets absent from `followed` (none, in practice) labelled as views."""
    return {t: "view" for t in targets if t not in followed}
