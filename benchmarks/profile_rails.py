"""Where a computed rail's CPU goes in the API process: py-spy on the real served path.

Usage:
    python benchmarks/profile_rails.py --bundle artifacts/<run>-rees46-rails
    python benchmarks/profile_rails.py            # the production bundle of serving.dataset

Starts Redis and the API (shipped settings, sessions encoded in-process as served) on
loopback, seeds synthetic sessions, then drives a closed loop of pdp_fbt requests (never
cached; `--path cached`: homepage_hero requests whose rails were warmed first, so every
answer is a cache read) while py-spy samples the API process, counting only the thread
that holds the GIL (`--gil`): time in numpy, LightGBM or torch kernels that release it is
not counted, so the shares are of the interpreter's time, which is what bounds one process's
throughput. Writes
`reports/benchmarks/profile_rails.svg` (a flame graph to open in a browser),
`profile_rails.json` (inclusive and self shares per frame) and `profile_rails.md` (the top
frames beside the load the profile was taken under); `--path cached` writes
`profile_rails_cached.*`. Compare two commits by running it on
each: the markdown names the commit.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.rails_api import (
    closed_loop,
    command_line,
    git_revision,
    single_api,
    synthetic_sessions,
    warm_cache,
)
from benchmarks.report import OUT, write_report
from railtower.settings import load_settings
from serving.app import production_pointer
from serving.rail_service import load_rails

_SITE = re.compile(r" \(.*?site-packages/")
_LINE = re.compile(r":\d+\)$")


def frame_shares(collapsed: str, top: int = 30) -> dict[str, Any]:
    """Inclusive and self share of samples per frame from py-spy's collapsed stacks
    ("frame;frame;... count" per line), line numbers dropped so a function is one row."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_LINE.sub(")", _SITE.sub(" (", f)) for f in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] += n
        own[frames[-1]] += n

    def share(counter: Counter[str]) -> list[dict[str, Any]]:
        return [{"frame": f, "share": n / max(total, 1)} for f, n in counter.most_common(top)]

    return {"samples": total, "inclusive": share(inclusive), "self": share(own)}


def record(pid: int, seconds: float, rate: int, out: Path, form: str) -> subprocess.Popen:
    """py-spy sampling `pid` for `seconds` into `out` (format flamegraph or raw)."""
    command = ["py-spy", "record", "--gil", "--nonblocking", "-p", str(pid)]
    command += ["-d", str(int(seconds)), "-r", str(rate), "-f", form, "-o", str(out)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--seconds", type=float, default=15.0, help="profiled load")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--path", choices=["computed", "cached"], default="computed")
    args = parser.parse_args()
    name = "profile_rails" if args.path == "computed" else "profile_rails_cached"
    settings = load_settings(log_level="WARNING")
    bundle = (args.bundle or production_pointer(settings)).resolve()
    loaded = load_rails(bundle, settings)
    sessions = synthetic_sessions(loaded, 300)
    work = settings.cache_dir / "bench-profile"
    OUT.mkdir(parents=True, exist_ok=True)
    with single_api(bundle, work, sessions, "p") as api:
        base = api.base
        bodies = [
            ("pdp_fbt", {"session_id": f"p{n}", "item_id": h[-1].item_id})
            for n, h in enumerate(sessions)
        ]
        if args.path == "cached":
            bodies = [("homepage_hero", {"session_id": f"p{n}"}) for n in range(len(sessions))]
            asyncio.run(warm_cache(base, bodies, 60.0))
        asyncio.run(closed_loop(base, bodies, args.concurrency, 3.0))  # warm the process
        raw, svg = work / "profile.txt", OUT / f"{name}.svg"
        spies = [
            record(api.server.process.pid, args.seconds, args.rate, raw, "raw"),
            record(api.server.process.pid, args.seconds, args.rate, svg, "flamegraph"),
        ]
        load = asyncio.run(closed_loop(base, bodies, args.concurrency, args.seconds))
        for spy in spies:
            _, err = spy.communicate(timeout=args.seconds + 60)
            if spy.returncode != 0:
                raise RuntimeError(f"py-spy failed: {err.decode()[-500:]}")
        result = {
            "path": args.path,
            "bundle": loaded.version,
            "commit": git_revision(),
            "command": command_line(),
            "load": load,
            "profile": frame_shares(raw.read_text()),
        }
    write_report(name, result, markdown(result))


def markdown(r: dict[str, Any]) -> str:
    load, profile = r["load"], r["profile"]
    what = "homepage_hero from the cache" if r.get("path") == "cached" else "pdp_fbt computed"
    lines = [
        f"# Where the API's interpreter time goes ({r['bundle']})",
        "",
        f"Commit `{r['commit']}`; command `{r['command']}`. {what}, closed loop at "
        f"concurrency {load['concurrency']}: {load['throughput_rps']:.0f} req/s, p50 "
        f"{load['p50']:.1f} ms while profiled (py-spy slows the process). "
        f"{profile['samples']} samples with the GIL held; flame graph beside this file (.svg).",
        "",
        "| frame (inclusive) | share | | frame (self) | share |",
        "|---|---|---|---|---|",
    ]
    for a, b in zip(profile["inclusive"], profile["self"], strict=False):
        lines.append(
            f"| {a['frame'][:90]} | {a['share']:.1%} | | {b['frame'][:90]} | {b['share']:.1%} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
