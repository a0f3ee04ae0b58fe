"""The live canary of each data set: which challenger serves which share of sessions, and
how that share moves (start, advance, hold, resume, abort, and the promotion at 100%).

    <artifacts_dir>/<promotion.pointer_dir>/<data set>.canary.json   the plan and its step
    <artifacts_dir>/<promotion.pointer_dir>/history.jsonl             every move, with figures

The state file is replaced in one rename, so an API process reading it each second sees
the old step or the new one, never half of either. Every move holds the pointer lock
(`railtower.production.pointer_lock`) for its read-decide-write-record step, like a
promotion or a rollback, so an operator's abort and the nightly step cannot interleave.

A session is routed by `in_canary`: a stable hash of its id, salted apart from the shadow
sample's, compared with the share. The hash is fixed, so a session served by the
challenger at 5% is still served by it at 25%: no shopper flips between models as the
ramp rises. Reaching the last step (1.0) is the promotion: the production pointer moves
to the challenger in one rename and the move is recorded as a promotion, so
`railtower.production.rollback` can put the previous bundle back.

Who decides when to advance or abort is `training.canary_decision` (it reads impressions
and events, offline code); this module only moves the state, and serving only reads it.
This module is core: it imports nothing of ours outside `railtower`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from railtower.errors import ArtifactMismatch, RailtowerError
from railtower.logs import get_logger
from railtower.manifest import Manifest, now_iso
from railtower.production import (
    append_history,
    current_production,
    history_path,
    load_evaluation,
    pointer_lock,
    pointer_path,
    record_promotion,
    switch,
)
from railtower.settings import CanarySettings, PromotionSettings

log = get_logger(__name__)

CANARY_ARM = "canary"
Status = Literal["running", "held", "aborted", "promoted"]
LIVE: tuple[Status, ...] = ("running", "held")


class CanaryRefused(RailtowerError):
    """The canary did not move: the message says why and what to do instead."""


class CanaryState(BaseModel):
    """One data set's canary: the two bundles, the ramp, where it stands."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str
    challenger: str  # the challenger bundle's model version
    challenger_path: str
    production: str  # the production version the canary is compared with
    production_path: str
    steps: list[float]
    step: int = Field(ge=0)
    status: Status
    salt: str
    started_at: str
    step_started_at: str
    updated_at: str
    reason: str = ""

    @property
    def live(self) -> bool:
        return self.status in LIVE

    @property
    def share(self) -> float:
        """Share of sessions the challenger serves now (0 once aborted or promoted)."""
        return self.steps[self.step] if self.live else 0.0

    @property
    def next_share(self) -> float | None:
        return self.steps[self.step + 1] if self.step + 1 < len(self.steps) else None

    def step_started(self) -> datetime:
        return datetime.fromisoformat(self.step_started_at)


def in_canary(session_id: str, share: float, salt: str) -> bool:
    """Whether the challenger serves `session_id` at `share`: a keyed blake2b of the id
    below the share (stable across processes and restarts; nested as the share rises)."""
    if share <= 0.0:
        return False
    if share >= 1.0:
        return True
    key = salt.encode()[:64]  # blake2b keys are at most 64 bytes
    digest = hashlib.blake2b(session_id.encode(), digest_size=8, key=key).digest()
    return int.from_bytes(digest, "big") / 2**64 < share


def canary_path(pointer: Path) -> Path:
    """The canary state file of the data set whose production pointer is `pointer`."""
    return pointer.parent / f"{pointer.name}.canary.json"


def read_canary(pointer: Path) -> CanaryState | None:
    """The canary of `pointer`'s data set; None when none was ever started.

    Raises:
        ValueError: the state file is not a canary state (edited by hand?).
    """
    path = canary_path(pointer)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    return CanaryState.model_validate_json(raw)


def _iso(at: datetime | None) -> str:
    """The time a move is stamped with: now, or a replay's clock (training.canary_replay
    walks days of logged sessions in minutes, and the steps' windows are in their time)."""
    return now_iso() if at is None else at.astimezone(UTC).isoformat(timespec="seconds")


def _write(pointer: Path, state: CanaryState) -> None:
    path = canary_path(pointer)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(orjson.dumps(state.model_dump(), option=orjson.OPT_INDENT_2))
    os.replace(temporary, path)


