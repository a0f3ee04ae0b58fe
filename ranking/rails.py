"""The three rails, stage by stage: fused candidates -> re-ranker -> MMR -> merchandising rules.

- homepage_hero: the session vector's HNSW neighbours fused with co-visitation, session-kNN
  and popularity candidates, re-ranked, diversified, then the rules.
- pdp_fbt: the same sources seeded by the product on the page (co-cart / co-purchase
  neighbours, the item tower's neighbours); the ranker's complementarity and same-shelf
  features put complements above substitutes. The viewed item is always excluded.
- cart_upsell: seeded by the cart; nothing already in the cart is ever returned.
- deals_for_you: items in a deal-spike state now, plus the strongest discounts against
  their own rolling price level (ranking.price_history), ranked by deal strength times the
  shopper's affinity (tower rank, category, brand and price-band match: the re-ranker's
  own features). No data set has a target for it, so it has no trained ranker and the
  harness never scores it.

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
import pandas as pd

from railtower.settings import RankingSettings
from ranking.business_features import FEATURES, ItemStats, build_features
from ranking.candidate_fusion import (
    SOURCES,
    CandidateTable,
    fuse,
    source_order,
    with_pair_columns,
)
from ranking.candidates import Candidate, candidates_of
from ranking.item_attributes import ItemAttributes
from ranking.mmr import mmr
from ranking.price_history import column, deal_strength
from ranking.retriever import CandidateSource, Query
from ranking.rule_set import NO_RULES
from ranking.rules import RuleSet, RulesOutcome, explain_rules

Stage = Literal["candidates", "ranker", "mmr", "rules"]
STAGES: tuple[Stage, ...] = ("candidates", "ranker", "mmr", "rules")
DEALS_RAIL = "deals_for_you"
# Fewer candidate rows than this are scored on one thread (see ranker_scores).
_PARALLEL_ROWS = 20_000
_FEATURE = {name: i for i, name in enumerate(FEATURES)}


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
    # per rail, the order its ranker stage serves (chosen on the ranker window's held-out
    # sessions at fit time): "ranker", "fused" or a source's name; absent = "ranker"
    orders: dict[str, str] = field(default_factory=dict)
    _popular: np.ndarray | None = field(default=None, init=False, repr=False)

    def candidate_table(
        self,
        queries: Sequence[Query],
        sources: Mapping[str, CandidateSource] | None = None,
        rail: str | None = None,
    ) -> CandidateTable:
        """Every source's candidates for the batch, fused and cut to `depth`.

        `sources` replaces the pipeline's own (serving swaps in a tower source that reuses
        a session vector from Redis or Triton). For deals_for_you the candidates are the
        current deals instead, carrying the fused sources' evidence where they named one.
        """
        running = sources or self.sources
        per_source = {
            name: source.candidates(queries, self.settings.per_source)
            for name, source in running.items()
        }
        fused = fuse(per_source, len(queries), self.depth, self.settings.rrf_k)
        fused = with_pair_columns(fused, queries, running)
        return self.deal_table(fused, queries) if rail == DEALS_RAIL else fused

    def deal_table(self, fused: CandidateTable, queries: Sequence[Query]) -> CandidateTable:
        """Per query, the items in a deal spike at its time plus the strongest discounts.

        Excluded and out-of-stock items never enter (the rules would drop them anyway, and
        a slot is worth more to a deal that can be bought). Rows carry `deal_strength` and
        the fused table's columns for the items the sources also named (NaN otherwise).
        """
        deals = self.settings.deals
        prices = self.stats.prices
        rows = prices.items_with_history() if prices is not None else np.zeros(0, np.int64)
        nows = self.stats.request_times(queries)
        evidence = fused.frame.set_index(["query", "item_id"])
        parts = []
        for q, query in enumerate(queries):
            features = self.stats.price_matrix(rows, np.full(len(rows), nows[q]), ranker=False)
            strength = deal_strength(features, deals.spike_bonus)
            discount = np.nan_to_num(column(features, "price_discount_long"), nan=0.0)
            spike = column(features, "price_deal_spike") == 1.0
            order = np.argsort(-discount, kind="stable")
            strongest = order[: deals.strongest]
            strongest = strongest[discount[strongest] >= deals.min_discount]
            chosen = np.union1d(np.flatnonzero(spike), strongest)
            items = self.stats.item_ids[rows[chosen]].tolist()
            keep = [
                i
                for i, item in enumerate(items)
                if item not in query.exclude
                and not getattr(self.attributes.get(item), "out_of_stock", False)
                and not getattr(self.attributes.get(item), "retired", False)
            ]
            parts.append(
                pd.DataFrame(
                    {
                        "query": q,
                        "item_id": [items[i] for i in keep],
                        "deal_strength": strength[chosen][keep],
                    }
                )
            )
        frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
        if frame.empty:
            return CandidateTable.from_frame(
                fused.frame.iloc[0:0].assign(deal_strength=[]), len(queries)
            )
        frame = frame.join(evidence, on=["query", "item_id"])
        frame["fused"] = frame["fused"].fillna(0.0)
        frame["sources"] = frame["sources"].fillna(0).astype(np.int64)
        frame = frame.sort_values(
            ["query", "deal_strength", "item_id"], ascending=[True, False, True], kind="stable"
        ).reset_index(drop=True)
        columns = [*fused.frame.columns, "deal_strength"]
        return CandidateTable.from_frame(frame[columns], len(queries))

    def deal_scores(self, table: CandidateTable, queries: Sequence[Query]) -> np.ndarray:
        """Deal strength x (affinity_floor + the shopper's affinity), per table row.

        Affinity (0..1) is the weighted mean of the signals this shopper gives on the item:
        the tower's rank (when a tower runs), leaf and top category match, brand match and
        price-band closeness, all read from the re-ranker's own features.
        """
        deals = self.settings.deals
        if len(table) == 0:
            return np.zeros(0)
        x = build_features(table, queries, self.stats)
        tower_rank = x[:, _FEATURE["two_tower_rank"]]
        query_of = table["query"]
        tower_on = pd.Series(np.isfinite(tower_rank)).groupby(query_of).transform("any")
        tower = np.where(
            np.isfinite(tower_rank),
            1.0 - (tower_rank - 1.0) / self.settings.per_source,
            np.where(tower_on.to_numpy(), 0.0, np.nan),
        )
        band_gap = x[:, _FEATURE["band_gap"]]
        signals = [
            (deals.tower_weight, tower),
            (deals.leaf_weight, x[:, _FEATURE["leaf_match"]]),
            (deals.top_weight, x[:, _FEATURE["top_match"]]),
            (deals.brand_weight, x[:, _FEATURE["brand_match"]]),
            (deals.band_weight, 1.0 / (1.0 + np.abs(band_gap))),
        ]
        weighted = np.zeros(len(x))
        weights = np.zeros(len(x))
        for weight, signal in signals:
            present = np.isfinite(signal)
            weighted += np.where(present, weight * np.nan_to_num(signal), 0.0)
            weights += np.where(present, weight, 0.0)
        affinity = np.divide(weighted, weights, out=np.zeros(len(x)), where=weights > 0)
        strength = table["deal_strength"].astype(float)
        return strength * (deals.affinity_floor + affinity)

    def ranker_scores(
        self, rail: str, table: CandidateTable, queries: Sequence[Query]
    ) -> np.ndarray:
        """The ranker stage's score per table row: the re-ranker's, or the order the rail
        serves instead (the fused order, or one source's own; see `orders`), the fused score
        where the rail has no ranker (deals_for_you: deal strength x affinity, see
        :meth:`deal_scores`)."""
        if rail == DEALS_RAIL:
            return np.asarray(self.deal_scores(table, queries), dtype=float)
        order = self.orders.get(rail, "ranker")
        if order in SOURCES and len(table):
            return source_order(table, order)
        booster = self.rankers.get(rail)
        if booster is None or order != "ranker" or len(table) == 0:
            return table["fused"].astype(float)
        features = build_features(table, queries, self.stats)
        # one request: OpenMP threads cost more to wake than 300 rows take to score, and
        # their spinning steals the core from the next request; big batches use every core
        return booster.predict(features, num_threads=1 if len(features) < _PARALLEL_ROWS else 0)

    def run(
        self,
        rail: str,
        queries: Sequence[Query],
        stages: Sequence[Stage] = STAGES,
        mmr_lambda: float | None = None,
        sources: Mapping[str, CandidateSource] | None = None,
    ) -> dict[Stage, list[list[Candidate]]]:
        """Each requested stage's ranked list per query (the full depth, slots first): a view
        of :func:`ranking.engine.compute`, the one composition of the stages.

        MMR re-orders the first `slots` and leaves the rest in ranker order, so recall at
        the candidate depth stays comparable across stages; the rules stage fills the slots
        from popular items when exclusions leave too few.
        """
        # imported here: the engine composes this class's stages (it imports this module)
        from ranking.engine import compute

        until = max(stages, key=STAGES.index)
        done = compute(self, rail, queries, until=until, sources=sources, mmr_lambda=mmr_lambda)
        out: dict[Stage, list[list[Candidate]]] = {}
        if "candidates" in stages:
            # deals_for_you's candidates come ordered by how good a deal they are
            key = "deal_strength" if rail == DEALS_RAIL else "fused"
            out["candidates"] = done.table.ranked(key)
        if "ranker" in stages:
            out["ranker"] = done.ranked  # type: ignore[assignment]
        if "mmr" in stages:
            out["mmr"] = done.diversified  # type: ignore[assignment]
        if "rules" in stages:
            out["rules"] = [r.outcome.candidates for r in done.ruled]  # type: ignore[union-attr]
        return out

    def diversify(
        self, ranked: Sequence[Candidate], lambda_: float, slots: int | None = None
    ) -> list[Candidate]:
        """MMR picks the slots from the top of the list; the rest keeps its order behind them."""
        n = self.slots if slots is None else slots
        top = mmr(ranked[: max(self.settings.mmr_window, n)], self.attributes, n, lambda_)
        chosen = {c[0] for c in top}
        ordered = top + [c for c in ranked if c[0] not in chosen]
        # The rules re-sort by score after boosting, which would undo MMR's order; so each
        # position takes the score of the same rank in the ranker's order: MMR's order
        # stands and a boost still weighs against the ranker's own scale.
        scores = sorted([c[1] for c in ordered], reverse=True)
        return candidates_of([c[0] for c in ordered], scores)

    def explain_rules(
        self,
        rail: str,
        ranked: Sequence[Candidate],
        query: Query,
        length: int,
        slots: int | None = None,
    ) -> RuledSlots:
        """The rules over `ranked` (at most `length` items), never fewer than `slots`, with
        the rules' effects per item and the popular fill it added (per-slot provenance).

        Out-of-stock items are dropped even without a rule set. When exclusions leave fewer
        than `slots`, popular items the query does not exclude are added below every
        candidate and judged by the rules like any other, until the slots are full or the
        catalogue has nothing eligible left.
        """
        rule_set = self.rules
        now = self.request_time(query)
        pool = [c for c in ranked if c.item_id not in query.exclude]

        def ruled() -> RulesOutcome:
            # The request's exclusions outrank every rule: a pin on the product on the page
            # or on a cart item is skipped, not shown.
            return explain_rules(pool, rule_set, self.attributes, rail, length, now, query.exclude)

        result = ruled()
        wanted = min(length, self.slots if slots is None else slots)
        fill = self._popular_fill(query, {c.item_id for c in pool})
        filled: list[str] = []
        # also fill while a pin is shown above its slot: the popular items are eligible
        # items too, and a pin sits at its slot whenever enough of them exist (bounded: a
        # rule set that blocks most of the catalogue must not make a request scan all of it)
        while len(result.candidates) < wanted or (result.pins_short and len(filled) < length):
            more = list(itertools.islice(fill, wanted))
            if not more:
                break  # nothing eligible left in the catalogue
            floor = min((c.score for c in pool), default=0.0)
            pool += [Candidate(item, _below(floor, i)) for i, item in enumerate(more)]
            filled += more
            result = ruled()
        return RuledSlots(result, frozenset(filled))

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

    @property
    def rules(self) -> RuleSet:
        """The rule set in force: the published one, else none."""
        return self.rule_set or NO_RULES

    def with_rules(self, rule_set: RuleSet | None) -> RailPipeline:
        """The same pipeline under another rule set (dry runs, shadow evaluation)."""
        return replace(self, rule_set=rule_set)


@dataclass(frozen=True)
class RuledSlots:
    """The rules stage's output: the slots and effects, and the items popular fill added."""

    outcome: RulesOutcome
    filled: frozenset[str]


def _below(floor: float, i: int) -> float:
    """Scores for fill items: below every candidate, in popularity order."""
    return min(floor, 0.0) - 1.0 - i


def ranked_ids(lists: Mapping[Stage, list[list[Candidate]]], stage: Stage) -> list[list[str]]:
    return [[c.item_id for c in row] for row in lists[stage]]
