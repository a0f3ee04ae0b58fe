"""The one error hierarchy of Railtower: every error says what is wrong and how to fix it."""

from __future__ import annotations


class RailtowerError(Exception):
    """Base of every error Railtower raises on purpose."""


class ConfigError(RailtowerError):
    """A configuration file or override is missing, malformed or unsafe."""


class SchemaError(RailtowerError):
    """Input data does not match the canonical schema.

    The message names the file, the column, how many rows are affected, a few example
    values and what to change, so the person who owns the data can fix it without a debugger.
    """

    def __init__(
        self,
        file: str,
        column: str | None,
        problem: str,
        rows: int | None = None,
        examples: list[object] | None = None,
        fix: str | None = None,
    ) -> None:
        self.file, self.column, self.problem = file, column, problem
        self.rows, self.examples, self.fix = rows, examples or [], fix
        parts = [f"{file}"]
        if column is not None:
            parts.append(f"column '{column}'")
        text = ": ".join([", ".join(parts), problem])
        if rows is not None:
            text += f" ({rows:,} row{'s' if rows != 1 else ''})"
        if self.examples:
            text += f"; examples: {', '.join(repr(e) for e in self.examples[:5])}"
        if fix:
            text += f". Fix: {fix}"
        super().__init__(text)


class ArtifactMismatch(RailtowerError):
    """An artifact bundle does not match its manifest or the running code."""


class RuleSetError(RailtowerError):
    """A merchandising rule set is missing, not JSON, or breaks the rule-set schema.

    The message names the source and lists every problem as `line L, rules[i].field: why`,
    so the merchandiser who wrote the file can fix it without reading code.
    """

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source, self.problems = source, problems
        listed = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"rule set {source} is invalid ({len(problems)} problem(s)):\n{listed}")
