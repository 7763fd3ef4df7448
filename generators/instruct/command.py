"""``vlmcurate import-batch``: store the replies of Batch API jobs the user submitted themselves.

Mounted on the command line through the ``vlmcurate.commands`` entry point group (pyproject.toml),
so the command line needs no import of generators.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from generators.instruct.batch import import_result_files
from generators.instruct.cache import ReplyCache
from generators.instruct.chat import ChatSettings


def import_batch(
    results: Annotated[list[Path], typer.Argument(metavar="RESULTS...", help="Batch API output / error JSONL files.")],
    cache: Annotated[Path, typer.Option(help="The instruction stage's reply cache (its `cache` setting).")],
    price_input: Annotated[float, typer.Option(help="USD per million prompt tokens, for the budget.")] = 0.0,
    price_output: Annotated[float, typer.Option(help="USD per million completion tokens.")] = 0.0,
) -> None:
    """Store the replies of Batch API jobs you submitted yourself (`submit: false`); then run retry-failed."""
    settings = ChatSettings(model="unknown", price_input=price_input, price_output=price_output)
    outcome = import_result_files(results, settings, ReplyCache(cache))
    Console(soft_wrap=True).print(
        f"{len(outcome.replies):,} replies stored in {cache}; {len(outcome.retry):,} to send again "
        f"and {len(outcome.failed):,} failed (retry-failed sends both again)"
    )
