"""The `railtower` command: thin commands over library functions.

One module on purpose: every command is a thin function over a library call, one per
subcommand and independent of the others; the file is long because the commands are
many, not because any one mixes concerns.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from railtower.errors import RailtowerError
from railtower.logs import configure_logging
from railtower.settings import Settings, load_settings

if TYPE_CHECKING:
    from railtower.canary import CanaryState

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
console = Console()

ConfigOption = typer.Option(
    None, "--config", "-c", help="YAML config (default configs/default.yaml)"
)


def _settings(config: Path | None, as_json: bool = False) -> Settings:
    try:
        settings = load_settings(config)
    except RailtowerError as exc:
        if as_json:
            _fail_on_stderr(str(exc), 2)
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    configure_logging(settings.log_level)
    return settings


def _fail_on_stderr(message: str, code: int) -> NoReturn:
    """End a `--json` command: the error as the last line of stderr (logs go there too),
    on one line, so a caller (the admin API) can quote it."""
    sys.stderr.write(" ".join(message.split()) + "\n")
    sys.stderr.flush()
    raise typer.Exit(code)


@app.command("check-config")
def check_config(config: Path | None = ConfigOption) -> None:
    """Load the settings and every data set mapping; print them or say what is wrong."""
    from railtower.settings import load_dataset_spec

    settings = _settings(config)
    try:
        specs = [load_dataset_spec(name, settings) for name in settings.datasets]
    except RailtowerError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    console.print_json(data=settings.model_dump(mode="json"))
    for spec in specs:
        console.print(f"data set [bold]{spec.name}[/bold]: rails {spec.rails or 'none'}")


@app.command()
def validate(
    datasets: list[str] = typer.Option(
        None, "--dataset", "-d", help="data set names (default: all)"
    ),
    config: Path | None = ConfigOption,
) -> None:
    """Load each data set through its mapping and report kept and dropped rows."""
    from railtower.datasets import load_dataset

    settings = _settings(config)
    table = Table("data set", "file", "rows in", "kept", "dropped", "notes")
    try:
        for name in datasets or settings.datasets:
            for r in load_dataset(name, settings).reports:
                table.add_row(
                    name,
                    Path(r.file).name,
                    f"{r.rows_in:,}",
                    f"{r.rows_out:,}",
                    str(r.dropped or "none"),
                    "\n".join(r.notes),
                )
    except RailtowerError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    console.print(table)


@app.command()
def evaluate(
    datasets: list[str] = typer.Option(
        None, "--dataset", "-d", help="data set names (default: all)"
    ),
    split: str = typer.Option("test", help="test (reported numbers) or validation (tuning)"),
    run_name: str | None = typer.Option(None, help="folder under reports/ (default: timestamp)"),
    towers: bool = typer.Option(False, help="also train, export and score the two towers"),
    bundle: Path | None = typer.Option(
        None, help="score this trained rails bundle instead of training (never retrains)"
    ),
    events: str | None = typer.Option(
        None,
        help="with --bundle: a data set name or a canonical Parquet/CSV events file "
        "(default: the bundle's data set); scored on sessions after its training window",
    ),
    later_window: bool = typer.Option(
        False,
        "--later-window",
        help="fit on each data set's history, judge and refit as the nightly job would, then "
        "score every baseline and stage on the later sessions nothing was tuned on",
    ),
    config: Path | None = ConfigOption,
) -> None:
    """Score every model on every rail each data set supports; write reports/<run>/."""
    from training.harness import run_evaluation
    from training.report import markdown_table, slice_table

    if split not in ("test", "validation"):
        raise typer.BadParameter("split must be 'test' or 'validation'")
    if events is not None and bundle is None:
        raise typer.BadParameter("--events needs --bundle (the bundle to score on them)")
    if later_window and bundle is not None:
        raise typer.BadParameter("--later-window fits its own bundles; drop --bundle")
    settings = _settings(config)
    try:
        if later_window:
            from training.later_window import run_later_window

            folder, _ = run_later_window(settings, datasets, run_name, towers)
            console.print((folder / "later_window.md").read_text(), markup=False, soft_wrap=True)
            console.print(f"\nreport: {folder}/later_window.md\nplots:  {folder}/plots/")
            return
        if bundle is not None:
            from railtower.production import load_evaluation
            from training.bundle_eval import evaluate_bundle

            source = events or str(load_evaluation(bundle)["dataset"])
            scored = evaluate_bundle(bundle, source, settings, run_name=run_name)
            results, outputs = [scored.result], scored.outputs
            shares = ", ".join(f"{r} {v:.1%}" for r, v in scored.cold_share.items())
            console.print(f"cold share (targets unseen in training): {shares}", markup=False)
        else:
            run = run_evaluation(settings, datasets, split, run_name, towers)  # type: ignore[arg-type]
            results, outputs = run.results, run.outputs
    except (RailtowerError, ValueError) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    console.print(markdown_table(results, settings), markup=False, soft_wrap=True)
    console.print(
        "\ncold-item slice:\n" + slice_table(results, settings, "cold"),
        markup=False,
        soft_wrap=True,
    )
    console.print(f"\nreport: {outputs['markdown']}\nplots:  {outputs['plots']}/")


@app.command()
def promote(
    bundle: Path = typer.Argument(
        ..., help="candidate rails bundle (artifacts/<run>-<data set>-rails)"
    ),
    pointer: Path | None = typer.Option(
        None, help="production pointer (default <artifacts>/<promotion.pointer_dir>/<data set>)"
    ),
    as_json: bool = typer.Option(
        False,
        "--json",
        help="print the decision as one JSON object on stdout (promoted, candidate, "
        "production, reasons, verdicts); an error as the last line of stderr",
    ),
    config: Path | None = ConfigOption,
) -> None:
    """Promote a bundle if its NDCG@slots is not below production's beyond the interval.

    Exit 0: promoted; 3: refused (production untouched); 1: not a promotable bundle.
    """
    import orjson

    from railtower.errors import ArtifactMismatch
    from railtower.production import load_evaluation, pointer_path
    from training.promotion import promote as run_gate

    settings = _settings(config, as_json)
    try:
        dataset = load_evaluation(bundle).get("dataset")
        if not isinstance(dataset, str):
            raise ArtifactMismatch(f"{bundle}'s evaluation names no data set")
        link = pointer or pointer_path(settings.artifacts_dir, settings.promotion, dataset)
        # With the settings, production evaluated on another window is re-scored on the
        # candidate's held-out cases (training.bundle_eval), so the gate stays paired.
        decision = run_gate(bundle, link, settings.promotion, settings.seed, rescore=settings)
    except (RailtowerError, OSError, KeyError, ValueError) as exc:
        if as_json:
            _fail_on_stderr(str(exc), 1)
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    if as_json:
        # NaN (a rail without a production record) becomes null: JSON has no NaN
        out = orjson.dumps(decision.to_dict(), option=orjson.OPT_SERIALIZE_NUMPY)
        sys.stdout.write(out.decode() + "\n")
    else:
        console.print(decision.to_markdown(), markup=False, soft_wrap=True)
    if not decision.promote:
        raise typer.Exit(3)


@app.command()
def rollback(
    dataset: str = typer.Option(..., "--dataset", "-d", help="data set whose pointer moves back"),
    reason: str = typer.Option(..., help="why (recorded in history.jsonl and the log)"),
    config: Path | None = ConfigOption,
) -> None:
    """Put back the bundle that was production before the current one (exit 3 if none)."""
    from railtower.production import RollbackRefused
    from railtower.production import rollback as run_rollback

    settings = _settings(config)
    try:
        decision = run_rollback(settings.artifacts_dir, settings.promotion, dataset, reason)
    except RollbackRefused as exc:
        console.print(f"[red]rollback refused: {exc}[/red]", markup=False)
        raise typer.Exit(3) from None
    except (RailtowerError, ValueError) as exc:
        console.print(f"[red]{exc}[/red]", markup=False)
        raise typer.Exit(1) from None
    console.print(decision.to_markdown(), markup=False, soft_wrap=True)


@app.command()
def nightly(
    datasets: list[str] = typer.Option(
        None, "--dataset", "-d", help="data set names (default: nightly.datasets or all)"
    ),
    window_days: float | None = typer.Option(
        None, help="newest days of events to train on (default nightly.window_days; 0 = all)"
    ),
    run_name: str | None = typer.Option(
        None, help="run name (default: derived from the data windows and settings)"
    ),
    resume: bool = typer.Option(False, help="continue the newest unfinished run"),
    config: Path | None = ConfigOption,
) -> None:
    """Train, evaluate and gate on the newest window; promote or refuse (exit 0 / 3)."""
    from training.nightly import run_nightly

    settings = _settings(config)
    try:
        result = run_nightly(settings, datasets, window_days, run_name, resume)
    except RailtowerError as exc:
        console.print(f"[red]{exc}[/red]", markup=False)
        raise typer.Exit(1) from None
    console.print(result.report_markdown.read_text(), markup=False, soft_wrap=True)
    console.print(f"report: {result.report_markdown}")
    raise typer.Exit(result.exit_code)


@app.command()
def drift(
    dataset: str = typer.Option(..., "--dataset", "-d", help="data set to check"),
    bundle: Path | None = typer.Option(
        None, help="rails bundle (default: the data set's production pointer)"
    ),
    recent_days: float | None = typer.Option(
        None, help="newest days compared with the training window (default drift.recent_days)"
    ),
    run_name: str | None = typer.Option(None, help="folder under reports/ (default: timestamp)"),
    retrain: bool = typer.Option(False, help="when drift is flagged, run the nightly job"),
    config: Path | None = ConfigOption,
) -> None:
    """Flag recent data that shifted from the bundle's training window (exit 4 when flagged)."""
    from training.drift import EXIT_FLAGGED, run_drift
    from training.nightly import run_nightly

    settings = _settings(config)
    try:
        report = run_drift(settings, dataset, bundle, recent_days, run_name)
    except RailtowerError as exc:
        console.print(f"[red]{exc}[/red]", markup=False)
        raise typer.Exit(1) from None
    console.print(report.markdown_path.read_text(), markup=False, soft_wrap=True)
    console.print(f"report: {report.markdown_path}\nplot:   {report.plot_path}")
    if not report.flagged:
        return
    if retrain:
        try:
            result = run_nightly(settings, [dataset])
        except RailtowerError as exc:
            console.print(f"[red]{exc}[/red]", markup=False)
            raise typer.Exit(1) from None
        console.print(result.report_markdown.read_text(), markup=False, soft_wrap=True)
        raise typer.Exit(result.exit_code)
    raise typer.Exit(EXIT_FLAGGED)


