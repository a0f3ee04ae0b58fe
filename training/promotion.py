"""`railtower promote`: the NDCG gate between a candidate bundle and production.

Both bundles carry the evaluation they earned (ranking.rails_bundle). The gate compares
them only on the *same* held-out cases (same window, same sampled sessions: the case
fingerprints must match), per rail, on the stage shoppers see:

- the paired NDCG@slots difference (candidate - production), bootstrapped over sessions,
  must not be negative beyond its interval (its upper bound must reach 0);
- the candidate's catalogue coverage@slots, as a share of the most its cases could reach,
  must reach `promotion.min_coverage_share`.

A pass switches the production pointer (a symlink) atomically, so a reader sees the old
bundle or the new one, never neither; a refusal leaves production untouched. Either way the
decision is appended to `<pointer_dir>/history.jsonl` with its reasons.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from railtower.errors import ArtifactMismatch
from railtower.manifest import Manifest, now_iso
from railtower.settings import PromotionSettings
from ranking.rails_bundle import load_evaluation
from training.metrics import bootstrap_ci


@dataclass(frozen=True)
class RailVerdict:
    rail: str
    candidate_ndcg: float
    production_ndcg: float
    difference: float
    low: float
    high: float
    coverage: float
    passed: bool
    why: str


@dataclass
class GateDecision:
    promote: bool
    candidate: str
    production: str | None
    reasons: list[str] = field(default_factory=list)
    verdicts: list[RailVerdict] = field(default_factory=list)

    def to_markdown(self) -> str:
        head = "PROMOTE" if self.promote else "REFUSE"
        lines = [
            f"## Promotion gate: {head} {self.candidate} (production: {self.production or 'none'})",
            "",
            *(f"- {r}" for r in self.reasons),
        ]
        if self.verdicts:
            lines += [
                "",
                "| rail | candidate NDCG | production NDCG | difference [CI] | coverage share "
                "| verdict |",
                "|---|---|---|---|---|---|",
            ]
            lines += [
                f"| {v.rail} | {v.candidate_ndcg:.4f} | {v.production_ndcg:.4f} | "
                f"{v.difference:+.4f} [{v.low:+.4f}, {v.high:+.4f}] | {v.coverage:.4f} | "
                f"{'pass' if v.passed else 'fail'}: {v.why} |"
                for v in self.verdicts
            ]
        return "\n".join(lines) + "\n"


def gate(
    candidate: dict[str, Any],
    production: dict[str, Any] | None,
    settings: PromotionSettings,
    seed: int,
    candidate_name: str = "candidate",
    production_name: str | None = None,
) -> GateDecision:
    """Decide whether `candidate` may replace `production` (evaluation records).

    Without a production record the candidate is promoted if it meets the coverage floor.
    """
    decision = GateDecision(False, candidate_name, production_name)
    rails = candidate.get("rails", {})
    if not rails:
        decision.reasons.append("the candidate has no evaluated rail")
        return decision
    if production is not None and production.get("dataset") != candidate.get("dataset"):
        decision.reasons.append(
            f"data sets differ: candidate {candidate.get('dataset')}, "
            f"production {production.get('dataset')}"
        )
        return decision
    for rail, record in rails.items():
        decision.verdicts.append(_rail_verdict(rail, record, production, settings, seed))
    failed = [v for v in decision.verdicts if not v.passed]
    decision.promote = not failed
    if production is None:
        decision.reasons.append("no production bundle yet: the coverage floor alone decides")
    decision.reasons += [f"{v.rail}: {v.why}" for v in failed]
    if decision.promote:
        decision.reasons.append("every rail passes")
    return decision


def _rail_verdict(
    rail: str,
    record: dict[str, Any],
    production: dict[str, Any] | None,
    settings: PromotionSettings,
    seed: int,
) -> RailVerdict:
    stage = settings.stage
    row = record["models"].get(stage)
    if row is None:
        return RailVerdict(rail, *(float("nan"),) * 5, 0.0, False, f"no '{stage}' row")
    mine = np.asarray(row["per_case_ndcg"], dtype=float)
    # coverage as a share of what the cases could reach at most (see PromotionSettings)
    coverage = float(row["coverage"]) / max(float(record.get("coverage_ceiling", 1.0)), 1e-12)
    nan = float("nan")
    if production is None:
        ok = coverage >= settings.min_coverage_share
        why = _coverage_why(coverage, settings) if not ok else "coverage floor met"
        return RailVerdict(rail, float(mine.mean()), nan, nan, nan, nan, coverage, ok, why)
    theirs_record = production.get("rails", {}).get(rail)
    if theirs_record is None:
        return RailVerdict(rail, float(mine.mean()), nan, nan, nan, nan, coverage, True, "new rail")
    if theirs_record["fingerprint"] != record["fingerprint"]:
        return RailVerdict(
            rail,
            float(mine.mean()),
            nan,
            nan,
            nan,
            nan,
            coverage,
            False,
            "evaluated on different held-out cases: re-evaluate both on one window",
        )
    theirs = np.asarray(theirs_record["models"][stage]["per_case_ndcg"], dtype=float)
    sessions = np.asarray(record["sessions"])
    diff, low, high = bootstrap_ci(mine - theirs, sessions, settings.bootstrap_samples, 0.95, seed)
    if high < 0:
        ok, why = False, f"NDCG@slots below production beyond the interval ({diff:+.4f})"
    elif coverage < settings.min_coverage_share:
        ok, why = False, _coverage_why(coverage, settings)
    else:
        ok, why = True, f"NDCG difference {diff:+.4f} within or above the interval"
    return RailVerdict(
        rail, float(mine.mean()), float(theirs.mean()), diff, low, high, coverage, ok, why
    )


def _coverage_why(coverage: float, settings: PromotionSettings) -> str:
    return f"coverage share {coverage:.4f} below the floor {settings.min_coverage_share}"


def promote(
    candidate_dir: Path, pointer: Path, settings: PromotionSettings, seed: int
) -> GateDecision:
    """Gate `candidate_dir` against the bundle `pointer` links to; switch it on a pass.

    Raises:
        ArtifactMismatch: the candidate is not a verified, evaluated bundle.
    """
    Manifest.load(candidate_dir, verify=True)
    candidate = load_evaluation(candidate_dir)
    current = pointer.resolve() if pointer.is_symlink() else None
    if current is not None and not current.exists():
        current = None  # a dangling pointer is no production to protect
    production = load_evaluation(current) if current is not None else None
    if current is not None and current == candidate_dir.resolve():
        raise ArtifactMismatch(f"{candidate_dir} is already production")
    decision = gate(
        candidate,
        production,
        settings,
        seed,
        candidate_name=candidate_dir.name,
        production_name=None if current is None else current.name,
    )
    if decision.promote:
        _switch(pointer, candidate_dir)
    _record(pointer.parent / "history.jsonl", decision)
    return decision


def _switch(pointer: Path, target: Path) -> None:
    """Point `pointer` at `target` in one rename (readers never see a missing link)."""
    pointer.parent.mkdir(parents=True, exist_ok=True)
    temporary = pointer.with_name(f".{pointer.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(os.path.relpath(target.resolve(), pointer.parent.resolve()))
    os.replace(temporary, pointer)


def _record(history: Path, decision: GateDecision) -> None:
    history.parent.mkdir(parents=True, exist_ok=True)
    entry = {"at": now_iso(), **asdict(decision)}
    with history.open("ab") as fh:
        fh.write(orjson.dumps(entry, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")
