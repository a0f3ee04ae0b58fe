"""Capacity model: what a shop of a given size needs, computed from the measured benchmarks.

Usage:
    python scripts/capacity_model.py                       # preset shops -> capacity.md
    python scripts/capacity_model.py --sessions-per-day 500000 --peak-events-per-s 2000 \
        --items 300000                                     # adds a "custom" column
    python scripts/capacity_model.py --readme              # also fills README.md's block

Every figure is a measured rate or size from a JSON file under reports/benchmarks/, scaled by
the shop's load; the "source" column names the file and the field. A file that is missing, or
holds no field the model can use, gives "not measured", never a guess. Fits beyond the
measured range (HNSW at 10M items) are marked as extrapolations.

The benchmark files are written by other scripts whose schemas still move, so they are read
tolerantly: a rate "by" some count (consumers, workers, instances) is any object in the tree
holding that count and one of the rate fields, the count possibly inherited from an enclosing
object. The per-unit rate is taken at the smallest measured count (one process, on its own
core); sizing assumes units scale out linearly across machines and runs each at `--headroom`
of its measured rate. Partitions are a rule, not a measurement: twice the consumers (room to
grow the group without repartitioning), at least six.

One module on purpose: one script, read top to bottom: tolerant readers of the benchmark
files, the sizing arithmetic and the table they fill.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "reports" / "benchmarks"
START, END = "<!-- capacity:start -->", "<!-- capacity:end -->"
NOT_MEASURED = "not measured"
MIN_PARTITIONS = 6
# settings a rate was measured under, named beside it in the source column
SETTING_KEYS = ("batch", "max_queue_delay_us", "concurrency", "threads")


@dataclass(frozen=True)
class Shop:
    name: str
    sessions_per_day: int
    peak_events_per_s: float
    items: int


PRESETS = (
    Shop("small", 20_000, 50, 20_000),
    Shop("medium", 500_000, 1_000, 300_000),
    Shop("large", 5_000_000, 10_000, 3_000_000),
)


@dataclass(frozen=True)
class Assumptions:
    # every event refreshes one user vector (the refresh consumer calls the user tower)
    tower_calls_per_event: float = 1.0
    # rail requests per event at peak (a page view asks for one rail)
    rail_requests_per_event: float = 1.0
    # share of its measured rate each unit is run at
    headroom: float = 0.7
    # session state and vector time to live (serving.state_ttl_s) and pre-warmed rails'
    state_ttl_s: int = 86_400
    prewarm_ttl_s: int = 300


@dataclass(frozen=True)
class Measured:
    """One measured figure and where it came from."""

    value: float
    source: str
    note: str = ""


@dataclass(frozen=True)
class Rate:
    """A rate per unit (events/s per consumer, ...), measured at `by` units."""

    per_unit: float
    by: float
    source: str
    # the p99 latency measured with that rate (same object), where the file has one
    p99_ms: Measured | None = None


# ------------------------------------------------------------------ reading the JSON files


def load(folder: Path, name: str) -> Any | None:
    """The parsed file, or None when it is absent or unreadable (a benchmark still running)."""
    path = folder / name
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def walk(node: Any, path: str = "", context: dict[str, float] | None = None) -> Iterator:
    """(path, object, context) for every object in the tree; context = numbers of ancestors."""
    context = context or {}
    if isinstance(node, dict):
        here = {**context, **{k: v for k, v in node.items() if _number(v)}}
        yield path, node, here
        for key, value in node.items():
            yield from walk(value, f"{path}.{key}" if path else str(key), here)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]", context)


# A measured rate counts as capacity only while at most this share of answers was degraded.
MAX_DEGRADED_SHARE = 0.05


def rate_by(tree: Any, file: str, by_keys: Sequence[str], rate_keys: Sequence[str]) -> Rate | None:
    """The best rate per unit at the smallest measured unit count, or None (rows with more
    than MAX_DEGRADED_SHARE degraded answers left out).

    At that count several settings may have been measured (batch sizes, delays): the best
    one is what a deployment would pick.
    """
    found: list[tuple[float, float, str, str, Measured | None]] = []
    for path, node, context in walk(tree):
        unit = next((k for k in by_keys if k in context and context[k] > 0), None)
        key = next((k for k in rate_keys if _number(node.get(k))), None)
        # a rate served mostly degraded (the budgets tripped) is not capacity
        degraded = node.get("degraded_share")
        if _number(degraded) and degraded > MAX_DEGRADED_SHARE:
            continue
        if unit is not None and key is not None and node[key] > 0:
            where = f"{path}.{key}" if path else key
            at = ", ".join(f"{k}={context[k]:g}" for k in SETTING_KEYS if k in context)
            where += f" ({unit}={context[unit]:g}{', ' + at if at else ''})"
            found.append((context[unit], float(node[key]), where, unit, _p99(node, file, path)))
    if not found:
        return None
    smallest = min(f[0] for f in found)
    by, value, where, unit, p99 = max((f for f in found if f[0] == smallest), key=lambda f: f[1])
    return Rate(value / by, by, f"{file}: {where}", p99)


def _p99(node: dict[str, Any], file: str, path: str) -> Measured | None:
    prefix = f"{path}." if path else ""
    for key in ("p99_ms", "p99"):
        if _number(node.get(key)):
            return Measured(float(node[key]), f"{file}: {prefix}{key}")
    latency = node.get("latency_ms") or node.get("latency")
    if isinstance(latency, dict) and _number(latency.get("p99")):
        return Measured(float(latency["p99"]), f"{file}: {prefix}latency.p99")
    return None


def leaf(
    tree: Any, file: str, patterns: Sequence[Sequence[str]], avoid: Sequence[str] = ()
) -> Measured | None:
    """The first number whose path mentions every word of a pattern and none of `avoid`;
    patterns are tried in order, most specific first."""
    for must in patterns:
        for path, node, _ in walk(tree):
            for key, value in node.items():
                full = (f"{path}.{key}" if path else key).lower()
                if (
                    _number(value)
                    and all(w in full for w in must)
                    and not any(w in full for w in avoid)
                ):
                    return Measured(float(value), f"{file}: {path + '.' if path else ''}{key}")
    return None


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# ------------------------------------------------------------------ the model


@dataclass(frozen=True)
class Inputs:
    """The measurements the model scales; None where a file or field is missing."""

    consumer: Rate | None
    triton: Rate | None
    api: Rate | None
    api_p99_ms: Measured | None
    session_bytes: Measured | None
    vector_bytes: Measured | None
    rail_bytes: Measured | None
    hnsw: dict[str, Any] | None


def read_inputs(folder: Path) -> Inputs:
    consumer_group = load(folder, "consumer_group.json")
    consumer = rate_by(
        consumer_group,
        "consumer_group.json",
        ("consumers",),
        ("events_per_s", "throughput_per_s", "applied_per_s", "rate_per_s"),
    )
    if consumer is None:  # one process measured by the refresh-consumer benchmark
        consumer = _single_consumer(load(folder, "refresh_consumer.json"))
    redis = load(folder, "redis_memory.json")
    api = load(folder, "api_replicas.json")
    api_rate = rate_by(
        api,
        "api_replicas.json",
        ("workers", "replicas"),
        ("rails_per_s", "throughput_rps", "throughput_per_s", "requests_per_s", "rps"),
    )
    return Inputs(
        consumer=consumer,
        triton=rate_by(
            load(folder, "triton_instances.json"),
            "triton_instances.json",
            ("instances",),
            ("sessions_per_s", "vectors_per_s", "requests_per_s", "throughput_per_s"),
        ),
        api=api_rate,
        api_p99_ms=None if api_rate is None else api_rate.p99_ms,
        # the parts, never a total that already holds the vector and the rail
        session_bytes=leaf(
            redis,
            "redis_memory.json",
            [("session_state",), ("session", "byte")],
            ("vector", "rail", "total"),
        ),
        vector_bytes=leaf(redis, "redis_memory.json", [("vector", "byte")], ("rail", "total")),
        rail_bytes=leaf(redis, "redis_memory.json", [("rail", "byte")], ("vector", "total")),
        hnsw=load(folder, "ann_scale.json"),
    )


def _single_consumer(tree: Any) -> Rate | None:
    best = None
    for path, node, _ in walk(tree):
        value = node.get("throughput_per_s")
        if _number(value) and value > 0 and (best is None or value > best.per_unit):
            best = Rate(
                float(value), 1, f"refresh_consumer.json: {path}.throughput_per_s (1 process)"
            )
    return best


def units_needed(load_per_s: float, rate: Rate | None, headroom: float) -> int | None:
    """Units to carry `load_per_s` with each at `headroom` of its measured rate."""
    if rate is None:
        return None
    return max(1, math.ceil(load_per_s / (rate.per_unit * headroom)))


def hnsw_at(report: dict[str, Any] | None, n: int) -> tuple[Measured, Measured] | None:
    """(build seconds, index bytes) at n items: measured where n was, else the fitted law."""
    if not report or "fit" not in report:
        return None
    for row in report.get("results", []):
        if row.get("n") == n:
            where = f"ann_scale.json: results[n={n}]"
            return (
                Measured(row["build_s"], f"{where}.build_s"),
                Measured(row["index_file_bytes"], f"{where}.index_file_bytes"),
            )
    fit = report["fit"]
    fitted_on = "/".join(f"{m:,}" for m in fit.get("fitted_on", []))
    note = f"extrapolated from measured {fitted_on} items"
    seconds = fit["build_s"]["c"] * n ** fit["build_s"]["b"]
    size = fit["index_bytes"]["a"] + fit["index_bytes"]["per_item"] * n
    return (
        Measured(seconds, f"ann_scale.json: fit.build_s (c*n^{fit['build_s']['b']})", note),
        Measured(size, "ann_scale.json: fit.index_bytes (a + per_item*n)", note),
    )


def redis_bytes(shop: Shop, inputs: Inputs, a: Assumptions) -> Measured | None:
    """Live sessions x (state + vector) + pre-warmed rails; None without the per-key sizes."""
    if inputs.session_bytes is None or inputs.vector_bytes is None:
        return None
    live = shop.sessions_per_day * min(a.state_ttl_s, 86_400) / 86_400
    total = live * (inputs.session_bytes.value + inputs.vector_bytes.value)
    if inputs.rail_bytes is not None:
        # at most one session per event within the pre-warm TTL (an upper bound)
        warm = min(live, shop.peak_events_per_s * a.prewarm_ttl_s)
        total += warm * inputs.rail_bytes.value
    return Measured(total, "redis_memory.json: per session + per vector (+ per rail)")


# ------------------------------------------------------------------ the table


def capacity_rows(shops: Sequence[Shop], inputs: Inputs, a: Assumptions) -> list[list[str]]:
    """One row per figure: name, one cell per shop, source."""

    def row(name: str, cells: list[str], source: str) -> list[str]:
        return [name, *cells, source]

    consumers = [units_needed(s.peak_events_per_s, inputs.consumer, a.headroom) for s in shops]
    triton = [
        units_needed(s.peak_events_per_s * a.tower_calls_per_event, inputs.triton, a.headroom)
        for s in shops
    ]
    api = [
        units_needed(s.peak_events_per_s * a.rail_requests_per_event, inputs.api, a.headroom)
        for s in shops
    ]
    redis = [redis_bytes(s, inputs, a) for s in shops]
    hnsw = [hnsw_at(inputs.hnsw, s.items) for s in shops]
    rows = [
        row("sessions / day", [f"{s.sessions_per_day:,}" for s in shops], "input"),
        row("peak events / s", [f"{s.peak_events_per_s:,.0f}" for s in shops], "input"),
        row("items", [f"{s.items:,}" for s in shops], "input"),
        row("refresh consumers", _counts(consumers), _rate_source(inputs.consumer, "events/s")),
        row(
            "topic partitions",
            [NOT_MEASURED if c is None else str(max(MIN_PARTITIONS, 2 * c)) for c in consumers],
            f"rule: max({MIN_PARTITIONS}, 2 x consumers)",
        ),
        row(
            "Redis bytes / session",
            [_size(inputs.session_bytes, "B")] * len(shops),
            _source(inputs.session_bytes),
        ),
        row(
            "Redis bytes / vector",
            [_size(inputs.vector_bytes, "B")] * len(shops),
            _source(inputs.vector_bytes),
        ),
        row("Redis total", [_size(r, "MB") for r in redis], _source(next(iter(redis), None))),
        row(
            "HNSW index at K items",
            [NOT_MEASURED if h is None else _size(h[1], "MB") for h in hnsw],
            _hnsw_source(hnsw, 1),
        ),
        row(
            "HNSW build at K items",
            [NOT_MEASURED if h is None else f"{h[0].value / 60:.1f} min" for h in hnsw],
            _hnsw_source(hnsw, 0),
        ),
        row(
            "Triton user-tower instances", _counts(triton), _rate_source(inputs.triton, "vectors/s")
        ),
        row("API workers", _counts(api), _rate_source(inputs.api, "rails/s")),
    ]
    if inputs.api_p99_ms is not None:
        rows.append(
            row(
                "API p99 at the measured rate",
                [f"{inputs.api_p99_ms.value:.0f} ms"] * len(shops),
                inputs.api_p99_ms.source,
            )
        )
    return rows


def hnsw_rows(report: dict[str, Any] | None) -> list[list[str]]:
    rows = []
    for n in (1_000_000, 10_000_000):
        found = hnsw_at(report, n)
        if found is None:
            rows.append([f"{n:,}", NOT_MEASURED, NOT_MEASURED, "ann_scale.json missing"])
            continue
        seconds, size = found
        rows.append(
            [
                f"{n:,}",
                f"{seconds.value / 60:.1f} min",
                _size(size, "MB"),
                f"{seconds.source}; {size.source}" + (f" — {seconds.note}" if seconds.note else ""),
            ]
        )
    return rows


def markdown(shops: Sequence[Shop], inputs: Inputs, a: Assumptions) -> str:
    head = ["figure", *[s.name for s in shops], "source"]
    lines = [
        "### Capacity model",
        "",
        f"From the measurements in `reports/benchmarks/` (`scripts/capacity_model.py`). Each unit "
        f"runs at {a.headroom:.0%} of its measured rate; one user-tower call and "
        f"{a.rail_requests_per_event:g} rail request per event at peak; session state and vector "
        f"live {a.state_ttl_s:,} s, pre-warmed rails {a.prewarm_ttl_s} s. Per-unit rates are "
        "measured on one 2-core machine and assumed to scale out linearly across machines.",
        "",
        _table(head, capacity_rows(shops, inputs, a)),
        "",
        _table(["HNSW items", "build", "index", "source"], hnsw_rows(inputs.hnsw)),
        "",
    ]
    return "\n".join(lines)


def replace_block(readme: str, block: str) -> str:
    """README text with the block between the capacity markers replaced by `block`."""
    start, end = readme.find(START), readme.find(END)
    if start < 0 or end < 0 or end < start:
        raise ValueError(
            f"README.md has no capacity block: add a line {START!r} and, below it, a line "
            f"{END!r} where the capacity table belongs, then run again"
        )
    return readme[: start + len(START)] + "\n" + block.rstrip() + "\n" + readme[end:]


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _counts(values: list[int | None]) -> list[str]:
    return [NOT_MEASURED if v is None else str(v) for v in values]


def _rate_source(rate: Rate | None, unit: str) -> str:
    if rate is None:
        return NOT_MEASURED
    return f"{rate.source}: {rate.per_unit:,.0f} {unit} per unit"


def _source(m: Measured | None) -> str:
    return NOT_MEASURED if m is None else m.source


def _hnsw_source(hnsw: list[tuple[Measured, Measured] | None], which: int) -> str:
    sources = {
        h[which].source + (f" ({h[which].note})" if h[which].note else "") for h in hnsw if h
    }
    return "; ".join(sorted(sources)) or NOT_MEASURED


def _size(m: Measured | None, unit: str) -> str:
    if m is None:
        return NOT_MEASURED
    return f"{m.value:,.0f} B" if unit == "B" else f"{m.value / 2**20:,.0f} MB"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions-per-day", type=int)
    parser.add_argument("--peak-events-per-s", type=float)
    parser.add_argument("--items", type=int)
    parser.add_argument("--headroom", type=float, default=Assumptions.headroom)
    parser.add_argument("--rail-requests-per-event", type=float, default=1.0)
    parser.add_argument("--benchmarks", type=Path, default=BENCHMARKS)
    parser.add_argument("--out", type=Path, default=None, help="default: <benchmarks>/capacity.md")
    parser.add_argument("--readme", nargs="?", const=ROOT / "README.md", type=Path, default=None)
    args = parser.parse_args(argv)

    shops = list(PRESETS)
    custom = (args.sessions_per_day, args.peak_events_per_s, args.items)
    if any(v is not None for v in custom):
        if any(v is None for v in custom):
            parser.error("a custom shop needs --sessions-per-day, --peak-events-per-s and --items")
        shops.append(Shop("custom", *custom))  # type: ignore[arg-type]
    assumptions = Assumptions(
        headroom=args.headroom, rail_requests_per_event=args.rail_requests_per_event
    )
    text = markdown(shops, read_inputs(args.benchmarks), assumptions)
    out = args.out or args.benchmarks / "capacity.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if args.readme is not None:
        try:
            args.readme.write_text(replace_block(args.readme.read_text(), text))
        except ValueError as exc:
            sys.exit(f"capacity_model: {exc}")
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
