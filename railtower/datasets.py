"""Load a data set, described by its YAML column mapping, into canonical events and items."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from railtower.errors import SchemaError
from railtower.logs import get_logger
from railtower.settings import DatasetSpec, Settings, load_dataset_spec
from railtower.validation import ValidationReport, canonical_events, canonical_items

log = get_logger(__name__)


@dataclass
class Dataset:
    """A canonical data set: events (None for a catalogue-only source) and the catalogue.

    The catalogue is the item table joined with every item the events mention, so metrics
    measured "against the full catalogue" really rank over all of it.
    """

    spec: DatasetSpec
    events: pd.DataFrame | None
    items: pd.DataFrame
    reports: list[ValidationReport] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def has_time(self) -> bool:
        return self.spec.has_time


def read_table(path: Path) -> pd.DataFrame:
    """Read a Parquet or CSV file, with a clear error when it is missing or unreadable."""
    if not path.exists():
        raise SchemaError(
            str(path),
            None,
            "does not exist",
            fix="check data_root in configs/default.yaml (or RAILTOWER_DATA_ROOT)",
        )
    try:
        if path.suffix == ".parquet":
            return pq.read_table(path).to_pandas()
        return pd.read_csv(path, low_memory=False)
    except Exception as exc:  # noqa: BLE001 - any reader failure becomes one actionable error
        raise SchemaError(
            str(path),
            None,
            f"cannot be read: {exc}",
            fix="write it as Parquet or CSV with a header row",
        ) from exc


def load_dataset(spec: DatasetSpec | str, settings: Settings) -> Dataset:
    """Read, map and validate one data set.

    Args:
        spec: a DatasetSpec or the name of `configs/datasets/<name>.yaml` (or a YAML path).
        settings: supplies data_root and the invalid-row policy.
    Raises:
        SchemaError: when a file does not fit its mapping (the message says where and why).
    """
    if not isinstance(spec, DatasetSpec):
        spec = load_dataset_spec(spec, settings)
    reports: list[ValidationReport] = []
    share = settings.validation.max_invalid_share
    events = None
    if spec.events is not None:
        path = spec.path(settings, spec.events.path)
        events, report = canonical_events(read_table(path), spec.events, str(path), share)
        reports.append(report)
    items = None
    if spec.items is not None:
        path = spec.path(settings, spec.items.path)
        image_root = spec.path(settings, spec.items.image_root)
        items, report = canonical_items(read_table(path), spec.items, str(path), image_root, share)
        reports.append(report)
    catalogue = _catalogue(items, events, reports)
    for report in reports:
        log.info("validated", dataset=spec.name, **report.as_dict())
    return Dataset(spec, events, catalogue, reports)


def _catalogue(
    items: pd.DataFrame | None, events: pd.DataFrame | None, reports: list[ValidationReport]
) -> pd.DataFrame:
    if events is None:
        assert items is not None  # DatasetSpec guarantees events or items
        return items
    seen = (
        events.groupby("item_id", sort=True)
        .agg(
            **({"price": ("price", "median")} if "price" in events.columns else {}),
            n_events=("event_id", "size"),
        )
        .reset_index()
    )
    if items is None:
        return seen.drop(columns="n_events")
    unknown = ~seen["item_id"].isin(items["item_id"])
    if unknown.any():
        reports[-1].notes.append(
            f"{int(unknown.sum()):,} items in the events are not in the item table; "
            "they join the catalogue with their median event price and no attributes"
        )
    extra = seen.loc[unknown].drop(columns="n_events")
    merged = pd.concat([items, extra], ignore_index=True) if len(extra) else items
    return merged.sort_values("item_id").reset_index(drop=True)
