"""Challengers of known quality for the canary's proofs (benchmarks/canary_replay.py, the
canary tests): derived from a trained rails bundle, each under its own version.

- `equal`: the same models and rules (the same answers): a canary must ramp it to 100%;
- `popularity`: the same bundle whose rule set pins the most popular items to every slot of
  every rail: a popularity list, worse than the trained pipeline by construction (the
  "what shops run now" baseline the product has to beat): a canary must abort it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.swap_harness import derive_bundle
from railtower.manifest import Manifest
from railtower.settings import RAILS, Settings
from ranking.rule_set import RuleSet
from serving.rail_service import load_rails


@dataclass(frozen=True)
class Challengers:
    equal: Path
    popularity: Path


def popularity_rules(top: list[str], version: str) -> RuleSet:
    """Pin `top` (most popular first) to slots 1..len(top) on every rail."""
    return RuleSet.model_validate(
        {
            "name": "popularity-only",
            "version": version,
            "rails": list(RAILS),
            "rules": [
                {"kind": "pin", "item_id": item, "slot": n, "note": "canary proof: popularity"}
                for n, item in enumerate(top, 1)
            ],
        }
    )


def derive_challengers(production: Path, folder: Path, settings: Settings) -> Challengers:
    """Both challengers of `production`, written under `folder`."""
    version = Manifest.load(production, verify=True).version
    stats = load_rails(production, settings).pipeline.stats
    order = np.argsort(-stats.popularity, kind="stable")[: settings.evaluation.slots]
    top = [str(stats.item_ids[i]) for i in order]
    equal = derive_bundle(production, folder / f"{version}-equal", f"{version}-equal", None)
    worse_version = f"{version}-popularity"
    worse = derive_bundle(
        production, folder / worse_version, worse_version, popularity_rules(top, worse_version)
    )
    return Challengers(equal, worse)
