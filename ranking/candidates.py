"""The unit every ranking stage passes on: an item id and the score that ordered it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import partial
from typing import NamedTuple


class Candidate(NamedTuple):
    """One ranked item (immutable).

    A named tuple rather than a frozen dataclass: every rail builds a few hundred at each
    stage, and a frozen dataclass's __init__ cost more than the stages' arithmetic.

    Attributes:
        item_id: the catalogue item id (always a string, as in the canonical schema).
        score: the score of the stage that produced it; higher is better.

    Example:
        >>> Candidate("tv-55", 0.93)
        Candidate(item_id='tv-55', score=0.93)
    """

    item_id: str
    score: float


# tuple.__new__ bound to Candidate: builds the very same named tuple without the Python-level
# __new__ a named tuple's constructor runs, half the cost per candidate, and a rail builds
# a few thousand of them.
new_candidate = partial(tuple.__new__, Candidate)


def candidates_of(items: Iterable[str], scores: Iterable[float]) -> list[Candidate]:
    """`[Candidate(i, s) for i, s in zip(items, scores)]`, at half the cost (the stages'
    hot path). `items` must already be strings and `scores` floats: nothing is converted.

    Example:
        >>> candidates_of(["a", "b"], [0.5, 0.25])
        [Candidate(item_id='a', score=0.5), Candidate(item_id='b', score=0.25)]
    """
    return list(map(new_candidate, zip(items, scores, strict=True)))


def unique_by_item(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The candidates with each item id's first occurrence only, order kept.

    Merged candidate sources can name an item twice; a rail must never show it twice, and
    the first occurrence is the better-ranked one.
    """
    ids = [c[0] for c in candidates]
    if len(set(ids)) == len(ids):  # the common case: no repeat, one pass in C
        return list(candidates)
    seen: set[str] = set()
    unique = []
    for candidate in candidates:
        if candidate.item_id not in seen:
            seen.add(candidate.item_id)
            unique.append(candidate)
    return unique
