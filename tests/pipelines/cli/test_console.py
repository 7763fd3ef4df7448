"""The terminal: libraries' output goes to the log file, the project's lines and warnings stay."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import warnings

from rich.console import Console

from pipelines.cli import console as terminal
from pipelines.cli.console import ProjectWarnings, log_to_file


def _library_noise() -> None:
    """What libraries do: C++ writes to descriptor 2, a child process prints, loggers and warnings."""
    os.write(2, b"[E core_worker.cc:2465] a line from C++\n")
    subprocess.run(
        [sys.executable, "-c", "import sys; print('a child on stdout'); print('a child on stderr', file=sys.stderr)"],
        check=True,
    )
    logging.getLogger("somelib.module").warning("a library's warning")
    logging.getLogger("somelib.module").info("a library's info")
    warnings.warn("a library's python warning", UserWarning, stacklevel=1)


def test_library_output_goes_to_the_log_and_the_project_keeps_the_terminal(tmp_path, capfd):
    log = tmp_path / "logs" / "vlmcurate.log"
    with log_to_file(log) as path:
        assert path == log and terminal._state["log"] == log
        _library_noise()
        logging.getLogger("pipelines.engine.runner").warning("stage 'x' asks for a GPU")
        logging.getLogger("pipelines.engine.runner").info("started Ray")
        terminal.console.print("a line of the project")
    os.write(2, b"after the block\n")
    out, err = capfd.readouterr()
    assert f"logs: {log}" in out and "a line of the project" in out
    assert "warning: stage 'x' asks for a GPU" in out
    for line in ("C++", "a child", "a library", "started Ray"):
        assert line not in out + err, line
    assert "after the block" in err  # the descriptors are back
    written = log.read_text()
    for line in (
        "a line from C++",
        "a child on stdout",
        "a child on stderr",
        "a library's warning",
        "a library's info",
        "a library's python warning",
        "started Ray",
        "stage 'x' asks for a GPU",
    ):
        assert line in written, line
    assert terminal._state["log"] is None


def test_verbose_and_nested_blocks_redirect_nothing(tmp_path, capfd, monkeypatch):
    log = tmp_path / "outer.log"
    with log_to_file(log):
        with log_to_file(tmp_path / "inner.log") as inner:
            assert inner == log
            os.write(2, b"nested\n")
    assert not (tmp_path / "inner.log").exists() and "nested" in log.read_text()
    monkeypatch.setitem(terminal._state, "verbose", True)
    with log_to_file(tmp_path / "verbose.log") as path:
        assert path is None
        os.write(2, b"verbose\n")
    assert "verbose" in capfd.readouterr().err and not (tmp_path / "verbose.log").exists()


def test_only_the_projects_warnings_are_printed_as_plain_lines():
    out = io.StringIO()
    handler = ProjectWarnings(Console(file=out, width=200))
    logger = logging.getLogger("test-console")
    records = [
        logger.makeRecord(name, level, __file__, 1, message, (), None)
        for name, level, message in [
            ("pipelines.engine.execute", logging.WARNING, "stage 'download' rejected 2 row(s) with internal_error"),
            ("vlmcurate.train", logging.ERROR, "it broke"),
            ("models.training.loop", logging.INFO, "step 1/2"),
            ("ray.data", logging.WARNING, "Operator 'MapBatches(clip_embed)' uses 1.8GiB of memory per worker"),
            ("transformers.modeling_utils", logging.WARNING, "weights not initialized"),
        ]
    ]
    for record in records:
        handler.handle(record)
    assert out.getvalue().splitlines() == [
        "warning: stage 'download' rejected 2 row(s) with internal_error",
        "error: it broke",
    ]
