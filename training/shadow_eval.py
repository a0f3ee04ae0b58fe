"""Shadow-traffic evaluation: join logged impressions with what the shopper did next.

Every request's served rail (`arm="production"`, `shown=True`) and any shadow rails computed
for the same request (`arm="challenger:<version>"` or `"rules:<name>"`, `shown=False`) are
joined with the events that followed in the same session: strictly after `served_at` and at
most `horizon` later. The items of those view / cart / purchase events are the impression's
targets, graded like the ranker's labels (purchase 3 > cart 2 > view 1, the strongest event
per item). Per rail and arm the report gives:

- hit rate@slots: share of impressions with any target in the list (an impression nothing
  followed is a miss: that is what the shop sees online);
- NDCG@slots with graded gains (2^grade - 1, LightGBM's lambdarank gain), over impressions
  with at least one target (undefined otherwise);
- catalogue coverage@slots: share of the catalogue in at least one list;
- per shadow arm, against the production impression of the same request: the share of
  slots that differ, the list overlap, and the paired difference shadow - production.

Intervals resample sessions (impressions of one session are correlated). A shadow list was
never shown, so its hits are counterfactual: the shopper reacted to the production list,
which biases the comparison towards production.

One module on purpose: reading impressions, joining them with what followed and
summarising the arms are the steps of one report (`railtower shadow-report`); each step is
a separate function, and nothing else imports the intermediate ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from railtower.canary import CANARY_ARM
from railtower.logs import get_logger
from railtower.schemas import Impression, MalformedMessage, decode_event, decode_impression
from railtower.settings import Settings
from training.evaluate import Interval
from training.metrics import bootstrap_ci, dedupe
from training.shadow_report import (
    BIAS_NOTE,
    ArmSummary,
    PairSummary,
    ShadowReport,
    write_shadow_report,
)

log = get_logger(__name__)

PRODUCTION_ARM = "production"
# arms shown to shoppers: production and a live canary's challenger (railtower.canary)
SERVED_ARMS = (PRODUCTION_ARM, CANARY_ARM)


# ------------------------------------------------------------------------------- inputs


def read_impressions_jsonl(path: Path) -> list[Impression]:
    """Impressions from a JSONL file (one `encode()`d Impression per line).

    A malformed line is skipped and counted (as the consumers send one to the dead letters);
    a file with no valid impression at all is an error, since a report on it would be empty.

    Raises:
        FileNotFoundError: no such file.
        ValueError: no line of the file is a valid impression.
    """
    if not path.exists():
        raise FileNotFoundError(f"impressions file {path} does not exist")
    impressions, bad = [], 0
    with path.open("rb") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                impressions.append(decode_impression(line))
            except MalformedMessage as exc:
                bad += 1
                if bad <= 5:
                    log.warning("malformed impression skipped", line=number, reason=exc.reason)
    if bad:
        log.warning("malformed impressions skipped", file=str(path), count=bad)
    if not impressions:
        raise ValueError(f"{path} holds no valid impression ({bad} malformed lines)")
    return impressions


def read_impressions_kafka(settings: Settings, idle_s: float = 5.0) -> list[Impression]:
    """Every impression on `streaming.impressions_topic`, from the beginning, until idle.

    Reads without a consumer group (assigned partitions, nothing committed), so a report
    never moves another reader's offsets.
    """
    from kafka import KafkaConsumer, TopicPartition

    topic = settings.streaming.impressions_topic
    consumer = KafkaConsumer(
        bootstrap_servers=settings.streaming.bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        consumer_timeout_ms=int(idle_s * 1000),
    )
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise ValueError(
                f"topic {topic!r} does not exist on {settings.streaming.bootstrap_servers}; "
                "is the API logging impressions (serving/impressions.py)?"
            )
        assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(assigned)
        consumer.seek_to_beginning(*assigned)
        impressions, bad = [], 0
        for record in consumer:  # stops after `idle_s` without a record
            try:
                impressions.append(decode_impression(record.value))
            except MalformedMessage:
                bad += 1
    finally:
        consumer.close()
    log.info("impressions read from kafka", topic=topic, count=len(impressions), malformed=bad)
    return impressions


def read_impressions(source: str, settings: Settings) -> list[Impression]:
    """Impressions from `source`: "kafka" (the impressions topic) or a JSONL file path."""
    if source == "kafka":
        return read_impressions_kafka(settings)
    return read_impressions_jsonl(Path(source))


def read_events(source: str, settings: Settings) -> tuple[pd.DataFrame, int | None]:
    """Canonical events from a data set name, or from a file (.jsonl of wire events,
    .parquet or .csv with canonical columns); and the catalogue size where it is known.

    Raises:
        ValueError: the file lacks a column the join needs, or the data set has no events.
    """
    path = Path(source)
    if path.suffix in {".jsonl", ".parquet", ".csv"}:
        if not path.exists():
            raise FileNotFoundError(f"events file {path} does not exist")
        if path.suffix == ".jsonl":
            rows = [decode_event(line).model_dump() for line in path.read_bytes().splitlines()]
            frame = pd.DataFrame(rows)
        elif path.suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            frame = pd.read_csv(path)
        missing = {"session_id", "item_id", "event_type", "event_time"} - set(frame.columns)
        if missing:
            raise ValueError(f"events file {path} lacks columns {sorted(missing)}")
        return frame, None
    from railtower.datasets import load_dataset

    dataset = load_dataset(source, settings)
    if dataset.events is None or not dataset.has_time:
        raise ValueError(f"data set {source!r} has no timed events to join impressions with")
    return dataset.events, len(dataset.items)


# --------------------------------------------------------------------------------- join


def epoch_s(value: datetime) -> float:
    # impressions written without a zone are UTC (the service writes aware times)
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


class SessionTimelines:
    """Each session's graded events in time order, for "what followed this impression"."""

    def __init__(self, events: pd.DataFrame, grades: Mapping[str, int]) -> None:
        graded = events[events["event_type"].astype(str).isin(list(grades))]
        times = pd.to_datetime(graded["event_time"], utc=True)
        frame = pd.DataFrame(
            {
                "session_id": graded["session_id"].astype(str).to_numpy(),
                "item_id": graded["item_id"].astype(str).to_numpy(),
                "grade": graded["event_type"].astype(str).map(grades).to_numpy(dtype=int),
                "time_s": times.astype("int64").to_numpy() / 1e9,
            }
        ).sort_values(["session_id", "time_s"], kind="stable")
        self._sessions: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {
            str(s): (g["time_s"].to_numpy(), g["item_id"].to_numpy(), g["grade"].to_numpy())
            for s, g in frame.groupby("session_id", sort=False)
        }
        self.last_time_s = float(frame["time_s"].max()) if len(frame) else float("-inf")

    def targets(self, session_id: str, after_s: float, horizon_s: float) -> dict[str, int]:
        """Items of the session's events in (after_s, after_s + horizon_s], strongest grade."""
        found = self._sessions.get(session_id)
        if found is None:
            return {}
        times, items, grades = found
        lo = np.searchsorted(times, after_s, side="right")  # strictly after: not the past
        hi = np.searchsorted(times, after_s + horizon_s, side="right")
        out: dict[str, int] = {}
        for item, grade in zip(items[lo:hi], grades[lo:hi], strict=True):
            out[item] = max(out.get(item, 0), int(grade))
        return out


