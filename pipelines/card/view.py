"""What a stage sees of a finished run when it writes its own section of the dataset card."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from pipelines.card.figures import markdown_cell, thumbnail_jpeg
from pipelines.card.stats import kept_scan, write_asset
from pipelines.engine.rundir import RunDir
from schemas.manifest import Manifest


@dataclass
class CardView:
    """What a stage reads to write its part of the dataset card (``Stage.card_notes``)."""

    rundir: RunDir
    manifest: Manifest
    stage: str
    summary: object  # what the stage's ``describe`` recorded (global stages), else None

    def kept(self, columns: list[str]) -> pl.LazyFrame | None:
        """A lazy scan of ``columns`` over the rows kept to the end; None when a column is not there."""
        return kept_scan(self.rundir, self.manifest, columns)

    def write_asset(self, name: str, data: bytes) -> str:
        """Write ``data`` beside the card; return the path to link it with."""
        return write_asset(self.rundir, f"{self.stage}-{name}", data)

    def image_link(self, name: str, data: bytes | None) -> str | None:
        """A thumbnail of encoded image ``data`` written beside the card as ``name``; the markdown
        image that shows it, or None when the bytes do not decode."""
        thumbnail = thumbnail_jpeg(data) if data else None
        return f"![{name}]({self.write_asset(name, thumbnail)})" if thumbnail else None

    @staticmethod
    def cell(text: str | None) -> str:
        """``text`` safe inside a markdown table cell."""
        return markdown_cell(text)