@app.command("rules-dry-run")
def rules_dry_run(
    proposed: Path = typer.Argument(..., help="the rule set about to be published (JSON)"),
    current: Path | None = typer.Option(
        None, help="the published rule set (default: ranking.rules_path)"
    ),
    dataset: str = typer.Option("rees46", "--dataset", "-d", help="data set to sample from"),
    requests: int = typer.Option(200, help="held-out requests per rail"),
    output: Path | None = typer.Option(None, help="write the markdown report here"),
    config: Path | None = ConfigOption,
) -> None:
    """Show what a new rule set changes on sampled held-out requests before publishing it."""
    from training.dry_run import dry_run_rule_sets

    settings = _settings(config)
    try:
        report = dry_run_rule_sets(settings, dataset, proposed, current, requests)
    except RailtowerError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    text = report.to_markdown()
    if output is not None:
        output.write_text(text)
    console.print(text, markup=False, soft_wrap=True)


@app.command()
def serve(config: Path | None = ConfigOption) -> None:
    """Run the rails API (uvicorn, serving.http_server) on serving.host:serving.port with the
    configured model, in serving.workers worker processes."""
    import os

    from serving.http_server import run

    s = _settings(config).serving
    # every worker builds its own app from the same settings file and environment
    if config is not None:
        os.environ["RAILTOWER_CONFIG"] = str(config.resolve())
    run(s.host, s.port, s.workers)


