"""Per-slot provenance for `explain=true`: where each shown item came from and why.

Built after the answer, from what the stages already hold (serving.stages.StageOutput keeps
the fused table, the re-ranker's order, MMR's order and the rules' effects by reference),
so a request without the flag pays nothing and one with it pays one pass over the slots.

- **tier**: `candidates` (named by at least one retrieval source), `popular_fill` (added by
  the rules stage when exclusions left too few), `pin` (placed by a pin without being a
  candidate), `fallback` (the computation failed; popular items under the rules), or
  `cache` (the pre-warmed rail; see below).
- **sources**: each retrieval source that named the item, with its rank and score there.
- **fused_rank / ranker_rank / mmr_rank / final_rank**: 1-based positions before the
  re-ranker (the fused order; deal strength on deals_for_you), after it, after MMR, and the
  slot in the response.
- **rules**: every effect of the rule set on the item (ranking.rules.RuleEffect).
- **reason**: for items retrieval named (candidates, cache), the session, page or cart item
  whose item-tower vector is closest (cosine) to the slot's item: the embedding the index
  searches, so "closest" is a measured similarity, not a claim about what the re-ranker
  weighed. No reason for popular fill, pins or the fallback: nothing personal put them there.

A cached rail stores only its items (the consumer warms many sessions in one batch and keeps
no per-stage table), so a cache hit says tier `cache`, the final rank, the effects of the
rules in force now (the marker guarantees they are those it was warmed under), the reason
(computed now from the same session state), and a note that its stage ranks are unknown.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ranking.candidate_fusion import SOURCES, CandidateTable
from ranking.candidates import Candidate
from ranking.exploration import Explored
from ranking.retriever import Query
from ranking.rules import RuleEffect, explain_rules
from serving.api_models import Provenance, RuleTouch, SlotReason, SourceRank, Tier
from serving.rail_service import LoadedRails
from serving.stages import Answer


@dataclass(frozen=True)
class Origin:
    """What is known about how a rail's items were chosen."""

    tier: Tier  # "candidates" for a computed rail (refined per item), else fallback / cache
    effects: dict[str, list[RuleEffect]]
    filled: frozenset[str] = frozenset()
    table: CandidateTable | None = None
    ranked: Sequence[Candidate] | None = None
    before_rules: Sequence[Candidate] | None = None
    explored: Explored | None = None
    note: str | None = None


def explain_answer(
    rail: str, query: Query, loaded: LoadedRails, answer: Answer
) -> list[Provenance]:
    """Per-slot provenance of a served answer (computed, fallback or cache; explain=true)."""
    output = answer.output
    if output is not None and output.ruled is not None:
        origin = Origin(
            "candidates",
            output.ruled.outcome.effects,
            output.ruled.filled,
            output.table,
            output.ranked,
            output.before_rules,
            answer.explored,
        )
    elif answer.ruled is not None:
        origin = Origin("fallback", answer.ruled.outcome.effects, answer.ruled.filled)
    else:
        origin = cache_origin(rail, query, loaded, answer)
    return explain_slots(loaded, query, answer.items, origin)


def cache_origin(rail: str, query: Query, loaded: LoadedRails, answer: Answer) -> Origin:
    """What a cached rail can truthfully say: the effects of the rules in force now (the
    marker names the rule set, so they are those it was warmed under), no stage ranks."""
    pipeline = loaded.pipeline
    rules = pipeline.rules
    now = pipeline.request_time(query)
    n = len(answer.items)
    outcome = explain_rules(answer.items, rules, pipeline.attributes, rail, n, now)
    note = (
        "served from the pre-warmed rail computed for this session state; "
        "its candidate, re-ranker and MMR ranks were not stored"
    )
    return Origin("cache", outcome.effects, explored=answer.explored, note=note)


