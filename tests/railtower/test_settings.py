"""Tests of railtower.settings: the typed configuration and the data set column mappings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from railtower.errors import ConfigError
from railtower.settings import (
    DEFAULT_CONFIG,
    PROJECT_ROOT,
    RAILS,
    DatasetSpec,
    Settings,
    load_dataset_spec,
    load_settings,
)
from tests.conftest import HERMETIC_FOLDERS

DATASET_DIR = PROJECT_ROOT / "configs" / "datasets"
DATASET_YAMLS = sorted(DATASET_DIR.glob("*.yaml"))


@pytest.fixture(autouse=True)
def _no_railtower_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts from a clean environment: no stray RAILTOWER_ variable leaks in."""
    import os

    for name in list(os.environ):
        if name.startswith("RAILTOWER_"):
            monkeypatch.delenv(name)


def write_yaml(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def settings() -> Settings:
    return load_settings()


# ------------------------------------------------------------------ the shipped YAML files


def test_default_yaml_loads_into_settings_with_its_values(monkeypatch: pytest.MonkeyPatch) -> None:
    _without_test_folders(monkeypatch)
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    s = load_settings(DEFAULT_CONFIG)

    assert isinstance(s, Settings)
    assert s.seed == raw["seed"]
    assert s.log_level == raw["log_level"]
    assert s.datasets == raw["datasets"]
    # every section of the file arrives unchanged in its typed section
    for section in ("validation", "split", "evaluation", "event_weights", "baselines"):
        assert s.model_dump()[section] == raw[section], section
    # relative paths in the file are resolved against the project root
    assert s.data_root == (PROJECT_ROOT / raw["data_root"]).resolve()
    assert s.reports_dir == PROJECT_ROOT / "reports"
    assert s.dataset_configs == DATASET_DIR


def test_default_config_is_used_when_no_path_is_given() -> None:
    assert load_settings() == load_settings(DEFAULT_CONFIG)


def test_default_yaml_has_sane_values(settings: Settings) -> None:
    ev = settings.evaluation
    assert 1 <= ev.slots <= ev.mrr_depth <= ev.candidates
    assert ev.bootstrap_samples >= 50
    assert 0.5 < ev.ci_level < 1.0
    assert 0.0 <= settings.validation.max_invalid_share <= 0.5
    assert settings.split.validation_share + settings.split.test_share < 1.0
    w = settings.event_weights
    assert w.purchase >= w.cart >= w.view > 0
    assert w.of("remove_from_cart") == 0.0
    for path in (settings.data_root, settings.reports_dir, settings.artifacts_dir):
        assert path.is_absolute()
    # every data set the main job loads has a column mapping
    for name in settings.datasets:
        assert (settings.dataset_configs / f"{name}.yaml").is_file(), name


def test_code_defaults_match_default_yaml(tmp_path: Path) -> None:
    """An empty YAML falls back to the defaults in code, which must agree with default.yaml."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_settings(empty).model_dump() == load_settings(DEFAULT_CONFIG).model_dump()


def test_there_are_dataset_yamls() -> None:
    assert {p.stem for p in DATASET_YAMLS} >= {
        "rees46",
        "amazon_m2",
        "uci_online_retail",
        "hm_catalogue",
    }


@pytest.mark.parametrize("path", DATASET_YAMLS, ids=lambda p: p.stem)
def test_every_dataset_yaml_loads(path: Path, settings: Settings) -> None:
    by_path = load_dataset_spec(path, settings)
    by_name = load_dataset_spec(path.stem, settings)

    assert by_path == by_name
    assert by_path.name == path.stem  # the file name is the data set's name
    assert set(by_path.rails) <= set(RAILS)
    assert by_path.events is not None or by_path.items is not None
    if by_path.events is not None:
        for field in ("session_id", "item_id"):
            assert field in by_path.events.columns
    if by_path.items is not None:
        assert "item_id" in by_path.items.columns


def test_rees46_mapping(settings: Settings) -> None:
    spec = load_dataset_spec("rees46", settings)
    assert spec.rails == ["homepage_hero", "pdp_fbt", "cart_upsell"]
    assert spec.session_kind == "sequence"
    assert spec.events is not None and spec.items is not None
    assert spec.events.time == "column"
    assert spec.events.columns["item_id"] == "product_id"
    assert spec.items.category_separator == "."
    assert spec.items.category_fallback == "category_id"
    assert spec.fallback_to_views is True
    assert spec.strong_event_types == ["cart", "purchase"]


def test_amazon_m2_mapping(settings: Settings) -> None:
    spec = load_dataset_spec("amazon_m2", settings)
    assert spec.rails == ["homepage_hero"]
    assert spec.events is not None
    assert spec.events.time == "order"
    assert spec.events.order_column == "position"
    assert spec.events.target_column == "is_target"
    assert "event_time" not in spec.events.columns
    assert spec.items is None


def test_uci_online_retail_mapping(settings: Settings) -> None:
    spec = load_dataset_spec("uci_online_retail", settings)
    assert spec.rails == ["pdp_fbt", "cart_upsell"]
    assert spec.session_kind == "basket"
    assert spec.strong_event_types == ["purchase"]
    assert spec.events is not None and spec.events.time == "column"
    assert spec.events.columns["quantity"] == "quantity"


def test_hm_catalogue_mapping(settings: Settings) -> None:
    spec = load_dataset_spec("hm_catalogue", settings)
    assert spec.events is None
    assert spec.rails == []
    assert spec.items is not None
    assert spec.items.category_separator == " > "
    assert spec.items.columns["image_path"] == "image_file"


def test_dataset_spec_path_joins_data_root_and_root(tmp_path: Path) -> None:
    s = load_settings(data_root=tmp_path)
    spec = load_dataset_spec("amazon_m2", s)
    assert spec.path(s, "events.parquet") == tmp_path / "amazon_m2_sessions" / "events.parquet"


# ------------------------------------------------------------------ environment and overrides


def test_env_overrides_nested_and_top_level(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAILTOWER_EVALUATION__SLOTS", "10")
    monkeypatch.setenv("RAILTOWER_DATA_ROOT", "/tmp/x")
    monkeypatch.setenv("RAILTOWER_BASELINES__COVISITATION__WINDOW", "3")
    monkeypatch.setenv("RAILTOWER_DATASETS", '["rees46"]')

    s = load_settings()

    assert s.evaluation.slots == 10
    assert s.data_root == Path("/tmp/x")
    assert s.baselines.covisitation.window == 3
    assert s.datasets == ["rees46"]
    # siblings of an overridden nested value keep their YAML values
    assert s.evaluation.candidates == 120
    assert s.baselines.covisitation.neighbours == 200


def test_env_beats_yaml_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write_yaml(tmp_path / "c.yaml", {"seed": 1, "evaluation": {"slots": 5}})
    monkeypatch.setenv("RAILTOWER_SEED", "2")
    s = load_settings(cfg)
    assert s.seed == 2
    assert s.evaluation.slots == 5  # not overridden: the file wins over the code default


def test_keyword_overrides_beat_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RAILTOWER_SEED", "2")
    monkeypatch.setenv("RAILTOWER_DATA_ROOT", "/tmp/from-env")
    monkeypatch.setenv("RAILTOWER_EVALUATION__SLOTS", "10")

    s = load_settings(seed=3, data_root=tmp_path, evaluation={"candidates": 200})

    assert s.seed == 3
    assert s.data_root == tmp_path
    # nested overrides merge: candidates from the keyword, slots still from the env
    assert s.evaluation.candidates == 200
    assert s.evaluation.slots == 10


def test_railtower_config_env_selects_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_cfg = write_yaml(tmp_path / "env.yaml", {"seed": 11})
    arg_cfg = write_yaml(tmp_path / "arg.yaml", {"seed": 22})
    monkeypatch.setenv("RAILTOWER_CONFIG", str(env_cfg))
    assert load_settings().seed == 11
    assert load_settings(arg_cfg).seed == 22  # an explicit path wins over RAILTOWER_CONFIG


def test_settings_are_frozen(settings: Settings) -> None:
    with pytest.raises(Exception, match="frozen"):
        settings.seed = 1  # type: ignore[misc]


# ------------------------------------------------------------------ invalid values


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"evaluation": {"slots": 500}}, "evaluation"),
        ({"evaluation": {"mrr_depth": 130}}, "evaluation"),
        ({"validation": {"max_invalid_share": -0.1}}, "validation.max_invalid_share"),
        ({"validation": {"max_invalid_share": 0.9}}, "validation.max_invalid_share"),
        ({"split": {"test_share": -1}}, "split.test_share"),
        ({"evaluation": {"bootstrap_samples": 10}}, "evaluation.bootstrap_samples"),
        ({"log_level": "LOUD"}, "log_level"),
        ({"bogus": 1}, "bogus"),
        ({"evaluation": {"slotz": 3}}, "evaluation.slotz"),
        ({"event_weights": {"click": 1.0}}, "event_weights.click"),
    ],
    ids=lambda v: str(v) if isinstance(v, str) else None,
)
def test_invalid_override_names_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(**overrides)
    message = str(info.value)
    assert re.search(rf"^\s+- {re.escape(field)}:", message, re.MULTILINE), message
    assert str(DEFAULT_CONFIG) in message


def test_slots_above_candidates_explains_the_order() -> None:
    with pytest.raises(ConfigError, match=r"slots <= mrr_depth <= candidates, got 500, 100, 120"):
        load_settings(evaluation={"slots": 500})


def test_invalid_yaml_value_names_file_and_every_field(tmp_path: Path) -> None:
    cfg = write_yaml(
        tmp_path / "bad.yaml",
        {
            "evaluation": {"slots": 500},
            "validation": {"max_invalid_share": -0.5},
            "unknown_key": 2,
        },
    )
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    message = str(info.value)
    assert str(cfg) in message
    for field in ("evaluation", "validation.max_invalid_share", "unknown_key"):
        assert f"- {field}:" in message, field


def test_invalid_env_value_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAILTOWER_EVALUATION__SLOTS", "abc")
    with pytest.raises(ConfigError, match=r"evaluation\.slots: .*'abc'") as info:
        load_settings()
    assert "RAILTOWER_" in str(info.value)


def test_env_can_make_values_inconsistent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAILTOWER_EVALUATION__CANDIDATES", "5")
    with pytest.raises(ConfigError, match="evaluation"):
        load_settings()


def test_missing_config_file_raises(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        load_settings(missing)


def test_missing_config_file_from_env_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "gone.yaml"
    monkeypatch.setenv("RAILTOWER_CONFIG", str(missing))
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        load_settings()


def test_malformed_config_yaml_raises_config_error(tmp_path: Path) -> None:
    # BUG (railtower/settings.py:174-179, load_settings): a config file that is not valid
    # YAML escapes as a raw yaml.parser.ParserError instead of a ConfigError, although
    # errors.ConfigError covers "malformed" files and load_dataset_spec already converts
    # yaml.YAMLError. This test asserts the intended behaviour and fails until it is fixed.
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("seed: [1\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_settings(cfg)


# ------------------------------------------------------------------ data set mappings


def test_unknown_dataset_name_lists_the_known_ones(settings: Settings) -> None:
    with pytest.raises(ConfigError) as info:
        load_dataset_spec("retailrocket", settings)
    message = str(info.value)
    assert "retailrocket.yaml" in message
    known = message.split("known data sets:")[1]
    for name in ("amazon_m2", "hm_catalogue", "rees46", "uci_online_retail"):
        assert name in known


def test_missing_dataset_yaml_path_raises(tmp_path: Path, settings: Settings) -> None:
    with pytest.raises(ConfigError, match="no data set mapping"):
        load_dataset_spec(tmp_path / "absent.yaml", settings)


def _events(**extra: object) -> dict:
    return {
        "path": "events.csv",
        "columns": {"session_id": "s", "item_id": "i", "event_type": "t"},
        **extra,
    }


def test_time_order_without_order_column_is_refused(tmp_path: Path, settings: Settings) -> None:
    path = write_yaml(tmp_path / "d.yaml", {"name": "d", "events": _events(time="order")})
    with pytest.raises(ConfigError) as info:
        load_dataset_spec(path, settings)
    message = str(info.value)
    assert str(path) in message
    assert "- events:" in message
    assert "order_column" in message


def test_time_order_with_order_column_is_accepted(tmp_path: Path, settings: Settings) -> None:
    path = write_yaml(
        tmp_path / "d.yaml",
        {"name": "d", "events": _events(time="order", order_column="pos")},
    )
    spec = load_dataset_spec(path, settings)
    assert spec.events is not None and spec.events.order_column == "pos"


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ({"name": "d", "events": _events()}, "- events: Value error, time: column needs"),
        ({"name": "d", "events": _events(time="clock")}, "- events.time:"),
        (
            {"name": "d", "rails": ["homepage_hero"], "items": {"path": "i", "columns": {}}},
            "need an events mapping",
        ),
        ({"name": "d"}, "events, items or both"),
        (
            {"name": "d", "events": _events(time="order", order_column="p"), "rails": ["hero"]},
            "- rails.0:",
        ),
        (
            {"name": "d", "events": _events(time="order", order_column="p"), "colour": "x"},
            "- colour:",
        ),
        (
            {"name": "d", "events": _events(time="order", order_column="p", extra=1)},
            "- events.extra:",
        ),
        ({"events": _events(time="order", order_column="p")}, "- name: Field required"),
    ],
    ids=[
        "no-event-time",
        "bad-time-kind",
        "rails-without-events",
        "nothing",
        "unknown-rail",
        "unknown-key",
        "unknown-events-key",
        "no-name",
    ],
)
def test_invalid_dataset_yaml_is_refused(
    doc: dict, needle: str, tmp_path: Path, settings: Settings
) -> None:
    path = write_yaml(tmp_path / "d.yaml", doc)
    with pytest.raises(ConfigError) as info:
        load_dataset_spec(path, settings)
    assert needle in str(info.value)
    assert str(path) in str(info.value)


def test_malformed_dataset_yaml_is_refused(tmp_path: Path, settings: Settings) -> None:
    path = tmp_path / "d.yml"
    path.write_text("name: [d\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_dataset_spec(path, settings)


def test_dataset_name_resolves_against_dataset_configs(tmp_path: Path) -> None:
    write_yaml(
        tmp_path / "shop.yaml",
        {"name": "shop", "items": {"path": "items.csv", "columns": {"item_id": "id"}}},
    )
    s = load_settings(dataset_configs=tmp_path)
    spec = load_dataset_spec("shop", s)
    assert isinstance(spec, DatasetSpec)
    assert spec.name == "shop" and spec.events is None
    with pytest.raises(ConfigError, match="known data sets: shop$"):
        load_dataset_spec("rees46", s)


# ------------------------------------------------------------------ paths


def _without_test_folders(monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite points every output folder into its pytest folder (tests/conftest.py);
    tests of the file's own paths read them without that."""
    for name in HERMETIC_FOLDERS:
        monkeypatch.delenv(name, raising=False)


def test_relative_paths_resolve_against_project_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write_yaml(
        tmp_path / "c.yaml",
        {"reports_dir": "rel/out", "artifacts_dir": "../elsewhere", "cache_dir": str(tmp_path)},
    )
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    _without_test_folders(monkeypatch)
    s = load_settings(cfg)
    assert s.reports_dir == PROJECT_ROOT / "rel" / "out"
    assert s.artifacts_dir == PROJECT_ROOT.parent / "elsewhere"
    assert s.cache_dir == tmp_path  # absolute paths are kept as they are


def test_relative_env_and_keyword_paths_resolve_against_project_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAILTOWER_DATA_ROOT", "data/here")
    s = load_settings(reports_dir="out")
    assert s.data_root == PROJECT_ROOT / "data" / "here"
    assert s.reports_dir == PROJECT_ROOT / "out"


# ------------------------------------------------------------------ fingerprint


def test_fingerprint_is_stable(settings: Settings, tmp_path: Path) -> None:
    fp = settings.fingerprint()
    assert re.fullmatch(r"[0-9a-f]{16}", fp)
    assert load_settings().fingerprint() == fp
    # the same values reached another way give the same fingerprint
    assert load_settings(seed=settings.seed).fingerprint() == fp
    copy = write_yaml(tmp_path / "copy.yaml", yaml.safe_load(DEFAULT_CONFIG.read_text()))
    assert load_settings(copy).fingerprint() == fp


@pytest.mark.parametrize(
    "overrides",
    [
        {"seed": 1},
        {"evaluation": {"slots": 11}},
        {"baselines": {"session_knn": {"idf_weighting": False}}},
        {"datasets": ["rees46"]},
        {"data_root": "/tmp/other"},
    ],
    ids=["seed", "nested", "deeply-nested", "list", "path"],
)
def test_fingerprint_changes_with_any_value(overrides: dict, settings: Settings) -> None:
    assert load_settings(**overrides).fingerprint() != settings.fingerprint()


def test_fingerprint_changes_with_env(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    monkeypatch.setenv("RAILTOWER_EVENT_WEIGHTS__CART", "2.5")
    assert load_settings().fingerprint() != settings.fingerprint()