@app.command()
def demo(
    sessions: int = typer.Option(3, help="held-out sessions to show"),
    config: Path | None = ConfigOption,
) -> None:
    """Start Redis, Triton and the API, print real rails for a few real sessions, stop."""
    from devstack.demo import run_demo  # dev tooling: starts local servers

    settings = _settings(config)
    try:
        run_demo(settings, sessions)
    except RailtowerError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None


@app.command()
def replay(
    dataset: str = typer.Option("rees46", "--dataset", "-d", help="data set whose events to send"),
    speed: float = typer.Option(0.0, help="speed-up: 1 = real time, 60 = 1 h/min, 0 = max"),
    limit: int = typer.Option(0, help="send at most this many events (0 = all)"),
    inject_drops: float = typer.Option(
        0.0, help="share of priced items that get an injected price drop (0 = none)"
    ),
    drop: float = typer.Option(0.3, help="fraction an injected drop takes off the price"),
    seed: int = typer.Option(0, help="seed choosing the dropped items and their times"),
    config: Path | None = ConfigOption,
) -> None:
    """Publish a data set's events to the events topic in time order, keyed by session.

    With --inject-drops, price drops go to the catalogue topic too (measure the deal
    mechanics; figures from such a replay come from injected drops, not real prices).
    """
    from railtower.datasets import load_dataset
    from streaming.replay import inject_drops as drop_prices
    from streaming.replay import replay as publish
    from streaming.topics import ensure_topics

    settings = _settings(config)
    try:
        events = load_dataset(dataset, settings).events
    except RailtowerError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    if events is None:
        console.print(f"[red]{dataset} has no events to replay[/red]")
        raise typer.Exit(1)
    updates = []
    if inject_drops:
        try:
            events, updates = drop_prices(events, inject_drops, drop, seed)
        except ValueError as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(1) from None
    ensure_topics(settings.streaming)
    sent = publish(events, settings.streaming, speed, limit, updates)
    console.print(f"sent {sent:,} events to {settings.streaming.events_topic}")
    if updates:
        console.print(
            f"injected {len(updates):,} price drops of {drop:.0%} on "
            f"{settings.streaming.catalogue_topic}"
        )


