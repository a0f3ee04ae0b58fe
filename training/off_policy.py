"""Off-policy evaluation of a slot policy from logged impressions: IPS and self-normalised IPS.

The exploration slot logs, for every impression, the item it showed and the probability the
logging policy had of showing it (`Impression.propensities`). Any other policy that can say
how likely it would have been to show that same item can then be valued on those logs
without being deployed:

    IPS    V = mean_i( r_i * w_i ),             w_i = pi(a_i | x_i) / p_i
    SNIPS  V = sum_i( r_i * w_i ) / sum_i( w_i )

IPS is unbiased when every item the target policy could show had a non-zero logging
propensity; SNIPS trades a small bias for much lower variance when weights are large. Both
come with an interval: IPS from the central limit theorem on its per-impression terms,
SNIPS from the delta method (its linearisation), and either from a bootstrap over sessions
when impressions of one session are correlated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from training.metrics import bootstrap_ci


@dataclass(frozen=True)
class LoggedSlot:
    """One logged decision: who saw it, what was shown, with what probability, what followed."""

    context: object
    action: str
    propensity: float
    reward: float
    session: str | None = None


@dataclass(frozen=True)
class Estimate:
    """A policy value with its interval and the diagnostics that say whether to trust it."""

    estimator: str
    value: float
    low: float
    high: float
    n: int
    # Kish's effective sample size of the weights: far below n means a few impressions
    # carry the estimate and the interval is optimistic.
    effective_n: float
    max_weight: float


TargetPolicy = Callable[[object, str], float]
"""pi(action | context): the probability the evaluated policy shows `action` in `context`."""


def importance_weights(logs: Sequence[LoggedSlot], target: TargetPolicy) -> np.ndarray:
    """w_i = pi(a_i | x_i) / p_i. Raises on a zero or missing logging propensity."""
    propensities = np.array([log.propensity for log in logs], dtype=float)
    if len(propensities) and (not np.all(np.isfinite(propensities)) or propensities.min() <= 0):
        bad = int(np.argmin(np.nan_to_num(propensities, nan=-1.0)))
        raise ValueError(
            f"impression {bad} has logging propensity {propensities[bad]!r}: IPS needs every "
            "logged action's probability > 0 (log propensities for the exploration slot)"
        )
    return np.array([target(log.context, log.action) for log in logs]) / propensities


def ips(
    logs: Sequence[LoggedSlot], target: TargetPolicy, level: float = 0.95, resamples: int = 0
) -> Estimate:
    """Inverse propensity scoring. `resamples` > 0 bootstraps over sessions instead of the CLT."""
    weights = importance_weights(logs, target)
    rewards = np.array([log.reward for log in logs], dtype=float)
    terms = rewards * weights
    value = float(terms.mean()) if len(terms) else float("nan")
    if resamples:
        low, high = _session_bootstrap(logs, terms, np.ones_like(terms), level, resamples)
    else:
        half = _z(level) * float(terms.std(ddof=1)) / np.sqrt(len(terms)) if len(terms) > 1 else 0
        low, high = value - half, value + half
    return _estimate("ips", value, low, high, weights)


def snips(
    logs: Sequence[LoggedSlot], target: TargetPolicy, level: float = 0.95, resamples: int = 0
) -> Estimate:
    """Self-normalised IPS; delta-method interval, or a session bootstrap when `resamples` > 0."""
    weights = importance_weights(logs, target)
    rewards = np.array([log.reward for log in logs], dtype=float)
    total = float(weights.sum())
    if total <= 0:
        raise ValueError(
            "the target policy gives probability 0 to every logged action: the logs say "
            "nothing about it (explore more, or evaluate a policy closer to the logging one)"
        )
    value = float((rewards * weights).sum() / total)
    if resamples:
        low, high = _session_bootstrap(logs, rewards * weights, weights, level, resamples)
    else:
        # Linearisation of a ratio estimator: residuals w_i (r_i - V) / mean(w).
        n = len(weights)
        residual = weights * (rewards - value) / weights.mean()
        half = _z(level) * float(residual.std(ddof=1)) / np.sqrt(n) if n > 1 else 0.0
        low, high = value - half, value + half
    return _estimate("snips", value, low, high, weights)


def _estimate(name: str, value: float, low: float, high: float, weights: np.ndarray) -> Estimate:
    sq = float((weights**2).sum())
    effective = float(weights.sum() ** 2 / sq) if sq > 0 else 0.0
    return Estimate(
        name, value, float(low), float(high), len(weights), effective, float(weights.max(initial=0))
    )


def _z(level: float) -> float:
    return float(stats.norm.ppf(0.5 + level / 2))


def _session_bootstrap(
    logs: Sequence[LoggedSlot],
    numerators: np.ndarray,
    denominators: np.ndarray,
    level: float,
    resamples: int,
) -> tuple[float, float]:
    """Ratio sum(num)/sum(den) bootstrapped over sessions (an impression is its own session
    when none is logged)."""
    groups = np.array(
        [log.session if log.session is not None else f"#{i}" for i, log in enumerate(logs)]
    )
    _, low, high = bootstrap_ci(numerators, groups, resamples, level, 0, denominators)
    return low, high


# ------------------------------------------------------------------ a simulator with known truth


@dataclass(frozen=True)
class SimulatedBandit:
    """Contexts with known click probabilities per action, to check estimators against truth.

    `click[x, a]` is the true probability that action `a` is clicked in context `x`.
    """

    click: np.ndarray

    @classmethod
    def random(cls, contexts: int, actions: int, seed: int) -> SimulatedBandit:
        rng = np.random.default_rng(seed)
        # A few good actions per context, most poor: the shape of a rail's tail.
        return cls(rng.beta(0.6, 4.0, size=(contexts, actions)))

    def value(self, policy: np.ndarray) -> float:
        """True value of a stochastic policy `policy[x, a]`, contexts equally likely."""
        return float((policy * self.click).sum(axis=1).mean())

    def log(self, policy: np.ndarray, n: int, seed: int) -> list[LoggedSlot]:
        """`n` impressions drawn from `policy`, with their propensities and sampled rewards."""
        rng = np.random.default_rng(seed)
        contexts = rng.integers(0, self.click.shape[0], size=n)
        logs = []
        for i, x in enumerate(contexts):
            a = int(rng.choice(self.click.shape[1], p=policy[x]))
            reward = float(rng.random() < self.click[x, a])
            logs.append(LoggedSlot(int(x), str(a), float(policy[x, a]), reward, f"s{i // 3}"))
        return logs


def epsilon_greedy_matrix(scores: np.ndarray, epsilon: float) -> np.ndarray:
    """The policy matrix of epsilon-greedy over `scores[x, a]` (uniform exploration)."""
    k = scores.shape[1]
    policy = np.full(scores.shape, epsilon / k)
    policy[np.arange(len(scores)), scores.argmax(axis=1)] += 1 - epsilon
    return policy


def as_target(policy: np.ndarray) -> TargetPolicy:
    """A policy matrix as the `pi(action | context)` callable the estimators take."""
    return lambda context, action: float(policy[int(context), int(action)])  # type: ignore[call-overload]
