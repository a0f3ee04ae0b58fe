"""Load shedding on the request path: admission to a compute slot, and the re-ranker within
its budget (`serving.budgets`).

- **admission**: at most `compute_slots` rails are computed at once per process; a request
  that waits `admission_ms` for a slot is over capacity and gets the rules over popular
  items (the caller's fallback), with the reason on its trace.
- **re-ranker**: runs on a small pool with `ranker_ms` to answer; beyond `ranker_queue` jobs
  in hand a request is shed at once, and either way the rail keeps the fused order.

Every shed is counted (`fallbacks{reason=...}`) and named in the answer's reasons.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time

import numpy as np

from railtower.settings import StageBudgets
from ranking.candidate_fusion import CandidateTable
from ranking.rails import RailPipeline
from ranking.retriever import Query
from serving.metrics import Metrics
from serving.stages import Trace


class ComputeBudgets:
    """One process's compute slots and re-ranker pool, shared by all its requests."""

    def __init__(self, budgets: StageBudgets, metrics: Metrics) -> None:
        self.budgets, self.metrics = budgets, metrics
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="ranker")
        self._ranker_jobs = 0  # submitted to the pool and not finished (ranker_queue)
        self._ranker_jobs_lock = threading.Lock()
        # admission: at most `compute_slots` rails computed at once (a Semaphore wakes its
        # waiters first come, first served)
        slots = budgets.compute_slots
        self._compute_slots = threading.Semaphore(slots) if slots else None

    def admit(self, trace: Trace) -> bool:
        """Wait up to `admission_ms` for a compute slot; False (counted, with the reason on
        the trace) when none freed up: the process is over capacity. An admitted request
        calls `release` when its computation ends."""
        if self._compute_slots is None:
            return True
        since = time.perf_counter()
        admitted = self._compute_slots.acquire(timeout=self.budgets.admission_ms / 1000)
        trace.lap("admission", since)
        if not admitted:
            self.metrics.fallbacks.labels(reason="over_capacity").inc()
            trace.reasons.append(
                f"over capacity: no compute slot within {self.budgets.admission_ms:.0f} ms: "
                "popular items"
            )
        return admitted

    def release(self) -> None:
        """Free the compute slot `admit` granted."""
        if self._compute_slots is not None:
            self._compute_slots.release()

    def rank(
        self,
        pipeline: RailPipeline,
        rail: str,
        table: CandidateTable,
        query: Query,
        trace: Trace,
    ) -> np.ndarray:
        """The re-ranker's scores for `table` within `ranker_ms`; the fused order (the table's
        `fused` column) when the pool is busy or the budget runs out."""
        fused = table["fused"].astype(float)
        bound = self.budgets.ranker_queue
        with self._ranker_jobs_lock:
            busy = bool(bound) and self._ranker_jobs >= bound
            if not busy:
                self._ranker_jobs += 1
        if busy:
            # Shed at once: queueing behind `bound` jobs would miss the budget and leave one
            # more job for the requests after this one (the backlog a spike used to leave).
            self.metrics.fallbacks.labels(reason="ranker_busy").inc()
            trace.reasons.append(f"re-ranker busy ({bound} jobs in hand): fused order")
            return fused
        future = self._pool.submit(pipeline.ranker_scores, rail, table, [query])
        future.add_done_callback(self._ranker_job_done)
        try:
            return future.result(timeout=self.budgets.ranker_ms / 1000)
        except concurrent.futures.TimeoutError:
            future.cancel()  # not started yet: nobody waits for it any more, drop it
            self.metrics.fallbacks.labels(reason="ranker_budget").inc()
            trace.reasons.append(
                f"re-ranker over its {self.budgets.ranker_ms:.0f} ms budget: fused order"
            )
            return fused

    def _ranker_job_done(self, _future: concurrent.futures.Future) -> None:  # type: ignore[type-arg]
        with self._ranker_jobs_lock:
            self._ranker_jobs -= 1