@app.command()
def consume(
    idle_exit: float = typer.Option(0.0, help="stop after this many idle seconds (0 = never)"),
    member_id: str | None = typer.Option(
        None, help="this member's name in the group (Kafka client id; default host-pid)"
    ),
    ledger: Path | None = typer.Option(
        None, help="append a JSON line per assignment, applied batch and commit to this file"
    ),
    config: Path | None = ConfigOption,
) -> None:
    """Run one refresh consumer: events and catalogue changes from Kafka into Redis.

    Start several with the same `streaming.group_id` to share the events topic's partitions.
    SIGTERM or Ctrl-C finishes the batch in hand, commits it and leaves the group, so the
    others take over its partitions at once.
    """
    import signal
    import threading

    from serving.app import Watchers, build_service, follow_model
    from streaming.consumer import RefreshConsumer, consumer_settings
    from streaming.topics import ensure_topics

    settings = consumer_settings(_settings(config))
    ensure_topics(settings.streaming)
    service = build_service(settings)
    if not service.ready:
        console.print("[red]no model could be loaded; see the log[/red]")
        raise typer.Exit(1)
    consumer = RefreshConsumer(settings, service, member_id, ledger)
    stop = threading.Event()
    # pre-warm under the model the API serves now: a promotion, a canary's step, published
    # rules and other members' stock changes reach this process as they reach the API's
    follow_model(settings, service, Watchers(stop, service.metrics))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        consumer.run(stop_after_idle_s=idle_exit or None, stop=stop)
    finally:
        consumer.close()


@app.command("rebuild-state")
def rebuild_state(
    from_offset: int | None = typer.Option(
        None, "--from-offset", help="start at this offset on every partition (default: earliest)"
    ),
    since: str | None = typer.Option(
        None, help="start at each partition's first record at or after this ISO time (no zone: UTC)"
    ),
    config: Path | None = ConfigOption,
) -> None:
    """Rebuild session state in Redis from the events topic's retention (after Redis lost it).

    Reads up to the end offsets taken at the start with a group-less consumer (the live
    group's offsets do not move), appends every event idempotently as the consumer does
    and prints a JSON summary. Stop the consumers first for sessions in topic order.
    """
    import orjson
    import redis

    from streaming.rebuild import RebuildError, parse_since, rebuild_from_settings

    settings = _settings(config)
    try:
        start = parse_since(since) if since is not None else None
        report = rebuild_from_settings(settings, from_offset, start)
    except (RebuildError, redis.RedisError) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    sys.stdout.write(orjson.dumps(report.to_dict()).decode() + "\n")


