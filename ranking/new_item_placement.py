"""Where a new item goes on a rail: at the rank its content earned in the towers' retrieval.

An item listed since the model was trained (no statistics row: `serving.new_items` gives it
attributes and a content vector, never history) reaches the candidate pool only through
the towers, which score its content against the session like any other item. The
re-ranker cannot judge it: it was trained on items with history, and a new item's
popularity, co-visitation and recency columns are all missing, so it sorts below every
known item (on REES46's later window listed items reached the pool but almost never the
slots). The customer's design says new products ride their content signal until they have
history; this stage is that rule, made explicit:

- `placement: tower_rank` (the default) puts each new item at the position the towers'
  ranking gave it (1-based rank r -> position r - 1, or `first_position` if that is lower
  on the rail), and the known items keep the re-ranker's order around it;
- `max_in_slots` caps how many new items can hold the rail's slots; the rest wait just
  below the slots (still in the pool a wider rail or the exploration slot reads);
- `placement: ranker` leaves the re-ranker's order as it is.

A placed item takes the score of the item it lands before, so the stages after (MMR reads
scores as relevance) see a list whose scores never rise.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence

import numpy as np

from railtower.settings import NewItemSettings
from ranking.candidate_fusion import CandidateTable
from ranking.candidates import Candidate


def unknown_items(items: Iterable[str], known: Collection[str]) -> frozenset[str]:
    """The items of `items` the model has no history for (not in `known`, the statistics'
    rows): listed since it was trained."""
    return frozenset(i for i in items if i not in known)


def tower_placed(table: CandidateTable, known: Collection[str]) -> dict[int, dict[str, int]]:
    """Per query (batch position) with any, its new items the towers retrieved -> their
    1-based rank in the towers' list. Empty when no request saw a new item (the common
    case, checked over the towers' rows only)."""
    rank = np.asarray(table["two_tower_rank"], dtype=float)
    rows = np.flatnonzero(np.isfinite(rank))
    if not len(rows):
        return {}
    items = table["item_id"][rows].tolist()
    new = [k for k, item in enumerate(items) if item not in known]
    placed: dict[int, dict[str, int]] = {}
    queries = table["query"]
    for k in new:
        row = rows[k]
        placed.setdefault(int(queries[row]), {})[str(items[k])] = int(rank[row])
    return placed


def place_new_items(
    ranked: Sequence[Candidate],
    tower_ranks: Mapping[str, int],
    slots: int,
    settings: NewItemSettings,
) -> list[Candidate]:
    """`ranked` (one request's re-ranked list) with each new item of `tower_ranks` moved to
    its towers' position, the known items in their order around them (module docstring).

    A new item that the re-ranker's list does not hold (cut from the pool) stays out.
    """
    if settings.placement == "ranker" or not tower_ranks:
        return list(ranked)
    present = [c.item_id for c in ranked if c.item_id in tower_ranks]
    if not present:
        return list(ranked)
    out = [c for c in ranked if c.item_id not in tower_ranks]
    targets = sorted(
        (max(tower_ranks[item] - 1, settings.first_position), tower_ranks[item], item)
        for item in present
    )
    in_slots, last = 0, -1
    for target, _, item in targets:
        if target < slots:
            if settings.max_in_slots is not None and in_slots >= settings.max_in_slots:
                target = slots
            else:
                in_slots += 1
        # inserted in increasing position order, so each lands exactly at its target (one
        # below the previous new item where targets tie, the towers' better rank first; the
        # end of a list shorter than that)
        at = min(max(target, last + 1), len(out))
        score = out[at].score if at < len(out) else (out[-1].score if out else 0.0)
        out.insert(at, Candidate(item, score))
        last = at
    return out
