"""Keep a loaded model out of the cycle collector's way.

A served bundle is hundreds of thousands of long-lived Python objects (item ids, neighbour
lists, attribute tables, the torch modules): an Amazon-M2 rails bundle leaves about 610k
objects tracked by the garbage collector. CPython's full (generation 2) collection walks
every one of them, and in a process that allocates per request it runs every so often on
its own: 300-500 ms with the GIL held, during which every request in flight waits. That is
the rare slow request at the p99 of a loaded API, not the rail computation.

`settle_heap` collects once, right after a model is loaded, and then freezes whatever
survived (`gc.freeze`): frozen objects are never walked again by the cycle collector, so
later collections only look at what requests allocate. Reference counting still frees a
frozen object as soon as nothing points at it; only cycles among frozen objects wait for
the next settle, which unfreezes first, so a swapped-out model's cycles are collected at
the next load.

`collector_held` is for batch work (the refresh consumer's micro-batch): a batch builds
hundreds of thousands of short-lived objects (candidate lists for every session it warms)
that stay alive until the batch ends. The collector's young generations run every few
hundred allocations while they are alive, find them all reachable and promote them, and
the promoted mass soon triggers full collections: 15% of a consumer's time at 1,000
events/s, 176 full collections in one benchmark run. Held off for the batch, the batch's
objects are freed by reference counting when it ends, and one young collection afterwards
takes whatever cycles it left.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from railtower.logs import get_logger

log = get_logger(__name__)


def settle_heap(reason: str) -> float:
    """Collect everything, then freeze the survivors; returns the pause in milliseconds.

    Call it where a long-lived structure was just built (a model loaded or swapped), from
    the thread doing the load: the collection is one pause instead of one per few thousand
    requests."""
    started = time.perf_counter()
    gc.unfreeze()  # the previous model's objects become collectable again
    collected = gc.collect()
    gc.freeze()
    pause_ms = (time.perf_counter() - started) * 1000
    log.info(
        "heap settled",
        reason=reason,
        collected=collected,
        frozen=gc.get_freeze_count(),
        pause_ms=round(pause_ms, 1),
    )
    return pause_ms


@dataclass
class GcPauses:
    """Every cycle-collector pause of this process, per generation: how many, how long in
    all, the longest. One instance per process (`gc_pauses`), fed by a `gc.callbacks` hook;
    the API's /metrics reads it (serving.metrics), so a p99 made of collector pauses shows
    as such."""

    count: list[int] = field(default_factory=lambda: [0, 0, 0])
    seconds: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    longest: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    _started: float = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        generation, pause = info["generation"], time.perf_counter() - self._started
        self.count[generation] += 1
        self.seconds[generation] += pause
        self.longest[generation] = max(self.longest[generation], pause)


_pauses: GcPauses | None = None
_install_lock = threading.Lock()


def gc_pauses() -> GcPauses:
    """This process's pause record, hooked into the collector on first use."""
    global _pauses
    with _install_lock:
        if _pauses is None:
            _pauses = GcPauses()
            gc.callbacks.append(_pauses)
        return _pauses


_held = 0  # how many collector_held blocks are running (threads may nest them)
_held_lock = threading.Lock()
_was_enabled = True


@contextmanager
def collector_held() -> Iterator[None]:
    """Run the block with automatic cycle collection off, then collect the young
    generations once (see the module docstring). Reference counting goes on as always;
    only cycles wait for the end of the block. Safe to nest and to use from several
    threads: the collector is back on when the last block ends, if it was on before."""
    global _held, _was_enabled
    with _held_lock:
        if _held == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _held += 1
    try:
        yield
    finally:
        with _held_lock:
            _held -= 1
            if _held == 0 and _was_enabled:
                gc.enable()
                gc.collect(1)
