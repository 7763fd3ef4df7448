"""The ``vlmcurate`` command line: run a pipeline, inspect a run, run the demo."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from pipelines.cli.common import console
from pipelines.cli.common import errors as _errors
from pipelines.cli.console import configure, log_to_file
from pipelines.cli.model_commands import eval_app, train_app
from pipelines.cli.progress_bars import PhaseBars, training_bars
from pipelines.demo.server import DEFAULT_PORT
from pipelines.engine.config import PipelineConfig, load_config, parse_config
from pipelines.engine.execute import run_pipeline
from pipelines.engine.runner import make_runner
from pipelines.job import build_plan
from pipelines.stage import storage
from schemas.manifest import Manifest

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Curate web image-text pools into training data for vision-language models.",
)
app.add_typer(train_app, name="train")
app.add_typer(eval_app, name="eval")
#: Entry point group of the commands that live with their domain (pyproject.toml names them).
COMMANDS_GROUP = "vlmcurate.commands"
RUN_HELP = "A run directory (holds manifest.json): a path, or a URI such as s3://bucket/runs/name."


def _guarded(command: Callable) -> Callable:
    """``command`` with the errors a user can fix turned into a message and an exit code."""

    @functools.wraps(command)
    def guarded(*args, **kwargs):
        with _errors():
            return command(*args, **kwargs)

    return guarded


def mount_domain_commands(target: typer.Typer) -> list[str]:
    """Add the commands of the ``vlmcurate.commands`` entry points (a Typer app becomes a command
    group, a function one command), so the command line imports no domain package; their names."""
    names = []
    for entry in sorted(metadata.entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        command = entry.load()
        if isinstance(command, typer.Typer):
            for info in command.registered_commands:
                info.callback = _guarded(info.callback)
            target.add_typer(command, name=entry.name)
        else:
            target.command(entry.name)(_guarded(command))
        names.append(entry.name)
    return names


@app.callback()
def _main(
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", "-v", help="Print what Ray and the other libraries log here, not into the run's log file."
        ),
    ] = False,
):
    configure(verbose)


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="Pipeline YAML, e.g. configs/text-pool.yaml.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. runner=ray.")] = None,
) -> None:
    """Run (or resume) a pipeline."""
    with _errors():
        cfg = load_config(config, overrides or [])
        _run(cfg)


@app.command()
def inspect(
    run_dir: Annotated[
        str, typer.Argument(metavar="RUN", help="A run directory (holds manifest.json): a path or a URI.")
    ],
    phase: Annotated[str | None, typer.Option(help="Phase to describe (default: the last).")] = None,
) -> None:
    """Show a run's ledger and the column statistics of one of its phases."""
    from pipelines.cli.inspect_run import column_stats, load_manifest

    with _errors():
        manifest = load_manifest(run_dir)
        console.print(ledger_table(manifest))
        phases = [p.name for p in manifest.phases]
        phase = phase or manifest.final_phase
        if phase is None:
            return
        if phase not in phases:
            raise ValueError(f"run {manifest.name} has no finished phase {phase!r}; its phases are {phases}")
        rows, stats = column_stats(run_dir, phase)
        table = Table(title=f"{phase}: {rows:,} rows")
        for header in ("column", "type", "nulls", "min", "mean", "max", "of"):
            table.add_column(header, justify="left" if header in ("column", "type", "of") else "right")
        for s in stats:
            table.add_row(s.name, s.dtype, f"{s.nulls:,}", _num(s.minimum), _num(s.mean), _num(s.maximum), s.measure)
        console.print(table)


@app.command("card")
def card(
    run_dir: Annotated[
        str, typer.Argument(metavar="RUN", help="A run directory (holds manifest.json): a path or a URI.")
    ],
) -> None:
    """Write a run's dataset card (README.md and its plots) again, from its files."""
    from pipelines.card.writer import write_card
    from pipelines.cli.inspect_run import load_manifest
    from pipelines.engine.rundir import RunDir

    with _errors():
        manifest = load_manifest(run_dir)
        plan = build_plan(parse_config({**manifest.config["pipeline"], "output_dir": storage.parent(run_dir)}))
        console.print(f"wrote {write_card(RunDir(run_dir), manifest, plan.stages)}")


@app.command("retry-failed")
def retry_failed_command(
    run_dir: Annotated[
        str, typer.Argument(metavar="RUN", help="A run directory (holds manifest.json): a path or a URI.")
    ],
    runner: Annotated[str | None, typer.Option(help="local or ray (default: as the run was made).")] = None,
) -> None:
    """Re-attempt the rows rejected for a transient reason (timeouts, 429, 5xx, ...) and rebuild the run."""
    from pipelines.cli.inspect_run import load_manifest
    from pipelines.engine.retry import retry_failed

    with _errors():
        manifest = load_manifest(run_dir)
        raw = {**manifest.config["pipeline"], "output_dir": storage.parent(run_dir)}
        if runner:
            raw["runner"] = runner
        cfg = parse_config(raw)
        plan = build_plan(cfg)
        engine = make_runner(cfg.runner, cfg.ray)
        with log_to_file(run_log(plan.run_uri)):
            try:
                report, manifest = retry_failed(plan, engine)
            finally:
                engine.close()
        if report.phase is None:
            console.print("nothing to retry: no reject has a transient reason")
        else:
            attempted = ", ".join(f"{r} {n:,}" for r, n in report.attempted.most_common())
            console.print(
                f"retried {sum(report.attempted.values()):,} rows of {report.phase} ({attempted}): "
                f"{report.recovered:,} recovered",
                soft_wrap=True,
            )
        console.print(ledger_table(manifest))


