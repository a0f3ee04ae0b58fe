"""Where a benchmark's result goes: `reports/benchmarks/<name>.json` (every figure) and
`<name>.md` (the short table a person reads, also printed), in one place for every
benchmark."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from railtower.settings import PROJECT_ROOT

OUT = PROJECT_ROOT / "reports" / "benchmarks"


def write_report(name: str, result: Mapping[str, Any], text: str, folder: Path = OUT) -> None:
    """Write `result` as `<name>.json` and `text` as `<name>.md` under `folder`; print `text`."""
    folder.mkdir(parents=True, exist_ok=True)
    options = orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY
    (folder / f"{name}.json").write_bytes(orjson.dumps(result, option=options))
    (folder / f"{name}.md").write_text(text)
    print(text)