@app.command("distill-images")
def distill_images(
    dataset: str = typer.Option("hm_catalogue", "--dataset", "-d", help="a data set with photos"),
    config: Path | None = ConfigOption,
) -> None:
    """Train the image encoder on a catalogue's own photos (aligned with their text)."""
    from railtower.datasets import load_dataset
    from training.image_distill import distill_image_encoder

    settings = _settings(config)
    try:
        weights = distill_image_encoder(settings, load_dataset(dataset, settings).items)
    except RailtowerError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    console.print(
        f"image encoder weights: {weights}\nuse them with: RAILTOWER_IMAGE__WEIGHTS_PATH={weights}"
    )


ImpressionsOption = typer.Option(
    ..., "--impressions", help="a JSONL file (one encoded Impression a line) or 'kafka'"
)


@app.command("shadow-report")
def shadow_report(
    impressions: str = ImpressionsOption,
    events: str = typer.Option(
        ..., "--events", help="a data set name, or an events file (.jsonl, .parquet, .csv)"
    ),
    horizon_minutes: float | None = typer.Option(
        None, help="minutes after an impression that count (default monitor.horizon_minutes)"
    ),
    run_name: str | None = typer.Option(None, help="folder under reports/ (default: timestamp)"),
    config: Path | None = ConfigOption,
) -> None:
    """Score production and shadow arms on what shoppers did next; write reports/<run>/shadow/."""
    from railtower.manifest import new_version
    from training.shadow_eval import read_events, read_impressions, run_shadow_report

    settings = _settings(config)
    try:
        logged = read_impressions(impressions, settings)
        frame, catalogue = read_events(events, settings)
        run = run_shadow_report(
            settings,
            logged,
            frame,
            catalogue,
            horizon_minutes or settings.monitor.horizon_minutes,
            run_name or new_version("shadow"),
            events_source=events,
        )
    except (RailtowerError, ValueError, FileNotFoundError) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    console.print(run.outputs["markdown"].read_text(), markup=False, soft_wrap=True)
    console.print(f"report: {run.outputs['markdown']}\nplots:  {run.outputs['plots']}/")


@app.command()
def monitor(
    dataset: str = typer.Option(..., "--dataset", "-d", help="data set whose production to watch"),
    impressions: str = ImpressionsOption,
    events: str | None = typer.Option(
        None, "--events", help="a data set name or an events file (default: --dataset)"
    ),
    dry_run: bool = typer.Option(False, help="report the decision, never roll back"),
    config: Path | None = ConfigOption,
) -> None:
    """Roll production back when its online hit rate drops beyond monitor.max_relative_drop."""
    from training.online_monitor import check_and_rollback
    from training.shadow_eval import SessionTimelines, read_events, read_impressions

    settings = _settings(config)
    try:
        logged = read_impressions(impressions, settings)
        frame, _ = read_events(events or dataset, settings)
        timelines = SessionTimelines(frame, settings.ranking.ranker.label_grades)
        decision = check_and_rollback(settings, dataset, logged, timelines, dry_run)
    except (RailtowerError, ValueError, FileNotFoundError) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    console.print(decision.to_markdown(), markup=False, soft_wrap=True)


# ------------------------------------------------------------------------------ canary

canary_app = typer.Typer(
    no_args_is_help=True,
    help="The live canary: a challenger bundle serves a rising share of sessions "
    "(railtower/canary.py); `step` advances or aborts it by rule, the others by hand.",
)
app.add_typer(canary_app, name="canary")

CanaryDatasetOption = typer.Option(..., "--dataset", "-d", help="data set whose canary moves")
CanaryReasonOption = typer.Option(..., help="why (recorded in history.jsonl and the log)")


def _canary_failed(exc: Exception) -> NoReturn:
    console.print(f"[red]{exc}[/red]", markup=False)
    raise typer.Exit(1) from None


def _print_canary(state: CanaryState) -> None:
    console.print(
        f"canary of {state.dataset}: {state.challenger} {state.status} at {state.share:.0%} "
        f"(step {state.step + 1} of {len(state.steps)}: {state.steps}) against production "
        f"{state.production}; reason: {state.reason}",
        markup=False,
        soft_wrap=True,
    )


