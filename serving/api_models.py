"""The rails endpoint's request and response, validated by pydantic (bad input -> a clear 4xx)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

ServedBy = Literal["cache", "computed", "fallback"]
ItemId = Annotated[str, StringConstraints(min_length=1, max_length=128)]
# Where a slot's item came from (serving/provenance.py): named by the candidate sources,
# added by the rules' popular fill, placed by a pin without being a candidate, the
# computation-failed fallback (popular items under the rules), or the pre-warmed cache.
Tier = Literal["candidates", "popular_fill", "pin", "fallback", "cache"]


class RequestContext(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device: str | None = Field(None, max_length=64)
    locale: str | None = Field(None, max_length=32)
    country: str | None = Field(None, max_length=64)

    def key(self) -> str | None:
        """The one context value the towers read (the same precedence as training)."""
        return self.device or self.locale or self.country


class RailRequest(BaseModel):
    """One rail for one shopper.

    Example:
        {"session_id": "s-42", "item_id": "1005115", "slots": 8}
    """

    model_config = ConfigDict(extra="forbid")

    session_id: str = Field(min_length=1, max_length=128, description="the storefront session")
    user_id: str | None = Field(None, max_length=128)
    item_id: str | None = Field(
        None, min_length=1, max_length=128, description="the product on the page (pdp_fbt)"
    )
    cart: list[str] = Field(
        default_factory=list, max_length=200, description="item ids in the cart (cart_upsell)"
    )
    slots: int = Field(12, ge=1, le=100, description="how many items the rail shows")
    context: RequestContext | None = None
    exclude: list[ItemId] = Field(
        default_factory=list,
        max_length=500,
        description="item ids never to show (unknown ids are harmless)",
    )
    explain: bool = Field(False, description="add a provenance object to every slot")


class SourceRank(BaseModel):
    source: str  # one of ranking.candidate_fusion.SOURCES
    rank: int  # 1-based, in that source's own list
    score: float


class RuleTouch(BaseModel):
    kind: str  # pin, boost, bury, pin_skipped (ranking.rules.RuleEffect.kind)
    rule_index: int | None  # index into the served rule set's rules
    detail: str


class SlotReason(BaseModel):
    """The session, page or cart item closest to the slot's item, and how that was measured."""

    text: str  # e.g. "because you viewed Samsung Galaxy A50"
    item_id: str
    title: str | None
    role: Literal["session", "page", "cart"]
    event_type: str | None
    # item_tower_cosine: cosine of the two items' item-tower vectors (the embedding the
    # retrieval index searches); the highest over the context items wins
    measure: Literal["item_tower_cosine"]
    value: float


class Provenance(BaseModel):
    tier: Tier
    sources: list[SourceRank] = []
    fused_rank: int | None = None  # in the fused candidate order (the re-ranker's input)
    ranker_rank: int | None = None  # after the re-ranker
    mmr_rank: int | None = None  # after MMR (the rules' input)
    final_rank: int  # 1-based slot in this response
    explored: bool = False  # the exploration slot's bandit put it here
    rules: list[RuleTouch] = []
    reason: SlotReason | None = None
    note: str | None = None  # what is not known (e.g. a cached rail's stage ranks)


class RailItem(BaseModel):
    item_id: str
    score: float
    title: str | None = None
    category: str | None = None
    # only with explain=true; the route omits unset fields, so a plain response has no key
    provenance: Provenance | None = None


class RailResponse(BaseModel):
    rail: str
    session_id: str
    model_version: str
    served_by: ServedBy
    # why the answer is degraded or came from a fallback; empty when every stage answered
    reasons: list[str]
    # where the session vector came from: redis, triton, in_process, new_item (a page of an
    # item listed after training: its own item-tower vector), or none
    vector_source: str
    items: list[RailItem]
    timings_ms: dict[str, float]
