"""Promotion under load, one place: the two bundles, the real stack, the load, the proof.

Shared by `benchmarks/swap_under_load.py` (the figures) and
`tests/serving/test_swap_under_load.py` (the assertions), so both measure the same thing.

- **Two distinguishable bundles, no second training.** The old bundle is a trained rails
  bundle copied as is; the new one is the same bundle with another rule set (one pin of a
  popular item in slot 1 of every rail) and its own manifest version, re-hashed by
  `railtower.manifest.Manifest.write`, so serving verifies it like any bundle. Their answers
  differ on every request whose list the pin changes, which is what makes a mixed response
  visible. Both carry the same evaluation record, so the NDCG gate passes (a tie).
- **The real stack** (benchmarks/live_stack.py): Redis, tritonserver and the API under
  uvicorn as its own process, settings through `RAILTOWER_…` variables. The API follows
  the production pointer; `POST /v1/admin/promote` and `POST /v1/admin/rollback` (with the
  X-API-Key) move it.
- **Load.** A few closed-loop clients, each sending its next request when the last one
  answers, over a fixed pool of requests (homepage_hero, pdp_fbt, cart_upsell on sessions
  seeded in Redis). Every reply is kept: status, model_version, items, start and end time.
- **Proof.** Each version's own pipeline is run offline (in this process, the bundle
  loaded as serving loads it) on every request of the pool; every 2xx reply must name one
  of the two versions and list exactly that version's offline items. A reply that mixed the
  two models would match neither.

One module on purpose: the bundles, the stack, the load and the proof are one harness
shared by a benchmark and a test, which must measure exactly the same thing.
"""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.live_stack import Stack, private_artifacts, wait_ready
from railtower.manifest import Manifest, now_iso
from railtower.production import pointer_path
from railtower.settings import ExclusionSettings, Settings
from ranking.rails_bundle import RULES
from ranking.rule_set import RuleSet
from serving.api_models import RailRequest
from serving.rail_service import LoadedRails, load_rails
from serving.stages import build_query
from state.session_store import SessionSnapshot, SessionStore
from towers.session_features import HistoryEvent
from training.promotion import promote

SWAP_RAILS = ("homepage_hero", "pdp_fbt", "cart_upsell")
PIN_SLOT = 1
# After the API reports the new version, the swap window stays open this long: replies to
# requests that were in flight, and the first requests on a model just loaded, belong to it.
SETTLE_S = 2.0


# ------------------------------------------------------------------------------ bundles


@dataclass(frozen=True)
class SwapBundles:
    """The artifacts folder the API serves from, and the two bundles inside it."""

    artifacts: Path
    old: Path
    new: Path
    old_version: str
    new_version: str
    pin_item: str


def derive_bundle(source: Path, target: Path, version: str, rule_set: RuleSet | None) -> Path:
    """A copy of rails bundle `source` under its own manifest version (every file re-hashed),
    with `rule_set` replacing its rules (None: the same rules, so the same answers)."""
    shutil.copytree(source, target)
    if rule_set is not None:
        (target / RULES).write_text(rule_set.model_dump_json(indent=2))
    manifest = Manifest.load(source, verify=True)
    manifest.model_copy(update={"version": version, "created_at": now_iso()}).write(target)
    return target


def derive_pinned_bundle(source: Path, target: Path, version: str, pin_item: str) -> Path:
    """A copy of rails bundle `source` whose rule set pins `pin_item` in slot 1 of every
    swap rail, under its own manifest version."""
    rule_set = RuleSet.model_validate(
        {
            "name": "swap-check",
            "version": version,
            "rails": list(SWAP_RAILS),
            "rules": [
                {"kind": "pin", "item_id": pin_item, "slot": PIN_SLOT, "note": "swap marker"}
            ],
        }
    )
    return derive_bundle(source, target, version, rule_set)


def prepare_bundles(
    bundle: Path, source_artifacts: Path, root: Path, settings: Settings
) -> SwapBundles:
    """A private artifacts folder: the tower bundle (linked), the old bundle (copied, then
    promoted as production), the new bundle (derived). Nothing outside `root` changes.

    Raises:
        RuntimeError: the old bundle does not pass the gate as first production bundle.
    """
    artifacts, old = private_artifacts(bundle, source_artifacts, root)
    old_version = Manifest.load(old, verify=True).version
    loaded = load_rails(old, settings.model_copy(update={"artifacts_dir": artifacts}))
    pin_item = _pin_item(loaded)
    new_version = f"{old_version}-pinned"
    new = derive_pinned_bundle(old, artifacts / new_version, new_version, pin_item)
    pointer = pointer_path(artifacts, settings.promotion, settings.serving.dataset)
    decision = promote(old, pointer, settings.promotion, settings.seed)
    if not decision.promote:
        raise RuntimeError(f"{old.name} was refused as production: {decision.reasons}")
    return SwapBundles(artifacts, old, new, old_version, new_version, pin_item)


def _pin_item(loaded: LoadedRails) -> str:
    """The most popular item: the pin that changes the most lists."""
    stats = loaded.pipeline.stats
    return str(stats.item_ids[int(np.argmax(stats.popularity))])


