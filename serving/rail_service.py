"""Load what a rail request needs from bundles: the ranking pipeline of one data set.

A rails bundle (`artifacts/<run>-<data set>-rails/`) names the tower bundle it fuses; both
are verified against their manifests. The result is the same `RailPipeline` the harness
scored, so what is served is what was measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from railtower.errors import ArtifactMismatch
from railtower.settings import Settings
from ranking.bundle import TowerBundle
from ranking.item_attributes import ItemAttributes
from ranking.rails import RailPipeline
from ranking.rails_bundle import RailsBundle
from ranking.retriever import Catalogue
from ranking.source_state import load_sources
from ranking.tower_retriever import BundleRetriever
from serving.new_items import NewItems, new_items_for


@dataclass
class LoadedRails:
    """A served model: the pipeline plus what identifies it."""

    pipeline: RailPipeline
    rails: RailsBundle
    towers: TowerBundle | None
    catalogue: Catalogue
    titles: dict[str, str]
    # items listed after the bundle was trained: their encoder and what it encoded
    new_items: NewItems | None = None

    @property
    def version(self) -> str:
        """The model version every Redis key and response carries."""
        return self.rails.version


def load_rails(folder: Path, settings: Settings) -> LoadedRails:
    """Load a rails bundle and the tower bundle it names (from `settings.artifacts_dir`).

    Raises:
        ArtifactMismatch: either bundle is missing, altered or built by other feature code.
    """
    folder = folder.resolve()
    if not folder.exists():
        raise ArtifactMismatch(f"rails bundle {folder} does not exist; run railtower evaluate")
    rails = RailsBundle.load(folder)
    catalogue = Catalogue(rails.items)
    sources = load_sources(folder, catalogue, settings, rails.basket)
    towers = None
    if rails.tower_bundle:
        towers = TowerBundle.load(settings.artifacts_dir / rails.tower_bundle)
        sources["two_tower"] = BundleRetriever(towers)
    pipeline = RailPipeline(
        sources=sources,
        stats=rails.stats,
        attributes=ItemAttributes.from_frame(rails.items, settings.towers.price_bands),
        # what the bundle was fitted with, but where new items go is a serving policy (like
        # the exploration slot): the running configuration's, changed without a retrain
        settings=rails.ranking.model_copy(update={"new_items": settings.ranking.new_items}),
        depth=rails.ranking.pool_size,
        slots=settings.evaluation.slots,
        rankers=rails.rankers,
        rule_set=rails.rule_set,
        orders=rails.orders,
    )
    titles = (
        {
            str(i): str(t)
            for i, t in zip(rails.items["item_id"], rails.items["title"], strict=True)
            if isinstance(t, str)
        }
        if "title" in rails.items.columns
        else {}
    )
    return LoadedRails(pipeline, rails, towers, catalogue, titles, new_items_for(towers, settings))