def _record(
    pointer: Path,
    state: CanaryState,
    event: str,
    reason: str,
    figures: Mapping[str, Any] | None,
    verdict: str | None = None,
) -> None:
    append_history(
        pointer,
        {
            "at": state.updated_at,
            "action": "canary",
            "event": event,
            "pointer": pointer.name,
            "challenger": state.challenger,
            "production": state.production,
            "step": state.step,
            "share": state.share,
            "status": state.status,
            "reason": reason,
            "figures": dict(figures) if figures else None,
            **({"verdict": verdict} if verdict else {}),
        },
    )


# ------------------------------------------------------------------------------ moves


def start_canary(
    artifacts_dir: Path,
    promotion: PromotionSettings,
    canary: CanarySettings,
    dataset: str,
    bundle: Path,
    reason: str = "started",
    at: datetime | None = None,
    salt: str | None = None,
) -> CanaryState:
    """Send the first step's share of `dataset`'s sessions to `bundle`.

    `salt` picks the sessions (default `canary.salt`); `railtower canary start --impressions`
    chooses one whose sessions production serves as well as the rest (an A/A check,
    training.canary_balance).

    Raises:
        CanaryRefused: a canary is already live, there is no production to compare with,
            or the bundle is production itself, fails verification or was never evaluated
            (the offline gate comes first). Nothing moved.
    """
    pointer = pointer_path(artifacts_dir, promotion, dataset)
    bundle = bundle if bundle.is_absolute() else artifacts_dir / bundle
    with pointer_lock(pointer):
        current = read_canary(pointer)
        if current is not None and current.live:
            raise CanaryRefused(
                f"a canary of {current.challenger} is {current.status} at "
                f"{current.share:.0%} for {dataset}; abort it first"
            )
        production = current_production(pointer)
        if production is None:
            raise CanaryRefused(
                f"no production bundle at {pointer}: promote one first, a canary needs "
                "production to be compared with"
            )
        if bundle.resolve() == production:
            raise CanaryRefused(f"{bundle.name} is production already")
        try:
            version = Manifest.load(bundle, verify=True).version
            load_evaluation(bundle)
            production_version = Manifest.load(production, verify=False).version
        except (ArtifactMismatch, OSError, ValueError) as exc:
            raise CanaryRefused(
                f"{bundle} cannot be a challenger ({exc}); evaluate a verified bundle first"
            ) from None
        now = _iso(at)
        state = CanaryState(
            dataset=dataset,
            challenger=version,
            challenger_path=str(bundle.resolve()),
            production=production_version,
            production_path=str(production),
            steps=list(canary.steps),
            step=0,
            status="running",
            salt=salt or canary.salt,
            started_at=now,
            step_started_at=now,
            updated_at=now,
            reason=reason,
        )
        _write(pointer, state)
        _record(pointer, state, "start", reason, None)
    log.info("canary started", dataset=dataset, challenger=version, share=state.share)
    return state


def advance_canary(
    artifacts_dir: Path,
    promotion: PromotionSettings,
    dataset: str,
    reason: str,
    figures: Mapping[str, Any] | None = None,
    at: datetime | None = None,
) -> CanaryState:
    """Move a running canary to its next step; the last step (1.0) promotes the challenger.

    Raises:
        CanaryRefused: no running canary (a held one is resumed first), or production is
            no longer the bundle the canary started against (moved by someone else).
    """
    pointer = pointer_path(artifacts_dir, promotion, dataset)
    with pointer_lock(pointer):
        state = _live(pointer, dataset, "advance")
        if state.status != "running":
            raise CanaryRefused(f"the canary of {dataset} is {state.status}: resume it first")
        production = current_production(pointer)
        if production is None or str(production) != state.production_path:
            raise CanaryRefused(
                f"production of {dataset} is no longer {state.production} (now "
                f"{production.name if production else 'nothing'}): abort this canary and "
                "start a new one against the current production"
            )
        now = _iso(at)
        step = state.step + 1
        if state.steps[step] < 1.0:
            moved = state.model_copy(
                update={"step": step, "step_started_at": now, "updated_at": now, "reason": reason}
            )
            _write(pointer, moved)
            _record(pointer, moved, "advance", reason, figures)
            log.info("canary advanced", dataset=dataset, share=moved.share)
            return moved
        challenger = Path(state.challenger_path)
        switch(pointer, challenger)  # one rename: every process follows the pointer
        record_promotion(
            pointer,
            {
                "promote": True,
                "by": "canary",
                "candidate": challenger.name,
                "production": production.name,
                "reasons": [reason],
                "figures": dict(figures) if figures else None,
            },
            challenger,
            production,
        )
        moved = state.model_copy(
            update={
                "step": step,
                "status": "promoted",
                "step_started_at": now,
                "updated_at": now,
                "reason": reason,
            }
        )
        _write(pointer, moved)
        _record(pointer, moved, "promote", reason, figures)
    log.warning("canary promoted", dataset=dataset, challenger=state.challenger)
    return moved


