"""The rails endpoint's request and response, validated by pydantic (bad input -> a clear 4xx)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ServedBy = Literal["cache", "computed", "fallback"]


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


class RailItem(BaseModel):
    item_id: str
    score: float
    title: str | None = None
    category: str | None = None


class RailResponse(BaseModel):
    rail: str
    session_id: str
    model_version: str
    served_by: ServedBy
    # why the answer is degraded or came from a fallback; empty when every stage answered
    reasons: list[str]
    # where the session vector came from: redis, triton, in_process, or none
    vector_source: str
    items: list[RailItem]
    timings_ms: dict[str, float]
