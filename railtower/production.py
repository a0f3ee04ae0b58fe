"""The production pointer of each data set: where it is, how it moves, what it held.

`<artifacts_dir>/<promotion.pointer_dir>/<data set>` is a symlink to the rails bundle in
production. It moves in one rename (`switch`), so a reader sees the old bundle or the new
one, never neither. Every move and every refusal is appended to `history.jsonl` beside the
pointers: promotions push a bundle, rollbacks pop one, refusals change nothing, so the
history replays into the stack of bundles each pointer has held (`production_stack`).

Who moves it: the promotion gate (`training.promotion.promote`, offline: it compares
evaluations and may re-score production) and `rollback` here (no evaluation code: it puts
back the bundle below the current one). Both hold `pointer_lock` for their
read-decide-switch-record step, so an automatic rollback racing an operator's promotion
cannot interleave. Serving only reads the pointer (`pointer_path`), and its admin rollback
calls `rollback` directly.

This module is core: it imports nothing of ours outside `railtower`.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from railtower.errors import ArtifactMismatch, RailtowerError
from railtower.logs import get_logger
from railtower.manifest import Manifest, now_iso
from railtower.settings import PromotionSettings

log = get_logger(__name__)

HISTORY = "history.jsonl"
# The evaluation record a rails bundle carries (written by ranking.rails_bundle).
EVALUATION = "evaluation.json"


class RollbackRefused(RailtowerError):
    """No rollback happened: nothing to roll back to, or the bundle to restore is unusable.

    The production pointer is untouched; the message says why and what to do instead.
    """


# ------------------------------------------------------------------------------ the pointer


def pointer_path(artifacts_dir: Path, promotion: PromotionSettings, dataset: str) -> Path:
    """The production pointer of `dataset`: `<artifacts_dir>/<promotion.pointer_dir>/<dataset>`.

    Example:
        ``pointer_path(settings.artifacts_dir, settings.promotion, "rees46")``

    Raises:
        ValueError: `dataset` is not a plain data set name (empty, a path, or hidden).
    """
    if not dataset or os.sep in dataset or dataset.startswith("."):
        raise ValueError(f"dataset {dataset!r} is not a data set name (e.g. 'rees46')")
    return artifacts_dir / promotion.pointer_dir / dataset


def history_path(pointer: Path) -> Path:
    """The history every pointer beside `pointer` appends to."""
    return pointer.parent / HISTORY


def current_production(pointer: Path) -> Path | None:
    """The bundle `pointer` links to, resolved; None without a pointer or with a dangling
    one (a bundle that is gone is no production to protect)."""
    if not pointer.is_symlink():
        return None
    current = pointer.resolve()
    return current if current.exists() else None


@contextmanager
def pointer_lock(pointer: Path) -> Iterator[None]:
    """An exclusive lock on the pointer folder for one read-decide-switch-record step."""
    pointer.parent.mkdir(parents=True, exist_ok=True)
    with (pointer.parent / ".lock").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def switch(pointer: Path, target: Path) -> None:
    """Point `pointer` at `target` in one rename (readers never see a missing link)."""
    pointer.parent.mkdir(parents=True, exist_ok=True)
    temporary = pointer.with_name(f".{pointer.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(os.path.relpath(target.resolve(), pointer.parent.resolve()))
    os.replace(temporary, pointer)


# ------------------------------------------------------------------------------ the history


def append_history(pointer: Path, entry: Mapping[str, Any]) -> None:
    """Append one JSON line to the history beside `pointer`."""
    history = history_path(pointer)
    history.parent.mkdir(parents=True, exist_ok=True)
    with history.open("ab") as fh:
        fh.write(orjson.dumps(dict(entry), option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")


def record_promotion(
    pointer: Path, decision: Mapping[str, Any], candidate: Path, production: Path | None
) -> dict[str, Any]:
    """Append a promotion gate's decision (passed or refused) to the history.

    Args:
        decision: the gate's decision as a mapping; its `promote` says whether the pointer
            moved, `candidate` and `production` name the bundles.
        candidate: the candidate bundle folder.
        production: the bundle production held when the gate ran (None: none yet).

    The pointer's name and both bundles' paths are what `production_stack` replays by.
    """
    entry: dict[str, Any] = {
        "at": now_iso(),
        **decision,
        "action": "promote",
        "pointer": pointer.name,
        "candidate_path": str(candidate.resolve()),
        "production_path": None if production is None else str(production),
    }
    append_history(pointer, entry)
    return entry


def load_evaluation(folder: Path) -> dict[str, Any]:
    """The evaluation record of a bundle folder (raises ArtifactMismatch if it has none)."""
    path = folder / EVALUATION
    if not path.exists():
        raise ArtifactMismatch(f"{folder} has no {EVALUATION}: it was never evaluated")
    record: dict[str, Any] = orjson.loads(path.read_bytes())
    return record


def production_stack(pointer: Path, artifacts_dir: Path) -> list[Path]:
    """The bundles `pointer` has held, oldest first, replayed from the history.

    Entries written before pointers were recorded are attributed to `pointer` when their
    candidate bundle's evaluation names its data set.
    """
    history = history_path(pointer)
    stack: list[Path] = []
    if not history.exists():
        return stack
    for line in history.read_bytes().splitlines():
        if not line.strip():
            continue
        entry = orjson.loads(line)
        action = entry.get("action", "promote")
        if action == "rollback":
            if entry.get("pointer") == pointer.name and entry.get("restored") and stack:
                stack.pop()
            continue
        if not entry.get("promote") or not _for_pointer(entry, pointer, artifacts_dir):
            continue
        if not stack and entry.get("production"):
            # the history starts mid-way: the promotion still says what it replaced
            stack.append(_bundle_path(entry, "production", artifacts_dir))
        stack.append(_bundle_path(entry, "candidate", artifacts_dir))
    return stack


def _for_pointer(entry: dict[str, Any], pointer: Path, artifacts_dir: Path) -> bool:
    if "pointer" in entry:
        return bool(entry["pointer"] == pointer.name)
    try:  # an entry from before pointers were recorded: ask the bundle
        evaluation = load_evaluation(_bundle_path(entry, "candidate", artifacts_dir))
    except (ArtifactMismatch, OSError, ValueError):
        return False
    return bool(evaluation.get("dataset") == pointer.name)


def _bundle_path(entry: dict[str, Any], role: str, artifacts_dir: Path) -> Path:
    path = entry.get(f"{role}_path")
    return Path(path) if path else artifacts_dir / str(entry[role])


# ------------------------------------------------------------------------------ rollback


@dataclass(frozen=True)
class RollbackDecision:
    """A rollback that happened: production moved from `previous` back to `restored`."""

    dataset: str
    previous: str
    restored: str
    restored_path: str
    reason: str
    at: str

    def to_markdown(self) -> str:
        return (
            f"## Rollback: {self.dataset} back to {self.restored} (was {self.previous})\n\n"
            f"- reason: {self.reason}\n- at: {self.at}\n"
        )


def rollback(
    artifacts_dir: Path, settings: PromotionSettings, dataset: str, reason: str
) -> RollbackDecision:
    """Move the production pointer of `dataset` back to the bundle production held before.

    The previous bundle is the one below the current on the production stack that
    `<artifacts_dir>/<pointer_dir>/history.jsonl` records (a promotion pushes, a rollback
    pops); it must still exist and verify against its manifest. The switch is one rename,
    as for a promotion, and the rollback is appended to the history (refused ones too), so
    a second rollback goes one further back. Serving processes follow the pointer on their
    own (serving.reload_interval_s).

    Args:
        artifacts_dir: the artifacts folder (settings.artifacts_dir).
        settings: the promotion settings (where the pointers live).
        dataset: the data set whose pointer moves (<pointer_dir>/<dataset>).
        reason: why, for the history and the log (e.g. the online monitor's finding).

    Returns:
        What moved where.

    Raises:
        RollbackRefused: no pointer, no previous bundle, the pointer disagrees with the
            history, or the previous bundle is gone or fails verification. Nothing moved.
        ValueError: the reason is empty or `dataset` is not a data set name.

    Example:
        ``rollback(settings.artifacts_dir, settings.promotion, "rees46", "hit rate -8%")``
    """
    if not reason.strip():
        raise ValueError("reason is empty; say why production is rolled back")
    pointer = pointer_path(artifacts_dir, settings, dataset)
    with pointer_lock(pointer):
        try:
            previous, restored = _rollback_target(pointer, artifacts_dir)
        except RollbackRefused as exc:
            _record_rollback(pointer, None, None, reason, refused=str(exc))
            log.warning("rollback refused", dataset=dataset, why=str(exc))
            raise
        switch(pointer, restored)
        entry = _record_rollback(pointer, previous, restored, reason, refused=None)
    log.warning(
        "production rolled back",
        dataset=dataset,
        previous=previous.name,
        restored=restored.name,
        reason=reason,
    )
    return RollbackDecision(
        dataset, previous.name, restored.name, str(restored), reason, str(entry["at"])
    )


def _rollback_target(pointer: Path, artifacts_dir: Path) -> tuple[Path, Path]:
    if not pointer.is_symlink():
        raise RollbackRefused(f"no production pointer at {pointer}: nothing to roll back")
    current = pointer.resolve()
    stack = production_stack(pointer, artifacts_dir)
    if not stack or stack[-1].resolve() != current:
        said = stack[-1].name if stack else "nothing"
        raise RollbackRefused(
            f"{pointer} names {current.name} but {HISTORY} says production is {said}; it "
            "was moved by hand, so promote the bundle you want with `railtower promote`"
        )
    if len(stack) < 2:
        raise RollbackRefused(
            f"{current.name} is the first production bundle of {pointer.name}: there is no "
            "previous one to roll back to; promote another bundle instead"
        )
    restored = stack[-2]
    try:
        Manifest.load(restored, verify=True)
        load_evaluation(restored)
    except (ArtifactMismatch, OSError, ValueError) as exc:
        raise RollbackRefused(
            f"the previous bundle {restored} cannot be restored ({exc}); promote a "
            "verified bundle with `railtower promote` instead"
        ) from None
    return current, restored


def _record_rollback(
    pointer: Path,
    previous: Path | None,
    restored: Path | None,
    reason: str,
    refused: str | None,
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "at": now_iso(),
        "action": "rollback",
        "pointer": pointer.name,
        "rolled_back": refused is None,
        "previous": None if previous is None else previous.name,
        "restored": None if restored is None else restored.name,
        "restored_path": None if restored is None else str(restored.resolve()),
        "reason": reason,
        "refused": refused,
    }
    append_history(pointer, entry)
    return entry
