"""What every ``vlmcurate`` command shares: the console and the guard that turns errors into messages."""

from __future__ import annotations

import typer

from pipelines.cli.console import console
from pipelines.engine.execute import ConfigChangedError
from pipelines.engine.ledger import LedgerError
from pipelines.engine.rundir import RunDirInUse

__all__ = ["console", "errors"]


class errors:
    """Turn the errors a user can fix into a one-paragraph message and a non-zero exit."""

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is None or not isinstance(error, (ValueError, ConfigChangedError, LedgerError, RunDirInUse, OSError)):
            return False
        what = "the ledger does not close: " if isinstance(error, LedgerError) else ""
        console.print(f"[bold red]error:[/] {what}{error}", soft_wrap=True)
        raise typer.Exit(code=2 if isinstance(error, (ValueError, ConfigChangedError)) else 1)