@app.command()
def demo(
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="key=value overrides of configs/demo-models.yaml, e.g. vlm_stage1.max_steps=100."),
    ] = None,
    output_dir: Annotated[Path, typer.Option(help="Where the pool, the run and the models go.")] = Path("runs"),
    runner: Annotated[str, typer.Option(help="local or ray.")] = "ray",
    port: Annotated[int, typer.Option(help="Loopback port of the demo's image server.")] = DEFAULT_PORT,
    rows: Annotated[int, typer.Option(help="Rows in the generated pool.")] = 2000,
    data: Annotated[
        str | None,
        typer.Option(
            help="Your own pool (url, caption[, boxes]) instead of the "
            "generated one: parquet/csv/tsv/jsonl file, folder or glob."
        ),
    ] = None,
    boxes_column: Annotated[str | None, typer.Option(help="With --data: the column of object boxes, if any.")] = None,
    long: Annotated[
        bool,
        typer.Option(
            "--long",
            help="The VLM budget of configs/demo-models.yaml's long section: the one that passes "
            "the object probe (about 35 min on 2 cores instead of 14).",
        ),
    ] = False,
) -> None:
    """The whole mission offline on embedded defaults: pool, curation (configs/demo.yaml), the LiT
    CLIP, VLM stages 1 and 2 and their evaluation (configs/demo-models.yaml)."""
    from pipelines.demo.run import Demo, DemoPaths, load_demo_models
    from pipelines.demo.server import DemoImageServer

    with _errors():
        models = load_demo_models(overrides or [], long=long)
        output_dir.mkdir(parents=True, exist_ok=True)
        steps = Demo(
            DemoPaths.under(output_dir, long=long), models, lambda line: console.print(line, soft_wrap=True), _run
        )
        with log_to_file(output_dir / "demo.log"), training_bars():
            steps.metadata(lambda path: run_command(["metadata", "build", "--output", str(path)]))
            server = None if data else DemoImageServer(port)
            try:
                pool = data or str(steps.pool(server.base, rows))
                steps.lit_clip()
                manifest = steps.curation(pool, runner, own_data=data is not None, boxes_column=boxes_column)
            finally:
                if server is not None:
                    server.close()
            steps.vlm()
            steps.evaluate()
            steps.summary(manifest)


def run_command(args: list[str]) -> None:
    """Run another ``vlmcurate`` command in this process, its output on the terminal (not in a log)."""
    with contextlib.redirect_stdout(console.file):
        typer.main.get_command(app)(args, standalone_mode=False)


def _run(cfg: PipelineConfig) -> Manifest:
    plan = build_plan(cfg)
    runner = make_runner(cfg.runner, cfg.ray)
    console.print(
        f"run [bold]{cfg.name}[/] ({cfg.runner} runner, config {plan.config_hash}) → {plan.run_uri}", soft_wrap=True
    )
    with log_to_file(run_log(plan.run_uri)):
        try:
            with PhaseBars() as progress:
                manifest = run_pipeline(plan, runner, progress=progress)
        finally:
            runner.close()
    console.print(ledger_table(manifest))
    run_root = plan.run_uri
    kept = manifest.phases[-1].rows_out if manifest.phases else 0
    console.print(f"kept rows: {kept:,} in [bold]{run_root}/{manifest.final_phase}/[/]", soft_wrap=True)
    console.print(f"rejects:   [bold]{run_root}/rejects/[/]", soft_wrap=True)
    console.print(f"manifest:  [bold]{run_root}/manifest.json[/]", soft_wrap=True)
    if manifest.export:
        console.print(
            f"export:    [bold]{manifest.export['folder']}[/] ({', '.join(manifest.export['formats'])}; "
            f"{manifest.export['rows']:,} rows in {manifest.export['shards']} shards)",
            soft_wrap=True,
        )
    return manifest


def run_log(run_uri: str) -> Path:
    """Where a run's libraries log: ``<run dir>/logs/vlmcurate.log``, or under the system's temporary
    folder for a run directory on remote storage."""
    if "://" in run_uri and not run_uri.startswith("file://"):
        import tempfile

        return Path(tempfile.gettempdir(), "vlmcurate-logs", run_uri.split("://", 1)[1], "vlmcurate.log")
    return Path(run_uri.removeprefix("file://"), "logs", "vlmcurate.log")


def ledger_table(manifest: Manifest) -> Table:
    table = Table(title=f"ledger of run {manifest.name} ({manifest.status})")
    table.add_column("phase / stage", no_wrap=True)
    for header in ("in", "kept", "rejected"):
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("reasons", overflow="fold")
    for phase in manifest.phases:
        table.add_row(f"[dim]{phase.name}[/]")
        for name, c in phase.counts.items():
            reasons = ", ".join(f"{r} {n:,}" for r, n in sorted(c.rejected.items(), key=lambda x: -x[1]))
            table.add_row(f"  {name}", f"{c.rows_in:,}", f"{c.rows_kept:,}", f"{c.rows_rejected:,}", reasons)
    return table


def _num(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:,.0f}" if abs(value) >= 1000 or float(value).is_integer() else f"{value:,.3g}"


mount_domain_commands(app)  # after the commands above, so they are listed first


def main() -> None:
    # No telemetry, no update checks, no hub: the only network a run uses is the urls it fetches.
    for key, value in (
        ("RAY_USAGE_STATS_ENABLED", "0"),
        ("RAY_AUTH_MODE", "disabled"),
        ("NO_ALBUMENTATIONS_UPDATE", "1"),
        ("WANDB_MODE", "disabled"),
        ("HF_HUB_OFFLINE", "1"),
    ):
        os.environ.setdefault(key, value)
    app(prog_name="vlmcurate", args=sys.argv[1:])
