"""The exploration slot: one configurable slot per rail filled by a bandit, with propensities.

A rail that only exploits what it knows never learns about the items below its cut, least
of all new ones. The exploration slot (off by default, `ranking.exploration`) lets a bandit
choose one slot's item among the greedy occupant and the next `window` eligible items below
the cut, and records the probability it had of choosing what it showed, so that any other
policy can later be valued on the logs (`training.off_policy`).

- epsilon-greedy: the greedy item with probability 1 - eps, else one of the choice set
  uniformly; its propensity is exact.
- Thompson sampling: each candidate's click rate has a Beta posterior; the one with the
  highest draw wins. Items never shown start from a prior centred on their content-tower
  score (a cold item the towers like starts optimistic), worth `prior_strength`
  impressions. Its propensity has no closed form and is estimated from `propensity_draws`
  Monte Carlo draws (floored, so IPS weights stay finite).

The choice set comes from the list the rules already produced, so an explored item is
never blocked, excluded or out of stock.

Young items (listed since the model was trained: the caller says which) get their own share
of the slot, `young_share`: the draw is a mixture, with probability `young_share` uniform
over the `young_window` best-ranked young items anywhere below the cut, else the policy
above; the logged probabilities are the mixture's, so IPS stays exact (epsilon-greedy) or
as estimated (Thompson).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from railtower.settings import ExplorationSettings
from ranking.candidates import Candidate


class ArmStats(Protocol):
    """Clicks and impressions of items in the exploration slot (Redis online, a dict offline)."""

    def counts(self, item_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(clicks, impressions) per item, zeros for items never shown."""
        ...


@dataclass
class InMemoryArmStats:
    """ArmStats over two dicts, for tests, simulation and offline replays."""

    clicks: dict[str, float]
    impressions: dict[str, float]

    def counts(self, item_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return (
            np.array([self.clicks.get(i, 0.0) for i in item_ids]),
            np.array([self.impressions.get(i, 0.0) for i in item_ids]),
        )

    def record(self, item_id: str, clicked: bool) -> None:
        self.impressions[item_id] = self.impressions.get(item_id, 0.0) + 1
        self.clicks[item_id] = self.clicks.get(item_id, 0.0) + float(clicked)


@dataclass(frozen=True)
class Explored:
    """The rail after exploration, and what the logs need to value other policies."""

    items: list[Candidate]
    slot: int | None
    choice_set: list[str]
    chosen: str | None
    # probability of every item in the choice set, the chosen one's being the propensity
    probabilities: dict[str, float]

    @property
    def propensity(self) -> float | None:
        return None if self.chosen is None else self.probabilities[self.chosen]

    def propensities(self) -> list[float]:
        """Per slot: 1.0 where the list is deterministic, the logged probability at the slot."""
        return [
            self.probabilities[c.item_id] if i == self.slot else 1.0
            for i, c in enumerate(self.items)
        ]


def explore(
    ranked: Sequence[Candidate],
    slots: int,
    settings: ExplorationSettings,
    rng: np.random.Generator,
    stats: ArmStats | None = None,
    tower_scores: Mapping[str, float] | None = None,
    young: Collection[str] = (),
) -> Explored:
    """Fill `settings.slot` of the top `slots` of `ranked` (the rules' output) by the bandit.

    `ranked` must be longer than `slots` for there to be anything to explore; the other
    slots keep their order. `tower_scores` (cosine similarity of the session and the item's
    content vector, -1..1) set the Thompson prior of items the stats have never shown.
    `young`: the items listed since the model was trained, for `settings.young_share`.
    """
    slot = settings.slot
    top = list(ranked[:slots])
    if slot is None or slot >= len(top):
        return Explored(top, None, [], None, {})
    below = list(ranked[slots : slots + settings.window])
    choice = [top[slot], *below]
    ids = [c.item_id for c in choice]
    if settings.policy == "epsilon_greedy":
        probabilities = _epsilon_greedy(len(choice), settings.epsilon)
    else:
        probabilities = _thompson(ids, settings, rng, stats, tower_scores)
    newcomers = [c.item_id for c in ranked[slots:] if c.item_id in young]
    newcomers = newcomers[: settings.young_window]
    if settings.young_share > 0 and newcomers:
        ids, probabilities = _with_young(ids, probabilities, newcomers, settings.young_share)
    pick = int(rng.choice(len(ids), p=probabilities))
    top[slot] = Candidate(ids[pick], top[slot].score)
    return Explored(
        top,
        slot,
        ids,
        ids[pick],
        {i: float(p) for i, p in zip(ids, probabilities, strict=True)},
    )


def _with_young(
    ids: list[str], probabilities: np.ndarray, young: list[str], share: float
) -> tuple[list[str], np.ndarray]:
    """The choice set widened by `young` and the mixture: (1 - share) x the policy's
    probabilities + share x uniform over the young items."""
    widened = ids + [i for i in young if i not in ids]
    mixed = np.zeros(len(widened))
    mixed[: len(ids)] = (1.0 - share) * probabilities
    for item in young:
        mixed[widened.index(item)] += share / len(young)
    return widened, mixed / mixed.sum()


def _epsilon_greedy(n: int, epsilon: float) -> np.ndarray:
    probabilities = np.full(n, epsilon / n)
    probabilities[0] += 1.0 - epsilon
    return probabilities


def _thompson(
    ids: Sequence[str],
    settings: ExplorationSettings,
    rng: np.random.Generator,
    stats: ArmStats | None,
    tower_scores: Mapping[str, float] | None,
) -> np.ndarray:
    clicks, shown = stats.counts(ids) if stats is not None else (np.zeros(len(ids)),) * 2
    prior = np.array([_prior_rate(settings, (tower_scores or {}).get(i)) for i in ids])
    alpha = 1.0 + prior * settings.prior_strength + clicks
    beta = 1.0 + (1.0 - prior) * settings.prior_strength + np.maximum(shown - clicks, 0.0)
    draws = rng.beta(alpha, beta, size=(settings.propensity_draws, len(ids)))
    wins = np.bincount(draws.argmax(axis=1), minlength=len(ids)).astype(float)
    # Floor then renormalise: the logged propensity is exactly the probability we sample from.
    probabilities = np.maximum(wins / wins.sum(), settings.min_propensity)
    return probabilities / probabilities.sum()


def _prior_rate(settings: ExplorationSettings, tower_score: float | None) -> float:
    """The towers' opinion as a click-rate prior: neutral at 0, up to 4x for a perfect match."""
    if tower_score is None or not np.isfinite(tower_score):
        return settings.prior_rate
    return float(np.clip(settings.prior_rate * 4.0 ** float(tower_score), 1e-4, 0.5))
