"""The one composition of a rail's stages: fused candidates -> re-ranker (new items at their
towers' rank) -> MMR -> rules.

Every path that computes a rail goes through :func:`compute`: the HTTP request
(`serving.stages.run_stages`), the consumer's pre-warming (`RailService.prewarm`), the shadow
arms and the console's rules preview, the evaluator and the parity check
(`RailPipeline.run`, a view of it). So a rail is ranked the same way wherever it is computed,
and a change of order or of a stage's inputs is made here once.

The stages themselves are `RailPipeline`'s methods (ranking.rails); the engine only decides
their order and what each one reads. It knows no HTTP, broker or Redis: a caller that needs a
time budget on the re-ranker passes its own `rank`, and per-stage timings land in `timings`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ranking.candidate_fusion import CandidateTable
from ranking.candidates import Candidate
from ranking.new_item_placement import place_new_items, tower_placed
from ranking.retriever import CandidateSource, Query

if TYPE_CHECKING:  # the engine composes RailPipeline's stages; rails.py delegates run() here
    from ranking.rails import RailPipeline, RuledSlots, Stage

# The re-ranker stage as a call: (candidate table, its queries) -> one score per row.
Rank = Callable[[CandidateTable, Sequence[Query]], np.ndarray]


@dataclass(frozen=True)
class RailRun:
    """Each stage's output for a batch of queries, up to the last stage asked for.

    `table` is the fused candidates (fused order, every source's evidence: what provenance
    reads). `ranked` is the re-ranker's order, `diversified` MMR's (the slots first, then the
    rest in ranker order), `ruled` the rules' slots with their effects and popular fill; each
    is None when the run stopped before it.
    """

    table: CandidateTable
    ranked: list[list[Candidate]] | None = None
    diversified: list[list[Candidate]] | None = None
    ruled: list[RuledSlots] | None = None


def compute(
    pipeline: RailPipeline,
    rail: str,
    queries: Sequence[Query],
    *,
    until: Stage = "rules",
    sources: Mapping[str, CandidateSource] | None = None,
    rank: Rank | None = None,
    slots: int | None = None,
    length: int | None = None,
    mmr_lambda: float | None = None,
    timings: MutableMapping[str, float] | None = None,
) -> RailRun:
    """Run `rail`'s stages for `queries`, in order, up to `until`.

    Args:
        sources: replaces the pipeline's candidate sources (serving swaps in a tower source
            over a session vector it already has).
        rank: the re-ranker stage (default `pipeline.ranker_scores`, no time budget).
        slots: items on the rail (default the pipeline's): what MMR picks and the rules fill.
        length: how many ruled items to keep (default the candidate depth, so recall at depth
            stays comparable across stages; serving asks for its slots plus the exploration
            window).
        mmr_lambda: MMR's relevance weight (default the pipeline's).
        timings: receives each stage's wall time in milliseconds under its name.
    """
    n = pipeline.slots if slots is None else slots
    clock = _Clock(timings)
    table = pipeline.candidate_table(queries, sources, rail)
    clock.lap("candidates")
    if until == "candidates":
        return RailRun(table)
    scores = (rank or _unbudgeted(pipeline, rail))(table, queries)
    ranked = table.with_columns(ranker=scores).ranked("ranker")
    ranked = _placed(pipeline, table, ranked, n)
    clock.lap("ranker")
    if until == "ranker":
        return RailRun(table, ranked)
    lam = pipeline.settings.mmr_lambda if mmr_lambda is None else mmr_lambda
    diversified = [pipeline.diversify(row, lam, n) for row in ranked]
    clock.lap("mmr")
    if until == "mmr":
        return RailRun(table, ranked, diversified)
    keep = pipeline.depth if length is None else length
    ruled = [
        pipeline.explain_rules(rail, row, query, keep, n)
        for row, query in zip(diversified, queries, strict=True)
    ]
    clock.lap("rules")
    return RailRun(table, ranked, diversified, ruled)


def rerule(
    pipeline: RailPipeline, rail: str, diversified: Sequence[Candidate], query: Query, slots: int
) -> list[Candidate]:
    """The rules stage alone over an MMR output another run produced: what a different rule
    set makes of the very list the served rules read (shadow rule arms, the console's
    comparison)."""
    return pipeline.explain_rules(rail, diversified, query, slots, slots).outcome.candidates


def fallback(pipeline: RailPipeline, rail: str, query: Query, slots: int) -> RuledSlots:
    """The rules stage over no candidates: popular items the query does not exclude, under
    the rules in force. What a rail serves when its computation failed."""
    return pipeline.explain_rules(rail, [], query, slots, slots)


def _placed(
    pipeline: RailPipeline, table: CandidateTable, ranked: list[list[Candidate]], slots: int
) -> list[list[Candidate]]:
    """The ranked lists with new items at their towers' rank (ranking.new_item_placement):
    part of the ranker stage, so MMR, the rules and every caller see the same order."""
    settings = pipeline.settings.new_items
    if settings.placement == "ranker":
        return ranked
    placed = tower_placed(table, pipeline.stats.row)
    for q, tower_ranks in placed.items():
        ranked[q] = place_new_items(ranked[q], tower_ranks, slots, settings)
    return ranked


def _unbudgeted(pipeline: RailPipeline, rail: str) -> Rank:
    return lambda table, queries: pipeline.ranker_scores(rail, table, queries)


class _Clock:
    """Stage laps into a caller's timings (milliseconds), or nothing."""

    def __init__(self, timings: MutableMapping[str, float] | None) -> None:
        self.timings = timings
        self.since = time.perf_counter()

    def lap(self, stage: str) -> None:
        if self.timings is None:
            return
        now = time.perf_counter()
        self.timings[stage] = round((now - self.since) * 1000, 3)
        self.since = now
