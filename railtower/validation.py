"""Map a source table onto the canonical schema and check every row on the way.

Structural problems (a mapped column missing, a column of the wrong type) raise a
:class:`SchemaError` at once. Row problems (an unparseable time, an unknown event type, a
null id, a negative price) are counted per reason; if they exceed the configured share the
load fails with the worst reason named, otherwise those rows are dropped and every drop is
listed in the :class:`ValidationReport`. Nothing is dropped without a line in that report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from railtower.errors import SchemaError
from railtower.schemas import (
    CATEGORY_SEPARATOR,
    EVENT_COLUMNS,
    EVENT_TYPES,
    ITEM_COLUMNS,
    Column,
)
from railtower.settings import EventsMapping, ItemsMapping

_SYNTHETIC_EPOCH = pd.Timestamp("1970-01-01", tz="UTC")


@dataclass
class ValidationReport:
    """What one file's load kept, dropped (by reason) and changed."""

    file: str
    kind: str
    rows_in: int
    rows_out: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "file": self.file,
            "kind": self.kind,
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "dropped": dict(self.dropped),
            "notes": list(self.notes),
        }


class _RowProblems:
    """Collects per-reason masks of invalid rows, then enforces the configured share."""

    def __init__(self, file: str, n_rows: int) -> None:
        self.file, self.n_rows = file, n_rows
        self.masks: dict[tuple[str, str], pd.Series] = {}
        self.examples: dict[tuple[str, str], list[object]] = {}

    def add(self, column: str, reason: str, mask: pd.Series, values: pd.Series, fix: str) -> None:
        # comparisons on nullable columns yield <NA> where the value is missing: not a problem
        mask = mask.fillna(False).astype(bool)
        if not mask.any():
            return
        key = (column, f"{reason}|{fix}")
        self.masks[key] = mask if key not in self.masks else self.masks[key] | mask
        self.examples[key] = values[mask].drop_duplicates().head(5).tolist()

    def enforce(self, max_share: float, report: ValidationReport) -> pd.Series:
        """Return the mask of rows to keep, or raise if too many are invalid."""
        invalid = (
            pd.Series(False, index=next(iter(self.masks.values())).index) if self.masks else None
        )
        for mask in self.masks.values():
            invalid = mask if invalid is None else invalid | mask
        if invalid is None or not invalid.any():
            return pd.Series(True, index=range(self.n_rows)) if invalid is None else ~invalid
        share = invalid.sum() / max(self.n_rows, 1)
        if share > max_share:
            (column, reason_fix), mask = max(self.masks.items(), key=lambda kv: int(kv[1].sum()))
            reason, fix = reason_fix.split("|", 1)
            others = len(self.masks) - 1
            problem = reason + (f" (and {others} other problem(s))" if others else "")
            raise SchemaError(
                self.file,
                column,
                problem,
                int(mask.sum()),
                self.examples[(column, reason_fix)],
                f"{fix}; or raise validation.max_invalid_share (now {max_share}) to drop "
                f"and report such rows ({share:.2%} of {self.n_rows:,} rows are invalid)",
            )
        for (column, reason_fix), mask in self.masks.items():
            report.dropped[f"{column}: {reason_fix.split('|', 1)[0]}"] = int(mask.sum())
        return ~invalid


def _check_mapping(
    raw: pd.DataFrame, columns: dict[str, str], canonical: tuple[Column, ...], file: str
) -> None:
    names = {c.name for c in canonical}
    for canon, source in columns.items():
        if canon not in names:
            raise SchemaError(
                file, canon, "is not a canonical field", fix=f"use one of {sorted(names)}"
            )
        if source not in raw.columns:
            raise SchemaError(
                file,
                source,
                f"is missing (the mapping feeds canonical '{canon}' from it)",
                rows=len(raw),
                fix=f"the file has columns {list(raw.columns)}; rename the source "
                f"column or change columns.{canon} in the data set's YAML",
            )


def _coerce(frame: pd.DataFrame, col: Column, problems: _RowProblems, file: str) -> None:
    """Convert one canonical column to its kind in place, recording rows that cannot be."""
    values = frame[col.name]
    present = values.notna()
    if col.kind == "string":
        as_str = values.astype("string").str.strip()
        frame[col.name] = as_str.mask(as_str == "")
    elif col.kind in {"float", "int"}:
        numbers = pd.to_numeric(values, errors="coerce")
        bad = present & numbers.isna()
        if present.any() and bad.all():
            raise SchemaError(
                file,
                col.name,
                f"has the wrong type: expected numbers, got {values.dtype}",
                int(bad.sum()),
                values[bad].head(3).tolist(),
                "map a numeric column here",
            )
        problems.add(col.name, "is not a number", bad, values, "fix or remove those values")
        problems.add(col.name, "is negative", numbers < 0, values, "prices and counts are >= 0")
        if col.kind == "int":
            fractional = numbers.notna() & (numbers != numbers.round())
            problems.add(
                col.name, "is not a whole number", fractional, values, "counts are whole numbers"
            )
            numbers = numbers.mask(fractional)
        frame[col.name] = numbers.astype("Float64" if col.kind == "float" else "Int64")
    elif col.kind == "time":
        frame[col.name] = _parse_time(values, present, problems, file)
    elif col.kind == "event_type":
        frame[col.name] = values.astype("string").str.strip().str.lower()
    if col.required:
        missing = frame[col.name].isna() & ~(present & (col.kind in {"time", "float", "int"}))
        problems.add(col.name, "is null", missing, values, f"every row needs a {col.name}")


