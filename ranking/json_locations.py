"""Where each key and value of a JSON text is, so an error on `rules[3].slot` can name a line.

`json.loads` returns values without positions; this scanner walks the same (already
validated) text once and records the offset of every path. It also reports what
`json.loads` accepts silently but a config file should not contain: duplicate keys (only
the last one survives, unseen) and NaN/Infinity (not JSON).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

Loc = tuple[str | int, ...]

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_SCALAR = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][-+]?\d+)?|true|false|null|-?Infinity|NaN")


@dataclass(frozen=True)
class JsonLocations:
    """Offsets of every path in one JSON text, and the problems found while scanning.

    Attributes:
        text: the JSON text.
        offsets: path -> character offset; an object member is located at its key, an
            array element at its value, the root at its first character.
        problems: (path, why) for duplicate keys and NaN/Infinity literals.

    Example:
        >>> where = JsonLocations.scan('{"rules": [\\n  {"slot": 0}\\n]}')
        >>> where.line(("rules", 0, "slot")), path_text(("rules", 0, "slot"))
        (2, 'rules[0].slot')
    """

    text: str
    offsets: dict[Loc, int]
    problems: list[tuple[Loc, str]]

    @classmethod
    def scan(cls, text: str) -> JsonLocations:
        """Scan text that `json.loads` has already accepted (so it is well formed).

        Args:
            text: the JSON text.

        Returns:
            The locations of every key and value in it.
        """
        offsets: dict[Loc, int] = {}
        problems: list[tuple[Loc, str]] = []

        def skip(i: int) -> int:
            match = _WHITESPACE.match(text, i)
            return match.end() if match else i

        def value(i: int, path: Loc) -> int:
            """Record the value starting at `i` (and its children); return where it ends."""
            offsets.setdefault(path, i)
            if text[i] in "{[":
                close, n, seen = "}" if text[i] == "{" else "]", 0, set()
                i = skip(i + 1)
                while text[i] != close:
                    if close == "}":
                        key, end = json.decoder.scanstring(text, i + 1)  # type: ignore[attr-defined]
                        child: Loc = (*path, key)
                        if key in seen:
                            problems.append((child, "duplicate key; JSON keeps only the last one"))
                        seen.add(key)
                        offsets[child] = i
                        i = value(skip(skip(end) + 1), child)  # skip(end) is at the ':'
                    else:
                        i = value(i, (*path, n))
                        n += 1
                    i = skip(i)
                    i = skip(i + 1) if text[i] == "," else i
                return i + 1
            if text[i] == '"':
                return int(json.decoder.scanstring(text, i + 1)[1])  # type: ignore[attr-defined]
            match = _SCALAR.match(text, i)
            if match is None:  # only reachable if the caller skipped json.loads
                raise ValueError(f"not JSON at offset {i}: {text[i : i + 20]!r}")
            if match.group().lstrip("-") in ("NaN", "Infinity"):
                problems.append((path, f"{match.group()} is not valid JSON; write a number"))
            return match.end()

        value(skip(0), ())
        return cls(text, offsets, problems)

    def line(self, loc: Loc) -> int:
        """1-based line of the deepest part of `loc` present in the text.

        A missing field's error thus points at the object that lacks it.
        """
        for end in range(len(loc), -1, -1):
            if loc[:end] in self.offsets:
                return self.text.count("\n", 0, self.offsets[loc[:end]]) + 1
        return 1


def path_text(loc: Loc) -> str:
    """A location as a person writes it: ('rules', 3, 'slot') -> 'rules[3].slot'."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text
