"""A local consumer group: several `railtower consume` processes, started, watched and stopped
by PID, for the scale-out test and benchmark (and to try a group by hand).

Each member is its own OS process running the command a deployment runs, with its own member
id and ledger (streaming.consumer.MemberLedger); settings reach it through `RAILTOWER_...`
environment variables like any railtower process. The ledger is how the parent knows what a
member holds and did, including one that was killed: it needs nothing from the member's
memory. CPU time comes from /proc, so the benchmark can say which process is the bottleneck.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from railtower.settings import PROJECT_ROOT, Settings, StreamingSettings
from streaming.consumer import read_ledger

_TICKS = os.sysconf("SC_CLK_TCK")


def consumer_env(
    settings: Settings,
    streaming: StreamingSettings,
    bundle: Path,
    redis_url: str,
    session_events: int = 50,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a member: the topics and group, the model it pre-warms with (and
    the artifacts folder its tower bundle is found in) and Redis; session vectors
    in-process (no Triton), budgets far above any stage (a busy machine must not turn a slow
    Redis call into a failed batch)."""
    env = {
        "RAILTOWER_ARTIFACTS_DIR": str(settings.artifacts_dir),
        "RAILTOWER_STREAMING__BOOTSTRAP_SERVERS": streaming.bootstrap_servers,
        "RAILTOWER_STREAMING__EVENTS_TOPIC": streaming.events_topic,
        "RAILTOWER_STREAMING__CATALOGUE_TOPIC": streaming.catalogue_topic,
        "RAILTOWER_STREAMING__DEAD_LETTER_TOPIC": streaming.dead_letter_topic,
        "RAILTOWER_STREAMING__IMPRESSIONS_TOPIC": streaming.impressions_topic,
        "RAILTOWER_STREAMING__GROUP_ID": streaming.group_id,
        "RAILTOWER_STREAMING__PARTITIONS": str(streaming.partitions),
        "RAILTOWER_STREAMING__MAX_BATCH": str(streaming.max_batch),
        "RAILTOWER_SERVING__BUNDLE": str(bundle),
        "RAILTOWER_SERVING__REDIS_URL": redis_url,
        "RAILTOWER_SERVING__TRITON_URL": "",
        "RAILTOWER_SERVING__SESSION_EVENTS": str(session_events),
        "RAILTOWER_SERVING__BUDGETS__REDIS_MS": "5000",
        "RAILTOWER_SERVING__BUDGETS__USER_VECTOR_MS": "10000",
        "RAILTOWER_SERVING__BUDGETS__RANKER_MS": "10000",
        "RAILTOWER_SHADOW__SINK": "memory",
        "RAILTOWER_LOG_LEVEL": "INFO",
    }
    return {**env, **(extra or {})}


@dataclass
class Member:
    """One `railtower consume` process of the group."""

    member_id: str
    ledger: Path
    log: Path
    process: subprocess.Popen  # type: ignore[type-arg]

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def lines(self, kind: str | None = None) -> list[dict[str, Any]]:
        lines = read_ledger(self.ledger) if self.ledger.exists() else []
        return [x for x in lines if kind is None or x["kind"] == kind]

    def partitions(self, topic: str) -> set[int]:
        """The partitions of `topic` this member holds now, by its ledger (a revocation
        empties the set until the next assignment)."""
        held: set[int] = set()
        for line in self.lines():
            if line["kind"] in ("assigned", "revoked"):
                held = set() if line["kind"] == "revoked" else _of_topic(line["partitions"], topic)
        return held

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.process.pid)

    def runqueue_seconds(self) -> float:
        return runqueue_seconds(self.process.pid)

    def kill(self) -> None:
        """SIGKILL: no batch finished, nothing committed, no goodbye to the group."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM (finish the batch, commit, leave the group); the exit code."""
        if self.alive:
            self.process.send_signal(signal.SIGTERM)
        try:
            return int(self.process.wait(timeout=timeout_s))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            return -9


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far, from /proc (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime (after the name)


def runqueue_seconds(pid: int) -> float:
    """Seconds the process's live threads were runnable but waited for a core (schedstat):
    high means too few cores for what runs on the machine, not a slow part."""
    total = 0.0
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            total += int(stat.read_text().split()[1]) / 1e9
        except (FileNotFoundError, IndexError, ValueError):
            continue  # the thread ended while we read
    return total


def _of_topic(names: Iterable[str], topic: str) -> set[int]:
    return {int(n.rsplit(":", 1)[1]) for n in names if n.rsplit(":", 1)[0] == topic}


def start_members(
    count: int, env: Mapping[str, str], workdir: Path, prefix: str = "member"
) -> list[Member]:
    """Start `count` members (`<prefix>-1` ...), each logging to `workdir/<id>.log`.

    A member's ledger is appended to across its own restarts, so one left in `workdir` by
    an earlier group of the same name is removed first: the ledgers describe this group only.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    members = []
    for k in range(1, count + 1):
        member_id = f"{prefix}-{k}"
        ledger, log = workdir / f"{member_id}.jsonl", workdir / f"{member_id}.log"
        ledger.unlink(missing_ok=True)
        command = [sys.executable, "-m", "railtower.cli", "consume"]
        command += ["--member-id", member_id, "--ledger", str(ledger)]
        with log.open("ab") as out:
            process = subprocess.Popen(
                command,
                cwd=PROJECT_ROOT,
                env={**os.environ, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a signal to the member never reaches its parent
            )
        members.append(Member(member_id, ledger, log, process))
    return members


def wait_for_assignment(
    members: Sequence[Member], topic: str, partitions: int, timeout_s: float
) -> dict[str, set[int]]:
    """Wait until the members' partitions of `topic` split all of them, each held once.

    Raises:
        RuntimeError: a member exited, or the split did not happen in time (with each
            member's holding and the tail of its log).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        held = {m.member_id: m.partitions(topic) for m in members}
        union = [p for ps in held.values() for p in ps]
        if sorted(union) == list(range(partitions)) and all(held.values()):
            return held
        dead = [m for m in members if not m.alive]
        if dead or time.monotonic() > deadline:
            why = f"{dead[0].member_id} exited" if dead else f"no split after {timeout_s} s"
            tails = "\n".join(f"{m.member_id}: {_tail(m.log)}" for m in members)
            raise RuntimeError(f"consumer group on {topic}: {why}; held {held}\n{tails}")
        time.sleep(0.2)


def applied_events(members: Iterable[Member]) -> int:
    """Events the group applied (new to Redis), by every member's ledger."""
    return sum(x["new_events"] for m in members for x in m.lines("applied"))


def _tail(log: Path, lines: int = 8) -> str:
    if not log.exists():
        return ""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