def _parse_time(
    values: pd.Series, present: pd.Series, problems: _RowProblems, file: str
) -> pd.Series:
    if isinstance(values.dtype, pd.DatetimeTZDtype):
        return values.dt.tz_convert("UTC")
    if pd.api.types.is_datetime64_dtype(values.dtype):
        return values.dt.tz_localize("UTC")  # naive times are taken as UTC, as documented
    if pd.api.types.is_numeric_dtype(values.dtype):
        raise SchemaError(
            file,
            "event_time",
            f"has the wrong type: numbers ({values.dtype}) are not times",
            int(present.sum()),
            values.head(3).tolist(),
            "store a timestamp or an ISO-8601 string (epoch numbers are ambiguous in unit)",
        )
    parsed = pd.to_datetime(values, errors="coerce", utc=True, format="mixed")
    bad = present & parsed.isna()
    problems.add(
        "event_time",
        "cannot be parsed as a time",
        bad,
        values,
        "write times as ISO-8601, e.g. 2019-10-01 00:00:04+00:00",
    )
    return parsed


def canonical_events(
    raw: pd.DataFrame, mapping: EventsMapping, file: str, max_invalid_share: float
) -> tuple[pd.DataFrame, ValidationReport]:
    """Map and validate a source event table into canonical events.

    Returns:
        (events sorted by time, session and position; the report). Columns are the
        canonical ones the source provides, plus `position` (order within the session) and,
        where the mapping names a target column, `is_target`.
    Raises:
        SchemaError: a mapped column is missing or mistyped, or invalid rows exceed the share.
    """
    _check_mapping(raw, mapping.columns, EVENT_COLUMNS, file)
    for extra in (mapping.order_column, mapping.target_column):
        if extra and extra not in raw.columns:
            raise SchemaError(file, extra, "is missing (named in the mapping)", rows=len(raw))
    report = ValidationReport(file, "events", len(raw))
    problems = _RowProblems(file, len(raw))
    frame = pd.DataFrame({canon: raw[src].to_numpy() for canon, src in mapping.columns.items()})
    for canon, value in mapping.constants.items():
        frame[canon] = value
    if mapping.time == "order":
        # No clock in the source: one synthetic second per position keeps sessions ordered;
        # the data set's split uses a session hash, never these times.
        frame["event_time"] = _SYNTHETIC_EPOCH + pd.to_timedelta(
            pd.to_numeric(raw[mapping.order_column]).to_numpy(), unit="s"
        )
        report.notes.append("no event time in source: times synthesised from order")
    missing = [c.name for c in EVENT_COLUMNS if c.required and c.name not in frame.columns]
    if missing:
        raise SchemaError(
            file,
            missing[0],
            "has no source column or constant",
            rows=len(raw),
            fix=f"add columns.{missing[0]} or constants.{missing[0]} to the data set's YAML",
        )
    for col in EVENT_COLUMNS:
        if col.name in frame.columns:
            _coerce(frame, col, problems, file)
    if mapping.event_type_map:
        # source values were lower-cased above, so the map's keys are too
        lowered = {k.strip().lower(): v for k, v in mapping.event_type_map.items()}
        frame["event_type"] = frame["event_type"].replace(lowered)
    unknown = frame["event_type"].notna() & ~frame["event_type"].isin(EVENT_TYPES)
    problems.add(
        "event_type",
        "has unknown event types",
        unknown,
        frame["event_type"],
        f"use one of {sorted(EVENT_TYPES)} or map the value in event_type_map",
    )
    order = pd.to_numeric(raw[mapping.order_column]).to_numpy() if mapping.order_column else None
    frame["_order"] = order if order is not None else np.arange(len(frame))
    if mapping.target_column:
        frame["is_target"] = raw[mapping.target_column].astype(bool).to_numpy()
    keep = problems.enforce(max_invalid_share, report)
    frame = frame[keep.to_numpy()]
    frame = frame.sort_values(["session_id", "event_time", "_order"], kind="stable")
    frame["position"] = frame.groupby("session_id", sort=False).cumcount().astype("int32")
    frame = frame.drop(columns="_order")
    frame = _with_event_ids(frame, report)
    frame = frame.sort_values(["event_time", "session_id", "position"], kind="stable")
    report.rows_out = len(frame)
    return frame.reset_index(drop=True), report