def graded_ndcg_at(ranked: Sequence[str], grades: Mapping[str, int], k: int) -> float:
    """NDCG@k with gains 2^grade - 1; the ideal list puts the strongest targets first.

    Raises:
        ValueError: `grades` is empty (NDCG is undefined without a target).
    """
    if not grades:
        raise ValueError("graded ndcg needs at least one target")
    top = [str(i) for i in dedupe(ranked)[:k]]
    dcg = sum((2.0 ** grades[i] - 1) / np.log2(n + 2) for n, i in enumerate(top) if i in grades)
    ideal = sorted(grades.values(), reverse=True)[:k]
    idcg = sum((2.0**g - 1) / np.log2(n + 2) for n, g in enumerate(ideal))
    return float(dcg / idcg)


@dataclass(frozen=True)
class ScoredImpression:
    """One impression with what followed it."""

    impression: Impression
    targets: dict[str, int]
    hit: float
    ndcg: float  # NaN without a target

    @property
    def key(self) -> tuple[str, str]:
        return self.impression.rail, self.impression.arm


def score_impressions(
    impressions: Iterable[Impression], timelines: SessionTimelines, slots: int, horizon_s: float
) -> list[ScoredImpression]:
    """Join each impression with the events that followed it; hit and graded NDCG@slots."""
    scored = []
    for imp in impressions:
        targets = timelines.targets(imp.session_id, epoch_s(imp.served_at), horizon_s)
        top = [str(i) for i in dedupe(imp.items)[:slots]]
        hit = float(any(i in targets for i in top))
        ndcg = graded_ndcg_at(top, targets, slots) if targets else float("nan")
        scored.append(ScoredImpression(imp, targets, hit, ndcg))
    return scored


