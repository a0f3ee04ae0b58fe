"""Train the LightGBM LambdaMART re-ranker on past requests and what followed them.

One request is one group: its fused candidates, their business features, and a graded label
per candidate (the strongest event the shopper then gave it: purchase > cart > view > none).
Groups where no candidate was relevant teach lambdarank nothing and are dropped. Whole
sessions are held out for early stopping on NDCG@slots, so a shopper's later requests never
grade the model trained on their earlier ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import lightgbm as lgb
import numpy as np
import pandas as pd

from railtower.logs import get_logger
from railtower.settings import RankerSettings
from ranking.business_features import CATEGORICAL, FEATURES
from ranking.candidate_fusion import CandidateTable, source_order
from training.metrics import bootstrap_ci
from training.split import session_bucket

log = get_logger(__name__)

RANKER_SALT = 7919


@dataclass
class RankerFit:
    """What training produced and how it went (written to the report).

    Attributes:
        booster: the fitted model, None when there were too few useful groups.
        groups: requests with at least one relevant candidate (train + early stopping).
        requests: all requests offered, including those without a relevant candidate.
        best_iteration: trees kept by early stopping.
        validation_ndcg: NDCG@slots of the early-stopping groups at the best iteration.
        importance: total gain per feature, largest first.
        reason: why no model was trained, when none was.
    """

    booster: lgb.Booster | None
    groups: int
    requests: int
    best_iteration: int = 0
    validation_ndcg: float = float("nan")
    importance: dict[str, float] = field(default_factory=dict)
    reason: str | None = None

    def summary(self) -> dict[str, object]:
        return {
            "trained": self.booster is not None,
            "groups": self.groups,
            "requests": self.requests,
            "best_iteration": self.best_iteration,
            "validation_ndcg": self.validation_ndcg,
            "importance": self.importance,
            "reason": self.reason,
        }


def graded_labels(
    table: CandidateTable, followed: Sequence[Mapping[str, str]], grades: Mapping[str, int]
) -> np.ndarray:
    """Per candidate row, the grade of the strongest event the shopper gave it (0: none)."""
    queries, items = table["query"], table["item_id"]
    return np.array(
        [grades.get(followed[q].get(i, ""), 0) for q, i in zip(queries, items, strict=True)],
        dtype=np.int32,
    )


def fit_ranker(
    features: np.ndarray,
    labels: np.ndarray,
    table: CandidateTable,
    sessions: Sequence[str],
    settings: RankerSettings,
    slots: int,
    seed: int,
) -> RankerFit:
    """Fit lambdarank on the requests of `table` (rows of `features` align with its rows).

    Args:
        sessions: the session id of each request, for the session-level holdout.
        slots: the NDCG cut-off early stopping watches (the rail's slot count).
    """
    queries = table["query"]
    useful = np.zeros(table.queries, dtype=bool)
    useful[np.unique(queries[labels > 0])] = True
    groups = int(useful.sum())
    if groups < settings.min_groups:
        reason = (
            f"{groups} requests with a relevant candidate, fewer than ranking.ranker.min_groups="
            f"{settings.min_groups}: candidates keep their fused order"
        )
        log.info("ranker not trained", reason=reason)
        return RankerFit(None, groups, table.queries, reason=reason)
    # Its own salt: the requests often come from one band of the data set's hash split
    # (seed), where the same hash would put every session on one side.
    buckets = session_bucket(pd.Series(list(sessions), dtype=object), seed + RANKER_SALT)
    held = buckets < settings.validation_share
    rows_train = useful[queries] & ~held[queries]
    rows_valid = useful[queries] & held[queries]
    if not rows_valid.any() or not rows_train.any():
        reason = "all useful requests fell on one side of the session holdout"
        log.warning("ranker not trained", reason=reason)
        return RankerFit(None, groups, table.queries, reason=reason)
    train = _dataset(features, labels, queries, rows_train)
    valid = _dataset(features, labels, queries, rows_valid, reference=train)
    params = {
        "objective": "lambdarank",
        "metric": "ndcg",
        "eval_at": [slots],
        "num_leaves": settings.num_leaves,
        "learning_rate": settings.learning_rate,
        "min_data_in_leaf": settings.min_data_in_leaf,
        "feature_fraction": settings.feature_fraction,
        "feature_pre_filter": False,
        "num_threads": 0,
        "seed": seed,
        "deterministic": True,
        "verbose": -1,
    }
    booster = lgb.train(
        params,
        train,
        num_boost_round=settings.num_trees,
        valid_sets=[valid],
        valid_names=["validation"],
        callbacks=[lgb.early_stopping(settings.early_stopping_rounds, verbose=False)],
    )
    best = booster.best_iteration or booster.current_iteration()
    score = booster.best_score.get("validation", {}).get(f"ndcg@{slots}", float("nan"))
    gains = booster.feature_importance("gain", iteration=best)
    importance = dict(
        sorted(
            ((name, float(g)) for name, g in zip(FEATURES, gains, strict=True)),
            key=lambda kv: -kv[1],
        )
    )
    log.info("ranker trained", groups=groups, best_iteration=best, validation_ndcg=round(score, 4))
    return RankerFit(booster, groups, table.queries, best, float(score), importance)


def _dataset(
    features: np.ndarray,
    labels: np.ndarray,
    queries: np.ndarray,
    rows: np.ndarray,
    reference: lgb.Dataset | None = None,
) -> lgb.Dataset:
    # Rows are sorted by query, so a group is a run of equal query ids.
    _, sizes = np.unique(queries[rows], return_counts=True)
    return lgb.Dataset(
        features[rows],
        label=labels[rows],
        group=sizes,
        feature_name=list(FEATURES),
        categorical_feature=list(CATEGORICAL),
        reference=reference,
        free_raw_data=False,
    )


def choose_order(
    table: CandidateTable,
    features: np.ndarray,
    labels: np.ndarray,
    sessions: Sequence[str],
    booster: lgb.Booster | None,
    sources: Sequence[str],
    settings: RankerSettings,
    slots: int,
    seed: int,
) -> tuple[str, dict[str, float]]:
    """The order a rail serves: the re-ranker (the fused order where none was trained),
    unless the fused order or one source's own order beats it on the ranker window's
    held-out sessions (the same session holdout the ranker stops early on) beyond a 95%
    session-bootstrap interval of the paired NDCG@slots difference (graded labels). A
    small holdout cannot overturn the ranker on noise; a rail on which session-kNN alone
    ranks clearly better is served by session-kNN, decided before any scored window.

    Returns:
        (the order's name, mean NDCG@slots of every order tried).
    """
    frame = table.frame
    queries = frame["query"].to_numpy()
    held_sessions = session_bucket(pd.Series(list(sessions), dtype=object), seed + RANKER_SALT)
    held_queries = held_sessions < settings.validation_share
    rows = held_queries[queries]
    default = "ranker" if booster is not None else "fused"
    if not rows.any():
        return default, {}
    held = frame[rows]
    scores: dict[str, np.ndarray] = {}
    if booster is not None:
        scores["ranker"] = booster.predict(features[rows], num_threads=0)
    scores["fused"] = held["fused"].to_numpy(dtype=float)
    for source in sources:
        if np.isfinite(held[f"{source}_rank"].to_numpy(dtype=float)).any():
            scores[source] = source_order(held, source)
    per_query = {
        name: _ndcg_per_query(queries[rows], labels[rows], s, slots) for name, s in scores.items()
    }
    means = {name: float(v.mean()) for name, v in per_query.items()}
    best = max(means, key=lambda name: means[name])
    chosen = default
    if best != default:
        asked = np.unique(queries[rows])
        clusters = np.asarray([sessions[q] for q in asked])
        _, low, _ = bootstrap_ci(per_query[best] - per_query[default], clusters, 200, 0.95, seed)
        chosen = best if low > 0 else default
    log.info("rail order chosen", order=chosen, **{k: round(v, 4) for k, v in means.items()})
    return chosen, means


def _ndcg_per_query(
    queries: np.ndarray, labels: np.ndarray, scores: np.ndarray, k: int
) -> np.ndarray:
    """NDCG@k of each query's rows (rows grouped by query; 0 with no relevant row), gain
    2^label - 1."""
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    values = []
    starts = np.flatnonzero(np.r_[True, queries[1:] != queries[:-1]])
    for start, end in zip(starts, [*starts[1:], len(queries)], strict=True):
        y = labels[start:end].astype(float)
        ideal = np.sort(2.0**y - 1.0)[::-1][:k]
        if ideal[0] <= 0:
            values.append(0.0)
            continue
        order = np.argsort(-scores[start:end], kind="stable")[:k]
        gains = 2.0 ** y[order] - 1.0
        values.append(float(gains @ discounts[: len(gains)] / (ideal @ discounts[: len(ideal)])))
    return np.asarray(values)
