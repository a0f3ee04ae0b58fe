"""The ranking half of a trained model, on disk: `artifacts/<version>/` beside the towers.

A rails bundle holds one LightGBM model per rail, the item statistics its features read,
the rule set it was evaluated with, the settings of fusion and MMR, the name of the tower
bundle it fuses, and the evaluation it earned on its held-out window (what the promotion
gate compares). The manifest hashes every file; loading refuses a bundle whose feature
contract differs from this code's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightgbm as lgb
import orjson
import pandas as pd

from railtower.errors import ArtifactMismatch
from railtower.manifest import DataWindow, Manifest, git_commit, library_versions, now_iso
from railtower.production import EVALUATION, load_evaluation
from railtower.settings import RankingSettings
from ranking.business_features import FEATURES, ItemStats
from ranking.retriever import CandidateSource
from ranking.rules import RuleSet
from ranking.source_state import save_sources

PIPELINE = "pipeline.json"
RULES = "rules.json"
RANKERS = "rankers"
STATS = "item_stats"
CATALOGUE = "catalogue.parquet"


@dataclass
class RailsBundle:
    folder: Path
    manifest: Manifest
    ranking: RankingSettings
    rankers: dict[str, lgb.Booster]
    stats: ItemStats
    rule_set: RuleSet | None
    tower_bundle: str | None
    evaluation: dict[str, Any]
    items: pd.DataFrame
    basket: bool
    # per rail, the order its ranker stage serves (RailPipeline.orders)
    orders: dict[str, str]

    @property
    def version(self) -> str:
        return self.manifest.version

    @classmethod
    def load(cls, folder: Path) -> RailsBundle:
        """Load and verify a rails bundle.

        Raises:
            ArtifactMismatch: a file is missing or altered, or the ranker was trained on
                other features than this code computes.
        """
        manifest = Manifest.load(folder, verify=True)
        meta = orjson.loads((folder / PIPELINE).read_bytes())
        if tuple(meta["features"]) != FEATURES:
            raise ArtifactMismatch(
                f"{folder} was trained on features {meta['features']}, this code computes "
                f"{list(FEATURES)}; retrain the bundle with this version"
            )
        rankers = {
            path.stem: lgb.Booster(model_file=str(path))
            for path in sorted((folder / RANKERS).glob("*.txt"))
        }
        rules = folder / RULES
        return cls(
            folder=folder,
            manifest=manifest,
            ranking=RankingSettings.model_validate(meta["ranking"]),
            rankers=rankers,
            stats=ItemStats.load(folder / STATS),
            rule_set=RuleSet.model_validate_json(rules.read_bytes()) if rules.exists() else None,
            tower_bundle=meta.get("tower_bundle"),
            evaluation=load_evaluation(folder),
            items=pd.read_parquet(folder / CATALOGUE),
            basket=meta.get("session_kind") == "basket",
            orders=dict(meta.get("orders", {})),
        )


def link_tower_bundle(bundle: Path, source_artifacts: Path, artifacts: Path) -> None:
    """Make the tower bundle rails bundle `bundle` names (if any) visible in another
    artifacts folder, as a link: it is read only (a private copy of production for a
    benchmark or a replay needs it beside the rails bundle)."""
    tower_bundle = orjson.loads((bundle / PIPELINE).read_bytes()).get("tower_bundle")
    if tower_bundle is not None:
        artifacts.mkdir(parents=True, exist_ok=True)
        (artifacts / tower_bundle).symlink_to((source_artifacts / tower_bundle).resolve())


def write_rails_bundle(
    folder: Path,
    version: str,
    rankers: dict[str, lgb.Booster],
    stats: ItemStats,
    rule_set: RuleSet | None,
    ranking: RankingSettings,
    tower_bundle: str | None,
    evaluation: dict[str, Any],
    windows: list[DataWindow],
    settings_fingerprint: str,
    sources: dict[str, CandidateSource],
    items: pd.DataFrame,
    session_kind: str,
    orders: dict[str, str] | None = None,
) -> Path:
    """Write every file of a rails bundle and its manifest; return the folder.

    The bundle is self-contained for serving: the catalogue it was trained on and the
    fitted state of every non-tower source travel with it.
    """
    folder.mkdir(parents=True, exist_ok=True)
    save_sources(sources, folder)
    items.to_parquet(folder / CATALOGUE, index=False)
    (folder / RANKERS).mkdir(exist_ok=True)
    for rail, booster in rankers.items():
        booster.save_model(str(folder / RANKERS / f"{rail}.txt"))
    stats.save(folder / STATS)
    if rule_set is not None:
        (folder / RULES).write_text(rule_set.model_dump_json(indent=2))
    meta = {
        "features": list(FEATURES),
        "ranking": ranking.model_dump(mode="json"),
        "tower_bundle": tower_bundle,
        "rails": sorted(rankers),
        "sources": sorted(sources),
        "session_kind": session_kind,
        "orders": orders or {},
    }
    (folder / PIPELINE).write_bytes(orjson.dumps(meta, option=orjson.OPT_INDENT_2))
    (folder / EVALUATION).write_bytes(
        orjson.dumps(evaluation, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
    )
    Manifest(
        kind="rails",
        version=version,
        created_at=now_iso(),
        git_commit=git_commit(),
        settings_fingerprint=settings_fingerprint,
        # the bundle's own fit window first; a refit also records the window it was judged on
        data=windows,
        metrics={
            rail: {name: row["ndcg"] for name, row in record["models"].items()}
            for rail, record in evaluation.get("rails", {}).items()
        },
        libraries=library_versions(),
    ).write(folder)
    return folder