# ------------------------------------------------------------------------------ requests


@dataclass(frozen=True)
class Probe:
    """One request of the pool and the session history Redis holds for it."""

    rail: str
    body: dict[str, Any]
    history: tuple[HistoryEvent, ...]


def build_probes(loaded: LoadedRails, sessions: int, avoid: str, seed: int = 0) -> list[Probe]:
    """Per session (2-5 popular items, never `avoid`): its hero, pdp and cart request."""
    rng = np.random.default_rng(seed)
    stats = loaded.pipeline.stats
    order = np.argsort(-stats.popularity)[:1500]
    ids = [str(i) for i in stats.item_ids[order] if str(i) != avoid]
    probes = []
    for n in range(sessions):
        picks = rng.choice(ids, size=int(rng.integers(2, 6)), replace=False)
        history = tuple(
            HistoryEvent(str(i), "view", 1569890000.0 + 30 * k) for k, i in enumerate(picks)
        )
        session = f"swap-{n}"
        probes += [
            Probe("homepage_hero", {"session_id": session}, history),
            Probe("pdp_fbt", {"session_id": session, "item_id": str(picks[-1])}, history),
            Probe("cart_upsell", {"session_id": session, "cart": [str(picks[0])]}, history),
        ]
    return probes


def seed_sessions(redis_url: str, probes: list[Probe]) -> None:
    store = SessionStore(redis_url, 2.0, 50, 3600, 3600)
    seeded = set()
    for probe in probes:
        session = probe.body["session_id"]
        if session not in seeded:
            events = [(f"{session}-{k}", e, None) for k, e in enumerate(probe.history)]
            store.append_events(session, events)
            seeded.add(session)


def offline_items(loaded: LoadedRails, probe: Probe) -> tuple[str, ...]:
    """What `loaded`'s own pipeline answers for `probe`, in this process: the query is
    built as the API builds it (serving.stages.build_query) from the same session events."""
    request = RailRequest(**probe.body)
    snapshot = SessionSnapshot(list(probe.history), None, "", None, None)
    anchor = request.item_id if probe.rail == "pdp_fbt" else None
    # the API under test runs with the default exclusions (live_stack sets none)
    parts = (anchor, tuple(dict.fromkeys(request.cart)))
    query = build_query(request, snapshot, parts, probe.rail, ExclusionSettings())
    ruled = loaded.pipeline.run(probe.rail, [query], stages=("rules",))["rules"][0]
    return tuple(c.item_id for c in ruled[: request.slots])


def references(
    versions: dict[str, LoadedRails], probes: list[Probe]
) -> dict[str, list[tuple[str, ...]]]:
    return {v: [offline_items(loaded, p) for p in probes] for v, loaded in versions.items()}


# ------------------------------------------------------------------------------ load


@dataclass(frozen=True)
class Reply:
    started: float  # time.perf_counter() of this process
    ended: float
    probe: int
    status: int | None  # None: no HTTP answer (connection error, timeout)
    version: str | None
    items: tuple[str, ...]
    degraded: bool
    error: str | None


