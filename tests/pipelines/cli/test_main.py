"""The command line, in-process: run, inspect, and errors a user can fix (the demo: tests/integration)."""

from __future__ import annotations

import yaml
from typer.testing import CliRunner

from pipelines.cli.main import app
from pipelines.demo.pool import write_demo_pool
from tests.conftest import TEXT_ONLY_HOST

cli = CliRunner()


def _config_file(tmp_path, **extra):
    pool = tmp_path / "pool.csv"
    lines = write_demo_pool(str(pool), TEXT_ONLY_HOST, rows=1200, seed=2)
    (tmp_path / "lines").write_text(str(lines))
    raw = {
        "name": "cli",
        "input": str(pool),
        "output_dir": str(tmp_path / "runs"),
        "shard_size": 400,
        "stages": [{"stage": "curation.basic:JunkAltText"}, {"stage": "curation.basic:CaptionLength"}],
        **extra,
    }
    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_run_then_inspect(tmp_path):
    config = _config_file(tmp_path)
    result = cli.invoke(app, ["run", str(config), "shard_size=300"])
    assert result.exit_code == 0, result.output
    assert "kept rows:" in result.output and "junk_alt_text" in result.output
    run_dir = tmp_path / "runs" / "cli"
    shards = -(-int((tmp_path / "lines").read_text()) // 300)
    assert len(list((run_dir / "01_caption_length").glob("*.parquet"))) == shards
    result = cli.invoke(app, ["inspect", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "ledger of run cli (complete)" in result.output
    assert "caption" in result.output and "characters" in result.output
    result = cli.invoke(app, ["inspect", str(run_dir), "--phase", "00_input"])
    assert result.exit_code == 0 and "00_input: 1,20" in result.output
    card = run_dir / "README.md"
    written = card.read_text()
    card.unlink()
    result = cli.invoke(app, ["card", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert card.read_text().split("Status")[1].split(";")[0] == written.split("Status")[1].split(";")[0]
    assert "| 01_caption_length | caption_length |" in card.read_text()


def test_bad_config_key_exits_2_with_the_message(tmp_path):
    result = cli.invoke(app, ["run", str(_config_file(tmp_path, shard_sise=3))])
    assert result.exit_code == 2
    assert "shard_sise: unknown key" in result.output


def test_changed_config_exits_2_and_says_how_to_start_a_new_run(tmp_path):
    config = _config_file(tmp_path)
    assert cli.invoke(app, ["run", str(config)]).exit_code == 0
    result = cli.invoke(app, ["run", str(config), "stages.caption_length.min_words=5"])
    assert result.exit_code == 2
    assert "min_words: 2 -> 5" in result.output and "name=<new name>" in result.output


def test_missing_input_and_non_run_directories_are_clear_errors(tmp_path):
    result = cli.invoke(app, ["run", str(_config_file(tmp_path)), f"input={tmp_path}/nope.parquet"])
    assert result.exit_code == 2 and "does not exist" in result.output
    result = cli.invoke(app, ["inspect", str(tmp_path)])
    assert result.exit_code == 2 and "is not a run directory" in result.output


def test_inspect_an_unknown_phase_names_the_phases(tmp_path):
    config = _config_file(tmp_path)
    assert cli.invoke(app, ["run", str(config)]).exit_code == 0
    result = cli.invoke(app, ["inspect", str(tmp_path / "runs" / "cli"), "--phase", "nope"])
    assert result.exit_code == 2 and "has no finished phase 'nope'" in result.output


def test_a_ledger_that_does_not_close_is_an_error_in_plain_words(tmp_path):
    import json

    config = _config_file(tmp_path)
    assert cli.invoke(app, ["run", str(config)]).exit_code == 0
    (tmp_path / "runs" / "cli" / "01_caption_length" / "_ledger.json").unlink()  # as if it never closed
    path = tmp_path / "runs" / "cli" / "01_caption_length" / "_ledger" / "00001.json"
    entry = json.loads(path.read_text())
    entry["stages"]["caption_length"]["rows_kept"] -= 1  # a row neither kept nor rejected
    entry["rows_out"] -= 1
    path.write_text(json.dumps(entry))
    result = cli.invoke(app, ["run", str(config)])
    assert result.exit_code == 1
    assert (
        "error: the ledger does not close: phase '01_caption_length', shard 1, stage 'caption_length'"
        in result.output.replace("\n", " ")
    )


def test_domain_commands_are_mounted_from_their_entry_points():
    from importlib import metadata

    from pipelines.cli.main import COMMANDS_GROUP

    entries = {e.name: e.value for e in metadata.entry_points(group=COMMANDS_GROUP)}
    assert entries == {
        "metadata": "curation.metaclip.command:app",
        "import-batch": "generators.instruct.command:import_batch",
    }
    shown = CliRunner().invoke(app, ["--help"]).output
    assert "metadata" in shown and "import-batch" in shown


def test_a_mounted_command_turns_a_users_mistake_into_a_message(tmp_path):
    captions = tmp_path / "captions.csv"
    captions.write_text("url,words\nhttp://127.0.0.1/a.jpg,a cat\n")
    result = CliRunner().invoke(
        app, ["metadata", "build", "--output", str(tmp_path / "m.txt"), "--bigrams-from", str(captions)]
    )
    assert result.exit_code == 2 and "none of the usual caption columns" in result.output, result.output


def test_a_command_run_inside_the_log_still_speaks_to_the_terminal(tmp_path, capfd):
    """The demo builds its metadata through `vlmcurate metadata build` while libraries log to a file:
    the command's table is for the person at the terminal."""
    from pipelines.cli.console import log_to_file
    from pipelines.cli.main import run_command

    output = tmp_path / "metadata.txt"
    with log_to_file(tmp_path / "demo.log"):
        run_command(["metadata", "build", "--output", str(output), "--unigrams", "50", "--no-wordnet"])
    shown = " ".join(capfd.readouterr().out.split())  # the title wraps a long path
    assert "50 entries written to" in shown and "unigrams │ 50 │ 50" in shown
    assert "entries written to" not in (tmp_path / "demo.log").read_text()
    assert len(output.read_text().splitlines()) == 50
