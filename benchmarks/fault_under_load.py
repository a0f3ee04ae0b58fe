"""Faults under load: Redis, tritonserver, the broker and the refresh consumer SIGKILLed
and restarted while clients ask for every rail and events stream in, and what the shoppers
saw and what became of every event in each phase.

Usage:
    python benchmarks/fault_under_load.py --bundle artifacts/<run>-rees46-rails

The real stack on loopback (benchmarks.live_stack: Redis with its append-only file,
tritonserver when the bundle has towers, the API as its own process) and the event side
(benchmarks.fault_stream: a Kafka-protocol broker, one `railtower consume` process and a
producer at `--events-per-s`). Closed-loop clients send homepage, product-page and cart
requests for seeded sessions without pause while the phases run one after another:

1. steady: nothing is wrong;
2. redis killed: Redis gets SIGKILL, stays down `down_s`, and starts again on its port from
   its append-only file;
3. triton killed: tritonserver gets SIGKILL and starts again after `down_s`;
4. broker killed: the broker gets SIGKILL; an empty one starts on its port after `down_s`;
5. consumer killed: the consumer gets SIGKILL mid-batch; a new member joins after `down_s`;
6. recovered: nothing is wrong again.

Per phase: requests, 5xx, transport errors, empty rails, the degraded share (answers carrying
a reason), p99 and how the rails were served; events sent, acknowledged, applied and lost.
After the Redis restart every seeded session's events are read back (the sessions lost to
the crash are counted); after the last phase every event is accounted for (applied,
duplicated, lost, and why). Writes `reports/benchmarks/fault_under_load.json` and `.md`;
tests/serving/test_fault_under_load.py runs it briefly in CI.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.fault_stream import EventStream
from benchmarks.live_stack import Stack, private_artifacts, start_stack
from benchmarks.report import write_report
from devstack.local_services import LocalServer
from railtower.settings import Settings, load_settings
from state.session_store import SessionStore
from towers.session_features import HistoryEvent

PHASES = (
    "steady",
    "redis killed",
    "triton killed",
    "broker killed",
    "consumer killed",
    "recovered",
)


@dataclass
class Reply:
    phase: str
    status: int  # 0: no HTTP answer at all
    empty: bool
    degraded: bool
    served_by: str
    seconds: float
    reasons: tuple[str, ...] = ()
    into_phase_s: float = 0.0  # when it was sent, counted from its phase's start


@dataclass
class FaultRun:
    replies: list[Reply] = field(default_factory=list)
    sessions_seeded: int = 0
    sessions_lost: int = 0
    phases: list[str] = field(default_factory=list)
    events: dict[str, Any] = field(default_factory=dict)  # fault_stream's accounting
    phase_starts: dict[str, float] = field(default_factory=dict)  # wall clock

    def table(self) -> list[dict[str, Any]]:
        rows = []
        for phase in self.phases:
            mine = [r for r in self.replies if r.phase == phase]
            answered = [r for r in mine if r.status == 200]
            latency = [r.seconds * 1000 for r in mine if r.status]
            rows.append(
                {
                    "phase": phase,
                    "requests": len(mine),
                    "server_errors": sum(r.status >= 500 for r in mine),
                    "other_errors": sum(0 < r.status < 500 and r.status != 200 for r in mine),
                    "transport_errors": sum(r.status == 0 for r in mine),
                    "empty": sum(r.empty for r in answered),
                    "degraded_share": sum(r.degraded for r in answered) / max(len(answered), 1),
                    "p99_ms": float(np.percentile(latency, 99)) if latency else float("nan"),
                    "served_by": dict(Counter(r.served_by for r in answered)),
                    # each reason's words before its first parenthesis, so causes group
                    "reasons": dict(Counter(x.split(" (")[0] for r in answered for x in r.reasons)),
                    "last_degraded_s": max(
                        (r.into_phase_s for r in answered if r.degraded), default=None
                    ),
                }
            )
        return rows


def seed(redis_url: str, items: list[str], sessions: int) -> list[str]:
    """`sessions` sessions of three views each, written as the consumer writes them."""
    store = SessionStore(redis_url, 2.0, 50, 3600, 300)
    names = []
    for n in range(sessions):
        history = [
            (f"f{n}-{k}", HistoryEvent(items[(7 * n + k) % len(items)], "view", 1e9 + k), None)
            for k in range(3)
        ]
        store.append_events(f"fault-{n}", history)
        names.append(f"fault-{n}")
    return names


def lost_sessions(redis_url: str, sessions: list[str]) -> int:
    store = SessionStore(redis_url, 2.0, 50, 3600, 300)
    return sum(len(store.snapshot(s, "any", None).events) != 3 for s in sessions)


def requests_for(sessions: list[str], items: list[str]) -> list[tuple[str, dict[str, Any]]]:
    bodies: list[tuple[str, dict[str, Any]]] = []
    for n, session in enumerate(sessions):
        item = items[(11 * n) % len(items)]
        bodies += [
            ("homepage_hero", {"session_id": session}),
            ("pdp_fbt", {"session_id": session, "item_id": item}),
            ("cart_upsell", {"session_id": session, "cart": [item]}),
        ]
    return bodies


def run_faults(
    stack: Stack,
    items: list[str],
    clients: int = 3,
    phase_s: float = 6.0,
    down_s: float = 2.0,
    sessions: int = 30,
    stream: EventStream | None = None,
) -> FaultRun:
    """The phases against a started stack; returns every reply and the sessions lost.

    With `stream` (started: broker, consumer, producer) the broker and the consumer are
    killed too, and every event it produced is accounted for at the end; without it those
    phases are left out."""
    run = FaultRun(phases=list(PHASES))
    names = seed(stack.redis_url, items, sessions)
    run.sessions_seeded = len(names)
    time.sleep(1.5)  # past the append-only file's once-a-second fsync
    bodies = requests_for(names, items)
    phase = [PHASES[0]]
    began = [time.perf_counter()]  # when the current phase began
    run.phase_starts[PHASES[0]] = time.time()

    def enter(name: str) -> None:
        phase[0], began[0] = name, time.perf_counter()
        run.phase_starts[name] = time.time()

    stop = threading.Event()
    lock = threading.Lock()

    def client(offset: int) -> None:
        k = offset
        with httpx.Client(base_url=stack.base, timeout=10) as http:
            while not stop.is_set():
                rail, body = bodies[k % len(bodies)]
                k += clients
                now, started = phase[0], time.perf_counter()
                into = started - began[0]
                try:
                    reply = http.post(f"/v1/rails/{rail}", json=body)
                except httpx.HTTPError:
                    seconds = time.perf_counter() - started
                    record = Reply(now, 0, True, True, "none", seconds, (), into)
                else:
                    data = reply.json() if reply.status_code == 200 else {}
                    record = Reply(
                        now,
                        reply.status_code,
                        not data.get("items"),
                        bool(data.get("reasons")),
                        str(data.get("served_by", "none")),
                        time.perf_counter() - started,
                        tuple(str(x) for x in data.get("reasons") or ()),
                        into,
                    )
                with lock:
                    run.replies.append(record)

    workers = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for worker in workers:
        worker.start()
    try:
        time.sleep(phase_s)
        enter(PHASES[1])
        redis = _server(stack, "redis")
        if stream is not None:
            stream.mark_redis_kill()
        redis.kill()
        time.sleep(down_s)
        redis.start()
        time.sleep(max(phase_s - down_s, 0.0))
        run.sessions_lost = lost_sessions(stack.redis_url, names)
        triton = _server(stack, "triton")
        if triton is not None:
            enter(PHASES[2])
            triton.kill()
            time.sleep(down_s)
            triton.start()
            time.sleep(max(phase_s - down_s, 0.0))
        else:
            run.phases.remove(PHASES[2])
        if stream is not None:
            enter(PHASES[3])
            stream.kill_broker(down_s)
            time.sleep(max(phase_s - down_s, 0.0))
            enter(PHASES[4])
            stream.kill_consumer(down_s)
            time.sleep(max(phase_s - down_s, 0.0))
        else:
            run.phases.remove(PHASES[3])
            run.phases.remove(PHASES[4])
        enter(PHASES[5])
        time.sleep(phase_s)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=15)
    if stream is not None:
        run.events = stream.finish()
        run.events["per_phase"] = stream.per_phase(run.phase_starts)
    return run


def _server(stack: Stack, name: str) -> LocalServer | None:
    return next((s for s in stack.servers if s.name.startswith(name)), None)


def markdown(run: FaultRun, bundle: str) -> str:
    lines = [
        f"# Faults under load ({bundle})",
        "",
        f"Sessions seeded before the Redis kill: {run.sessions_seeded}; lost after its "
        f"restart: {run.sessions_lost}.",
        "",
        "| phase | requests | 5xx | other 4xx/5xx | transport errors | empty rails | degraded "
        "| p99 ms | served by |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in run.table():
        served = ", ".join(f"{k} {v}" for k, v in sorted(row["served_by"].items()))
        lines.append(
            f"| {row['phase']} | {row['requests']} | {row['server_errors']} | "
            f"{row['other_errors']} | {row['transport_errors']} | {row['empty']} | "
            f"{row['degraded_share']:.1%} | {row['p99_ms']:.0f} | {served} |"
        )
    lines += events_markdown(run.events)
    lines += ["", "Reasons on the answers, per phase (last degraded answer, seconds into it):", ""]
    for row in run.table():
        reasons = "; ".join(f"{k}: {v}" for k, v in sorted(row["reasons"].items())) or "none"
        last = row["last_degraded_s"]
        lines.append(
            f"- {row['phase']}: {reasons}" + ("" if last is None else f" (last at {last:.1f} s)")
        )
    return "\n".join(lines) + "\n"


def events_markdown(events: dict[str, Any]) -> list[str]:
    """The event side's accounting (benchmarks.fault_stream), or nothing without it."""
    if not events:
        return []
    lines = [
        "",
        "Events through the broker and the consumer, by the phase they were sent in:",
        "",
        "| phase | sent | acknowledged by the broker | applied | lost |",
        "|---|---|---|---|---|",
    ]
    for row in events["per_phase"]:
        lines.append(
            f"| {row['phase']} | {row['sent']} | {row['acknowledged']} | {row['applied']} | "
            f"{row['lost']} |"
        )
    recovery = ", ".join(
        f"{kind} {'never' if s is None else f'{s:.1f} s'}"
        for kind, s in events["recovery_s"].items()
    )
    exits = [code for code in events["consumer_exits"] if code not in (None, -9, 0)]
    lines += [
        "",
        f"Produced {events['produced']}: acknowledged {events['acknowledged']}, refused to "
        f"the producer {events['refused_to_producer']}, unanswered {events['unanswered']}; "
        f"applied {events['applied']}, read again and skipped {events['redelivered']}, "
        f"duplicated {events['duplicated']}, lost "
        f"{events['lost']} (with the broker's memory {events['lost_with_broker_memory']}, "
        f"with Redis's last second {events['lost_with_redis_last_second']}, other "
        f"{events['lost_other']}). First batch applied after each restart: {recovery}. "
        f"Consumers that exited by themselves: {len(exits)}.",
    ]
    return lines


