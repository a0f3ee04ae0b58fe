"""The production pointer in core: one path per data set, an atomic switch, the history."""

from __future__ import annotations

import orjson
import pytest

from railtower.production import (
    current_production,
    history_path,
    pointer_path,
    production_stack,
    record_promotion,
    switch,
)
from railtower.settings import PromotionSettings, load_settings


def test_pointer_path_is_the_one_place_the_pointer_is_named(tmp_path):
    settings = load_settings(artifacts_dir=tmp_path, promotion={"pointer_dir": "live"})
    pointer = pointer_path(settings.artifacts_dir, settings.promotion, "rees46")
    assert pointer == tmp_path / "live" / "rees46"
    assert history_path(pointer) == tmp_path / "live" / "history.jsonl"
    for name in ("", "../etc", ".hidden"):
        with pytest.raises(ValueError, match="not a data set name"):
            pointer_path(tmp_path, PromotionSettings(), name)


def test_switch_and_record_build_the_stack(tmp_path):
    pointer = pointer_path(tmp_path, PromotionSettings(), "shop")
    assert current_production(pointer) is None
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    v1.mkdir(), v2.mkdir()
    switch(pointer, v1)
    record_promotion(pointer, {"promote": True, "candidate": "v1", "production": None}, v1, None)
    switch(pointer, v2)
    record_promotion(pointer, {"promote": True, "candidate": "v2", "production": "v1"}, v2, v1)
    refused = {"promote": False, "candidate": "v3", "production": "v2"}
    record_promotion(pointer, refused, tmp_path / "v3", v2)
    assert current_production(pointer) == v2.resolve()
    assert not pointer.readlink().is_absolute()  # relative: the artifacts folder can move
    assert [p.name for p in production_stack(pointer, tmp_path)] == ["v1", "v2"]
    entries = [orjson.loads(x) for x in history_path(pointer).read_bytes().splitlines()]
    assert [e["action"] for e in entries] == ["promote"] * 3
    assert entries[-1]["pointer"] == "shop" and entries[-1]["production_path"] == str(v2)
    v2.rmdir()  # a dangling pointer is no production
    assert current_production(pointer) is None
