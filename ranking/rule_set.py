"""What a merchandising rule set is, and how it is read from JSON.

A rule set is a JSON file (`configs/rules/*.json`) validated by :class:`RuleSet`: a
discriminated union of rule kinds on `kind` (pin, boost, bury, block, margin_floor).
:func:`load_rule_set` reports every problem with its line in the file, the field and why,
so a merchandiser can fix the file without reading code. Applying a rule set lives in
:mod:`ranking.rules`.

One module on purpose: the rule schema and the loader that words its errors are one
contract (each problem names the line and field of the schema defined above it), and
ranking.rules, the console and the admin routes read both.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from railtower.errors import RuleSetError
from railtower.schemas import CATEGORY_SEPARATOR
from railtower.settings import RAILS, RailName
from ranking.json_locations import JsonLocations, Loc, path_text

if TYPE_CHECKING:  # only for hints: loading a rule set should not import torch
    from ranking.item_attributes import ItemInfo

TARGETS = ("item_id", "category", "brand")


# ------------------------------------------------------------------------------ the schema


class _Rule(BaseModel):
    """What every rule has: an optional validity window [valid_from, valid_until) in UTC."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    valid_from: datetime | None = None
    valid_until: datetime | None = None
    # JSON has no comments: say here why the rule exists and who asked for it.
    note: str | None = None

    @field_validator("valid_from", "valid_until", mode="before")
    @classmethod
    def _iso_text(cls, value: object) -> object:
        # Without this, pydantic would also read a bare number as a Unix timestamp.
        if value is None or isinstance(value, str | datetime):
            return value
        raise ValueError(f'write an ISO 8601 time such as "2024-11-29T00:00:00Z", got {value!r}')

    @field_validator("valid_from", "valid_until")
    @classmethod
    def _utc(cls, value: datetime | None, info: ValidationInfo) -> datetime | None:
        if value is None:
            return None
        if value.utcoffset() is None:
            raise ValueError(
                f"{value.isoformat()} has no UTC offset; add one (e.g. a trailing Z), since "
                "a local time means different instants on different servers"
            )
        value = value.astimezone(UTC)
        start = info.data.get("valid_from") if info.field_name == "valid_until" else None
        if start is not None and value <= start:
            raise ValueError(
                f"valid_until {value.isoformat()} must be after valid_from {start.isoformat()}"
            )
        return value

    def active_at(self, now: datetime) -> bool:
        """Whether `now` (timezone-aware) lies in [valid_from, valid_until)."""
        return (self.valid_from is None or self.valid_from <= now) and (
            self.valid_until is None or now < self.valid_until
        )


class _Targeted(_Rule):
    """A rule aimed at one item, one category subtree or one brand (exactly one of them)."""

    item_id: str | None = Field(None, min_length=1)
    # Matches the category and every level below it: "electronics" matches
    # "electronics > audio" but not "electronicsx".
    category: str | None = None
    brand: str | None = None

    @field_validator("category")
    @classmethod
    def _canonical_path(cls, value: str | None) -> str | None:
        if value is None:
            return None
        levels = [level.strip() for level in value.split(CATEGORY_SEPARATOR.strip())]
        if not all(levels):
            raise ValueError(
                f"category {value!r} has an empty level; join levels with "
                f"'{CATEGORY_SEPARATOR}', e.g. 'electronics > smartphone'"
            )
        return CATEGORY_SEPARATOR.join(levels)

    @field_validator("brand")
    @classmethod
    def _lower_brand(cls, value: str | None) -> str | None:
        # Catalogue brands are lower-case (railtower.schemas), so "Samsung" means "samsung".
        if value is not None and not value.strip():
            raise ValueError("brand is empty; name a brand such as 'samsung'")
        return None if value is None else value.strip().lower()

    @model_validator(mode="after")
    def _one_target(self) -> _Targeted:
        given = [name for name in TARGETS if getattr(self, name) is not None]
        if not given:
            raise PydanticCustomError(
                "rule_target",
                "{why}",
                {"why": "needs a target: one of item_id, category or brand", "field": None},
            )
        if len(given) > 1:
            why = f"has two targets ({given[0]} and {given[1]}); write one rule per target"
            raise PydanticCustomError("rule_target", "{why}", {"why": why, "field": given[1]})
        return self

    def targets(self, item_id: str, info: ItemInfo | None) -> bool:
        """Whether this rule aims at the item (unknown attributes match nothing but the id)."""
        if self.item_id is not None:
            return item_id == self.item_id
        if info is None:
            return False
        if self.category is not None:
            return category_matches(info.category_path, self.category)
        return info.brand == self.brand

    def target_text(self) -> str:
        name = next(n for n in TARGETS if getattr(self, n) is not None)
        return f"{name.replace('_id', '')} {getattr(self, name)!r}"


