"""What a person sees in the terminal: the project's own lines; everything libraries say goes to a log file.

By default a command runs inside :func:`log_to_file`: Ray, Ray Data, torch, transformers and the
other libraries write into ``<run dir>/logs/vlmcurate.log`` (the demo: ``<output dir>/demo.log``),
whether they log through Python's ``logging``, print, or write from C++ to the process's standard
streams (Ray's ``core_worker.cc`` lines) or from child processes (Ray's workers, forwarded to the
driver). The terminal keeps the project's lines, progress bars and tables, and the warnings of the
project's own loggers, each as one plain ``warning: ...`` line. ``vlmcurate -v`` leaves every
stream where it is and logs INFO to the terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.logging import RichHandler
from rich.text import Text

console = Console()
log = logging.getLogger("vlmcurate.console")

#: Loggers of the project (its packages, and ``vlmcurate.*``): their warnings reach the terminal.
PROJECT_LOGGERS = ("pipelines", "curation", "generators", "models", "schemas", "vlmcurate")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_state = {"verbose": False, "log": None}


def configure(verbose: bool) -> None:
    """Called once per command: ``verbose`` logs INFO of every library to the terminal, and no file."""
    _state["verbose"] = verbose
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False)],
    )


class ProjectWarnings(logging.Handler):
    """Prints the project's warnings and errors (not the libraries') as plain lines on the console."""

    def __init__(self, out: Console) -> None:
        super().__init__(logging.WARNING)
        self.out = out

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level and record.name.split(".")[0] in PROJECT_LOGGERS

    def emit(self, record: logging.LogRecord) -> None:
        kind = "warning" if record.levelno < logging.ERROR else "error"
        line = Text(f"{kind}: ", style="bold yellow" if kind == "warning" else "bold red")
        line.append(record.getMessage())
        self.out.print(line, soft_wrap=True)


@contextlib.contextmanager
def log_to_file(path: Path) -> Iterator[Path | None]:
    """Send every library's output to ``path`` while the block runs, and say so; the console keeps
    the terminal. A no-op (yields None) with ``-v``, and inside another ``log_to_file`` (the demo's
    curation writes into the demo's log)."""
    if _state["verbose"] or _state["log"] is not None:
        yield _state["log"]
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    console.print(f"logs: {path}", soft_wrap=True, highlight=False)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
    with _streams_into(path) as terminal:
        console.file = terminal
        root.handlers = [file_handler, ProjectWarnings(console)]
        root.setLevel(logging.INFO)
        logging.captureWarnings(True)
        _state["log"] = path
        log.info("vlmcurate %s (pid %d)", " ".join(sys.argv[1:]), os.getpid())
        try:
            yield path
        except BaseException:
            log.info("stopped by an exception (the terminal shows it too)", exc_info=True)
            raise
        finally:
            _state["log"] = None
            logging.captureWarnings(False)
            root.handlers, level = saved
            root.setLevel(level)
            file_handler.close()
            console.file = None  # sys.stdout again


@contextlib.contextmanager
def _streams_into(path: Path) -> Iterator[TextIO]:
    """File descriptors 1 and 2 point at ``path`` while the block runs: what C++ code, child
    processes and ``sys.stdout``/``sys.stderr`` (where they are those descriptors) write lands
    there. Yields a stream to where standard output went before (the terminal)."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    log_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    terminal, own = _terminal(saved[1])
    try:
        for fd in saved:
            os.dup2(log_fd, fd)
        yield terminal
    finally:
        for stream in (sys.stdout, sys.stderr, terminal):
            stream.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        os.close(log_fd)
        if own:
            terminal.close()


def _terminal(stdout_copy: int) -> tuple[TextIO, bool]:
    """A stream to the terminal, and whether it is ours to close: a new one on a copy of
    descriptor 1 when ``sys.stdout`` writes there, else ``sys.stdout`` itself (a test's capture)."""
    try:
        on_fd_1 = sys.stdout.fileno() == 1
    except (AttributeError, OSError, ValueError):
        on_fd_1 = False
    if not on_fd_1:
        return sys.stdout, False
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    return open(os.dup(stdout_copy), "w", buffering=1, encoding=encoding, errors="replace"), True