def catalogue_items(bundle: Path, settings: Settings) -> list[str]:
    from serving.rail_service import load_rails  # noqa: PLC0415 - loads the models

    loaded = load_rails(bundle, settings)
    order = np.argsort(-loaded.pipeline.stats.popularity, kind="stable")
    return [str(i) for i in loaded.pipeline.stats.item_ids[order[:500]]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--phase-seconds", type=float, default=10.0)
    parser.add_argument("--down-seconds", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument(
        "--events-per-s", type=float, default=20.0, help="0: no broker, consumer or events"
    )
    args = parser.parse_args()
    settings = load_settings(log_level="WARNING")
    bundle = args.bundle.resolve()
    items = catalogue_items(bundle, settings)
    root = settings.cache_dir / "bench-faults"
    if root.exists():
        import shutil  # noqa: PLC0415

        shutil.rmtree(root)
    artifacts, copy = private_artifacts(bundle, settings.artifacts_dir, root)
    stack = start_stack(artifacts, settings.serving.triton_repository, root / "work", copy)
    stream = None
    try:
        if args.events_per_s > 0:
            local = settings.model_copy(update={"artifacts_dir": artifacts})
            stream = EventStream(local, copy, stack.redis_url, root / "stream", items)
            stream.rate_per_s = args.events_per_s
            stream.start()
        run = run_faults(
            stack, items, args.clients, args.phase_seconds, args.down_seconds, stream=stream
        )
    finally:
        if stream is not None:
            stream.stop()
        stack.stop()
    result = {
        "bundle": bundle.name,
        "phases": run.table(),
        "sessions_seeded": run.sessions_seeded,
        "sessions_lost": run.sessions_lost,
        "events": run.events,
        "replies": [asdict(r) for r in run.replies],
    }
    write_report("fault_under_load", result, markdown(run, bundle.name))


if __name__ == "__main__":
    main()
