"""Shadow traffic: what a challenger bundle or a candidate rule set would have shown for the
same requests, computed off the critical path, plus the served impression of every request.

    request thread  served impression -> sink.log (non-blocking)
                    session sampled?  -> job -> bounded queue (put_nowait; full: dropped)
    shadow worker   job -> each arm's rail -> sink.log (shown=False, same request_id)

A session is in or out of the shadow sample by a stable hash of its id (`in_shadow`), so
the same shoppers are shadowed on every replica and request. Arms:

- `challenger:<version>`: the challenger bundle (`shadow.challenger_bundle`, loaded and
  verified like production) runs the served stages (`serving.stages.run_stages`) on the
  session snapshot the request read, with its own in-process tower: no Redis, no Triton.
- `rules:<name>`: the production model under a candidate rule set. A computed rail reuses
  the served list the rules stage read (so the rules are the only difference); a cached
  or fallback rail is recomputed on the production model. Started and stopped at runtime
  (`shadow_rules` / `stop_rules`, or the admin routes in `serving.shadow_routes`).

The worker thread lowers its own scheduling priority (Linux gives each thread its own nice
value) and yields between arms, so on a small machine request threads win the CPU.

One module on purpose: `ShadowRunner` is one worker with its queue, arms and counters;
the admin routes live in serving.shadow_routes, the sinks in serving.impressions, and
the stages it runs are serving.stages'.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from railtower.errors import ArtifactMismatch
from railtower.logs import get_logger
from railtower.schemas import Impression
from railtower.settings import Settings, ShadowSettings
from ranking.candidate_fusion import CandidateTable
from ranking.candidates import Candidate
from ranking.engine import fallback, rerule
from ranking.exploration import Explored
from ranking.rule_set import RuleSet, load_rule_set
from serving.impressions import ImpressionCounts, ImpressionSink, make_sink
from serving.metrics import Metrics
from serving.new_items import apply_records
from serving.observer import ServedRequest
from serving.rail_service import LoadedRails, load_rails
from serving.stages import Trace, in_process_vector, run_stages
from state.redis_client import connect

log = get_logger(__name__)

PRODUCTION = "production"
_WORKER_NICE = 10  # added to the worker thread's nice value (19 is the lowest priority)


def in_shadow(session_id: str, share: float) -> bool:
    """Whether the session is in the shadow sample: a stable hash of its id below `share`.

    blake2b, not hash(): Python salts hash() per process, and a session must land on the
    same side on every replica and after every restart.
    """
    if share <= 0.0:
        return False
    digest = hashlib.blake2b(session_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < share


def rule_set_label(rule_set: RuleSet | None) -> str | None:
    return None if rule_set is None else f"{rule_set.name}@{rule_set.version}"


@dataclass(frozen=True)
class _Arm:
    name: str  # "challenger:<version>" or "rules:<name>"
    kind: str  # "challenger" or "rules"
    rule_set: RuleSet | None = None  # the candidate rule set of a rules arm


@dataclass
class _ArmStats:
    """Live counters of one arm; `differing` and `overlap` sum over shadowed requests."""

    kind: str
    since: datetime = field(default_factory=lambda: datetime.now(UTC))
    active: bool = True
    shadowed: int = 0
    dropped: int = 0
    failed: int = 0
    skipped: int = 0
    slots: int = 0
    differing: int = 0
    overlap: float = 0.0

    def add(self, served: list[str], shadow: list[str]) -> None:
        """Count one comparison: slots whose item differs, and the share of items in common."""
        self.shadowed += 1
        if not served:
            return
        self.slots += len(served)
        self.differing += sum(
            1 for i, item in enumerate(served) if i >= len(shadow) or shadow[i] != item
        )
        self.overlap += len(set(served) & set(shadow)) / len(served)

    def as_dict(self) -> dict[str, Any]:
        compared = self.shadowed if self.slots else 0
        return {
            "kind": self.kind,
            "active": self.active,
            "since": self.since.isoformat(),
            "shadowed": self.shadowed,
            "dropped": self.dropped,
            "failed": self.failed,
            "skipped": self.skipped,
            "differ_share": self.differing / self.slots if self.slots else None,
            "mean_overlap": self.overlap / compared if compared else None,
        }


@dataclass(frozen=True)
class _Job:
    request_id: str
    served_at: datetime
    served: ServedRequest
    arms: tuple[_Arm, ...]


class ShadowRunner:
    """Logs every served impression and computes the shadow arms of sampled sessions.

    Example:
        >>> runner = ShadowRunner(ShadowSettings(share=0.1), MemoryImpressionSink(Metrics()),
        ...                       Metrics(), rule_set=load_rule_set("configs/rules/x.json"))
        >>> service.observer = runner.start()
        >>> runner.report()["arms"]["rules:x"]["differ_share"]
    """

    def __init__(
        self,
        settings: ShadowSettings,
        sink: ImpressionSink,
        metrics: Metrics,
        challenger: LoadedRails | None = None,
        rule_set: RuleSet | None = None,
    ) -> None:
        self.sink, self.metrics, self.challenger = sink, metrics, challenger
        self.share, self.workers = settings.share, settings.workers
        self._queue: queue.Queue[_Job | None] = queue.Queue(settings.queue_size)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending = 0  # jobs queued or in progress, for drain()
        self._stats: dict[str, _ArmStats] = {}
        self._jobs = {"queued": 0, "completed": 0, "dropped": 0}
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._rules_arm: _Arm | None = None
        # (production model, rule set, that model under that rule set), rebuilt on a swap
        self._ruled: tuple[LoadedRails, RuleSet, LoadedRails] | None = None
        self._challenger_arm = (
            None if challenger is None else _Arm(f"challenger:{challenger.version}", "challenger")
        )
        if self._challenger_arm is not None:
            self._stats[self._challenger_arm.name] = _ArmStats("challenger")
        if rule_set is not None:
            self.shadow_rules(rule_set)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> ShadowRunner:
        for n in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"shadow-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def drain(self, timeout_s: float = 30.0) -> bool:
        """Wait until every queued shadow job is done (tests, benchmarks); False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self._pending:
                if not self._idle.wait(max(0.0, deadline - time.monotonic())):
                    return False
        return True

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the workers (jobs still queued are dropped and counted), then flush the sink."""
        self._stopping.set()
        abandoned = 0
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                abandoned += 1
                self._dropped(job.arms)
                self._done()
        for _ in self._threads:
            try:
                self._queue.put(None, timeout=timeout_s)
            except queue.Full:  # requests still queueing: the daemon workers end with us
                break
        for thread in self._threads:
            thread.join(timeout=timeout_s)
        if abandoned:
            log.warning("shadow jobs dropped at shutdown", jobs=abandoned)
        self.sink.close()

    # ------------------------------------------------------------------ request thread

    def observe(self, served: ServedRequest) -> None:
        """Log the served impression and, for a sampled session, queue the shadow job.

        Runs on the request thread: builds one small record and never waits.
        """
        request_id, served_at = uuid.uuid4().hex, datetime.now(UTC)
        self.sink.log(
            _impression(
                request_id,
                served_at,
                served,
                served.arm,
                served.loaded.version,
                rule_set_label(served.loaded.pipeline.rule_set),
                served.items,
                shown=True,
                explored=served.explored,
            )
        )
        arms = tuple(a for a in (self._challenger_arm, self._rules_arm) if a is not None)
        # shadow arms are compared with production: a canary's session has none
        shadowed = arms and served.arm == PRODUCTION
        if not shadowed or not in_shadow(served.request.session_id, self.share):
            return
        job = _Job(request_id, served_at, served, arms)
        with self._lock:
            self._pending += 1
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self._dropped(arms)
            self._done()
            return
        with self._lock:
            self._jobs["queued"] += 1
        self.metrics.shadow_jobs.labels(outcome="queued").inc()

    def catalogue_changed(self, records: Mapping[str, Mapping[str, object]]) -> None:
        """Keep the challenger's stock, prices, retirements and new items current, as
        production's are (serving.new_items: a sync's new listings in one batch)."""
        challenger = self.challenger
        if challenger is not None:
            apply_records(challenger, records)

    # ------------------------------------------------------------------ runtime control

    def shadow_rules(
        self, rule_set: RuleSet, name: str | None = None, share: float | None = None
    ) -> str:
        """Shadow `rule_set` on the production model from the next request; return the arm.

        Replaces a rules arm already running (its counters stay in the report, inactive).
        `share` also sets the sampled share of sessions (0..1), for every arm.
        """
        if share is not None:
            self.set_share(share)
        arm = _Arm(f"rules:{name or rule_set.name}", "rules", rule_set)
        with self._lock:
            self._deactivate(self._rules_arm)
            self._stats[arm.name] = _ArmStats("rules")
            self._rules_arm = arm
        log.info("shadowing a rule set", arm=arm.name, version=rule_set.version, share=self.share)
        return arm.name

    def stop_rules(self) -> str | None:
        """Stop shadowing the candidate rule set; return the arm stopped, None if none ran."""
        with self._lock:
            arm, self._rules_arm = self._rules_arm, None
            self._deactivate(arm)
        if arm is not None:
            log.info("stopped shadowing a rule set", arm=arm.name)
        return None if arm is None else arm.name

    def set_share(self, share: float) -> None:
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"share is a fraction of sessions between 0 and 1, got {share}")
        self.share = share

    def report(self) -> dict[str, Any]:
        """Live counters: per arm, requests shadowed, dropped, failed, skipped, the share of
        slots that differ from production (position by position) and the mean overlap."""
        with self._lock:
            return {
                "share": self.share,
                "queue": {"capacity": self._queue.maxsize, "waiting": self._queue.qsize()},
                "jobs": dict(self._jobs),
                "arms": {name: stats.as_dict() for name, stats in self._stats.items()},
            }

    # ------------------------------------------------------------------ shadow worker

    def _work(self) -> None:
        _lower_thread_priority()
        while True:
            job = self._queue.get()
            if job is None or self._stopping.is_set():
                if job is not None:
                    self._dropped(job.arms)
                    self._done()
                return
            try:
                for arm in job.arms:
                    self._run_arm(arm, job)
                    time.sleep(0)  # give waiting request threads the GIL between arms
                with self._lock:
                    self._jobs["completed"] += 1
                self.metrics.shadow_jobs.labels(outcome="completed").inc()
            finally:
                self._done()

    def _run_arm(self, arm: _Arm, job: _Job) -> None:
        started = time.perf_counter()
        try:
            computed = self._arm_rail(arm, job.served)
        except Exception as exc:  # noqa: BLE001 - a broken arm never affects serving
            self._bump(arm, "failed")
            self.metrics.shadow_jobs.labels(outcome="failed").inc()
            log.warning("shadow arm failed", arm=arm.name, error=f"{type(exc).__name__}: {exc}")
            return
        if computed is None:
            self._bump(arm, "skipped")
            return
        loaded, items = computed
        self.metrics.shadow_seconds.labels(arm=arm.kind).observe(time.perf_counter() - started)
        rule_set = arm.rule_set if arm.kind == "rules" else loaded.pipeline.rule_set
        self.sink.log(
            _impression(
                job.request_id,
                job.served_at,
                job.served,
                arm.name,
                loaded.version,
                rule_set_label(rule_set),
                items,
                shown=False,
            )
        )
        served_ids = [c.item_id for c in job.served.items]
        with self._lock:
            stats = self._stats.get(arm.name)
            if stats is not None:
                stats.add(served_ids, [c.item_id for c in items])

    def _arm_rail(
        self, arm: _Arm, served: ServedRequest
    ) -> tuple[LoadedRails, list[Candidate]] | None:
        """The arm's model and rail for the served request; None when it cannot answer it."""
        rail, query, slots = served.rail, served.query, served.request.slots
        if arm.kind == "challenger":
            loaded = self.challenger
            if loaded is None:
                return None
            index = loaded.catalogue.index
            # A page product or cart item the challenger's catalogue lacks: not comparable.
            if (query.anchor is not None and query.anchor not in index) or any(
                i not in index for i in query.cart
            ):
                return None
            vector = in_process_vector(loaded, query)
        else:
            loaded = self._under_rules(served.loaded, arm.rule_set)  # type: ignore[arg-type]
            pipeline = loaded.pipeline
            if served.before_rules is not None:  # the rules are the only difference
                return loaded, rerule(pipeline, rail, served.before_rules, query, slots)
            if served.served_by == "fallback":  # production fell back to popular items
                return loaded, fallback(pipeline, rail, query, slots).outcome.candidates
            vector = served.vector
            session_only = query.anchor is None and not query.cart
            if vector is None and session_only and served.snapshot is not None:
                vector = served.snapshot.vector
            if vector is None:
                vector = in_process_vector(loaded, query)

        def rank(table: CandidateTable) -> Any:
            return loaded.pipeline.ranker_scores(rail, table, [query])

        return loaded, run_stages(loaded, rail, query, slots, vector, rank, Trace()).slots

    def _under_rules(self, production: LoadedRails, rule_set: RuleSet) -> LoadedRails:
        """The production model under `rule_set`, cached until production is swapped."""
        cached = self._ruled
        if cached is not None and cached[0] is production and cached[1] is rule_set:
            return cached[2]
        derived = replace(production, pipeline=production.pipeline.with_rules(rule_set))
        self._ruled = (production, rule_set, derived)
        return derived

    # ------------------------------------------------------------------ counters

    def _bump(self, arm: _Arm, counter: str) -> None:
        with self._lock:
            stats = self._stats.get(arm.name)
            if stats is not None:
                setattr(stats, counter, getattr(stats, counter) + 1)

    def _dropped(self, arms: tuple[_Arm, ...]) -> None:
        with self._lock:
            self._jobs["dropped"] += 1
            for arm in arms:
                if arm.name in self._stats:
                    self._stats[arm.name].dropped += 1
        self.metrics.shadow_jobs.labels(outcome="dropped").inc()

    def _done(self) -> None:
        with self._idle:
            self._pending -= 1
            if not self._pending:
                self._idle.notify_all()

    def _deactivate(self, arm: _Arm | None) -> None:
        if arm is not None and arm.name in self._stats:
            self._stats[arm.name].active = False