class Load:
    """`clients` closed-loop clients over `probes`, each on its own thread and connection."""

    def __init__(self, base: str, probes: list[Probe], clients: int) -> None:
        self.base, self.probes, self.clients = base, probes, clients
        self._stop = threading.Event()
        self._replies: list[list[Reply]] = [[] for _ in range(clients)]
        self._threads = [
            threading.Thread(target=self._worker, args=(c,), daemon=True) for c in range(clients)
        ]

    def start(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> list[Reply]:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        return sorted((r for rs in self._replies for r in rs), key=lambda r: r.started)

    def _worker(self, client: int) -> None:
        out, k = self._replies[client], client
        with httpx.Client(base_url=self.base, timeout=30) as http:
            while not self._stop.is_set():
                index = k % len(self.probes)
                k += self.clients
                out.append(_send(http, index, self.probes[index]))


def _send(http: httpx.Client, index: int, probe: Probe) -> Reply:
    started = time.perf_counter()
    try:
        reply = http.post(f"/v1/rails/{probe.rail}", json=probe.body)
    except httpx.HTTPError as exc:
        return Reply(started, time.perf_counter(), index, None, None, (), False, repr(exc))
    ended = time.perf_counter()
    if reply.status_code != 200:
        return Reply(started, ended, index, reply.status_code, None, (), False, reply.text[:300])
    body = reply.json()
    items = tuple(i["item_id"] for i in body["items"])
    return Reply(
        started, ended, index, 200, body["model_version"], items, bool(body["reasons"]), None
    )


# ------------------------------------------------------------------------------ switches


@dataclass(frozen=True)
class Switch:
    """One production switch: the admin call and when the API first reported the version."""

    action: str  # promote | rollback
    to_version: str
    called: float
    answered: float
    served: float
    answer: dict[str, Any]


def switch(stack: Stack, action: str, payload: dict[str, Any], to_version: str) -> Switch:
    """Call the admin route, then wait until /readyz names `to_version`.

    Raises:
        RuntimeError: the route refused, or the API never served the version.
    """
    called = time.perf_counter()
    reply = httpx.post(
        f"{stack.base}/v1/admin/{action}",
        json=payload,
        headers={"X-API-Key": stack.admin_key},
        timeout=300,
    )
    answered = time.perf_counter()
    if reply.status_code != 200:
        raise RuntimeError(f"{action} answered {reply.status_code}: {reply.text[:1000]}")
    deadline = time.monotonic() + 120
    while wait_ready(stack.base, 60)["model_version"] != to_version:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the API still does not serve {to_version} after {action}")
        time.sleep(0.05)
    return Switch(action, to_version, called, answered, time.perf_counter(), reply.json())


@dataclass
class SwapRun:
    replies: list[Reply]
    switches: list[Switch]
    started: float
    ended: float


def run_swap(
    stack: Stack, bundles: SwapBundles, probes: list[Probe], clients: int, phase_s: float
) -> SwapRun:
    """Load for `phase_s`, promote the new bundle, load `phase_s`, roll back, load `phase_s`.

    Every request is sent once first, unrecorded, so "before" is the old model in its
    steady state (hero rails cached) rather than its cold start."""
    with httpx.Client(base_url=stack.base, timeout=60) as http:
        for index, probe in enumerate(probes):
            _send(http, index, probe)
    load = Load(stack.base, probes, clients)
    started = time.perf_counter()
    load.start()
    switches = []
    try:
        time.sleep(phase_s)
        payload = {"bundle": bundles.new.name}
        switches.append(switch(stack, "promote", payload, bundles.new_version))
        time.sleep(phase_s)
        payload = {"reason": "swap-under-load check: back to the old bundle"}
        switches.append(switch(stack, "rollback", payload, bundles.old_version))
        time.sleep(phase_s)
    finally:
        replies = load.stop()
    return SwapRun(replies, switches, started, time.perf_counter())


# ------------------------------------------------------------------------------ proof


@dataclass
class Verdict:
    """What the replies prove; every list holds offending replies (empty: proved)."""

    replies: int
    failed: list[Reply]
    unknown_version: list[Reply]
    mismatched: list[Reply]
    # after a switch was served and before the next call: replies of another version
    stale: list[Reply]
    degraded: int
    distinguishable_probes: int
    checked_in_windows: int
    versions: dict[str, int]


def verify(run: SwapRun, refs: dict[str, list[tuple[str, ...]]]) -> Verdict:
    """Every reply against the offline answer of the version it names."""
    ok = [r for r in run.replies if r.status == 200]
    known = [r for r in ok if r.version in refs]
    old, new = list(refs)
    distinguishable = sum(a != b for a, b in zip(refs[old], refs[new], strict=True))
    versions: dict[str, int] = {}
    for reply in ok:
        versions[str(reply.version)] = versions.get(str(reply.version), 0) + 1
    return Verdict(
        replies=len(run.replies),
        failed=[r for r in run.replies if r.status is None or not 200 <= r.status < 300],
        unknown_version=[r for r in ok if r.version not in refs],
        mismatched=[r for r in known if r.items != refs[str(r.version)][r.probe]],
        stale=_stale(run),
        degraded=sum(r.degraded for r in ok),
        distinguishable_probes=distinguishable,
        checked_in_windows=sum(1 for r in known if _phase(r, run.switches).endswith("window")),
        versions=versions,
    )


def _stale(run: SwapRun) -> list[Reply]:
    stale = []
    for n, sw in enumerate(run.switches):
        until = run.switches[n + 1].called if n + 1 < len(run.switches) else run.ended
        stale += [
            r
            for r in run.replies
            if r.status == 200 and sw.served < r.started < until and r.version != sw.to_version
        ]
    return stale


def _phase(reply: Reply, switches: list[Switch]) -> str:
    """before | <action> window | between | after, by when the request was sent."""
    names = ["before", "between", "after"]
    for n, sw in enumerate(switches):
        if reply.started < sw.called:
            return names[n] if n < len(names) else "after"
        if reply.started <= sw.served + SETTLE_S:
            return f"{sw.action} window"
    return names[min(len(switches), len(names) - 1)]


def phase_latencies(run: SwapRun) -> dict[str, dict[str, float]]:
    """p50 / p95 / p99 latency (ms), replies and failures per phase, in time order."""
    groups: dict[str, list[Reply]] = {}
    for reply in run.replies:
        groups.setdefault(_phase(reply, run.switches), []).append(reply)
    out = {}
    for name, replies in groups.items():
        ms = np.asarray([(r.ended - r.started) * 1000 for r in replies])
        seconds = max(max(r.ended for r in replies) - min(r.started for r in replies), 1e-9)
        out[name] = {
            "replies": len(replies),
            "failed": sum(r.status != 200 for r in replies),
            "rps": len(replies) / seconds,
            **{f"p{q}": float(np.percentile(ms, q)) for q in (50, 95, 99)},
        }
    return out
