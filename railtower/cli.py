"""The `railtower` command: thin commands over library functions."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from railtower.errors import RailtowerError
from railtower.logs import configure_logging
from railtower.settings import Settings, load_settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
console = Console()

ConfigOption = typer.Option(
    None, "--config", "-c", help="YAML config (default configs/default.yaml)"
)


def _settings(config: Path | None) -> Settings:
    try:
        settings = load_settings(config)
    except RailtowerError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    configure_logging(settings.log_level)
    return settings


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
    config: Path | None = ConfigOption,
) -> None:
    """Score every model on every rail each data set supports; write reports/<run>/."""
    from training.harness import run_evaluation
    from training.report import markdown_table, slice_table

    if split not in ("test", "validation"):
        raise typer.BadParameter("split must be 'test' or 'validation'")
    settings = _settings(config)
    try:
        run = run_evaluation(settings, datasets, split, run_name, towers)  # type: ignore[arg-type]
    except RailtowerError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    console.print(markdown_table(run.results, settings), markup=False, soft_wrap=True)
    console.print(
        "\ncold-item slice:\n" + slice_table(run.results, settings, "cold"),
        markup=False,
        soft_wrap=True,
    )
    console.print(f"\nreport: {run.outputs['markdown']}\nplots:  {run.outputs['plots']}/")


@app.command()
def promote(
    bundle: Path = typer.Argument(
        ..., help="candidate rails bundle (artifacts/<run>-<data set>-rails)"
    ),
    pointer: Path | None = typer.Option(
        None, help="production pointer (default <artifacts>/<promotion.pointer_dir>/<data set>)"
    ),
    config: Path | None = ConfigOption,
) -> None:
    """Promote a bundle if its NDCG@slots is not below production's beyond the interval."""
    from ranking.rails_bundle import load_evaluation
    from training.promotion import promote as run_gate

    settings = _settings(config)
    try:
        dataset = load_evaluation(bundle)["dataset"]
        link = pointer or settings.artifacts_dir / settings.promotion.pointer_dir / dataset
        decision = run_gate(bundle, link, settings.promotion, settings.seed)
    except RailtowerError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    console.print(decision.to_markdown(), markup=False, soft_wrap=True)
    if not decision.promote:
        raise typer.Exit(3)


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
    """Run the rails API (uvicorn) on serving.host:serving.port with the configured model."""
    import uvicorn

    from serving.app import create_app

    settings = _settings(config)
    uvicorn.run(create_app(settings), host=settings.serving.host, port=settings.serving.port)


@app.command()
def demo(
    sessions: int = typer.Option(3, help="held-out sessions to show"),
    config: Path | None = ConfigOption,
) -> None:
    """Start Redis, Triton and the API, print real rails for a few real sessions, stop."""
    from serving.demo import run_demo

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
    config: Path | None = ConfigOption,
) -> None:
    """Publish a data set's events to the events topic in time order, keyed by session."""
    from railtower.datasets import load_dataset
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
    ensure_topics(settings.streaming)
    sent = publish(events, settings.streaming, speed, limit)
    console.print(f"sent {sent:,} events to {settings.streaming.events_topic}")


@app.command()
def consume(
    idle_exit: float = typer.Option(0.0, help="stop after this many idle seconds (0 = never)"),
    config: Path | None = ConfigOption,
) -> None:
    """Run one refresh consumer: events and catalogue changes from Kafka into Redis."""
    from serving.app import build_service
    from streaming.consumer import RefreshConsumer
    from streaming.topics import ensure_topics

    settings = _settings(config)
    ensure_topics(settings.streaming)
    service = build_service(settings)
    if not service.ready:
        console.print("[red]no model could be loaded; see the log[/red]")
        raise typer.Exit(1)
    consumer = RefreshConsumer(settings, service)
    try:
        consumer.run(stop_after_idle_s=idle_exit or None)
    finally:
        consumer.close()


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


if __name__ == "__main__":
    app()