@canary_app.command("start")
def canary_start(
    dataset: str = CanaryDatasetOption,
    bundle: Path = typer.Option(..., help="the challenger rails bundle (relative: artifacts_dir)"),
    reason: str = typer.Option("started by an operator", help="why (for the history)"),
    impressions: str | None = typer.Option(
        None,
        "--impressions",
        help="production's recent impressions (JSONL or 'kafka'): choose the hash salt by an "
        "A/A check (training.canary_balance); default: canary.salt unchecked",
    ),
    events: str | None = typer.Option(
        None, "--events", help="with --impressions: a data set name or events file (default -d)"
    ),
    config: Path | None = ConfigOption,
) -> None:
    """Send the first step's share of the data set's sessions to a verified, evaluated bundle."""
    from railtower.canary import start_canary

    settings = _settings(config)
    try:
        salt = None
        if impressions is not None:
            from training.canary_balance import balanced_salt
            from training.shadow_eval import SessionTimelines, read_events, read_impressions

            logged = read_impressions(impressions, settings)
            frame, _ = read_events(events or dataset, settings)
            timelines = SessionTimelines(frame, settings.ranking.ranker.label_grades)
            choice = balanced_salt(settings, logged, timelines)
            console.print(choice.to_markdown(), markup=False, soft_wrap=True)
            salt = choice.salt
        state = start_canary(
            settings.artifacts_dir,
            settings.promotion,
            settings.canary,
            dataset,
            bundle,
            reason,
            salt=salt,
        )
    except (RailtowerError, ValueError, FileNotFoundError) as exc:
        _canary_failed(exc)
    _print_canary(state)


@canary_app.command("status")
def canary_status(
    dataset: str = CanaryDatasetOption,
    last: int = typer.Option(20, min=1, help="how many of the latest moves to list"),
    config: Path | None = ConfigOption,
) -> None:
    """The canary's state and its latest moves."""
    from railtower.canary import canary_history, read_canary
    from railtower.production import pointer_path

    settings = _settings(config)
    try:
        pointer = pointer_path(settings.artifacts_dir, settings.promotion, dataset)
        state = read_canary(pointer)
        history = canary_history(pointer, last)
    except (RailtowerError, ValueError, FileNotFoundError) as exc:
        _canary_failed(exc)
    if state is None:
        console.print(f"no canary of {dataset} was ever started", markup=False)
        return
    _print_canary(state)
    table = Table("at", "event", "challenger", "step", "share", "status", "reason")
    for entry in history:
        table.add_row(
            str(entry.get("at")),
            str(entry.get("event")),
            str(entry.get("challenger")),
            str(entry.get("step")),
            f"{float(entry.get('share') or 0.0):.0%}",
            str(entry.get("status")),
            str(entry.get("reason")),
        )
    console.print(table)


@canary_app.command("step")
def canary_step(
    dataset: str = CanaryDatasetOption,
    impressions: str = ImpressionsOption,
    events: str | None = typer.Option(
        None, "--events", help="a data set name or an events file (default: --dataset)"
    ),
    dry_run: bool = typer.Option(False, help="report the decision, never move the canary"),
    config: Path | None = ConfigOption,
) -> None:
    """Judge the running step on served impressions: advance, abort, or wait (the rule)."""
    from training.canary_decision import step_canary
    from training.shadow_eval import SessionTimelines, read_events, read_impressions

    settings = _settings(config)
    try:
        logged = read_impressions(impressions, settings)
        frame, _ = read_events(events or dataset, settings)
        timelines = SessionTimelines(frame, settings.ranking.ranker.label_grades)
        decision = step_canary(settings, dataset, logged, timelines, dry_run)
    except (RailtowerError, ValueError, FileNotFoundError) as exc:
        _canary_failed(exc)
    console.print(decision.to_markdown(), markup=False, soft_wrap=True)


def _canary_move(move: str, dataset: str, reason: str, config: Path | None) -> None:
    from railtower import canary

    moves = {
        "hold": canary.hold_canary,
        "resume": canary.resume_canary,
        "advance": canary.advance_canary,
        "abort": canary.abort_canary,
    }
    settings = _settings(config)
    try:
        state = moves[move](settings.artifacts_dir, settings.promotion, dataset, reason)
    except (RailtowerError, ValueError, FileNotFoundError) as exc:
        _canary_failed(exc)
    _print_canary(state)


@canary_app.command("hold")
def canary_hold(
    dataset: str = CanaryDatasetOption,
    reason: str = CanaryReasonOption,
    config: Path | None = ConfigOption,
) -> None:
    """Keep the current share; no advance (by rule or by hand) until resumed."""
    _canary_move("hold", dataset, reason, config)