def _impression(
    request_id: str,
    served_at: datetime,
    served: ServedRequest,
    arm: str,
    model_version: str,
    rule_set: str | None,
    items: list[Candidate],
    shown: bool,
    explored: Explored | None = None,
) -> Impression:
    # Only the shown arm carries propensities: a shadow arm's list is never drawn, only computed.
    drew = explored is not None and explored.slot is not None
    return Impression(
        impression_id=uuid.uuid4().hex,
        request_id=request_id,
        served_at=served_at,
        session_id=served.request.session_id,
        user_id=served.request.user_id,
        rail=served.rail,
        arm=arm,
        shown=shown,
        model_version=model_version,
        rule_set=rule_set,
        items=[c.item_id for c in items],
        scores=[float(c.score) for c in items],
        propensities=explored.propensities() if explored is not None else None,
        explored_slot=explored.slot if drew else None,  # type: ignore[union-attr]
        choice_set_size=len(explored.choice_set) if drew else None,  # type: ignore[union-attr]
        greedy_item=explored.choice_set[0] if drew else None,  # type: ignore[union-attr]
        served_by=served.served_by if shown else "computed",
    )


def _lower_thread_priority() -> None:
    """Raise this thread's nice value (Linux: per thread, so request threads keep theirs)."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + _WORKER_NICE)
    except (OSError, AttributeError) as exc:  # not Linux, or not allowed: run at normal priority
        log.info("shadow worker keeps normal priority", error=str(exc))


def build_shadow(settings: Settings, metrics: Metrics) -> ShadowRunner:
    """The runner as configured: its sink, Redis counts, challenger and candidate rules.

    A challenger that fails to load is logged and counted, and serving goes on without it
    (shadow traffic must never keep the API from starting). An invalid `shadow.rules_path`
    raises RuleSetError naming each problem, like any invalid configuration.
    """
    shadow = settings.shadow
    counts = ImpressionCounts(
        # its own client: the session store's socket timeout is the request's Redis budget,
        # far too short for the sink thread's batched writes
        connect(settings.serving, timeout_s=2.0),
        shadow.count_ttl_days,
    )
    sink = make_sink(settings, metrics, counts)
    challenger = None
    if shadow.challenger_bundle is not None:
        try:
            challenger = load_rails(shadow.challenger_bundle, settings)
        except (ArtifactMismatch, OSError, ValueError) as exc:
            metrics.errors.labels(kind="challenger_load").inc()
            log.error(
                "challenger bundle not loaded; shadowing without it",
                folder=str(shadow.challenger_bundle),
                error=str(exc),
            )
    rule_set = load_rule_set(shadow.rules_path) if shadow.rules_path is not None else None
    runner = ShadowRunner(shadow, sink, metrics, challenger, rule_set)
    log.info(
        "shadow traffic",
        share=shadow.share,
        challenger=None if challenger is None else challenger.version,
        rules=rule_set_label(rule_set),
    )
    return runner.start()
