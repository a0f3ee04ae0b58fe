"""The cached homepage rail in Redis: what is stored with it (items, the marker of the
session state it was computed from, the exploration draw) and how it is read back."""

from __future__ import annotations

from collections.abc import Sequence

from ranking.candidates import Candidate
from ranking.exploration import Explored
from ranking.rails import RailPipeline
from ranking.retriever import Query
from ranking.rules import ineligible


def rail_payload(
    marker: str, items: Sequence[Candidate], explored: Explored | None
) -> dict[str, object]:
    """The cached rail: its items and, when the exploration slot drew, that draw."""
    payload: dict[str, object] = {
        "marker": marker,
        "items": [{"item_id": c.item_id, "score": c.score} for c in items],
    }
    if explored is not None and explored.slot is not None:
        payload["exploration"] = {
            "slot": explored.slot,
            "choice_set": explored.choice_set,
            "probabilities": [explored.probabilities[i] for i in explored.choice_set],
        }
    return payload


def stored_exploration(payload: dict[str, object], slots: int) -> Explored | None:
    """The exploration draw stored with a cached rail (its items are set by the caller); None
    when the rail was warmed without one or for a different number of slots."""
    stored = payload.get("exploration")
    if not isinstance(stored, dict):
        return None
    items = payload.get("items", [])
    slot = int(stored["slot"])
    if slot >= slots or len(items) != slots:  # type: ignore[arg-type]
        return None  # warmed for another slot count: the draw was over another cut
    choice = [str(i) for i in stored["choice_set"]]
    chosen = str(items[slot]["item_id"])  # type: ignore[index]
    probabilities = dict(zip(choice, map(float, stored["probabilities"]), strict=True))
    return Explored([], slot, choice, chosen, probabilities)


def cached_rail(
    payload: dict[str, object], pipeline: RailPipeline, rail: str, query: Query, slots: int
) -> tuple[list[Candidate], Explored | None] | None:
    """The pre-warmed rail (`payload`, stored for this session state) as this request may
    show it, and its exploration draw when it was warmed with one; None to compute afresh.

    The exploration slot is drawn when the rail is computed (request or warm time) and the
    draw is stored with the rail, so a cached answer shows exactly what the stored
    propensities describe. A cached rail that explored and lost an item since (out of stock,
    blocked, excluded by the request) is recomputed instead: the slots would shift under the
    logged propensity. So is one left with fewer items than slots.
    """
    stored = payload.get("items", [])
    # What the query excludes now, or went out of stock or got blocked since the rail was
    # warmed, leaves it at once: the same judgement as the rules stage, without re-ranking.
    removed = ineligible(
        [i["item_id"] for i in stored],  # type: ignore[union-attr]
        pipeline.rules,
        pipeline.attributes,
        rail,
        pipeline.request_time(query),
        query.exclude,
    )
    items = [i for i in stored if i["item_id"] not in removed]  # type: ignore[union-attr]
    if len(items) < slots:
        return None
    explored = stored_exploration(payload, slots)
    if "exploration" in payload and (len(items) < len(stored) or explored is None):  # type: ignore[arg-type]
        return None
    top = [Candidate(i["item_id"], float(i["score"])) for i in items[:slots]]
    if explored is not None:
        explored = Explored(
            top, explored.slot, explored.choice_set, explored.chosen, explored.probabilities
        )
    return top, explored
