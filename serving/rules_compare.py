"""The console's rule comparison: a candidate rule set against the served one, on sessions.

Each sampled session's rails go through the served stages once, up to MMR; both rule sets
then judge that same ranked list, with the request's exclusions and the popular fill, so
a difference the comparison shows is the rules' alone. Served by
`POST /v1/console/rules/compare` (serving/console.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

import redis
from pydantic import BaseModel, Field

from ranking.engine import rerule
from ranking.rail_inputs import RAIL_INPUTS, rail_parts
from ranking.retriever import Query as RailQuery
from ranking.rules import RuleSet
from serving.api_models import RailRequest
from serving.console_sessions import loaded_model, recent_sessions, session_targets
from serving.rail_service import LoadedRails
from serving.request_checks import BadRequest
from serving.service import RailService
from serving.stages import Ranker, Trace, build_query, in_process_vector, run_stages

# The rails a session's own events define (its page: last item; its cart: carted items).
PREVIEW_RAILS = ("homepage_hero", "pdp_fbt", "cart_upsell")


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


def rule_set_label(rule_set: RuleSet) -> str:
    return f"{rule_set.name}@{rule_set.version}"


def compare_rules(service: RailService, proposed: RuleSet, body: CompareRequest) -> CompareResponse:
    """Each rail of each sampled session under the served rules and under `proposed`.

    Sessions are the named ones, then the most recent others, up to `body.sample`. Each
    (session, rail) is ranked once through the served stages (towers, fusion, re-ranker,
    MMR); both rule sets then go through the served rules stage over that same list, with
    the request's exclusions and the popular fill, so a difference is the rules' alone.
    """
    loaded = loaded_model(service)  # one model for the whole comparison
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
        current=rule_set_label(current),
        proposed=rule_set_label(proposed),
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
