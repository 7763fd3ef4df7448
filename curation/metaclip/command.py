"""``vlmcurate metadata build``: a MetaCLIP-style metadata list, built offline.

Mounted on the command line through the ``vlmcurate.commands`` entry point group (pyproject.toml),
so the command line needs no import of curation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from curation.metaclip.build import METACLIP_COUNTS, build_metadata, write_metadata
from curation.metaclip.caption_files import caption_texts

app = typer.Typer(add_completion=False, no_args_is_help=True, help="MetaCLIP metadata lists.")


@app.command("build")
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

    def captions():
        for path in bigrams_from or []:
            yield from caption_texts(str(path), caption_column)

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
        if offered is not None:
            shown = f"{offered:,}"
        else:
            shown = "(no offline source)" if kind == "wikipedia_titles" else "(not asked for)"
        table.add_row(kind, shown, f"{report.added.get(kind, 0):,}", f"{METACLIP_COUNTS[kind]:,}")
    table.add_row("total", "", f"{report.total:,}", f"{sum(METACLIP_COUNTS.values()):,}")
    Console().print(table)
