"""Tests of railtower.validation and railtower.datasets: mapping sources onto the schema."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import structlog
import yaml

from railtower.datasets import Dataset, load_dataset, read_table
from railtower.errors import SchemaError
from railtower.schemas import EVENT_COLUMN_NAMES, EVENT_TYPES, ITEM_COLUMN_NAMES
from railtower.settings import EventsMapping, ItemsMapping, load_settings
from railtower.validation import ValidationReport, canonical_events, canonical_items

FILE = "shop/events.csv"
ITEMS_FILE = "shop/items.csv"

# canonical field -> source column, as a data set's YAML would give it
EVENT_COLUMNS = {
    "event_time": "ts",
    "event_type": "action",
    "session_id": "basket",
    "user_id": "visitor",
    "item_id": "sku",
    "price": "cost",
}


@pytest.fixture(autouse=True)
def _no_railtower_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("RAILTOWER_"):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    """load_dataset logs through structlog. A test that ran configure_logging under a
    CliRunner (tests/railtower/test_cli.py) leaves structlog printing to that runner's
    closed stream, so every later log call raises "I/O operation on closed file"."""
    saved = structlog.get_config()
    structlog.reset_defaults()
    yield
    structlog.configure(**saved)


def raw_events(n: int = 5) -> pd.DataFrame:
    """n valid source rows in two sessions, one second apart, with source column names."""
    return pd.DataFrame(
        {
            "ts": [f"2020-01-01 00:00:{i:02d}" for i in range(n)],
            "action": ["view"] * n,
            "basket": ["a" if i < 2 else "b" for i in range(n)],
            "visitor": [f"u{i % 2}" for i in range(n)],
            "sku": [100 + i for i in range(n)],
            "cost": [1.5 * (i + 1) for i in range(n)],
        }
    )


def events_mapping(**extra: object) -> EventsMapping:
    columns = extra.pop("columns", EVENT_COLUMNS)
    return EventsMapping(path="events.csv", columns=columns, **extra)


def run_events(
    raw: pd.DataFrame, share: float = 0.0, **mapping: object
) -> tuple[pd.DataFrame, ValidationReport]:
    return canonical_events(raw, events_mapping(**mapping), FILE, share)


def assert_names(err: SchemaError, file: str, column: str, rows: int) -> None:
    """The message names the file, the column and how many rows are affected."""
    text = str(err)
    assert err.file == file and err.column == column and err.rows == rows, text
    assert text.startswith(file), text
    assert f"column '{column}'" in text, text
    assert f"({rows:,} row{'s' if rows != 1 else ''})" in text, text


def assert_consistent(report: ValidationReport) -> None:
    """Nothing vanishes silently: every row lost is in report.dropped."""
    assert report.rows_out == report.rows_in - sum(report.dropped.values())


# ================================================================== events: happy path


def test_clean_events_become_canonical() -> None:
    events, report = run_events(raw_events())

    assert set(events.columns) == set(EVENT_COLUMNS) | {"position", "event_id"}
    assert set(events.columns) - {"position"} <= set(EVENT_COLUMN_NAMES)
    assert isinstance(events["event_time"].dtype, pd.DatetimeTZDtype)
    assert str(events["event_time"].dt.tz) == "UTC"
    for col in ("event_id", "event_type", "session_id", "user_id", "item_id"):
        assert events[col].dtype == "string", col
    assert events["price"].dtype == "Float64"
    assert events["position"].dtype == "int32"
    # ids are strings even where the source had integers
    assert events["item_id"].tolist() == ["100", "101", "102", "103", "104"]
    assert events["price"].tolist() == [1.5, 3.0, 4.5, 6.0, 7.5]
    assert report.kind == "events" and report.file == FILE
    assert report.rows_in == report.rows_out == 5
    assert report.dropped == {} and report.notes == []
    assert report.as_dict()["rows_out"] == 5


def test_times_are_normalised_to_utc() -> None:
    raw = raw_events(3)
    raw["ts"] = ["2020-01-01T01:00:00+01:00", "2020-01-01 00:00:01Z", "2020-01-01 00:00:02"]
    events, _ = run_events(raw)
    assert events["event_time"].tolist() == [
        pd.Timestamp("2020-01-01 00:00:00", tz="UTC"),
        pd.Timestamp("2020-01-01 00:00:01", tz="UTC"),
        pd.Timestamp("2020-01-01 00:00:02", tz="UTC"),
    ]


def test_naive_datetime_column_is_taken_as_utc() -> None:
    raw = raw_events(2)
    raw["ts"] = pd.to_datetime(raw["ts"])
    events, _ = run_events(raw)
    assert events["event_time"].iloc[0] == pd.Timestamp("2020-01-01", tz="UTC")


def test_events_sorted_by_time_with_position_per_session() -> None:
    raw = pd.DataFrame(
        {
            "ts": [
                "2020-01-01 00:00:05",
                "2020-01-01 00:00:01",
                "2020-01-01 00:00:03",
                "2020-01-01 00:00:02",
                "2020-01-01 00:00:04",
                "2020-01-01 00:00:03",  # same second as sku 3: source order breaks the tie
            ],
            "action": ["view"] * 6,
            "basket": ["s1", "s2", "s1", "s1", "s2", "s1"],
            "visitor": ["u"] * 6,
            "sku": [1, 2, 3, 4, 5, 6],
            "cost": [1.0] * 6,
        }
    )
    events, _ = run_events(raw)

    assert events["event_time"].is_monotonic_increasing
    assert events["item_id"].tolist() == ["2", "4", "3", "6", "5", "1"]
    by_session = {
        s: g.sort_values("position")["item_id"].tolist() for s, g in events.groupby("session_id")
    }
    assert by_session == {"s1": ["4", "3", "6", "1"], "s2": ["2", "5"]}
    for _, group in events.groupby("session_id"):
        assert sorted(group["position"]) == list(range(len(group)))
        assert group.sort_values("position")["event_time"].is_monotonic_increasing


def test_event_type_map_maps_source_values() -> None:
    raw = raw_events(5)
    raw["action"] = ["view", "addtocart", "transaction", " View ", "PURCHASE"]
    events, report = run_events(
        raw, event_type_map={"addtocart": "cart", "transaction": "purchase"}
    )
    by_item = dict(zip(events["item_id"], events["event_type"], strict=True))
    assert by_item == {
        "100": "view",
        "101": "cart",
        "102": "purchase",
        "103": "view",
        "104": "purchase",
    }
    assert set(events["event_type"]) <= EVENT_TYPES
    assert report.dropped == {}


def test_event_type_map_to_unknown_value_is_still_refused() -> None:
    raw = raw_events(5)
    raw.loc[0, "action"] = "addtocart"
    with pytest.raises(SchemaError) as info:
        run_events(raw, event_type_map={"addtocart": "basket_add"})
    assert_names(info.value, FILE, "event_type", 1)
    assert "'basket_add'" in str(info.value)


def test_constants_fill_columns() -> None:
    raw = raw_events(4).drop(columns="action")
    columns = {k: v for k, v in EVENT_COLUMNS.items() if k != "event_type"}
    events, _ = run_events(
        raw,
        columns=columns,
        constants={"event_type": "purchase", "locale": "DE", "device": "mobile"},
    )
    assert events["event_type"].tolist() == ["purchase"] * 4
    assert events["locale"].tolist() == ["DE"] * 4
    assert events["device"].tolist() == ["mobile"] * 4
    assert events["locale"].dtype == "string"


def test_required_field_without_source_or_constant_is_refused() -> None:
    columns = {k: v for k, v in EVENT_COLUMNS.items() if k != "session_id"}
    with pytest.raises(SchemaError) as info:
        run_events(raw_events(), columns=columns)
    assert_names(info.value, FILE, "session_id", 5)
    assert "constants.session_id" in str(info.value)


# ================================================================== events: structural errors


def test_missing_mapped_column() -> None:
    raw = raw_events().drop(columns="cost")
    with pytest.raises(SchemaError) as info:
        run_events(raw)
    assert_names(info.value, FILE, "cost", 5)
    text = str(info.value)
    assert "is missing" in text and "canonical 'price'" in text
    assert "columns.price" in text  # says what to change


def test_missing_order_column_is_refused() -> None:
    columns = {k: v for k, v in EVENT_COLUMNS.items() if k != "event_time"}
    with pytest.raises(SchemaError) as info:
        run_events(raw_events(), columns=columns, time="order", order_column="pos")
    assert_names(info.value, FILE, "pos", 5)


def test_missing_target_column_is_refused() -> None:
    with pytest.raises(SchemaError) as info:
        run_events(raw_events(), target_column="is_target")
    assert_names(info.value, FILE, "is_target", 5)


def test_unknown_canonical_field_in_mapping() -> None:
    with pytest.raises(SchemaError) as info:
        run_events(raw_events(), columns={**EVENT_COLUMNS, "colour": "cost"})
    err = info.value
    text = str(err)
    # a mapping problem, not a row problem: it names the file and the field (no row count)
    assert err.file == FILE and err.column == "colour"
    assert text.startswith(FILE) and "column 'colour'" in text
    assert "is not a canonical field" in text
    assert "'session_id'" in text  # lists the valid fields


def test_numeric_epoch_event_time_is_a_wrong_type() -> None:
    raw = raw_events()
    raw["ts"] = [1_569_888_000 + i for i in range(5)]
    with pytest.raises(SchemaError) as info:
        run_events(raw)
    assert_names(info.value, FILE, "event_time", 5)
    assert "wrong type" in str(info.value)
    assert "1569888000" in str(info.value)  # an example value


def test_text_only_price_is_a_wrong_type() -> None:
    raw = raw_events()
    raw["cost"] = ["cheap", "dear", "free", "n/a", "?"]
    with pytest.raises(SchemaError) as info:
        run_events(raw)
    assert_names(info.value, FILE, "price", 5)
    assert "wrong type" in str(info.value) and "'cheap'" in str(info.value)


# ================================================================== events: row errors


def test_unparseable_time() -> None:
    raw = raw_events()
    raw.loc[[1, 3], "ts"] = "not-a-time"
    with pytest.raises(SchemaError) as info:
        run_events(raw)
    assert_names(info.value, FILE, "event_time", 2)
    text = str(info.value)
    assert "2 rows" in text
    assert "cannot be parsed as a time" in text
    assert "'not-a-time'" in text
    assert "max_invalid_share" in text  # says how to tolerate such rows


def test_unknown_event_type() -> None:
    raw = raw_events()
    raw.loc[2, "action"] = "click"
    with pytest.raises(SchemaError) as info:
        run_events(raw)
    assert_names(info.value, FILE, "event_type", 1)
    assert "'click'" in str(info.value)
    assert "event_type_map" in str(info.value)


@pytest.mark.parametrize("bad", [None, "", "   "], ids=["none", "empty", "blank"])
def test_null_session_id(bad: object) -> None:
    raw = raw_events()
    raw["basket"] = raw["basket"].astype(object)
    raw.loc[2, "basket"] = bad
    with pytest.raises(SchemaError) as info:
        run_events(raw)
    assert_names(info.value, FILE, "session_id", 1)
    assert "is null" in str(info.value)


def test_null_item_id() -> None:
    raw = raw_events()
    raw["sku"] = raw["sku"].astype(object)
    raw.loc[[0, 4], "sku"] = None
    with pytest.raises(SchemaError) as info:
        run_events(raw)
    assert_names(info.value, FILE, "item_id", 2)


def test_negative_price() -> None:
    raw = raw_events()
    raw.loc[2, "cost"] = -4.0
    with pytest.raises(SchemaError) as info:
        run_events(raw)
    assert_names(info.value, FILE, "price", 1)
    assert "is negative" in str(info.value) and "-4.0" in str(info.value)


def test_partly_non_numeric_price() -> None:
    raw = raw_events()
    raw["cost"] = ["1.0", "2.5", "abc", "4", "5"]
    with pytest.raises(SchemaError) as info:
        run_events(raw)
    assert_names(info.value, FILE, "price", 1)
    assert "is not a number" in str(info.value) and "'abc'" in str(info.value)


def test_null_price_is_allowed() -> None:
    raw = raw_events()
    raw.loc[1, "cost"] = None
    events, report = run_events(raw)
    assert events["price"].isna().sum() == 1
    assert report.dropped == {}


def test_worst_problem_is_named_with_the_others_counted() -> None:
    raw = raw_events()
    raw.loc[[0, 1], "ts"] = "not-a-time"
    raw.loc[4, "action"] = "click"
    with pytest.raises(SchemaError) as info:
        run_events(raw)
    assert_names(info.value, FILE, "event_time", 2)
    assert "and 1 other problem(s)" in str(info.value)
    assert "60.00% of 5 rows" in str(info.value)


# ================================================================== events: tolerated invalid rows


def test_invalid_rows_dropped_and_reported_under_the_share() -> None:
    raw = raw_events(10)
    raw.loc[[1, 3], "ts"] = "not-a-time"
    events, report = run_events(raw, share=0.3)

    assert report.dropped == {"event_time: cannot be parsed as a time": 2}
    assert report.rows_in == 10 and report.rows_out == 8 == len(events)
    assert_consistent(report)
    assert "101" not in set(events["item_id"]) and "103" not in set(events["item_id"])
    assert events["event_time"].notna().all()
    # positions are recomputed over the rows that remain
    for _, group in events.groupby("session_id"):
        assert sorted(group["position"]) == list(range(len(group)))


def test_each_reason_is_reported_separately() -> None:
    raw = raw_events(10)
    raw.loc[0, "ts"] = "not-a-time"
    raw.loc[2, "action"] = "click"
    raw.loc[5, "cost"] = -1.0
    raw["basket"] = raw["basket"].astype(object)
    raw.loc[7, "basket"] = None
    events, report = run_events(raw, share=0.5)

    assert report.dropped == {
        "event_time: cannot be parsed as a time": 1,
        "event_type: has unknown event types": 1,
        "price: is negative": 1,
        "session_id: is null": 1,
    }
    assert len(events) == report.rows_out == 6
    assert_consistent(report)


def test_share_exactly_at_the_limit_is_tolerated() -> None:
    raw = raw_events(5)
    raw.loc[0, "action"] = "click"
    _, report = run_events(raw, share=0.2)
    assert report.dropped == {"event_type: has unknown event types": 1}
    assert report.rows_out == 4


def test_share_above_the_limit_still_fails() -> None:
    raw = raw_events(5)
    raw.loc[[0, 1], "action"] = "click"
    with pytest.raises(SchemaError) as info:
        run_events(raw, share=0.3)
    assert_names(info.value, FILE, "event_type", 2)
    assert "(now 0.3)" in str(info.value)


def test_structural_errors_are_not_tolerated_by_the_share() -> None:
    raw = raw_events()
    raw["ts"] = range(5)
    with pytest.raises(SchemaError, match="wrong type"):
        run_events(raw, share=0.5)


def test_fractional_quantity_is_a_schema_error() -> None:
    # BUG (railtower/validation.py:138, _coerce): an "int" column with a fractional value
    # (quantity 1.5) crashes with a bare TypeError ("cannot safely cast non-equivalent
    # float64 to int64") from numbers.astype("Int64"), naming neither file nor column.
    # Fractions should be a row problem like "is not a number" (e.g.
    # problems.add(col.name, "is not a whole number", numbers % 1 != 0, ...) and a
    # rounded/masked cast). This test asserts the intended behaviour and fails until fixed.
    raw = raw_events()
    raw["qty"] = [1, 2, 1.5, 1, 1]
    with pytest.raises(SchemaError) as info:
        run_events(raw, columns={**EVENT_COLUMNS, "quantity": "qty"})
    assert_names(info.value, FILE, "quantity", 1)


# ================================================================== events: ids


def test_duplicate_event_ids_are_dropped_and_reported() -> None:
    raw = raw_events(5)
    raw["eid"] = ["e1", "e2", "e1", "e3", "e2"]
    events, report = run_events(raw, columns={**EVENT_COLUMNS, "event_id": "eid"})

    assert report.dropped == {"event_id: duplicate (redelivered) events": 2}
    assert sorted(events["event_id"]) == ["e1", "e2", "e3"]
    assert events["event_id"].is_unique
    # the first delivery is kept
    assert dict(zip(events["event_id"], events["item_id"], strict=True)) == {
        "e1": "100",
        "e2": "101",
        "e3": "103",
    }
    assert report.rows_out == 3
    assert_consistent(report)


def test_content_derived_event_ids_are_deterministic() -> None:
    first, _ = run_events(raw_events(8))
    second, _ = run_events(raw_events(8))
    shuffled, _ = run_events(raw_events(8).sample(frac=1, random_state=3).reset_index(drop=True))

    assert first["event_id"].tolist() == second["event_id"].tolist()
    assert set(shuffled["event_id"]) == set(first["event_id"])
    assert first["event_id"].str.fullmatch(r"[0-9a-f]{16}").all()
    assert first["event_id"].is_unique


def test_content_derived_event_ids_depend_on_content() -> None:
    base, _ = run_events(raw_events(3))
    changed = raw_events(3)
    changed.loc[0, "sku"] = 999
    other, _ = run_events(changed)
    assert base["event_id"].iloc[0] != other["event_id"].iloc[0]
    assert base["event_id"].iloc[1:].tolist() == other["event_id"].iloc[1:].tolist()


def test_repeated_identical_rows_get_unique_ids() -> None:
    raw = pd.concat([raw_events(1)] * 3 + [raw_events(2)], ignore_index=True)
    events, report = run_events(raw)
    assert len(events) == 5
    assert events["event_id"].is_unique
    assert report.dropped == {}
    again, _ = run_events(raw)
    assert sorted(again["event_id"]) == sorted(events["event_id"])


# ================================================================== events: time from order


def test_time_order_synthesises_times_and_notes_it() -> None:
    raw = pd.DataFrame(
        {
            "session": ["x", "x", "y", "x", "y"],
            "product": ["B", "A", "C", "D", "E"],
            "type": ["view"] * 5,
            "pos": [2, 0, 1, 1, 0],
            "target": [True, False, True, False, False],
        }
    )
    events, report = run_events(
        raw,
        columns={"session_id": "session", "item_id": "product", "event_type": "type"},
        time="order",
        order_column="pos",
        target_column="target",
    )

    epoch = pd.Timestamp("1970-01-01", tz="UTC")
    assert (events["event_time"] - epoch).dt.total_seconds().tolist() == [0, 0, 1, 1, 2]
    seq = {
        s: g.sort_values("position")["item_id"].tolist() for s, g in events.groupby("session_id")
    }
    assert seq == {"x": ["A", "D", "B"], "y": ["E", "C"]}
    targets = events.loc[events["is_target"], "item_id"]
    assert sorted(targets) == ["B", "C"]
    assert any("synthesised" in note for note in report.notes)
    assert report.rows_out == 5


# ================================================================== items


def item_mapping(**extra: object) -> ItemsMapping:
    columns = extra.pop(
        "columns",
        {
            "item_id": "id",
            "title": "name",
            "category_path": "cat",
            "brand": "maker",
            "price": "list_price",
        },
    )
    return ItemsMapping(path="items.csv", columns=columns, **extra)


def raw_items() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": [3, 1, 2, 4],
            "name": ["Headphones", "Phone", "Cable", "Case"],
            "cat": [
                "electronics.audio.headphone",
                "electronics.smartphone",
                None,
                "accessories..case",
            ],
            "cat_id": [30, 10, 20, 40],
            "maker": ["Sony", "APPLE", None, "OtterBox"],
            "list_price": [99.0, 999.0, 5.0, 20.0],
        }
    )


def run_items(
    raw: pd.DataFrame, image_root: Path = Path("."), share: float = 0.0, **mapping: object
) -> tuple[pd.DataFrame, ValidationReport]:
    return canonical_items(raw, item_mapping(**mapping), ITEMS_FILE, image_root, share)


def test_clean_items_become_canonical() -> None:
    items, report = run_items(raw_items())
    assert items["item_id"].tolist() == ["1", "2", "3", "4"]  # sorted, strings
    assert set(items.columns) <= set(ITEM_COLUMN_NAMES)
    assert items["item_id"].dtype == "string"
    assert items["price"].dtype == "Float64"
    assert report.kind == "items" and report.rows_in == report.rows_out == 4
    assert report.dropped == {}


def test_brand_is_lower_cased() -> None:
    items, _ = run_items(raw_items())
    brands = items.set_index("item_id")["brand"]
    assert brands.dtype == "string"
    assert brands.drop("2").to_dict() == {"1": "apple", "3": "sony", "4": "otterbox"}
    assert pd.isna(brands["2"])


def test_category_paths_rejoined_from_dot_separator() -> None:
    items, _ = run_items(raw_items(), category_separator=".")
    paths = items.set_index("item_id")["category_path"]
    assert paths["3"] == "electronics > audio > headphone"
    assert paths["1"] == "electronics > smartphone"
    assert paths["4"] == "accessories > case"  # empty levels are dropped
    assert pd.isna(paths["2"])


def test_category_paths_kept_when_already_canonical() -> None:
    raw = raw_items()
    raw["cat"] = ["a > b", "c", None, "d > e > f"]
    items, _ = run_items(raw, category_separator=" > ")
    assert items["category_path"].tolist()[0] == "c"
    assert items.set_index("item_id")["category_path"]["4"] == "d > e > f"


def test_category_fallback_fills_missing_paths_and_is_noted() -> None:
    raw = raw_items()
    raw.loc[raw["id"] == 4, "cat"] = None
    items, report = run_items(raw, category_separator=".", category_fallback="cat_id")
    paths = items.set_index("item_id")["category_path"]

    assert paths["2"] == "category-20"
    assert paths["4"] == "category-40"
    assert paths["3"] == "electronics > audio > headphone"  # real paths are not overwritten
    assert paths.notna().all()
    assert any("2 items without a category path" in n and "'cat_id'" in n for n in report.notes)


def test_category_fallback_works_without_a_path_column() -> None:
    columns = {"item_id": "id", "title": "name"}
    items, report = run_items(raw_items(), columns=columns, category_fallback="cat_id")
    assert items["category_path"].tolist() == [
        "category-10",
        "category-20",
        "category-30",
        "category-40",
    ]
    assert any("4 items" in n for n in report.notes)


def test_missing_category_fallback_column_is_refused() -> None:
    with pytest.raises(SchemaError) as info:
        run_items(raw_items(), category_fallback="category_id")
    assert info.value.file == ITEMS_FILE and info.value.column == "category_id"
    assert "category_fallback" in str(info.value)


def test_images_resolve_or_become_null_with_a_note(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "3.jpg").write_bytes(b"\xff\xd8")
    (tmp_path / "img" / "1.jpg").write_bytes(b"\xff\xd8")
    raw = raw_items()
    raw["photo"] = ["img/3.jpg", "img/1.jpg", None, "img/missing.jpg"]
    columns = {"item_id": "id", "image_path": "photo"}
    items, report = run_items(raw, image_root=tmp_path, columns=columns)
    images = items.set_index("item_id")["image_path"]

    assert images["3"] == str((tmp_path / "img" / "3.jpg").resolve())
    assert Path(images["1"]).is_absolute() and Path(images["1"]).is_file()
    assert pd.isna(images["2"])
    assert pd.isna(images["4"])
    assert items["image_path"].dtype == "string"
    assert report.rows_out == 4  # items without images are kept
    notes = [n for n in report.notes if "image files not found" in n]
    assert len(notes) == 1 and notes[0].startswith("1 image") and str(tmp_path) in notes[0]


def test_no_image_note_when_all_images_exist(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"x")
    raw = raw_items().head(1).assign(photo=["a.jpg"])
    _, report = run_items(
        raw, image_root=tmp_path, columns={"item_id": "id", "image_path": "photo"}
    )
    assert report.notes == []


def test_duplicate_item_id_is_refused() -> None:
    raw = raw_items()
    raw.loc[3, "id"] = 1
    with pytest.raises(SchemaError) as info:
        run_items(raw)
    assert_names(info.value, ITEMS_FILE, "item_id", 1)
    assert "is duplicated" in str(info.value) and "'1'" in str(info.value)


def test_duplicate_item_id_dropped_and_reported_under_the_share() -> None:
    raw = raw_items()
    raw.loc[3, "id"] = 1
    items, report = run_items(raw, share=0.25)
    assert items["item_id"].is_unique
    assert items.set_index("item_id")["title"]["1"] == "Phone"  # the first row is kept
    assert report.dropped == {"item_id: is duplicated": 1}
    assert_consistent(report)


def test_margin_above_one_is_refused() -> None:
    raw = raw_items().assign(mg=[0.2, 0.4, 1.5, 0.1])
    with pytest.raises(SchemaError) as info:
        run_items(raw, columns={"item_id": "id", "margin": "mg"})
    assert_names(info.value, ITEMS_FILE, "margin", 1)
    assert "is above 1" in str(info.value) and "1.5" in str(info.value)


def test_margin_above_one_dropped_when_some_margins_are_null() -> None:
    # BUG (railtower/validation.py:278-283, canonical_items): after coercion margin is a
    # nullable Float64, so `frame["margin"] > 1` is <NA> for items without a margin. With a
    # tolerant max_invalid_share the NA reaches the keep mask and
    # `frame[keep.to_numpy()]` crashes with "ValueError: Cannot mask with non-boolean array
    # containing NA / NaN values". Fix: `(frame["margin"] > 1).fillna(False)` (and the same
    # guard in _RowProblems.add, e.g. `mask = mask.fillna(False).astype(bool)`).
    # This test asserts the intended behaviour and fails until fixed.
    raw = raw_items().assign(mg=[0.2, None, 1.5, 0.1])
    items, report = run_items(raw, share=0.25, columns={"item_id": "id", "margin": "mg"})
    assert report.dropped == {"margin: is above 1": 1}
    assert sorted(items["item_id"]) == ["1", "3", "4"]
    assert_consistent(report)


def test_negative_item_price_is_refused() -> None:
    raw = raw_items()
    raw.loc[0, "list_price"] = -1.0
    with pytest.raises(SchemaError) as info:
        run_items(raw)
    assert_names(info.value, ITEMS_FILE, "price", 1)


def test_missing_mapped_item_column() -> None:
    with pytest.raises(SchemaError) as info:
        run_items(raw_items().drop(columns="maker"))
    assert_names(info.value, ITEMS_FILE, "maker", 4)
    assert "canonical 'brand'" in str(info.value)


def test_unknown_canonical_item_field() -> None:
    with pytest.raises(SchemaError) as info:
        run_items(raw_items(), columns={"item_id": "id", "colour": "name"})
    assert info.value.file == ITEMS_FILE and info.value.column == "colour"
    assert "is not a canonical field" in str(info.value)


# ================================================================== reading files


def test_read_table_missing_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.parquet"
    with pytest.raises(SchemaError, match="does not exist") as info:
        read_table(missing)
    assert str(info.value).startswith(str(missing))
    assert "RAILTOWER_DATA_ROOT" in str(info.value)


def test_read_table_unreadable_file_names_it(tmp_path: Path) -> None:
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"this is not parquet")
    with pytest.raises(SchemaError, match="cannot be read") as info:
        read_table(broken)
    assert str(info.value).startswith(str(broken))


def test_read_table_reads_csv_and_parquet(tmp_path: Path) -> None:
    frame = raw_events(3)
    frame.to_csv(tmp_path / "e.csv", index=False)
    frame.to_parquet(tmp_path / "e.parquet", index=False)
    pd.testing.assert_frame_equal(read_table(tmp_path / "e.csv"), frame)
    pd.testing.assert_frame_equal(read_table(tmp_path / "e.parquet"), frame)


# ================================================================== end to end


def write_shop(root: Path, events: pd.DataFrame | None = None) -> Path:
    """A custom data set under root/shop, described only by a YAML column mapping."""
    shop = root / "shop"
    (shop / "photos").mkdir(parents=True)
    (shop / "photos" / "p1.jpg").write_bytes(b"x")
    if events is None:
        events = pd.DataFrame(
            {
                "ts": [
                    "2024-03-01 10:00:00",
                    "2024-03-01 10:00:05",
                    "2024-03-01 10:01:00",
                    "2024-03-01 11:00:00",
                    "2024-03-01 11:00:30",
                    "2024-03-01 11:02:00",
                    "2024-03-01 11:03:00",
                ],
                "action": ["view", "addtocart", "transaction", "view", "view", "addtocart", "view"],
                "visitor": [7, 7, 7, 8, 8, 8, 8],
                "sku": [1, 1, 1, 2, 99, 99, 3],
                "cost": [10.0, 10.0, 10.0, 4.0, 2.0, 4.0, 6.0],
                "basket": ["b1", "b1", "b1", "b2", "b2", "b2", "b2"],
            }
        )
    events.to_csv(shop / "clicks.csv", index=False)
    pd.DataFrame(
        {
            "product": [1, 2, 3],
            "label": ["Mug", "Lamp", "Rug"],
            "tree": ["home/kitchen", "home/light", None],
            "dept": ["kitchen", "light", "floor"],
            "maker": ["ACME", "Lumo", "acme"],
            "photo": ["p1.jpg", "p2.jpg", None],
        }
    ).to_csv(shop / "products.csv", index=False)
    spec = {
        "name": "shop",
        "root": "shop",
        "events": {
            "path": "clicks.csv",
            "columns": {
                "event_time": "ts",
                "event_type": "action",
                "user_id": "visitor",
                "session_id": "basket",
                "item_id": "sku",
                "price": "cost",
            },
            "event_type_map": {"addtocart": "cart", "transaction": "purchase"},
            "constants": {"country": "NL"},
        },
        "items": {
            "path": "products.csv",
            "columns": {
                "item_id": "product",
                "title": "label",
                "category_path": "tree",
                "brand": "maker",
                "image_path": "photo",
            },
            "category_separator": "/",
            "category_fallback": "dept",
            "image_root": "photos",
        },
        "rails": ["homepage_hero", "pdp_fbt"],
    }
    path = root / "shop.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_custom_dataset_from_a_yaml_mapping(tmp_path: Path) -> None:
    spec_path = write_shop(tmp_path)
    settings = load_settings(data_root=tmp_path)
    ds = load_dataset(str(spec_path), settings)

    assert isinstance(ds, Dataset) and ds.name == "shop" and ds.has_time
    events = ds.events
    assert events is not None and len(events) == 7
    assert set(events.columns) == {
        "event_id",
        "event_time",
        "event_type",
        "user_id",
        "session_id",
        "item_id",
        "price",
        "country",
        "position",
    }
    assert events["event_type"].value_counts().to_dict() == {"view": 4, "cart": 2, "purchase": 1}
    assert events.loc[events["item_id"] == "1", "event_type"].tolist() == [
        "view",
        "cart",
        "purchase",
    ]
    assert events["user_id"].dtype == "string" and set(events["user_id"]) == {"7", "8"}
    assert events["session_id"].dtype == "string" and set(events["session_id"]) == {"b1", "b2"}
    assert events["item_id"].dtype == "string"
    assert events["price"].dtype == "Float64"
    assert str(events["event_time"].dt.tz) == "UTC"
    assert events["event_time"].is_monotonic_increasing
    assert set(events["country"]) == {"NL"}
    assert events["event_id"].is_unique

    items = ds.items.set_index("item_id")
    # the catalogue holds the item table plus items seen only in events
    assert sorted(items.index) == ["1", "2", "3", "99"]
    assert items.loc["99", "price"] == 3.0  # median event price
    assert pd.isna(items.loc["99", "title"])
    assert items.loc["1", "category_path"] == "home > kitchen"
    assert items.loc["3", "category_path"] == "category-floor"
    assert items.loc["3", "brand"] == "acme" and items.loc["1", "brand"] == "acme"
    assert items.loc["1", "image_path"] == str(tmp_path / "shop" / "photos" / "p1.jpg")
    assert pd.isna(items.loc["2", "image_path"])
    assert "n_events" not in ds.items.columns

    assert [r.kind for r in ds.reports] == ["events", "items"]
    events_report, items_report = ds.reports
    assert events_report.file == str(tmp_path / "shop" / "clicks.csv")
    assert events_report.rows_in == events_report.rows_out == 7
    assert events_report.dropped == {} and items_report.dropped == {}
    assert any("1 items in the events are not in the item table" in n for n in items_report.notes)
    assert any("image files not found" in n for n in items_report.notes)
    assert any("without a category path" in n for n in items_report.notes)


def test_custom_dataset_errors_name_the_real_file(tmp_path: Path) -> None:
    bad = pd.DataFrame(
        {
            "ts": ["2024-03-01 10:00:00", "2024-03-01 10:00:05"],
            "action": ["view", "click"],
            "visitor": [1, 1],
            "sku": [1, 2],
            "cost": [1.0, 2.0],
            "basket": ["b", "b"],
        }
    )
    spec_path = write_shop(tmp_path, bad)
    with pytest.raises(SchemaError) as info:
        load_dataset(str(spec_path), load_settings(data_root=tmp_path))
    assert_names(info.value, str(tmp_path / "shop" / "clicks.csv"), "event_type", 1)
    assert "'click'" in str(info.value)


def test_settings_share_lets_load_dataset_drop_and_report(tmp_path: Path) -> None:
    bad = pd.DataFrame(
        {
            "ts": ["2024-03-01 10:00:00", "garbage", "2024-03-01 10:00:09", "2024-03-01 10:01"],
            "action": ["view"] * 4,
            "visitor": [1] * 4,
            "sku": [1, 2, 3, 1],
            "cost": [1.0] * 4,
            "basket": ["b"] * 4,
        }
    )
    spec_path = write_shop(tmp_path, bad)
    settings = load_settings(data_root=tmp_path, validation={"max_invalid_share": 0.25})
    ds = load_dataset(str(spec_path), settings)
    assert ds.events is not None and len(ds.events) == 3
    assert ds.reports[0].dropped == {"event_time: cannot be parsed as a time": 1}
    assert_consistent(ds.reports[0])


def test_items_only_and_events_only_datasets(tmp_path: Path) -> None:
    root = tmp_path / "d"
    root.mkdir()
    pd.DataFrame({"pid": ["x", "y"], "t": ["X", "Y"]}).to_parquet(root / "items.parquet")
    raw_events(4).to_parquet(root / "events.parquet")
    items_only = tmp_path / "catalogue.yaml"
    items_only.write_text(
        yaml.safe_dump(
            {
                "name": "catalogue",
                "root": "d",
                "items": {"path": "items.parquet", "columns": {"item_id": "pid", "title": "t"}},
            }
        )
    )
    events_only = tmp_path / "clicks.yaml"
    events_only.write_text(
        yaml.safe_dump(
            {
                "name": "clicks",
                "root": "d",
                "events": {"path": "events.parquet", "columns": EVENT_COLUMNS},
            }
        )
    )
    settings = load_settings(data_root=tmp_path)

    cat = load_dataset(str(items_only), settings)
    assert cat.events is None and not cat.has_time
    assert cat.items["item_id"].tolist() == ["x", "y"]
    assert len(cat.reports) == 1

    clicks = load_dataset(str(events_only), settings)
    assert clicks.events is not None and len(clicks.events) == 4
    assert clicks.items.columns.tolist() == ["item_id", "price"]
    assert clicks.items["item_id"].tolist() == ["100", "101", "102", "103"]


def test_real_rees46_sample() -> None:
    ds = load_dataset("rees46", load_settings())
    assert ds.name == "rees46" and ds.has_time
    assert ds.events is not None
    assert len(ds.events) == 12_478
    assert len(ds.items) == 4_972
    assert set(ds.events["event_type"]) <= {"view", "cart", "purchase"}
    assert ds.events["event_id"].is_unique
    assert ds.events["event_time"].is_monotonic_increasing
    assert set(ds.events["item_id"]) <= set(ds.items["item_id"])
    assert ds.items["item_id"].is_unique
    assert ds.items["category_path"].notna().all()  # category_fallback covers the rest
    for report in ds.reports:
        assert report.dropped == {}
        assert report.rows_in == report.rows_out
