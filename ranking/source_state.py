"""Save and restore the fitted state of the candidate sources, so serving loads a bundle
instead of refitting on the event log.

Each source's state is a few arrays: popularity scores (every source backfills or ranks with
them), the co-visitation neighbour matrix, and session-kNN's past-session matrix with its
weights. The towers live in their own bundle (ranking.bundle).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp

from railtower.settings import Settings
from ranking.baselines import BASELINES
from ranking.buy_again import BuyAgainRetriever
from ranking.category_popularity import CategoryPopularityRetriever
from ranking.covisitation import CovisitationRetriever
from ranking.popularity import PopularityRetriever
from ranking.retriever import CandidateSource, Catalogue
from ranking.session_knn import SessionKnnRetriever

SOURCES_DIR = "sources"


def save_sources(sources: dict[str, CandidateSource], folder: Path) -> None:
    """Write the state of every non-tower source under `folder/sources/<name>/`."""
    for name, source in sources.items():
        if name == "two_tower":
            continue
        out = folder / SOURCES_DIR / name
        out.mkdir(parents=True, exist_ok=True)
        popularity = source if isinstance(source, PopularityRetriever) else source.popularity  # type: ignore[attr-defined]
        np.save(out / "popularity.npy", popularity.scores)
        if isinstance(source, CovisitationRetriever):
            sp.save_npz(out / "neighbours.npz", source.matrix)
            np.save(out / "row_stats.npy", source.row_stats)
        if isinstance(source, SessionKnnRetriever):
            sp.save_npz(out / "sessions.npz", source.sessions)
            np.save(out / "norm.npy", source.norm)
            np.save(out / "idf.npy", source.idf)


def load_sources(
    folder: Path, catalogue: Catalogue, settings: Settings, basket: bool
) -> dict[str, CandidateSource]:
    """Rebuild every source saved under `folder/sources/`, ready to answer queries."""
    sources: dict[str, CandidateSource] = {}
    root = folder / SOURCES_DIR
    for path in sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []:
        source = BASELINES[path.name](settings, basket)
        scores = np.load(path / "popularity.npy", allow_pickle=False)
        if isinstance(source, PopularityRetriever):
            source.restore(catalogue, scores)
        else:
            source.popularity.restore(catalogue, scores)  # type: ignore[attr-defined]
        if isinstance(source, CovisitationRetriever):
            source.catalogue = catalogue
            source.matrix = sp.load_npz(path / "neighbours.npz").tocsr()
            source.row_stats = np.load(path / "row_stats.npy", allow_pickle=False)
        elif isinstance(source, SessionKnnRetriever):
            source.restore(
                catalogue,
                sp.load_npz(path / "sessions.npz").tocsr(),
                np.load(path / "norm.npy", allow_pickle=False),
                np.load(path / "idf.npy", allow_pickle=False),
            )
        elif isinstance(source, CategoryPopularityRetriever | BuyAgainRetriever):
            source.restore(catalogue)
        sources[path.name] = source  # type: ignore[assignment]
    return sources