def _with_event_ids(frame: pd.DataFrame, report: ValidationReport) -> pd.DataFrame:
    if "event_id" not in frame.columns:
        # Content-derived ids stay stable across reloads and replays, which the streaming
        # consumer's idempotence relies on; the occurrence count separates true repeats.
        key = frame[["session_id", "event_time", "event_type", "item_id"]]
        occurrence = key.groupby(list(key.columns), sort=False, dropna=False).cumcount()
        hashed = pd.util.hash_pandas_object(key.assign(n=occurrence), index=False)
        frame["event_id"] = pd.array([f"{h:016x}" for h in hashed.to_numpy()], dtype="string")
        return frame
    dup = frame["event_id"].duplicated()
    if dup.any():
        report.dropped["event_id: duplicate (redelivered) events"] = int(dup.sum())
    return frame[~dup]


def canonical_items(
    raw: pd.DataFrame, mapping: ItemsMapping, file: str, image_root: Path, max_invalid_share: float
) -> tuple[pd.DataFrame, ValidationReport]:
    """Map and validate a source item table into the canonical catalogue.

    Returns:
        (items sorted by item_id; the report).
    Raises:
        SchemaError: a mapped column is missing or mistyped, or invalid rows exceed the share.
    """
    _check_mapping(raw, mapping.columns, ITEM_COLUMNS, file)
    if mapping.category_fallback and mapping.category_fallback not in raw.columns:
        raise SchemaError(file, mapping.category_fallback, "is missing (category_fallback)")
    report = ValidationReport(file, "items", len(raw))
    problems = _RowProblems(file, len(raw))
    frame = pd.DataFrame({canon: raw[src].to_numpy() for canon, src in mapping.columns.items()})
    for col in ITEM_COLUMNS:
        if col.name in frame.columns:
            _coerce(frame, col, problems, file)
    dup = frame["item_id"].duplicated(keep="first")
    problems.add("item_id", "is duplicated", dup, frame["item_id"], "give each item one row")
    if "margin" in frame.columns:
        problems.add(
            "margin",
            "is above 1",
            frame["margin"] > 1,
            frame["margin"],
            "margin is a share of the price, 0..1",
        )
    keep = problems.enforce(max_invalid_share, report)
    frame = frame[keep.to_numpy()].copy()
    if "category_path" in frame.columns:
        frame["category_path"] = _canonical_paths(
            frame["category_path"], mapping.category_separator
        )
    if mapping.category_fallback:
        fallback = _as_labels(raw.loc[keep.to_numpy(), mapping.category_fallback]).to_numpy()
        path = frame.get("category_path", pd.Series(pd.NA, index=frame.index, dtype="string"))
        filled = path.isna() & pd.notna(fallback)
        frame["category_path"] = path.mask(
            filled, "category-" + pd.Series(fallback, index=frame.index)
        )
        report.notes.append(
            f"{int(filled.sum()):,} items without a category path use "
            f"'{mapping.category_fallback}' as a one-level category"
        )
    if "brand" in frame.columns:
        frame["brand"] = frame["brand"].str.lower()
    if "image_path" in frame.columns:
        frame["image_path"] = _resolve_images(frame["image_path"], image_root, report)
    report.rows_out = len(frame)
    return frame.sort_values("item_id").reset_index(drop=True), report


def _as_labels(values: pd.Series) -> pd.Series:
    """Strings for labels; numeric ids lose the '.0' a null turned them into."""
    if pd.api.types.is_float_dtype(values.dtype):
        values = values.astype("Int64")
    return values.astype("string")


def _canonical_paths(paths: pd.Series, separator: str | None) -> pd.Series:
    if separator is None:
        return paths
    parts = paths.str.split(separator, regex=False)
    return parts.map(
        lambda p: (
            CATEGORY_SEPARATOR.join(s.strip() for s in p if s.strip()) or pd.NA
            if isinstance(p, list)
            else pd.NA
        )
    ).astype("string")


def _resolve_images(paths: pd.Series, root: Path, report: ValidationReport) -> pd.Series:
    absolute = paths.map(lambda p: str((root / p).resolve()) if isinstance(p, str) else pd.NA)
    exists = absolute.map(lambda p: isinstance(p, str) and Path(p).is_file())
    missing = absolute.notna() & ~exists.astype(bool)
    if missing.any():
        report.notes.append(
            f"{int(missing.sum()):,} image files not found under {root}; "
            "those items are served without an image"
        )
    return absolute.mask(missing).astype("string")