class PinRule(_Rule):
    """Show `item_id` at `slot` (1-based) while the rule is valid."""

    kind: Literal["pin"]
    item_id: str = Field(min_length=1)
    slot: int = Field(strict=True)

    @field_validator("slot")
    @classmethod
    def _one_based(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"slots count from 1 (the first slot is 1), got {value}")
        return value


class BoostRule(_Targeted):
    """Multiply the score of targeted items by `factor` > 1."""

    kind: Literal["boost"]
    factor: float = Field(strict=True, allow_inf_nan=False)

    @field_validator("factor")
    @classmethod
    def _above_one(cls, value: float) -> float:
        if value <= 1:
            raise ValueError(
                f"a boost factor must be greater than 1, got {value}; "
                "to push items down use kind 'bury' with a factor between 0 and 1"
            )
        return value


class BuryRule(_Targeted):
    """Multiply the score of targeted items by `factor` in (0, 1)."""

    kind: Literal["bury"]
    factor: float = Field(strict=True, allow_inf_nan=False)

    @field_validator("factor")
    @classmethod
    def _below_one(cls, value: float) -> float:
        if not 0 < value < 1:
            raise ValueError(
                f"a bury factor must be between 0 and 1 (exclusive), got {value}; "
                "to push items up use kind 'boost', to remove them use kind 'block'"
            )
        return value


class BlockRule(_Targeted):
    """Never show targeted items (a pin on a blocked item is not placed either)."""

    kind: Literal["block"]


class MarginFloorRule(_Rule):
    """Remove items whose known margin share is below `min_margin`.

    An item without a known margin is kept: most catalogues carry no margin at all, and a
    floor that emptied such rails would punish missing data rather than thin margins.
    """

    kind: Literal["margin_floor"]
    min_margin: float = Field(strict=True, allow_inf_nan=False)

    @field_validator("min_margin")
    @classmethod
    def _share(cls, value: float) -> float:
        if not 0 <= value <= 1:
            raise ValueError(f"min_margin is a share between 0 and 1 (0.15 = 15%), got {value}")
        return value


Rule = Annotated[
    PinRule | BoostRule | BuryRule | BlockRule | MarginFloorRule, Field(discriminator="kind")
]
RULE_TYPES: dict[str, type[_Rule]] = {
    "pin": PinRule,
    "boost": BoostRule,
    "bury": BuryRule,
    "block": BlockRule,
    "margin_floor": MarginFloorRule,
}