def slot_difference(shadow: Sequence[str], production: Sequence[str], k: int) -> float:
    """Share of the first k positions whose item differs (a missing slot differs)."""
    a, b = dedupe(shadow)[:k], dedupe(production)[:k]
    n = max(len(a), len(b))
    if n == 0:
        return 0.0
    return sum(i >= len(a) or i >= len(b) or a[i] != b[i] for i in range(n)) / n


def list_overlap(shadow: Sequence[str], production: Sequence[str], k: int) -> float:
    """Share of the (longer) top-k list that both lists contain, in any order."""
    a, b = set(dedupe(shadow)[:k]), set(dedupe(production)[:k])
    n = max(len(a), len(b))
    return len(a & b) / n if n else 1.0


# ------------------------------------------------------------------------------ summary


def coverage_bootstrap(
    lists: Sequence[Sequence[Sequence[str]]],
    sessions: Sequence[str],
    catalogue_size: int,
    k: int,
    samples: int,
    level: float,
    seed: int,
) -> list[Interval]:
    """Coverage@k of each of several arms (lists[arm][impression], one session array), with
    session-resampled intervals; with two arms a third interval: the paired difference
    (arm 1 - arm 0) under the same resamples.

    Coverage is a property of the whole set of lists, not a per-case mean, so it cannot go
    through `bootstrap_ci`; the same multinomial session weights are used instead.
    """
    if catalogue_size <= 0:
        raise ValueError("catalogue_size must be positive")
    session_codes, uniques = pd.factorize(pd.Series(sessions, dtype=str))
    n = len(uniques)
    weights = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=samples) > 0
    per_arm = []
    for arm_lists in lists:
        entry_session = np.repeat(session_codes, [len(dedupe(x)[:k]) for x in arm_lists])
        entry_items = [i for x in arm_lists for i in dedupe(x)[:k]]
        codes, items = pd.factorize(pd.Series(entry_items, dtype=object))
        point = len(items) / catalogue_size
        draws = np.array(
            [
                np.count_nonzero(np.bincount(codes[w[entry_session]], minlength=len(items)))
                for w in weights
            ]
        )
        per_arm.append((point, draws / catalogue_size))
    # A resample repeats some sessions and misses others, so it always covers fewer distinct
    # items than the whole log: the draws are biased low. Each distribution is shifted by its
    # bias (estimate - mean of the draws), so the interval is centred on the estimate.
    alpha = (1.0 - level) / 2.0

    def interval(point: float, draws: np.ndarray) -> Interval:
        low, high = np.quantile(draws + (point - draws.mean()), [alpha, 1 - alpha])
        return Interval(point, float(low), float(high))

    out = [interval(point, draws) for point, draws in per_arm]
    if len(per_arm) == 2:
        out.append(interval(per_arm[1][0] - per_arm[0][0], per_arm[1][1] - per_arm[0][1]))
    return out


def session_ci(values: Sequence[float], sessions: Sequence[str], settings: Settings) -> Interval:
    ev = settings.evaluation
    mean, low, high = bootstrap_ci(
        np.asarray(values, dtype=float),
        np.asarray(sessions, dtype=str),
        ev.bootstrap_samples,
        ev.ci_level,
        settings.seed,
    )
    return Interval(mean, low, high)


