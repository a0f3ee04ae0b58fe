"""An A/A check before a canary starts: choose the hash salt whose first-step sessions
production already serves as well as the rest.

The canary compares two groups of different sessions. On a small step the group the hash
picks can differ from the rest before any challenger is involved (on REES46's 330 held-out
sessions the 10% sample of the default salt had a lower hit rate under production itself),
and the rule would read that as a worse challenger. So, on production's own served
impressions from before the start (joined with what followed, as the canary's rule joins
them), each of `tries` salts (`canary.salt`, `canary.salt-1`, ...) splits the sessions at
the first step's share; the salt kept is the one with the smallest difference between its
sample and the rest among those whose interval contains 0 (the smallest overall, flagged,
if none does). Experimentation platforms call this re-randomising the seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from railtower.canary import in_canary
from railtower.logs import get_logger
from railtower.schemas import Impression
from railtower.settings import Settings
from training.canary_decision import difference_intervals
from training.evaluate import Interval
from training.shadow_eval import (
    PRODUCTION_ARM,
    ScoredImpression,
    SessionTimelines,
    epoch_s,
    score_impressions,
)

log = get_logger(__name__)


@dataclass
class SaltTrial:
    salt: str
    sample: int  # matured impressions of the sessions the salt sends to the challenger
    rest: int
    difference: Interval  # production's hit rate: sample - rest
    sample_sessions: int = 0
    rest_hit_rate: float = 0.0
    abort_high: float = 0.0  # upper bound of the difference at canary.abort_ci_level

    def would_abort(self, settings: Settings, level: str = "abort") -> bool:
        """Whether the canary's rule would abort a challenger that served this sample the
        rest's answers (an A/A difference read as a worse challenger): at the abort's
        interval (`level="abort"`), or at `evaluation.ci_level` (the rule before
        canary.abort_ci_level)."""
        cfg = settings.canary
        if self.sample_sessions < cfg.min_sessions or self.rest_hit_rate <= 0:
            return False
        drop = -self.difference.mean / self.rest_hit_rate
        high = self.abort_high if level == "abort" else self.difference.high
        return drop > cfg.max_relative_drop and high < 0


@dataclass
class SaltChoice:
    salt: str
    share: float
    balanced: bool  # the kept salt's interval contains 0
    reason: str
    trials: list[SaltTrial] = field(default_factory=list)

    def to_markdown(self) -> str:
        lines = [
            f"## A/A check at {self.share:.0%}: salt {self.salt!r}",
            "",
            f"- {self.reason}",
        ]
        if self.trials:
            lines += [
                "",
                "| salt | sample impressions | rest | production hit rate, sample - rest |",
                "|---|---|---|---|",
            ]
            for t in self.trials:
                d = t.difference
                lines.append(
                    f"| {t.salt} | {t.sample:,} | {t.rest:,} | "
                    f"{d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}] |"
                )
        return "\n".join(lines) + "\n"


def production_rows(
    impressions: Sequence[Impression], timelines: SessionTimelines, settings: Settings
) -> list[ScoredImpression]:
    """Production's served impressions whose horizon is over, with what followed them."""
    horizon_s = settings.monitor.horizon_minutes * 60
    served = [i for i in impressions if i.shown and i.arm == PRODUCTION_ARM]
    scored = score_impressions(served, timelines, settings.evaluation.slots, horizon_s)
    return [
        r for r in scored if epoch_s(r.impression.served_at) + horizon_s <= timelines.last_time_s
    ]


def balanced_salt(
    settings: Settings,
    impressions: Sequence[Impression],
    timelines: SessionTimelines,
    tries: int = 20,
) -> SaltChoice:
    """The salt to start the canary with (see the module docstring)."""
    base, share = settings.canary.salt, settings.canary.steps[0]
    rows = production_rows(impressions, timelines, settings)
    trials = salt_trials(settings, rows, share, tries)
    if trials is None:
        return SaltChoice(
            base,
            share,
            False,
            f"too few matured production impressions to check ({len(rows):,}; the "
            f"{share:.0%} sample needs canary.min_impressions = "
            f"{settings.canary.min_impressions:,}): the configured salt is kept",
        )
    inside = [t for t in trials if t.difference.low <= 0 <= t.difference.high]
    best = min(inside or trials, key=lambda t: abs(t.difference.mean))
    reason = (
        f"production's hit rate on the {share:.0%} sample of salt {best.salt!r} differs from "
        f"the rest's by {best.difference.mean:+.4f}"
    )
    if best.salt != base:
        first = trials[0].difference
        reason += f" (the configured salt {base!r}: {first.mean:+.4f})"
    if not inside:
        reason += (
            "; no salt's interval contains 0: the steps will read part of this as the challenger's"
        )
    log.info("canary salt chosen", salt=best.salt, balanced=bool(inside), share=share)
    return SaltChoice(best.salt, share, bool(inside), reason, trials)


def salt_trials(
    settings: Settings, rows: Sequence[ScoredImpression], share: float, tries: int
) -> list[SaltTrial] | None:
    """Production's hit rate on the `share` sample of each of `tries` salts (`canary.salt`,
    `canary.salt-1`, ...) against the rest's; None when a sample or the rest has fewer than
    `canary.min_impressions` rows. Over many salts it is the A/A distribution: how often
    the rule would read a sample of identical answers as a worse challenger."""
    base = settings.canary.salt
    trials = []
    for n in range(tries):
        salt = base if n == 0 else f"{base}-{n}"
        sample = [r for r in rows if in_canary(r.impression.session_id, share, salt)]
        rest = [r for r in rows if not in_canary(r.impression.session_id, share, salt)]
        if min(len(sample), len(rest)) < settings.canary.min_impressions:
            return None
        levels = [settings.evaluation.ci_level, settings.canary.abort_ci_level]
        difference, guard = difference_intervals(sample, rest, settings, levels)
        trials.append(
            SaltTrial(
                salt,
                len(sample),
                len(rest),
                difference,
                len({r.impression.session_id for r in sample}),
                sum(r.hit for r in rest) / len(rest),
                guard.high,
            )
        )
    return trials