class RuleSet(BaseModel):
    """A named, versioned list of rules for some rails.

    Example:
        >>> pin = {"kind": "pin", "item_id": "a", "slot": 1}
        >>> rule_set = RuleSet(name="black-friday", version="1", rules=[pin])
        >>> rule_set.rails, rule_set.rules[0].slot
        (('homepage_hero', 'pdp_fbt', 'cart_upsell'), 1)
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    description: str | None = None
    rails: tuple[RailName, ...] = RAILS
    rules: tuple[Rule, ...] = ()

    @field_validator("rails")
    @classmethod
    def _distinct_rails(cls, rails: tuple[RailName, ...]) -> tuple[RailName, ...]:
        if not rails:
            raise ValueError("rails is empty; leave it out to apply the rules to every rail")
        if len(set(rails)) != len(rails):
            raise ValueError(f"rails lists a rail twice: {list(rails)}")
        return rails

    @model_validator(mode="after")
    def _pins_do_not_collide(self) -> RuleSet:
        problems = _pin_conflicts(self.rules)
        if problems:
            summary = "; ".join(f"{_path_text(loc)}: {why}" for loc, why in problems)
            # The structured problems ride along in ctx so load_rule_set can give each a line.
            raise PydanticCustomError(
                "pin_conflict", "{summary}", {"summary": summary, "problems": problems}
            )
        return self


def category_matches(path: str | None, category: str) -> bool:
    """Whether `path` is `category` or lies below it, level by level.

    Example:
        >>> category_matches("electronics > audio", "electronics"), category_matches(
        ...     "electronicsx", "electronics")
        (True, False)
    """
    return path is not None and (path == category or path.startswith(category + CATEGORY_SEPARATOR))


def _overlap(a: _Rule, b: _Rule) -> bool:
    # Half-open windows [from, until) overlap unless one ends before the other starts.
    return (a.valid_from is None or b.valid_until is None or a.valid_from < b.valid_until) and (
        b.valid_from is None or a.valid_until is None or b.valid_from < a.valid_until
    )


def _pin_conflicts(rules: Sequence[_Rule]) -> list[tuple[Loc, str]]:
    """Pins that could be active together on one slot or for one item.

    Pins whose validity windows do not overlap never compete (a Black Friday pin and a
    Cyber Monday pin on slot 1), so only overlapping ones are refused.
    """
    pins = [(i, r) for i, r in enumerate(rules) if isinstance(r, PinRule)]
    problems: list[tuple[Loc, str]] = []
    for n, (j, later) in enumerate(pins):
        for i, earlier in pins[:n]:
            if not _overlap(earlier, later):
                continue
            if later.slot == earlier.slot:
                why = (
                    f"slot {later.slot} is already pinned by rules[{i}] ({earlier.item_id!r}) "
                    "in an overlapping validity window; use another slot or separate windows"
                )
                problems.append((("rules", j, "slot"), why))
            if later.item_id == earlier.item_id:
                why = (
                    f"item {later.item_id!r} is already pinned by rules[{i}] in an overlapping "
                    "validity window; keep one pin per item"
                )
                problems.append((("rules", j, "item_id"), why))
    return problems


# ------------------------------------------------------------------------------ loading


def load_rule_set(source: str | Path) -> RuleSet:
    """Load and validate a rule set from a JSON file or JSON text.

    Args:
        source: a path, or the JSON text itself (a string starting with '{' or '[').

    Returns:
        The validated rule set, every datetime in UTC.

    Raises:
        RuleSetError: the file is missing, is not JSON, or breaks the schema. The message
            lists every problem as `line L, rules[i].field: why`.
    """
    text, where = _read(source)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        problem = f"line {exc.lineno}, column {exc.colno}: not valid JSON: {exc.msg}"
        raise RuleSetError(where, [problem]) from None
    where_in_text = JsonLocations.scan(text)
    problems = list(where_in_text.problems)
    try:
        rule_set = RuleSet.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            problems.extend(_explain(error, data))
    if problems:
        located = sorted((where_in_text.line(loc), _path_text(loc), why) for loc, why in problems)
        raise RuleSetError(where, [f"line {line}, {path}: {why}" for line, path, why in located])
    return rule_set


def _read(source: str | Path) -> tuple[str, str]:
    if isinstance(source, str) and source.lstrip()[:1] in ("{", "["):
        return source, "<text>"
    path = Path(source)
    if not path.is_file():
        raise RuleSetError(str(path), ["file not found; pass a rule set .json file or its text"])
    try:
        # utf-8-sig: editors on Windows often prepend a byte-order mark json.loads refuses.
        return path.read_text(encoding="utf-8-sig"), str(path)
    except UnicodeDecodeError as exc:
        problem = f"byte {exc.start}: not UTF-8 text; save the file as UTF-8"
        raise RuleSetError(str(path), [problem]) from None


def _explain(error: ErrorDetails, data: Any) -> Iterator[tuple[Loc, str]]:
    """Turn one pydantic error into (location, why) pairs in the JSON file's terms."""
    loc = tuple(error["loc"])
    # A discriminated union puts the tag in the location (rules.3.boost.factor); the file
    # has no such level, so drop it.
    if len(loc) > 2 and loc[0] == "rules" and isinstance(loc[1], int) and loc[2] in RULE_TYPES:
        loc = loc[:2] + loc[3:]
    kind, ctx = error["type"], error.get("ctx", {})
    kinds = ", ".join(RULE_TYPES)
    if kind == "pin_conflict":
        yield from ctx["problems"]
    elif kind == "rule_target":
        yield (loc + ((ctx["field"],) if ctx["field"] else ())), ctx["why"]
    elif kind == "union_tag_invalid":
        yield (*loc, "kind"), f"unknown kind {ctx['tag']!r}; use one of {kinds}"
    elif kind == "union_tag_not_found":
        yield (*loc, "kind"), f"missing 'kind'; use one of {kinds}"
    elif kind == "extra_forbidden":
        yield loc, f"unknown field; allowed here: {', '.join(_allowed_fields(loc, data))}"
    elif kind == "model_type" and not loc:
        yield loc, "a rule set is a JSON object with name, version, rails and rules"
    elif kind == "missing":
        yield loc, "required field is missing"
    elif kind == "value_error":
        yield loc, str(ctx["error"])
    else:
        got = error.get("input")
        shown = f" (got {got!r})" if not isinstance(got, dict | list) else ""
        yield loc, f"{error['msg']}{shown}"


def _path_text(loc: Loc) -> str:
    return path_text(loc) or "rule set"


def _allowed_fields(loc: Loc, data: Any) -> list[str]:
    if len(loc) == 3 and loc[0] == "rules":
        kind = data["rules"][loc[1]].get("kind")
        return list(RULE_TYPES[kind].model_fields)
    return list(RuleSet.model_fields)


# What a rail is judged by when no rule set is published: no rules at all.
NO_RULES = RuleSet(name="none", version="0")
