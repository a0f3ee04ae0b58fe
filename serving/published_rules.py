"""The merchandisers' published rule set: validating rule-set text, publishing it to disk
atomically, and serving it in every API process.

Publishing writes `<artifacts>/rules/<serving.dataset>/published.json` in one rename (every
version is also kept under `history/`), so every API process on these artifacts picks it up
from the file within a second (`PublishedRules.sync`, called by serving.app's watch loop).
A published rule set replaces the bundle's own rules, including in bundles promoted later.
Pre-warmed rails computed under other rules are not served once it is in force: the rules'
version is part of the rail marker (state.session_store), so they are recomputed. The admin
routes (serving/admin.py) and the console (serving/console.py) call it.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from railtower.errors import RuleSetError
from railtower.logs import get_logger
from railtower.settings import Settings
from ranking.rule_set import RuleSet, load_rule_set
from serving.metrics import Metrics

if TYPE_CHECKING:  # the service is only passed through to sync
    from serving.service import RailService

log = get_logger(__name__)

PUBLISHED = "published.json"
# "line 12, rules[3].slot: why" and "line 2, column 5: not valid JSON: why", as
# ranking.rule_set.load_rule_set words its problems.
_JSON_PROBLEM = re.compile(r"^line (\d+), (column \d+: .*)$", re.DOTALL)
_PROBLEM = re.compile(r"^line (\d+), (.+?): (.*)$", re.DOTALL)


# ------------------------------------------------------------------------------ rule sets


def parse_rule_set(text: str) -> RuleSet:
    """Validate rule-set JSON text (never a path: a request body must not name a file).

    Raises:
        RuleSetError: the text is not a JSON object or breaks the schema (line/field/why).
    """
    if not text.lstrip().startswith(("{", "[")):
        why = "a rule set is a JSON object with name, version, rails and rules"
        raise RuleSetError("<request body>", [f"line 1, rule set: {why}"])
    return load_rule_set(text)


def rule_errors(exc: RuleSetError) -> list[dict[str, Any]]:
    """The problems of a refused rule set as `{"line", "field", "why"}` (field None for
    the document as a whole)."""
    errors: list[dict[str, Any]] = []
    for problem in exc.problems:
        json_problem, match = _JSON_PROBLEM.match(problem), _PROBLEM.match(problem)
        if json_problem is not None:
            errors.append({"line": int(json_problem[1]), "field": None, "why": json_problem[2]})
        elif match is not None:
            field = None if match[2] == "rule set" else match[2]
            errors.append({"line": int(match[1]), "field": field, "why": match[3]})
        else:  # a wording this parser does not know: keep the whole text
            errors.append({"line": None, "field": None, "why": problem})
    return errors


def rule_summary(rule_set: RuleSet) -> dict[str, Any]:
    kinds: dict[str, int] = {}
    for rule in rule_set.rules:
        kinds[rule.kind] = kinds.get(rule.kind, 0) + 1
    return {
        "name": rule_set.name,
        "version": rule_set.version,
        "rails": list(rule_set.rails),
        "rules": len(rule_set.rules),
        "kinds": kinds,
    }


@dataclass(frozen=True)
class Publication:
    """A published rule set: its text's hash is its version, the same in every process."""

    version: str
    published_at: str
    rule_set: RuleSet
    path: Path


class PublishedRules:
    """The published rule set of one data set, on disk, and the one each process serves.

    Args:
        folder: `<artifacts>/rules/<data set>`: `published.json` and `history/`.
        metrics: counts a published file that fails to load (`errors{kind="rules_load"}`).
    """

    def __init__(self, folder: Path, metrics: Metrics) -> None:
        self.folder, self.metrics = folder, metrics
        self.path, self.history = folder / PUBLISHED, folder / "history"
        self._lock = threading.Lock()
        self._signature: tuple[int, int, int] | None = None
        self._publication: Publication | None = None
        # (id of the model, id of the canary's challenger, published version) last applied
        self._applied: tuple[int, int | None, str | None] | None = None

    @classmethod
    def for_settings(cls, settings: Settings, metrics: Metrics) -> PublishedRules:
        return cls(settings.artifacts_dir / "rules" / settings.serving.dataset, metrics)

    @property
    def publication(self) -> Publication | None:
        """The publication this process last read (None: nothing published)."""
        return self._publication

    def publish(self, text: str) -> Publication:
        """Validate `text` and make it the published rule set, atomically.

        The version is kept under `history/` first, then `published.json` is replaced in
        one rename: a reader sees the old file or the new one, never half of one.

        Raises:
            RuleSetError: the text is not a valid rule set (nothing is written).
        """
        rule_set = parse_rule_set(text)
        version = hashlib.sha256(text.encode()).hexdigest()[:16]
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        self.history.mkdir(parents=True, exist_ok=True)
        _write_atomically(self.history / f"{stamp}-{version}.json", text)
        _write_atomically(self.path, text)
        log.info("rule set published", version=version, name=rule_set.name, path=str(self.path))
        return Publication(version, _mtime_iso(self.path), rule_set, self.path)

    def sync(self, service: RailService) -> bool:
        """Serve the published rule set in `service` if it, or the served model, changed.

        Cheap when nothing changed (one stat). A published file that fails to load is
        logged and counted, and the last good rules keep serving. Without a published
        file the bundle's own rules serve. Returns True when the served rules changed.
        """
        with self._lock:
            loaded = service.loaded
            if loaded is None:
                return False
            # a live canary's challenger serves under the same published rules
            canary = None if service.canary is None else service.canary.loaded
            self._read_if_changed()
            publication = self._publication
            version = None if publication is None else publication.version
            applied = (id(loaded), None if canary is None else id(canary), version)
            if self._applied == applied:
                return False
            # One attribute assignment: a request reads the rule set once (the engine's rules
            # stage), so it uses the old rules or the new ones, never a mix.
            for model in (loaded, canary):
                if model is not None:
                    model.pipeline.rule_set = (
                        model.rails.rule_set if publication is None else publication.rule_set
                    )
            if service.store is not None:
                # Rules first, then the marker: a rail whose snapshot carries the new epoch
                # was ranked under the new rules. The model version is part of the epoch,
                # so rails a newly loaded bundle warmed under its own rules expire too.
                epoch = None if version is None else f"{version}/{loaded.version}"
                service.store.rules_epoch = epoch
            self._applied = applied
            rule_set = loaded.pipeline.rule_set
            log.info(
                "serving rule set",
                published_version=version,
                name=None if rule_set is None else rule_set.name,
                model_version=loaded.version,
                canary_version=None if canary is None else canary.version,
            )
            return True

    def _read_if_changed(self) -> None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._signature, self._publication = None, None
            return
        # A publish is a rename, so the inode changes even within one mtime tick.
        signature = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if signature == self._signature:
            return
        self._signature = signature
        try:
            text = self.path.read_text(encoding="utf-8-sig")
            rule_set = parse_rule_set(text)
        except (OSError, UnicodeDecodeError, RuleSetError) as exc:
            self.metrics.errors.labels(kind="rules_load").inc()
            log.error("published rule set not loaded; keeping the current rules", error=str(exc))
            return
        version = hashlib.sha256(text.encode()).hexdigest()[:16]
        self._publication = Publication(version, _mtime_iso(self.path), rule_set, self.path)


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with temporary.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(temporary, path)


def _mtime_iso(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat(timespec="seconds")