def hold_canary(
    artifacts_dir: Path, promotion: PromotionSettings, dataset: str, reason: str
) -> CanaryState:
    """Keep the current share, and make no automatic advance until resumed (aborts still
    apply: the guard never sleeps)."""
    return _set_status(artifacts_dir, promotion, dataset, "held", "hold", reason, None)


def resume_canary(
    artifacts_dir: Path, promotion: PromotionSettings, dataset: str, reason: str
) -> CanaryState:
    """Let a held canary advance again."""
    return _set_status(artifacts_dir, promotion, dataset, "running", "resume", reason, None)


def abort_canary(
    artifacts_dir: Path,
    promotion: PromotionSettings,
    dataset: str,
    reason: str,
    figures: Mapping[str, Any] | None = None,
    at: datetime | None = None,
) -> CanaryState:
    """Send every session back to production (share 0); production never moved."""
    return _set_status(artifacts_dir, promotion, dataset, "aborted", "abort", reason, figures, at)


def _set_status(
    artifacts_dir: Path,
    promotion: PromotionSettings,
    dataset: str,
    status: Status,
    event: str,
    reason: str,
    figures: Mapping[str, Any] | None,
    at: datetime | None = None,
) -> CanaryState:
    if not reason.strip():
        raise ValueError(f"reason is empty; say why the canary is told to {event}")
    pointer = pointer_path(artifacts_dir, promotion, dataset)
    with pointer_lock(pointer):
        state = _live(pointer, dataset, event)
        if event == "resume" and state.status != "held":
            raise CanaryRefused(f"the canary of {dataset} is {state.status}, not held")
        now = _iso(at)
        moved = state.model_copy(update={"status": status, "updated_at": now, "reason": reason})
        _write(pointer, moved)
        _record(pointer, moved, event, reason, figures)
    log.warning("canary " + event, dataset=dataset, challenger=state.challenger, reason=reason)
    return moved


def record_judgement(
    artifacts_dir: Path,
    promotion: PromotionSettings,
    dataset: str,
    verdict: str,
    reason: str,
    figures: Mapping[str, Any] | None,
    at: datetime | None = None,
) -> None:
    """Append a judgement that moved nothing (wait, held) to the history with its figures,
    so the console shows how the step stands between moves."""
    pointer = pointer_path(artifacts_dir, promotion, dataset)
    with pointer_lock(pointer):
        state = _live(pointer, dataset, "judge")
        entry = state.model_copy(update={"updated_at": _iso(at)})
        _record(pointer, entry, "judged", reason, figures, verdict)


def _live(pointer: Path, dataset: str, event: str) -> CanaryState:
    state = read_canary(pointer)
    if state is None or not state.live:
        said = "none was started" if state is None else f"the last one was {state.status}"
        raise CanaryRefused(
            f"no live canary of {dataset} to {event} ({said}); start one with "
            "`railtower canary start`"
        )
    return state


def canary_history(pointer: Path, limit: int = 50) -> list[dict[str, Any]]:
    """The newest `limit` canary moves of `pointer`'s data set, oldest first."""
    history = history_path(pointer)
    if not history.exists():
        return []
    entries = [orjson.loads(line) for line in history.read_bytes().splitlines() if line.strip()]
    mine = [e for e in entries if e.get("action") == "canary" and e.get("pointer") == pointer.name]
    return mine[-limit:]
