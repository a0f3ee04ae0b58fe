"""`railtower promote`: the NDCG gate between a candidate bundle and production.

Both bundles carry the evaluation they earned (ranking.rails_bundle). The gate compares
them only on the *same* held-out cases (same window, same sampled sessions: the case
fingerprints must match), per rail, on the stage shoppers see:

- the paired NDCG@slots difference (candidate - production), bootstrapped over sessions,
  must not be negative beyond its interval (its upper bound must reach 0);
- the candidate's catalogue coverage@slots, as a share of the most its cases could reach,
  must reach `promotion.min_coverage_share`.

A pass switches the production pointer atomically and a refusal leaves it untouched; either
way the decision is appended to the pointers' history with its reasons. The pointer itself
(where it is, its lock, the switch, the history, `rollback`) is core: railtower.production.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from railtower.datasets import Dataset
from railtower.errors import ArtifactMismatch
from railtower.manifest import Manifest
from railtower.production import (
    current_production,
    load_evaluation,
    pointer_lock,
    record_promotion,
    switch,
)
from railtower.settings import PromotionSettings, Settings
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
    # the best baseline on the same cases (fitted on the same window), and the paired
    # difference candidate - baseline with its interval; None where the record has none
    baseline: str | None = None
    baseline_ndcg: float = float("nan")
    baseline_difference: float = float("nan")
    baseline_low: float = float("nan")
    baseline_high: float = float("nan")


@dataclass
class GateDecision:
    promote: bool
    candidate: str
    production: str | None
    reasons: list[str] = field(default_factory=list)
    verdicts: list[RailVerdict] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The decision as `railtower promote --json` prints it and /v1/admin/promote answers
        (NaN, a rail without a production record, stays NaN here: orjson writes it null)."""
        return {
            "promoted": self.promote,
            "candidate": self.candidate,
            "production": self.production,
            "reasons": list(self.reasons),
            "verdicts": [asdict(v) for v in self.verdicts],
        }

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
                "| rail | candidate NDCG | production NDCG | difference [CI] | best baseline "
                "| vs baseline [CI] | coverage share | verdict |",
                "|---|---|---|---|---|---|---|---|",
            ]
            lines += [
                f"| {v.rail} | {v.candidate_ndcg:.4f} | {v.production_ndcg:.4f} | "
                f"{v.difference:+.4f} [{v.low:+.4f}, {v.high:+.4f}] | "
                f"{v.baseline or '—'} {v.baseline_ndcg:.4f} | {v.baseline_difference:+.4f} "
                f"[{v.baseline_low:+.4f}, {v.baseline_high:+.4f}] | {v.coverage:.4f} | "
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

    Every rail must reach the coverage floor and must not lose to the best baseline on
    its cases beyond the paired interval (`promotion.beat_baselines`); with a production
    record, it must not lose to production either. Without one, the baselines decide.
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
        decision.reasons.append(
            "no production bundle yet: the baselines and the coverage floor decide"
        )
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
    nan = float("nan")
    row = record["models"].get(stage)
    if row is None:
        return RailVerdict(rail, *(nan,) * 5, 0.0, False, f"no '{stage}' row")
    mine = np.asarray(row["per_case_ndcg"], dtype=float)
    sessions = np.asarray(record["sessions"])
    # coverage as a share of what the cases could reach at most (see PromotionSettings)
    coverage = float(row["coverage"]) / max(float(record.get("coverage_ceiling", 1.0)), 1e-12)
    failures: list[str] = []
    notes: list[str] = []
    vs_baseline = _best_baseline(record, mine, sessions, settings, seed)
    if vs_baseline is not None:
        name, theirs_mean, diff, low, high = vs_baseline
        if settings.beat_baselines and high < 0:
            failures.append(
                f"{name} wins: NDCG@slots {theirs_mean:.4f} against {mine.mean():.4f} "
                f"({diff:+.4f} [{low:+.4f}, {high:+.4f}]); the rail keeps what production "
                "served"
            )
        else:
            notes.append(f"vs {name} {diff:+.4f} [{low:+.4f}, {high:+.4f}]")
    paired = (nan, nan, nan, nan)
    theirs_record = None if production is None else production.get("rails", {}).get(rail)
    if production is not None and theirs_record is None:
        notes.append("new rail")
    elif theirs_record is not None and theirs_record["fingerprint"] != record["fingerprint"]:
        failures.append(
            "evaluated on different held-out cases: re-evaluate both on one window "
            "(or promote with the settings, which re-scores production on these cases)"
        )
    elif theirs_record is not None:
        theirs = np.asarray(theirs_record["models"][stage]["per_case_ndcg"], dtype=float)
        diff, low, high = bootstrap_ci(
            mine - theirs, sessions, settings.bootstrap_samples, 0.95, seed
        )
        paired = (float(theirs.mean()), diff, low, high)
        if high < 0:
            failures.append(f"NDCG@slots below production beyond the interval ({diff:+.4f})")
        else:
            notes.append(f"NDCG difference {diff:+.4f} within or above the interval")
    if coverage < settings.min_coverage_share:
        failures.append(_coverage_why(coverage, settings))
    elif production is None:
        notes.append("coverage floor met")
    why = "; ".join(failures or notes)
    baseline = (None, nan, nan, nan, nan) if vs_baseline is None else vs_baseline
    return RailVerdict(rail, float(mine.mean()), *paired, coverage, not failures, why, *baseline)


def _best_baseline(
    record: dict[str, Any],
    mine: np.ndarray,
    sessions: np.ndarray,
    settings: PromotionSettings,
    seed: int,
) -> tuple[str, float, float, float, float] | None:
    """(name, its NDCG, paired difference candidate - it, low, high) for the baseline with
    the highest NDCG@slots on the rail's cases, or None when the record carries none."""
    rows = {
        name: np.asarray(record["models"][name]["per_case_ndcg"], dtype=float)
        for name in record.get("baselines", [])
        if name in record["models"]
    }
    if not rows:
        return None
    name = max(rows, key=lambda n: float(np.nanmean(rows[n])))
    diff, low, high = bootstrap_ci(
        mine - rows[name], sessions, settings.bootstrap_samples, 0.95, seed
    )
    return name, float(np.nanmean(rows[name])), diff, low, high


def _coverage_why(coverage: float, settings: PromotionSettings) -> str:
    return f"coverage share {coverage:.4f} below the floor {settings.min_coverage_share}"


def promote(
    candidate_dir: Path,
    pointer: Path,
    settings: PromotionSettings,
    seed: int,
    rescore: Settings | None = None,
    events: str | Path | Dataset | None = None,
) -> GateDecision:
    """Gate `candidate_dir` against the bundle `pointer` links to; switch it on a pass.

    Args:
        rescore: the full settings; with them, a production bundle evaluated on other
            held-out cases is re-scored on the candidate's (see production_record).
        events: where those cases are rebuilt from (default: the candidate's data set).

    Raises:
        ArtifactMismatch: the candidate is not a verified, evaluated bundle.
    """
    Manifest.load(candidate_dir, verify=True)
    candidate = load_evaluation(candidate_dir)
    with pointer_lock(pointer):
        current = current_production(pointer)
        if current is not None and current == candidate_dir.resolve():
            raise ArtifactMismatch(f"{candidate_dir} is already production")
        decision = gated(candidate, current, settings, seed, candidate_dir.name, rescore, events)
        if decision.promote:
            switch(pointer, candidate_dir)
        # Which pointer and where the bundles are: what `rollback` replays the history by.
        record_promotion(pointer, asdict(decision), candidate_dir, current)
    return decision


def production_record(
    candidate: dict[str, Any],
    production_dir: Path,
    settings: Settings,
    events: str | Path | Dataset | None = None,
) -> tuple[dict[str, Any], str | None]:
    """Production's record to gate `candidate` against, and a note when it was re-scored.

    When production was evaluated on other held-out cases than the candidate (a nightly
    challenger trains on a newer window), production is scored again, without retraining,
    on the candidate's own cases (training.bundle_eval), so the comparison stays paired.

    Raises:
        ArtifactMismatch: the candidate's cases cannot be rebuilt as recorded.
    """
    production = load_evaluation(production_dir)
    theirs = production.get("rails", {})
    differ = [
        rail
        for rail, record in candidate.get("rails", {}).items()
        if rail in theirs and theirs[rail]["fingerprint"] != record["fingerprint"]
    ]
    if not differ or production.get("dataset") != candidate.get("dataset"):
        return production, None
    from training.bundle_eval import rescore_on_cases_of  # noqa: PLC0415 - loads models

    rescored = rescore_on_cases_of(production_dir, candidate, settings, events)
    return rescored, (
        f"production {production_dir.name} was re-scored on the candidate's held-out window "
        f"(rails {', '.join(differ)} had been evaluated on other cases): paired on the same cases"
    )


def gated(
    candidate: dict[str, Any],
    current: Path | None,
    settings: PromotionSettings,
    seed: int,
    candidate_name: str,
    rescore: Settings | None = None,
    events: str | Path | Dataset | None = None,
) -> GateDecision:
    """The gate against the production bundle `current` (None: none yet), re-scoring it on
    the candidate's cases when `rescore` settings are given and their cases differ.

    A candidate whose cases cannot be rebuilt is refused with the reason, never raised on,
    so the decision still reaches the history.
    """
    production_name = None if current is None else current.name
    note = None
    if current is None:
        production = None
    elif rescore is None:
        production = load_evaluation(current)
    else:
        try:
            production, note = production_record(candidate, current, rescore, events)
        except (ArtifactMismatch, ValueError) as exc:
            refused = GateDecision(False, candidate_name, production_name)
            refused.reasons.append(
                f"production cannot be re-scored on the candidate's cases: {exc}"
            )
            return refused
    decision = gate(candidate, production, settings, seed, candidate_name, production_name)
    if note is not None:
        decision.reasons.insert(0, note)
    return decision