def summarise(
    scored: Sequence[ScoredImpression],
    settings: Settings,
    catalogue_size: int,
    catalogue_source: str,
    horizon_minutes: float,
) -> ShadowReport:
    """Per rail and arm: hit rate, NDCG, coverage; per shadow arm: paired comparisons."""
    ev, slots = settings.evaluation, settings.evaluation.slots
    groups: dict[tuple[str, str], list[ScoredImpression]] = {}
    for row in scored:
        groups.setdefault(row.key, []).append(row)
    arms = []
    for (rail, arm), rows in sorted(
        groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != "production", kv[0][1])
    ):
        sessions = [r.impression.session_id for r in rows]
        (coverage,) = coverage_bootstrap(
            [[r.impression.items for r in rows]],
            sessions,
            catalogue_size,
            slots,
            ev.bootstrap_samples,
            ev.ci_level,
            settings.seed,
        )
        arms.append(
            ArmSummary(
                rail=rail,
                arm=arm,
                shown=any(r.impression.shown for r in rows),
                model_versions=sorted({r.impression.model_version for r in rows}),
                impressions=len(rows),
                sessions=len(set(sessions)),
                with_targets=sum(bool(r.targets) for r in rows),
                hit_rate=session_ci([r.hit for r in rows], sessions, settings),
                ndcg=session_ci([r.ndcg for r in rows], sessions, settings),
                coverage=coverage,
            )
        )
    pairs = []
    for (rail, arm), rows in sorted(groups.items()):
        if arm in SERVED_ARMS:  # shown to shoppers: no shadow pairs, its own row above
            continue
        production = {r.impression.request_id: r for r in groups.get((rail, PRODUCTION_ARM), [])}
        matched = [
            (r, production[r.impression.request_id])
            for r in rows
            if r.impression.request_id in production
        ]
        if not matched:
            log.warning("shadow arm has no production impression to pair with", rail=rail, arm=arm)
            continue
        sessions = [p.impression.session_id for _, p in matched]
        differ = [
            slot_difference(s.impression.items, p.impression.items, slots) for s, p in matched
        ]
        overlap = [list_overlap(s.impression.items, p.impression.items, slots) for s, p in matched]
        _, _, coverage_diff = coverage_bootstrap(
            [[p.impression.items for _, p in matched], [s.impression.items for s, _ in matched]],
            sessions,
            catalogue_size,
            slots,
            ev.bootstrap_samples,
            ev.ci_level,
            settings.seed,
        )
        pairs.append(
            PairSummary(
                rail=rail,
                arm=arm,
                pairs=len(matched),
                unpaired=len(rows) - len(matched),
                slot_difference=session_ci(differ, sessions, settings),
                overlap=session_ci(overlap, sessions, settings),
                hit_rate_diff=session_ci([s.hit - p.hit for s, p in matched], sessions, settings),
                # NaN where the request had no target: left out by the bootstrap
                ndcg_diff=session_ci([s.ndcg - p.ndcg for s, p in matched], sessions, settings),
                coverage_diff=coverage_diff,
                per_request_slot_difference=differ,
            )
        )
    return ShadowReport(
        horizon_minutes, slots, catalogue_size, catalogue_source, len(scored), arms, pairs
    )


@dataclass
class ShadowRun:
    folder: Path
    report: ShadowReport
    outputs: dict[str, Path]


def run_shadow_report(
    settings: Settings,
    impressions: Sequence[Impression],
    events: pd.DataFrame,
    catalogue_size: int | None,
    horizon_minutes: float,
    run_name: str,
    events_source: str = "",
) -> ShadowRun:
    """Join, summarise and write `reports/<run_name>/shadow/`.

    Without a known catalogue (an events file), coverage is of the items seen in the events
    and the impressions, which the report says.
    """
    if horizon_minutes <= 0:
        raise ValueError(f"horizon_minutes must be positive, got {horizon_minutes}")
    if not impressions:
        raise ValueError("no impressions to evaluate")
    grades = settings.ranking.ranker.label_grades
    timelines = SessionTimelines(events, grades)
    scored = score_impressions(
        impressions, timelines, settings.evaluation.slots, horizon_minutes * 60
    )
    if catalogue_size is None:
        seen = set(events["item_id"].astype(str)) | {i for imp in impressions for i in imp.items}
        catalogue_size, source = len(seen), "items seen in the events and impressions"
    else:
        source = f"catalogue of {events_source}" if events_source else "data set catalogue"
    report = summarise(scored, settings, catalogue_size, source, horizon_minutes)
    folder = settings.reports_dir / run_name / "shadow"
    header: dict[str, object] = {
        "run": run_name,
        "events": events_source,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings_fingerprint": settings.fingerprint(),
        "bias": BIAS_NOTE,
    }
    outputs = write_shadow_report(folder, report, settings, header)
    log.info("shadow report written", folder=str(folder), impressions=len(impressions))
    return ShadowRun(folder, report, outputs)
