"""Long modules say why they are long: every module of the product, its benchmarks and its
scripts over `LIMIT` lines carries a "One module on purpose" paragraph in its docstring
(the one-rail-engine issue's rule: small modules named after what they do, or a reason)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = (
    "railtower",
    "ranking",
    "towers",
    "state",
    "serving",
    "streaming",
    "training",
    "devstack",
    "benchmarks",
    "scripts",
    "triton_models",
)
LIMIT = 400
NOTE = "One module on purpose"


def long_modules_without_note(root: Path) -> list[str]:
    """`path (lines)` of every .py under the packages of `root` over LIMIT lines whose
    module docstring lacks the NOTE paragraph."""
    missing = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            text = path.read_text()
            lines = text.count("\n")
            if lines <= LIMIT:
                continue
            docstring = ast.get_docstring(ast.parse(text, filename=str(path))) or ""
            if NOTE not in docstring:
                missing.append(f"{path.relative_to(root)} ({lines} lines)")
    return missing


def test_every_long_module_says_why() -> None:
    missing = long_modules_without_note(ROOT)
    assert missing == [], (
        f"modules over {LIMIT} lines without a '{NOTE}' paragraph in their docstring "
        "(split them, or say why they are one): " + ", ".join(missing)
    )


def test_the_check_finds_a_long_module_without_a_note(tmp_path: Path) -> None:
    (tmp_path / "ranking").mkdir()
    body = "x = 1\n" * (LIMIT + 1)
    (tmp_path / "ranking" / "long.py").write_text('"""Does many things."""\n' + body)
    (tmp_path / "ranking" / "noted.py").write_text(f'"""Many things.\n\n{NOTE}: why."""\n' + body)
    (tmp_path / "ranking" / "short.py").write_text('"""Small."""\nx = 1\n')
    assert long_modules_without_note(tmp_path) == [f"ranking/long.py ({LIMIT + 2} lines)"]
