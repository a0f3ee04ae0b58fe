"""Per-request scoring of the sparse sources equals the matrix formulation it replaced.

The served path scores a batch from the few rows its seeds read
(ranking.retriever.weighted_row_batch); the reference below is the whole-batch sparse matmul
with session-kNN's neighbour selection written out, which is what the sources computed
before. Equal floats, not close ones: the ranker was trained on the old values.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from railtower.settings import load_settings
from ranking.covisitation import CovisitationRetriever
from ranking.retriever import Catalogue, Query, seed_weights, weighted_row_batch
from ranking.session_knn import SessionKnnRetriever
from tests.conftest import toy_events

SETTINGS = load_settings()
ITEMS = [f"i{k}" for k in range(12)]
CATALOGUE = Catalogue(pd.DataFrame({"item_id": ITEMS, "category_path": ["c"] * len(ITEMS)}))

sessions_strategy = st.lists(
    st.lists(st.sampled_from(ITEMS), min_size=1, max_size=5), min_size=1, max_size=25
)
query_strategy = st.builds(
    lambda items, anchor: Query(tuple(items), ("view",) * len(items), anchor=anchor),
    st.lists(st.sampled_from([*ITEMS, "unknown"]), max_size=4),
    st.none() | st.sampled_from(ITEMS),
)


def _events(sessions: list[list[str]]) -> pd.DataFrame:
    return toy_events({f"s{n}": [(i, "view") for i in items] for n, items in enumerate(sessions)})


def _seeds(queries: list[Query], decay: float) -> sp.csr_matrix:
    rows, cols, vals = [], [], []
    for row, query in enumerate(queries):
        for item, w in seed_weights(query, decay).items():
            if item in CATALOGUE.index:
                rows.append(row)
                cols.append(CATALOGUE.index[item])
                vals.append(w)
    return sp.csr_matrix((vals, (rows, cols)), shape=(len(queries), len(CATALOGUE)))


@settings(max_examples=60, deadline=None)
@given(
    matrix=st.lists(st.floats(0.0, 5.0), min_size=144, max_size=144),
    batch=st.lists(st.lists(st.integers(0, 11), max_size=6, unique=True).map(sorted), max_size=5),
    data=st.data(),
)
def test_weighted_row_batch_is_the_sparse_product_of_those_rows(matrix, batch, data):
    dense = np.asarray(matrix).reshape(12, 12)
    csr = sp.csr_matrix(dense)
    seeds, expected = [], []
    for rows in batch:
        weights = np.asarray(
            data.draw(st.lists(st.floats(0.01, 3.0), min_size=len(rows), max_size=len(rows)))
        )
        seeds.append((np.asarray(rows, dtype=np.int64), weights))
        one = sp.csr_matrix((weights, ([0] * len(rows), rows)), shape=(1, 12))
        expected.append((one @ csr).tocsr())
    got = weighted_row_batch(csr, seeds, 12)
    assert got.shape == (len(batch), 12)
    for q, want in enumerate(expected):
        row = got.getrow(q)
        mine = dict(zip(row.indices.tolist(), row.data.tolist(), strict=True))
        theirs = dict(zip(want.indices.tolist(), want.data.tolist(), strict=True))
        # equal floats, not close ones; explicit zeros aside
        assert {c: v for c, v in mine.items() if v} == {c: v for c, v in theirs.items() if v}


@settings(max_examples=40, deadline=None)
@given(sessions=sessions_strategy, queries=st.lists(query_strategy, min_size=1, max_size=4))
def test_covisitation_scores_equal_the_seed_matrix_product(sessions, queries):
    model = CovisitationRetriever(
        SETTINGS.baselines.covisitation,
        SETTINGS.event_weights,
        SETTINGS.baselines.popularity,
        basket=False,
    ).fit(_events(sessions), CATALOGUE)
    expected = (_seeds(queries, model.settings.recency_decay) @ model.matrix).toarray()
    np.testing.assert_array_equal(model.scores(queries).toarray(), expected)


def _knn_reference(model: SessionKnnRetriever, queries: list[Query]) -> np.ndarray:
    """Session-kNN votes as whole-matrix algebra: similarity to every session, the most
    recent `sample_sessions` of those sharing a seed, the `neighbours` most similar vote."""
    knn = model.settings
    seeds = _seeds(queries, knn.recency_decay)
    sims = (seeds @ sp.diags(model.idf) @ model.sessions.T).toarray() * model.norm
    votes = np.zeros((len(queries), len(CATALOGUE)))
    for q in range(len(queries)):
        sharing = np.flatnonzero(sims[q] > 0)[-knn.sample_sessions :]
        order = np.lexsort((-sharing, -sims[q, sharing]))[: knn.neighbours]
        chosen = sharing[order]
        votes[q] = sims[q, chosen] @ model.sessions[chosen].toarray()
    return votes


@settings(max_examples=40, deadline=None)
@given(
    sessions=sessions_strategy,
    queries=st.lists(query_strategy, min_size=1, max_size=4),
    sample=st.integers(1, 8),
    neighbours=st.integers(1, 8),
)
def test_session_knn_votes_equal_the_matrix_formulation(sessions, queries, sample, neighbours):
    knn = SETTINGS.baselines.session_knn.model_copy(
        update={"sample_sessions": sample, "neighbours": neighbours}
    )
    model = SessionKnnRetriever(knn, SETTINGS.event_weights, SETTINGS.baselines.popularity).fit(
        _events(sessions), CATALOGUE
    )
    np.testing.assert_allclose(
        model._votes(queries).toarray(), _knn_reference(model, queries), rtol=1e-12, atol=0
    )


@settings(max_examples=60, deadline=None)
@given(
    matrix=st.lists(st.floats(0.0, 5.0) | st.just(0.0), min_size=144, max_size=144),
    pairs=st.lists(st.tuples(st.integers(-1, 11), st.integers(-1, 11)), max_size=40),
)
def test_covisitation_weights_at_read_the_matrix_for_a_batch_of_pairs(matrix, pairs):
    """The batch lookup behind the re-ranker's pair columns: each (seed, item) pair's stored
    weight, 0 for a pair never seen or a row of -1 (an item the matrix does not know)."""
    dense = np.asarray(matrix).reshape(12, 12)
    model = CovisitationRetriever(
        SETTINGS.baselines.covisitation,
        SETTINGS.event_weights,
        SETTINGS.baselines.popularity,
        basket=False,
    )
    model.matrix = sp.csr_matrix(dense)
    seeds = np.asarray([p[0] for p in pairs], dtype=np.int64)
    items = np.asarray([p[1] for p in pairs], dtype=np.int64)
    want = [dense[s, i] if s >= 0 and i >= 0 else 0.0 for s, i in pairs]
    np.testing.assert_array_equal(model.weights_at(seeds, items), np.asarray(want, dtype=float))
