"""The three rails, stage by stage: fused candidates -> re-ranker -> MMR -> merchandising rules.

- homepage_hero: the session vector's HNSW neighbours fused with co-visitation, session-kNN
  and popularity candidates, re-ranked, diversified, then the rules.
- pdp_fbt: the same sources seeded by the product on the page (co-cart / co-purchase
  neighbours, the item tower's neighbours); the ranker's complementarity and same-shelf
  features put complements above substitutes. The viewed item is always excluded.
- cart_upsell: seeded by the cart; nothing already in the cart is ever returned.

Every rail returns as many slots as asked while eligible items exist (popular items fill
in when the candidates run out) and never a blocked or out-of-stock item. The evaluation
harness reads each stage's output; serving reads the last.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Literal

import lightgbm as lgb
import numpy as np

from railtower.settings import RankingSettings
from ranking.business_features import ItemStats, build_features
from ranking.candidate_fusion import CandidateTable, fuse
from ranking.candidates import Candidate
from ranking.item_attributes import ItemAttributes
from ranking.mmr import mmr
from ranking.retriever import CandidateSource, Query
from ranking.rules import RuleSet, apply_rules

Stage = Literal["candidates", "ranker", "mmr", "rules"]
STAGES: tuple[Stage, ...] = ("candidates", "ranker", "mmr", "rules")


@dataclass
class RailPipeline:
    """Everything a rail needs after the request is parsed, fitted and loaded.

    Attributes:
        sources: candidate sources by name (see ranking.candidate_fusion.SOURCES).
        stats: the training window's item statistics (the ranker's item features).
        rankers: a LightGBM booster per rail; a rail without one keeps the fused order.
        attributes: category, price band, stock and margin per item (MMR and rules).
        rule_set: the published merchandising rules, or None.
        settings: fusion depth, MMR λ.
        depth: candidates kept after fusion (the re-ranker's input).
        slots: items on a rail.
    """

    sources: dict[str, CandidateSource]
    stats: ItemStats
    attributes: ItemAttributes
    settings: RankingSettings
    depth: int
    slots: int
    rankers: dict[str, lgb.Booster] = field(default_factory=dict)
    rule_set: RuleSet | None = None
    _popular: np.ndarray | None = field(default=None, init=False, repr=False)

    def candidate_table(
        self, queries: Sequence[Query], sources: Mapping[str, CandidateSource] | None = None
    ) -> CandidateTable:
        """Every source's candidates for the batch, fused and cut to `depth`.

        `sources` replaces the pipeline's own (serving swaps in a tower source that reuses
        a session vector from Redis or Triton).
        """
        per_source = {
            name: source.candidates(queries, self.settings.per_source)
            for name, source in (sources or self.sources).items()
        }
        return fuse(per_source, len(queries), self.depth, self.settings.rrf_k)

    def ranker_scores(
        self, rail: str, table: CandidateTable, queries: Sequence[Query]
    ) -> np.ndarray:
        """The re-ranker's score per table row; the fused score where the rail has no ranker."""
        booster = self.rankers.get(rail)
        if booster is None or table.frame.empty:
            return table.frame["fused"].to_numpy(dtype=float)
        features = build_features(table, queries, self.stats)
        return booster.predict(features, num_threads=0)

    def run(
        self,
        rail: str,
        queries: Sequence[Query],
        stages: Sequence[Stage] = STAGES,
        mmr_lambda: float | None = None,
        sources: Mapping[str, CandidateSource] | None = None,
    ) -> dict[Stage, list[list[Candidate]]]:
        """Each requested stage's ranked list per query (the full depth, slots first).

        MMR re-orders the first `slots` and leaves the rest in ranker order, so recall at
        the candidate depth stays comparable across stages; the rules stage fills the slots
        from popular items when exclusions leave too few.
        """
        table = self.candidate_table(queries, sources)
        out: dict[Stage, list[list[Candidate]]] = {}
        if "candidates" in stages:
            out["candidates"] = table.ranked()
        if not set(stages) & {"ranker", "mmr", "rules"}:
            return out
        scored = CandidateTable(
            table.frame.assign(ranker=self.ranker_scores(rail, table, queries)), table.queries
        )
        ranked = scored.ranked("ranker")
        if "ranker" in stages:
            out["ranker"] = ranked
        if not set(stages) & {"mmr", "rules"}:
            return out
        lam = self.settings.mmr_lambda if mmr_lambda is None else mmr_lambda
        diversified = [self.diversify(row, lam) for row in ranked]
        if "mmr" in stages:
            out["mmr"] = diversified
        if "rules" in stages:
            out["rules"] = [
                self.apply_rules(rail, row, query, self.depth)
                for row, query in zip(diversified, queries, strict=True)
            ]
        return out

    def diversify(
        self, ranked: Sequence[Candidate], lambda_: float, slots: int | None = None
    ) -> list[Candidate]:
        """MMR picks the slots from the top of the list; the rest keeps its order behind them."""
        n = self.slots if slots is None else slots
        top = mmr(ranked[: max(self.settings.mmr_window, n)], self.attributes, n, lambda_)
        chosen = {c.item_id for c in top}
        ordered = top + [c for c in ranked if c.item_id not in chosen]
        # The rules re-sort by score after boosting, which would undo MMR's order; so each
        # position takes the score of the same rank in the ranker's order: MMR's order
        # stands and a boost still weighs against the ranker's own scale.
        scores = sorted((c.score for c in ordered), reverse=True)
        return [Candidate(c.item_id, s) for c, s in zip(ordered, scores, strict=True)]

    def apply_rules(
        self,
        rail: str,
        ranked: Sequence[Candidate],
        query: Query,
        length: int,
        slots: int | None = None,
    ) -> list[Candidate]:
        """The rules over `ranked` (at most `length` items), never fewer than `slots`.

        Out-of-stock items are dropped even without a rule set. When exclusions leave fewer
        than `slots`, popular items the query does not exclude are added below every
        candidate and judged by the rules like any other, until the slots are full or the
        catalogue has nothing eligible left.
        """
        rule_set = self.rule_set or _NO_RULES
        now = self.request_time(query)
        pool = [c for c in ranked if c.item_id not in query.exclude]

        def ruled() -> list[Candidate]:
            # The request's exclusions outrank every rule: a pin on the product on the page
            # or on a cart item is skipped, not shown.
            return apply_rules(pool, rule_set, self.attributes, rail, length, now, query.exclude)

        result = ruled()
        wanted = min(length, self.slots if slots is None else slots)
        fill = self._popular_fill(query, {c.item_id for c in pool})
        while len(result) < wanted:
            more = list(itertools.islice(fill, wanted))
            if not more:
                break  # nothing eligible left in the catalogue
            floor = min((c.score for c in pool), default=0.0)
            pool += [Candidate(item, _below(floor, i)) for i, item in enumerate(more)]
            result = ruled()
        return result

    def _popular_fill(self, query: Query, taken: set[str]) -> Iterator[str]:
        if self._popular is None:
            self._popular = self.stats.item_ids[np.argsort(-self.stats.popularity, kind="stable")]
        for item in self._popular.tolist():
            if item not in taken and item not in query.exclude:
                yield item

    def request_time(self, query: Query) -> datetime:
        """The time rules are judged at: the session's last event, else the window's end."""
        if query.session_times:
            return datetime.fromtimestamp(max(query.session_times), UTC)
        if math.isfinite(self.stats.end_time):
            return datetime.fromtimestamp(self.stats.end_time, UTC)
        return datetime.now(UTC)

    def with_rules(self, rule_set: RuleSet | None) -> RailPipeline:
        """The same pipeline under another rule set (dry runs, shadow evaluation)."""
        return replace(self, rule_set=rule_set)


_NO_RULES = RuleSet(name="none", version="0")


def _below(floor: float, i: int) -> float:
    """Scores for fill items: below every candidate, in popularity order."""
    return min(floor, 0.0) - 1.0 - i


def ranked_ids(lists: Mapping[Stage, list[list[Candidate]]], stage: Stage) -> list[list[str]]:
    return [[c.item_id for c in row] for row in lists[stage]]