@canary_app.command("resume")
def canary_resume(
    dataset: str = CanaryDatasetOption,
    reason: str = CanaryReasonOption,
    config: Path | None = ConfigOption,
) -> None:
    """Let a held canary advance again."""
    _canary_move("resume", dataset, reason, config)


@canary_app.command("advance")
def canary_advance(
    dataset: str = CanaryDatasetOption,
    reason: str = CanaryReasonOption,
    config: Path | None = ConfigOption,
) -> None:
    """Move to the next share on the operator's word; the last step promotes.

    No figures are checked (`railtower canary step` checks them); from the last share below
    100% this moves the production pointer to the challenger."""
    _canary_move("advance", dataset, reason, config)


@canary_app.command("abort")
def canary_abort(
    dataset: str = CanaryDatasetOption,
    reason: str = CanaryReasonOption,
    config: Path | None = ConfigOption,
) -> None:
    """Send every session back to production (share 0); production never moved."""
    _canary_move("abort", dataset, reason, config)


@app.command("shadow-replay")
def shadow_replay(
    dataset: str = typer.Option("rees46", "--dataset", "-d", help="data set to replay"),
    challenger: Path | None = typer.Option(None, help="challenger rails bundle"),
    challenger_rules: Path | None = typer.Option(
        None, help="or: a candidate rule set (JSON) on the production model"
    ),
    production: Path | None = typer.Option(
        None, help="production rails bundle (default serving.bundle or the production pointer)"
    ),
    sessions: int = typer.Option(0, help="first N held-out sessions (0 = all)"),
    output: Path | None = typer.Option(
        None, help="impressions JSONL (default reports/<run>/shadow/impressions.jsonl)"
    ),
    run_name: str | None = typer.Option(None, help="folder under reports/ (default: timestamp)"),
    config: Path | None = ConfigOption,
) -> None:
    """Replay held-out sessions through production and a challenger; then the shadow report."""
    from railtower.manifest import new_version
    from railtower.production import pointer_path
    from training.shadow_replay import run_shadow_replay

    settings = _settings(config)
    run = run_name or new_version("shadow-replay")
    bundle = production or settings.serving.bundle
    if bundle is None:
        bundle = pointer_path(settings.artifacts_dir, settings.promotion, dataset)
    target = output or settings.reports_dir / run / "shadow" / "impressions.jsonl"
    try:
        result = run_shadow_replay(
            settings, dataset, bundle, target, challenger, challenger_rules, sessions, run
        )
    except (RailtowerError, ValueError) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    console.print(
        f"{result.requests:,} requests, {result.impressions:,} impressions -> "
        f"{result.impressions_path}; skipped {result.skipped}; fallbacks {result.degraded}"
    )
    if result.shadow is not None:
        text = result.shadow.outputs["markdown"].read_text()
        console.print(text, markup=False, soft_wrap=True)


@app.command("exploration-replay")
def exploration_replay(
    dataset: str = typer.Option("rees46", "--dataset", "-d", help="data set to replay"),
    sessions: int = typer.Option(0, help="first N held-out sessions (0 = all)"),
    slot: int = typer.Option(11, help="0-based slot the epsilon-greedy bandit fills"),
    epsilon: float = typer.Option(0.2, help="the logging policy's epsilon"),
    alternative_epsilon: float = typer.Option(
        0.05, help="the epsilon-greedy policy to value on the log (same slot and choice set)"
    ),
    production: Path | None = typer.Option(
        None, help="rails bundle (default serving.bundle or the production pointer)"
    ),
    run_name: str | None = typer.Option(None, help="folder under reports/ (default: timestamp)"),
    config: Path | None = ConfigOption,
) -> None:
    """Replay held-out sessions with the exploration slot on; value other epsilons by IPS."""
    from railtower.manifest import new_version
    from railtower.production import pointer_path
    from training.exploration_replay import run_exploration_replay

    settings = _settings(config)
    run = run_name or new_version("exploration-replay")
    bundle = production or settings.serving.bundle
    if bundle is None:
        bundle = pointer_path(settings.artifacts_dir, settings.promotion, dataset)
    try:
        result = run_exploration_replay(
            settings, dataset, bundle, run, sessions, slot, epsilon, alternative_epsilon
        )
    except (RailtowerError, ValueError) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    console.print(result.outputs["markdown"].read_text(), markup=False, soft_wrap=True)


if __name__ == "__main__":
    app()
