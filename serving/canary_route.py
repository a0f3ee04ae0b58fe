"""Which model serves a session while a canary runs (railtower.canary holds the plan).

Each API process reads the canary state file every second (serving.app's catalogue
watcher) and keeps one `CanaryRoute`: the challenger bundle, loaded and verified like
production, and the share of sessions it serves. A request picks its model once, by
`in_canary` over its session id, and then runs the same stages on it as on production
(exclusions, rules, stock, budgets and fallbacks hold for both arms). Cache keys carry the
model version (state.session_store), so an arm never reads the other arm's cached rail.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from railtower.canary import CanaryState, in_canary
from serving.rail_service import LoadedRails


@dataclass(frozen=True)
class CanaryRoute:
    """The challenger this process serves to `share` of sessions."""

    version: str
    share: float
    salt: str
    loaded: LoadedRails
    source: Path  # the challenger bundle folder, resolved
    state: CanaryState

    def takes(self, session_id: str) -> bool:
        """Whether the challenger serves this session."""
        return in_canary(session_id, self.share, self.salt)
