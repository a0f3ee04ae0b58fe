"""The baselines every evaluation runs, by the names used in `evaluation.baselines`."""

from __future__ import annotations

from collections.abc import Callable

from railtower.settings import Settings
from ranking.buy_again import BuyAgainRetriever
from ranking.category_popularity import CategoryPopularityRetriever
from ranking.covisitation import CovisitationRetriever, TransitionRetriever
from ranking.popularity import PopularityRetriever, RandomRetriever
from ranking.retriever import Retriever
from ranking.session_knn import SessionKnnRetriever

# name -> factory(settings, basket_data)
BASELINES: dict[str, Callable[[Settings, bool], Retriever]] = {
    "random": lambda s, _basket: RandomRetriever(s.seed),
    "popularity": lambda s, _basket: PopularityRetriever(s.baselines.popularity, s.event_weights),
    "category_popularity": lambda s, _basket: CategoryPopularityRetriever(
        s.baselines.popularity, s.event_weights, s.baselines.covisitation.recency_decay
    ),
    "covisitation": lambda s, basket: CovisitationRetriever(
        s.baselines.covisitation, s.event_weights, s.baselines.popularity, basket
    ),
    "transitions": lambda s, basket: TransitionRetriever(
        s.baselines.transitions, s.event_weights, s.baselines.popularity, basket
    ),
    "session_knn": lambda s, _basket: SessionKnnRetriever(
        s.baselines.session_knn, s.event_weights, s.baselines.popularity
    ),
    "buy_again": lambda s, _basket: BuyAgainRetriever(s.baselines.popularity, s.event_weights),
}
