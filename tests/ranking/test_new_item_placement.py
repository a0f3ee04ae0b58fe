"""New items on a rail: placed at the towers' rank, the known items in the re-ranker's order
around them, within the slot cap; and the engine applies it on every path."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from railtower.settings import NewItemSettings
from ranking.candidate_fusion import SOURCES, CandidateTable
from ranking.candidates import Candidate
from ranking.new_item_placement import place_new_items, tower_placed, unknown_items

KNOWN = [Candidate(f"k{i}", 10.0 - i) for i in range(20)]
TOWER_RANK = NewItemSettings()


def _ids(row: list[Candidate]) -> list[str]:
    return [c.item_id for c in row]


def test_a_new_item_lands_at_its_tower_rank_with_its_neighbours_score():
    ranked = [*KNOWN, Candidate("new", -5.0)]  # the re-ranker put it last
    out = place_new_items(ranked, {"new": 3}, slots=12, settings=TOWER_RANK)
    assert _ids(out)[:5] == ["k0", "k1", "new", "k2", "k3"]
    assert out[2].score == KNOWN[2].score  # the score of the item it lands before
    assert _ids(out)[3:] == _ids(KNOWN)[2:]


def test_several_new_items_each_land_exactly_at_their_rank():
    ranked = [*KNOWN, Candidate("a", -1.0), Candidate("b", -2.0), Candidate("c", -3.0)]
    out = place_new_items(ranked, {"a": 5, "b": 1, "c": 2}, slots=12, settings=TOWER_RANK)
    assert [_ids(out).index(i) for i in ("b", "c", "a")] == [0, 1, 4]


def test_first_position_and_the_slot_cap_hold_new_items_back():
    ranked = [*KNOWN, Candidate("a", -1.0), Candidate("b", -2.0), Candidate("c", -3.0)]
    ranks = {"a": 1, "b": 2, "c": 30}
    out = place_new_items(ranked, ranks, slots=12, settings=NewItemSettings(first_position=4))
    assert _ids(out)[4:6] == ["a", "b"] and _ids(out)[:4] == ["k0", "k1", "k2", "k3"]
    capped = place_new_items(ranked, ranks, slots=12, settings=NewItemSettings(max_in_slots=1))
    assert _ids(capped)[0] == "a" and _ids(capped)[12] == "b"  # b waits just below the slots
    assert _ids(capped).index("c") == 22  # rank 30 on a 23-item list: the end


def test_the_ranker_placement_and_an_empty_map_change_nothing():
    ranked = [*KNOWN, Candidate("new", -5.0)]
    assert place_new_items(ranked, {"new": 1}, 12, NewItemSettings(placement="ranker")) == ranked
    assert place_new_items(ranked, {}, 12, TOWER_RANK) == ranked
    # an item the pool no longer holds is not brought back
    assert place_new_items(KNOWN, {"gone": 1}, 12, TOWER_RANK) == KNOWN


@settings(max_examples=200, deadline=None)
@given(
    known=st.integers(0, 30),
    new=st.dictionaries(st.sampled_from([f"n{i}" for i in range(8)]), st.integers(1, 40)),
    slots=st.integers(1, 15),
    first=st.integers(0, 5),
    cap=st.one_of(st.none(), st.integers(0, 4)),
)
def test_placement_is_a_reordering_that_keeps_the_known_order(known, new, slots, first, cap):  # type: ignore[no-untyped-def]
    ranked = [Candidate(f"k{i}", float(100 - i)) for i in range(known)]
    ranked += [Candidate(item, float(-k)) for k, item in enumerate(new)]
    config = NewItemSettings(first_position=first, max_in_slots=cap)
    out = place_new_items(ranked, new, slots, config)
    assert sorted(_ids(out)) == sorted(_ids(ranked))
    assert [i for i in _ids(out) if i.startswith("k")] == [f"k{i}" for i in range(known)]
    scores = [c.score for c in out]
    assert all(a >= b for a, b in zip(scores, scores[1:], strict=False))
    positions = {item: p for p, item in enumerate(_ids(out))}
    if cap is not None and known >= slots:  # a shorter list fills its slots with what it has
        assert len([i for i in new if positions[i] < slots]) <= cap
    if known >= first:  # enough known items to fill the positions above first_position
        assert all(positions[i] >= first for i in new)
    wanted = {item: max(rank - 1, first) for item, rank in new.items()}
    if (
        cap is None
        and len(set(wanted.values())) == len(new)
        and max(wanted.values(), default=0) < known
    ):
        assert positions == {**positions, **wanted}  # distinct targets: each exactly at its own


def _table(rows: list[tuple[int, str, float]], queries: int) -> CandidateTable:
    columns: dict[str, np.ndarray] = {
        "query": np.array([q for q, _, _ in rows], dtype=np.int64),
        "item_id": np.array([i for _, i, _ in rows], dtype=object),
        "fused": np.ones(len(rows)),
    }
    for name in SOURCES:
        columns[f"{name}_rank"] = np.full(len(rows), np.nan)
        columns[f"{name}_score"] = np.full(len(rows), np.nan)
    columns["two_tower_rank"] = np.array([r for _, _, r in rows], dtype=float)
    return CandidateTable(columns, queries)


def test_tower_placed_finds_the_new_items_the_towers_named_per_query():
    table = _table(
        [
            (0, "k0", 1.0),
            (0, "new-a", 2.0),
            (1, "k1", np.nan),
            (1, "new-b", np.nan),
            (2, "new-c", 7.0),
        ],
        queries=3,
    )
    known = {"k0": 0, "k1": 1}
    # new-b was not retrieved by the towers (no rank): it keeps the re-ranker's place
    assert tower_placed(table, known) == {0: {"new-a": 2}, 2: {"new-c": 7}}
    assert tower_placed(_table([(0, "k0", 1.0)], 1), known) == {}
    assert unknown_items(["k0", "x", "k1"], known) == frozenset({"x"})