def explain_slots(
    loaded: LoadedRails, query: Query, items: Sequence[Candidate], origin: Origin
) -> list[Provenance]:
    """One provenance per item of `items` (the response's slots, in order)."""
    sources = _source_ranks(origin.table)
    fused = _positions(origin.table["item_id"].tolist() if origin.table is not None else [])
    ranker = _positions([c.item_id for c in origin.ranked or []])
    mmr = _positions([c.item_id for c in origin.before_rules or []])
    closest = _Closest(loaded, query)
    out = []
    for slot, candidate in enumerate(items):
        item = candidate.item_id
        effects = origin.effects.get(item, [])
        tier = _tier(origin, item, item in fused, effects)
        explored = origin.explored
        out.append(
            Provenance(
                tier=tier,
                sources=sources.get(item, []),
                fused_rank=fused.get(item),
                ranker_rank=ranker.get(item),
                mmr_rank=mmr.get(item),
                final_rank=slot + 1,
                explored=explored is not None and explored.slot == slot and explored.chosen == item,
                rules=[
                    RuleTouch(kind=e.kind, rule_index=e.rule_index, detail=e.detail)
                    for e in effects
                ],
                reason=closest.reason(item) if tier in ("candidates", "cache") else None,
                note=origin.note,
            )
        )
    return out


def _tier(origin: Origin, item: str, named: bool, effects: list[RuleEffect]) -> Tier:
    if origin.tier != "candidates":
        return origin.tier
    if named:
        return "candidates"
    if item in origin.filled:
        return "popular_fill"
    return "pin" if any(e.kind == "pin" for e in effects) else "candidates"


def _positions(ids: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for n, item in enumerate(ids):
        out.setdefault(item, n + 1)
    return out


def _source_ranks(table: CandidateTable | None) -> dict[str, list[SourceRank]]:
    if table is None or len(table) == 0:
        return {}
    out: dict[str, list[SourceRank]] = {}
    items = table["item_id"].tolist()
    for name in SOURCES:
        ranks = table[f"{name}_rank"].astype(float)
        scores = table[f"{name}_score"].astype(float)
        for item, rank, score in zip(items, ranks, scores, strict=True):
            if math.isfinite(rank):
                named = out.setdefault(item, [])
                named.append(SourceRank(source=name, rank=int(rank), score=float(score)))
    return out


_SAID = {
    "view": "because you viewed {}",
    "cart": "because you added {} to your cart",
    "purchase": "because you bought {}",
    "remove_from_cart": "because you looked at {}",
}


class _Closest:
    """The context item (session, page, cart) nearest to a slot's item in item-tower space."""

    def __init__(self, loaded: LoadedRails, query: Query) -> None:
        self.titles = loaded.titles
        towers = loaded.towers
        self.row = towers.item_row if towers is not None else {}
        self.vectors = towers.item_vectors if towers is not None else np.zeros((0, 1))
        context: dict[str, tuple[str, str | None]] = {}
        for item, kind in zip(query.session_items, query.session_types, strict=False):
            context[item] = ("session", kind)  # the newest event of an item names it
        for item in query.cart:
            context[item] = ("cart", None)
        if query.anchor is not None:
            context[query.anchor] = ("page", None)
        self.context = [(i, *role) for i, role in context.items() if i in self.row]
        if self.context:
            rows = [self.row[i] for i, _, _ in self.context]
            self.matrix = _unit(self.vectors[rows])

    def reason(self, item: str) -> SlotReason | None:
        if not self.context or item not in self.row:
            return None
        cosines = self.matrix @ _unit(self.vectors[[self.row[item]]])[0]
        best = int(np.argmax(cosines))
        source, role, kind = self.context[best]
        title = self.titles.get(source)
        name = title or f"item {source}"
        if role == "page":
            text = f"because you are looking at {name}"
        elif role == "cart":
            text = f"because {name} is in your cart"
        else:
            text = _SAID.get(kind or "", _SAID["view"]).format(name)
        return SlotReason(
            text=text,
            item_id=source,
            title=title,
            role=role,  # type: ignore[arg-type]
            event_type=kind,
            measure="item_tower_cosine",
            value=round(float(cosines[best]), 4),
        )


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)
