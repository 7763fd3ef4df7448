"""The ``vlmcurate`` command line: run a pipeline, inspect a run, run the demo."""

from __future__ import annotations

import os
import sys
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
from pipelines.engine.plan import build_plan
from pipelines.engine.runner import make_runner
from schemas.manifest import Manifest

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Curate web image-text pools into training data for vision-language models.",
)
metadata_app = typer.Typer(add_completion=False, no_args_is_help=True, help="MetaCLIP metadata lists.")
app.add_typer(metadata_app, name="metadata")
app.add_typer(train_app, name="train")
app.add_typer(eval_app, name="eval")
REPO_ROOT = Path(__file__).resolve().parents[1]


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
    run_dir: Annotated[Path, typer.Argument(metavar="RUN", help="A run directory (holds manifest.json).")],
    phase: Annotated[str | None, typer.Option(help="Phase to describe (default: the last).")] = None,
) -> None:
    """Show a run's ledger and the column statistics of one of its phases."""
    from pipelines.cli.inspect_run import column_stats, load_manifest

    with _errors():
        manifest = load_manifest(str(run_dir))
        console.print(ledger_table(manifest))
        phases = [p.name for p in manifest.phases]
        phase = phase or manifest.final_phase
        if phase is None:
            return
        if phase not in phases:
            raise ValueError(f"run {manifest.name} has no finished phase {phase!r}; its phases are {phases}")
        rows, stats = column_stats(str(run_dir), phase)
        table = Table(title=f"{phase}: {rows:,} rows")
        for header in ("column", "type", "nulls", "min", "mean", "max", "of"):
            table.add_column(header, justify="left" if header in ("column", "type", "of") else "right")
        for s in stats:
            table.add_row(s.name, s.dtype, f"{s.nulls:,}", _num(s.minimum), _num(s.mean), _num(s.maximum), s.measure)
        console.print(table)


@app.command("card")
def card(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN", help="A run directory (holds manifest.json).")],
) -> None:
    """Write a run's dataset card (README.md and its plots) again, from its files."""
    from pipelines.card.writer import write_card
    from pipelines.cli.inspect_run import load_manifest
    from pipelines.engine.rundir import RunDir

    with _errors():
        manifest = load_manifest(str(run_dir))
        plan = build_plan(parse_config({**manifest.config["pipeline"], "output_dir": str(run_dir.resolve().parent)}))
        console.print(f"wrote {write_card(RunDir(str(run_dir)), manifest, plan.stages)}")


@app.command("retry-failed")
def retry_failed_command(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN", help="A run directory (holds manifest.json).")],
    runner: Annotated[str | None, typer.Option(help="local or ray (default: as the run was made).")] = None,
) -> None:
    """Re-attempt the rows rejected for a transient reason (timeouts, 429, 5xx, ...) and rebuild the run."""
    from pipelines.cli.inspect_run import load_manifest
    from pipelines.engine.retry import retry_failed

    with _errors():
        manifest = load_manifest(str(run_dir))
        raw = {**manifest.config["pipeline"], "output_dir": str(run_dir.resolve().parent)}
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


@app.command("import-batch")
def import_batch(
    results: Annotated[list[Path], typer.Argument(metavar="RESULTS...", help="Batch API output / error JSONL files.")],
    cache: Annotated[Path, typer.Option(help="The instruction stage's reply cache (its `cache` setting).")],
    price_input: Annotated[float, typer.Option(help="USD per million prompt tokens, for the budget.")] = 0.0,
    price_output: Annotated[float, typer.Option(help="USD per million completion tokens.")] = 0.0,
) -> None:
    """Store the replies of Batch API jobs you submitted yourself (`submit: false`); then run retry-failed."""
    from generators.instruct.batch import import_result_files
    from generators.instruct.cache import ReplyCache
    from generators.instruct.chat import ChatSettings

    with _errors():
        settings = ChatSettings(model="unknown", price_input=price_input, price_output=price_output)
        outcome = import_result_files(results, settings, ReplyCache(cache))
        console.print(
            f"{len(outcome.replies):,} replies stored in {cache}; {len(outcome.retry):,} to send again "
            f"and {len(outcome.failed):,} failed (retry-failed sends both again)"
        )


@metadata_app.command("build")
def metadata_build(
    output: Annotated[Path, typer.Option(help="Where to write the list (.json: a JSON list; else one per line).")],
    unigrams: Annotated[int, typer.Option(help="Most frequent English words to include (wordfreq).")] = 250_000,
    wordnet: Annotated[bool, typer.Option(help="Include every WordNet 3.0 lemma name.")] = True,
    bigrams_from: Annotated[
        list[Path] | None,
        typer.Option(
            help="Caption files (parquet/csv/tsv/jsonl, or .txt one a line) to mine high-PMI bigrams from; repeatable."
        ),
    ] = None,
    caption_column: Annotated[str, typer.Option(help="Caption column of those files.")] = "auto",
    max_bigrams: Annotated[int, typer.Option(help="Most bigrams to add.")] = 100_000,
    min_bigram_count: Annotated[int, typer.Option(help="Occurrences a bigram needs.")] = 5,
    min_pmi: Annotated[float, typer.Option(help="Pointwise mutual information a bigram needs (bits).")] = 5.0,
) -> None:
    """Build a MetaCLIP-style metadata list offline (WordNet, wordfreq, optional corpus bigrams)."""
    from curation.metaclip.build import METACLIP_COUNTS, build_metadata, write_metadata
    from pipelines.source.readers import caption_texts

    def captions():
        for path in bigrams_from or []:
            yield from caption_texts(str(path), caption_column)

    with _errors():
        entries, report = build_metadata(
            unigrams=unigrams,
            wordnet=wordnet,
            bigram_captions=captions() if bigrams_from else None,
            max_bigrams=max_bigrams,
            min_bigram_count=min_bigram_count,
            min_pmi=min_pmi,
        )
        write_metadata(entries, output)
        table = Table(title=f"{len(entries):,} entries written to {output}")
        for header in ("kind", "offered", "added", "in MetaCLIP's list"):
            table.add_column(header, justify="left" if header == "kind" else "right")
        for kind in ("wordnet", "unigrams", "bigrams", "wikipedia_titles"):
            offered = report.offered.get(kind)
            table.add_row(
                kind,
                f"{offered:,}"
                if offered is not None
                else "(no offline source)"
                if kind == "wikipedia_titles"
                else "(not asked for)",
                f"{report.added.get(kind, 0):,}",
                f"{METACLIP_COUNTS[kind]:,}",
            )
        table.add_row("total", "", f"{report.total:,}", f"{sum(METACLIP_COUNTS.values()):,}")
        console.print(table)


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
) -> None:
    """The whole mission offline on embedded defaults: pool, curation (configs/demo.yaml), the LiT
    CLIP, VLM stages 1 and 2 and their evaluation (configs/demo-models.yaml)."""
    from pipelines.demo.run import Demo, DemoPaths, load_demo_models
    from pipelines.demo.server import DemoImageServer

    with _errors():
        models = load_demo_models(overrides or [])
        output_dir.mkdir(parents=True, exist_ok=True)
        steps = Demo(DemoPaths.under(output_dir), models, lambda line: console.print(line, soft_wrap=True), _run)
        with log_to_file(output_dir / "demo.log"), training_bars():
            steps.metadata()
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
