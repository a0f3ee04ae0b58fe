"""The two-tower model as a harness retriever: fit = train, export a bundle, load it back.

Scoring goes through the exported bundle (TorchScript + HNSW), the same files serving
loads, so the harness measures what would be served, not the training-time module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd

from railtower.manifest import DataWindow
from railtower.settings import DatasetSpec, Settings
from ranking.bundle import TowerBundle
from ranking.candidates import Candidate
from ranking.retriever import Catalogue, Query
from ranking.tower_retriever import BundleRetriever
from training.export import write_bundle
from training.fit_towers import train_towers


class TowerRetriever:
    """Trains on the events it is fitted on and serves from the bundle it wrote."""

    name = "two_tower"

    def __init__(
        self, settings: Settings, spec: DatasetSpec, items: pd.DataFrame, version: str
    ) -> None:
        """Args:
        items: the canonical catalogue (content features come from it).
        version: bundle name; the bundle goes to artifacts/<version>/.
        """
        self.settings, self.spec, self.items, self.version = settings, spec, items, version
        self.retriever: BundleRetriever | None = None
        self.bundle: TowerBundle | None = None

    def fit(self, events: pd.DataFrame, catalogue: Catalogue) -> TowerRetriever:
        """Train on `events` over the items of `catalogue` (the point-in-time catalogue:
        the item tower embeds and the index holds only what was known at the cut)."""
        items = self.items.set_index(self.items["item_id"].astype(str), drop=False)
        missing = set(catalogue.ids) - set(items.index)
        if missing:
            raise ValueError(
                f"{len(missing)} catalogue items have no row in the item table "
                f"(e.g. {sorted(missing)[:3]}): build the catalogue from the same table"
            )
        items = items.loc[catalogue.ids].reset_index(drop=True)
        work = self.settings.artifacts_dir / "work" / self.version
        trained = train_towers(events, items, self.spec, self.settings, work)
        has_time = self.spec.has_time
        window = DataWindow(
            dataset=self.spec.name,
            files={},
            events=len(events),
            start=str(events["event_time"].min()) if has_time else None,
            end=str(events["event_time"].max()) if has_time else None,
        )
        bundle_dir = write_bundle(
            trained,
            self.settings,
            self.settings.artifacts_dir / self.version,
            self.version,
            [window],
            has_time,
        )
        self.bundle = TowerBundle.load(bundle_dir)
        self.retriever = BundleRetriever(self.bundle)
        return self

    def recommend(self, queries: Sequence[Query], k: int) -> list[list[str]]:
        return self._fitted().recommend(queries, k)

    def candidates(self, queries: Sequence[Query], k: int) -> list[list[Candidate]]:
        return self._fitted().candidates(queries, k)

    def _fitted(self) -> BundleRetriever:
        if self.retriever is None:
            raise RuntimeError("TowerRetriever used before fit")
        return self.retriever


def tower_factory(
    settings: Settings, spec: DatasetSpec, items: pd.DataFrame, version: str
) -> Callable[[str], TowerRetriever]:
    """Fresh tower retrievers whose bundles are named `<version><suffix>` (the judged fit
    and its refit each export their own)."""
    return lambda suffix: TowerRetriever(settings, spec, items, f"{version}{suffix}")
