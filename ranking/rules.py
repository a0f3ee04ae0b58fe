"""Merchandising rules, applied: the last ranking stage, steered by JSON files, not deploys.

:func:`apply_rules` applies a :class:`~ranking.rule_set.RuleSet` to one rail's ranked
candidates, deterministically, in this order:

1. drop out-of-stock items (always on; a rule set cannot switch it off), blocked items and
   items whose known margin is below a margin floor;
2. multiply scores by every active boost and bury that targets the item, re-sort (stable);
3. fill the slots, then place each active pin at its slot.

:func:`explain_rules` returns the same slots plus which rule touched which item, for per-slot
provenance, :func:`ineligible` judges a list without re-ordering it (a pre-warmed rail is
filtered by the rules in force now), and :func:`dry_run` compares two rule sets on sampled
requests before one is published. The schema and the loader are re-exported here, so
callers import from one place.

One module on purpose: applying, explaining, judging (`ineligible`) and the dry run all
share the one eligibility judgement (`_judge`, `_active`), which must not drift between
the served rules stage, provenance, the cache filter and the comparison.
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from railtower.errors import RuleSetError
from railtower.settings import RAILS
from ranking.candidates import Candidate, unique_by_item
from ranking.item_attributes import ItemAttributes, ItemInfo
from ranking.rule_set import (
    BlockRule,
    BoostRule,
    BuryRule,
    MarginFloorRule,
    PinRule,
    Rule,
    RuleSet,
    category_matches,
    load_rule_set,
)

__all__ = [
    "BlockRule",
    "BoostRule",
    "BuryRule",
    "DryRunReport",
    "MarginFloorRule",
    "PinRule",
    "RequestChange",
    "Rule",
    "RuleEffect",
    "RuleSet",
    "RuleSetError",
    "RulesOutcome",
    "apply_rules",
    "category_matches",
    "dry_run",
    "explain_rules",
    "ineligible",
    "load_rule_set",
]

EffectKind = Literal[
    "request",
    "out_of_stock",
    "retired",
    "block",
    "margin_floor",
    "boost",
    "bury",
    "pin",
    "pin_skipped",
]
EXCLUSIONS: frozenset[EffectKind] = frozenset(
    {"request", "out_of_stock", "retired", "block", "margin_floor"}
)


# ------------------------------------------------------------------------------ applying


@dataclass(frozen=True)
class RuleEffect:
    """One thing a rule did to one item.

    Attributes:
        rule_index: index into `rule_set.rules`; None for the always-on stock exclusion.
        kind: what happened (the rule's kind, "out_of_stock", or "pin_skipped").
        detail: a sentence for a merchandiser, e.g. "score x1.5 (brand 'samsung')".
    """

    rule_index: int | None
    kind: EffectKind
    detail: str


@dataclass
class RulesOutcome:
    """The slots a rule set produced and, per item id, the effects that made them."""

    candidates: list[Candidate]
    effects: dict[str, list[RuleEffect]]
    # a pinned item is shown above its slot: too few other eligible items to reach it
    pins_short: bool = False

    def excluded(self, item_id: str) -> bool:
        """Whether the item was removed (out of stock, blocked or below a margin floor)."""
        return any(e.kind in EXCLUSIONS for e in self.effects.get(item_id, []))

    def placed_pins(self) -> list[str]:
        """Items in the slots because a pin put them there."""
        return [
            c.item_id
            for c in self.candidates
            if any(e.kind == "pin" for e in self.effects.get(c.item_id, []))
        ]


def apply_rules(
    candidates: Sequence[Candidate],
    rule_set: RuleSet,
    attributes: ItemAttributes,
    rail: str,
    slots: int,
    now: datetime,
    exclude: frozenset[str] = frozenset(),
) -> list[Candidate]:
    """The rail's final slots under `rule_set`; see :func:`explain_rules`."""
    return explain_rules(candidates, rule_set, attributes, rail, slots, now, exclude).candidates


def explain_rules(
    candidates: Sequence[Candidate],
    rule_set: RuleSet,
    attributes: ItemAttributes,
    rail: str,
    slots: int,
    now: datetime,
    exclude: frozenset[str] = frozenset(),
) -> RulesOutcome:
    """Apply a rule set to one rail's candidates and record which rule touched which item.

    Only rules valid at `now` apply, and none at all on a rail the rule set does not list
    (out-of-stock items are still dropped). A boost or bury multiplies a non-negative score
    and divides a negative one, so a boost always moves an item up whatever the score's sign.
    A pin places an eligible item even if it was not a candidate (score 0.0 then); it is not
    placed when the item is out of stock, blocked, below a margin floor, unknown to the
    catalogue, or its slot is beyond `slots`. When too few items remain to reach a pin's
    slot, the pinned item closes the list.

    Args:
        candidates: ranked candidates (e.g. MMR's output); repeated ids keep the first.
        rule_set: the rules to apply.
        attributes: stock, margin, category and brand per item.
        rail: the rail being served (one of railtower.settings.RAILS).
        slots: how many items the rail shows (>= 0).
        now: the request time, timezone-aware.
        exclude: items the request rules out (the product on the page, the cart, items
            already seen); no rule, not even a pin, can show them.

    Returns:
        min(slots, |eligible candidates ∪ placed pins|) candidates, no duplicates, with
        boosted scores, and the effects of every rule per item id judged (a best-first list
        is judged only as far as an item could still reach the slots: see _judged_head).

    Raises:
        ValueError: unknown rail, slots < 0, naive `now`, or a score that is not finite.
    """
    if rail not in RAILS:
        raise ValueError(f"rail must be one of {', '.join(RAILS)}, got {rail!r}")
    if slots < 0:
        raise ValueError(f"slots must be >= 0, got {slots}")
    if now.utcoffset() is None:
        raise ValueError(f"now must be timezone-aware (UTC), got {now.isoformat()}")
    pool = unique_by_item(candidates)
    scores = [c[1] for c in pool]
    # one sum instead of a check per candidate (inf and NaN carry through a sum); only a
    # sum that is not finite looks for the culprit (or was an overflow of finite scores)
    if not math.isfinite(sum(scores)):
        for c in pool:
            if not math.isfinite(c.score):
                raise ValueError(
                    f"candidate {c.item_id!r} has score {c.score}; scores must be finite"
                )
    active = _active(rule_set, rail, now)
    effects: dict[str, list[RuleEffect]] = defaultdict(list)
    eligible: dict[str, bool] = {}

    def is_eligible(item_id: str) -> bool:
        # Memoised so an item that is both a candidate and pinned is judged (and noted) once.
        if item_id not in eligible:
            if item_id in exclude:
                effects[item_id].append(
                    RuleEffect(None, "request", "removed: the request excludes it")
                )
                eligible[item_id] = False
            else:
                eligible[item_id] = _judge(item_id, attributes.get(item_id), active, effects)
        return eligible[item_id]

    # 1. Exclusions first, so boosts and pins never resurrect an excluded item; 2. boosts and
    # buries. Only as far down the list as an item could still reach the slots (see
    # _judged_head); sorted() is stable, so equal scores keep the incoming order.
    # finite scores: sorting a list that is already best first returns it unchanged
    best_first = scores == sorted(scores, reverse=True)
    rescored = _judged_head(
        pool, slots + len(active.pins), active, is_eligible, attributes, effects, best_first
    )
    ranked = sorted(rescored, key=lambda c: -c.score)
    # 3. Pins: decide which are placeable, then fill the slots around them.
    pinned: dict[int, tuple[int, Candidate]] = {}  # slot -> (rule index, item)
    # the lookups pins need, built only when a pin is active (most rails have none)
    by_item = {c.item_id: c for c in ranked} if active.pins else {}
    pool_by_item = {c.item_id: c for c in pool} if active.pins else {}

    def known(item_id: str) -> bool:
        return item_id in pool_by_item or item_id in attributes

    for i, rule in active.pins:
        why_not = _pin_blocker(rule, slots, pinned, known, is_eligible)
        if why_not:
            effects[rule.item_id].append(RuleEffect(i, "pin_skipped", f"not placed: {why_not}"))
        else:
            candidate = by_item.get(rule.item_id)
            if candidate is None and rule.item_id in pool_by_item:  # below the judged head
                candidate = _rescore(
                    pool_by_item[rule.item_id], attributes.get(rule.item_id), active, effects
                )
            pinned[rule.slot] = (i, candidate or Candidate(rule.item_id, 0.0))
    taken = {c.item_id for _, c in pinned.values()}
    rest = iter(c for c in ranked if c.item_id not in taken)
    result: list[Candidate] = []
    short = False
    for slot in range(1, slots + 1):
        if slot in pinned:
            i, candidate = pinned[slot]
            detail = f"pinned at slot {slot}"
            if len(result) + 1 != slot:
                short = True
                detail += f", shown at {len(result) + 1}: too few eligible items to reach it"
            effects[candidate.item_id].append(RuleEffect(i, "pin", detail))
            result.append(candidate)
        elif (unpinned := next(rest, None)) is not None:
            result.append(unpinned)
    kept = {item: notes for item, notes in effects.items() if notes}
    return RulesOutcome(result, kept, short)


def _judged_head(
    pool: Sequence[Candidate],
    needed: int,
    active: _Active,
    is_eligible: Callable[[str], bool],
    attributes: ItemAttributes,
    effects: dict[str, list[RuleEffect]],
    best_first: bool,
) -> list[Candidate]:
    """The eligible candidates of `pool`, rescored, in pool order, as far as any could still
    make the `needed` best.

    When the pool comes `best_first` (a ranker's or MMR's list always does), a candidate whose
    score, times every boost that could apply, cannot beat the `needed`-th best rescored
    score so far can never be shown, nor can anything after it: the rest is left unjudged
    (the rails stage judged 300 candidates to show 12). Otherwise every candidate is judged.
    """
    lift = math.prod(rule.factor for _, rule in active.rescores if rule.factor > 1)
    best: list[float] = []  # min-heap of the `needed` best rescored scores so far
    out = []
    for c in pool:
        if best_first and needed and len(best) >= needed:
            reach = c.score * lift if c.score >= 0 else c.score / lift
            if best[0] >= reach:
                break
        if not is_eligible(c.item_id):
            continue
        rescored = _rescore(c, attributes.get(c.item_id), active, effects)
        out.append(rescored)
        if len(best) < needed:
            heapq.heappush(best, rescored.score)
        elif needed:
            heapq.heappushpop(best, rescored.score)
    return out


def ineligible(
    item_ids: Sequence[str],
    rule_set: RuleSet,
    attributes: ItemAttributes,
    rail: str,
    now: datetime,
    exclude: frozenset[str] = frozenset(),
) -> set[str]:
    """The items of `item_ids` that step 1 of :func:`explain_rules` would remove: excluded by
    the request, out of stock, blocked or below a margin floor (same rules, same `now`)."""
    active = _active(rule_set, rail, now)
    effects: dict[str, list[RuleEffect]] = defaultdict(list)
    return {
        item
        for item in item_ids
        if item in exclude or not _judge(item, attributes.get(item), active, effects)
    }


@dataclass(frozen=True)
class _Active:
    """The rules valid for one request, by what they do (index in the rule set, rule): the
    rules stage judges every candidate of the pool, so each item walks only its kind's."""

    blocks: list[tuple[int, BlockRule]]
    floors: list[tuple[int, MarginFloorRule]]
    rescores: list[tuple[int, BoostRule | BuryRule]]
    pins: list[tuple[int, PinRule]]


def _active(rule_set: RuleSet, rail: str, now: datetime) -> _Active:
    applies = rail in rule_set.rails
    active = [(i, r) for i, r in enumerate(rule_set.rules) if applies and r.active_at(now)]
    return _Active(
        blocks=[(i, r) for i, r in active if isinstance(r, BlockRule)],
        floors=[(i, r) for i, r in active if isinstance(r, MarginFloorRule)],
        rescores=[(i, r) for i, r in active if isinstance(r, BoostRule | BuryRule)],
        pins=[(i, r) for i, r in active if isinstance(r, PinRule)],
    )


def _judge(
    item_id: str,
    info: ItemInfo | None,
    active: _Active,
    effects: dict[str, list[RuleEffect]],
) -> bool:
    """Whether the item may be shown; notes every reason it may not."""
    notes: list[RuleEffect] = []
    if info is not None and info.out_of_stock:
        notes.append(RuleEffect(None, "out_of_stock", "removed: stock is 0"))
    if info is not None and info.retired:
        notes.append(RuleEffect(None, "retired", "removed: retired from the catalogue"))
    for i, rule in active.blocks:
        if rule.targets(item_id, info):
            notes.append(RuleEffect(i, "block", f"removed: blocked {rule.target_text()}"))
    if info is not None and info.margin is not None:
        for i, floor in active.floors:
            if info.margin < floor.min_margin:
                why = f"removed: margin {info.margin:g} below floor {floor.min_margin:g}"
                notes.append(RuleEffect(i, "margin_floor", why))
    if notes:  # every note here is an exclusion (EXCLUSIONS)
        effects[item_id].extend(notes)
    return not notes


def _rescore(
    candidate: Candidate,
    info: ItemInfo | None,
    active: _Active,
    effects: dict[str, list[RuleEffect]],
) -> Candidate:
    factor = 1.0
    for i, rule in active.rescores:
        if rule.targets(candidate.item_id, info):
            factor *= rule.factor
            detail = f"score x{rule.factor:g} ({rule.target_text()})"
            effects[candidate.item_id].append(RuleEffect(i, rule.kind, detail))
    if factor == 1.0:
        return candidate
    score = candidate.score
    return Candidate(candidate.item_id, score * factor if score >= 0 else score / factor)


def _pin_blocker(
    rule: PinRule,
    slots: int,
    pinned: dict[int, tuple[int, Candidate]],
    known: Callable[[str], bool],
    is_eligible: Callable[[str], bool],
) -> str | None:
    """Why a pin cannot be placed, or None when it can."""
    if rule.slot > slots:
        return f"slot {rule.slot} is beyond this rail's {slots} slots"
    if rule.slot in pinned or rule.item_id in {c.item_id for _, c in pinned.values()}:
        # Validation refuses overlapping pins; this only guards hand-built rule sets.
        return f"slot {rule.slot} or item {rule.item_id!r} is already pinned by an earlier rule"
    if not known(rule.item_id):
        # Neither a candidate nor in the catalogue: most likely a typo or a delisted item,
        # and nothing says it is in stock.
        return f"item {rule.item_id!r} is not in the catalogue"
    if not is_eligible(rule.item_id):
        return "the item is excluded (see its other effects)"
    return None


# ------------------------------------------------------------------------------ dry run


@dataclass(frozen=True)
class RequestChange:
    """One request's slots under the current and the proposed rule set.

    Attributes:
        rail: the request's rail.
        current: item ids in slot order under the current rule set.
        proposed: item ids in slot order under the proposed rule set.
        added: items shown only under the proposed set.
        removed: items shown only under the current set.
        moved: (item, current slot, proposed slot), 1-based, for items shown under both.
        newly_blocked: candidates a proposed block removes that the current set kept
            (an item already out of stock or excluded is not newly blocked).
        pins_placed: items placed by a pin under the proposed set.
    """

    rail: str
    current: tuple[str, ...]
    proposed: tuple[str, ...]
    added: tuple[str, ...]
    removed: tuple[str, ...]
    moved: tuple[tuple[str, int, int], ...]
    newly_blocked: tuple[str, ...]
    pins_placed: tuple[str, ...]

    @property
    def changed(self) -> bool:
        return self.current != self.proposed


@dataclass(frozen=True)
class DryRunReport:
    """What publishing `proposed` instead of `current` would change, request by request."""

    current: str
    proposed: str
    requests: tuple[RequestChange, ...]

    @property
    def changed_share(self) -> float:
        """Share of requests whose slots differ (0.0 when there are no requests)."""
        return sum(r.changed for r in self.requests) / len(self.requests) if self.requests else 0.0

    @property
    def newly_blocked(self) -> tuple[str, ...]:
        """Distinct items newly blocked in any request, sorted."""
        return tuple(sorted({item for r in self.requests for item in r.newly_blocked}))

    @property
    def pins_placed(self) -> int:
        """Pins placed under the proposed set, summed over requests."""
        return sum(len(r.pins_placed) for r in self.requests)

    def to_markdown(self, max_requests: int = 20) -> str:
        """A report for the merchandiser: totals, then the first changed requests in detail.

        Args:
            max_requests: changed requests shown slot by slot; the rest are counted.

        Returns:
            Markdown text.
        """
        changed = [(n, r) for n, r in enumerate(self.requests) if r.changed]
        blocked = ", ".join(f"`{i}`" for i in self.newly_blocked) or "none"
        lines = [
            f"# Rule set dry run: `{self.current}` → `{self.proposed}`",
            "",
            "| measure | value |",
            "|---|---|",
            f"| requests | {len(self.requests)} |",
            f"| requests changed | {len(changed)} ({self.changed_share:.1%}) |",
            f"| items newly blocked | {len(self.newly_blocked)}: {blocked} |",
            f"| pins placed (proposed) | {self.pins_placed} |",
        ]
        for n, r in changed[:max_requests]:
            lines += ["", f"## Request {n} · {r.rail}", "", "| slot | current | proposed |"]
            lines.append("|---:|---|---|")
            for slot in range(max(len(r.current), len(r.proposed))):
                now_item = r.current[slot] if slot < len(r.current) else ""
                new_item = r.proposed[slot] if slot < len(r.proposed) else ""
                lines.append(f"| {slot + 1} | {now_item} | {new_item} |")
            lines += [
                "",
                f"- added: {', '.join(r.added) or 'none'}",
                f"- removed: {', '.join(r.removed) or 'none'}",
                f"- moved: {', '.join(f'{i} {a}→{b}' for i, a, b in r.moved) or 'none'}",
            ]
        if len(changed) > max_requests:
            lines += ["", f"… and {len(changed) - max_requests} more changed requests."]
        return "\n".join(lines) + "\n"


def dry_run(
    current: RuleSet,
    proposed: RuleSet,
    requests: Sequence[tuple[str, Sequence[Candidate]]],
    attributes: ItemAttributes,
    slots: int,
    now: datetime,
) -> DryRunReport:
    """Apply both rule sets to the same requests and report the differences.

    Args:
        current: the published rule set.
        proposed: the rule set about to be published.
        requests: (rail, ranked candidates) per sampled request, e.g. from held-out sessions.
        attributes: item attributes, the same for both sets.
        slots: slots per rail.
        now: the time both are evaluated at (windows and pins depend on it).

    Returns:
        Per request the slots under each set and what changed, plus totals.
    """
    changes = []
    for rail, candidates in requests:
        before = explain_rules(candidates, current, attributes, rail, slots, now)
        after = explain_rules(candidates, proposed, attributes, rail, slots, now)
        old = tuple(c.item_id for c in before.candidates)
        new = tuple(c.item_id for c in after.candidates)
        changes.append(
            RequestChange(
                rail=rail,
                current=old,
                proposed=new,
                added=tuple(i for i in new if i not in old),
                removed=tuple(i for i in old if i not in new),
                moved=tuple(
                    (i, old.index(i) + 1, new.index(i) + 1)
                    for i in new
                    if i in old and old.index(i) != new.index(i)
                ),
                newly_blocked=tuple(
                    c.item_id
                    for c in unique_by_item(candidates)
                    if _blocked(after, c.item_id) and not before.excluded(c.item_id)
                ),
                pins_placed=tuple(after.placed_pins()),
            )
        )
    label = "{0.name}@{0.version}".format
    return DryRunReport(label(current), label(proposed), tuple(changes))


def _blocked(outcome: RulesOutcome, item_id: str) -> bool:
    return any(e.kind == "block" for e in outcome.effects.get(item_id, []))
