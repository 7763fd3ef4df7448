"""From a validated config to the plan the engine runs: the pool read by :mod:`pipelines.source`,
the stages, and the export and dataset card as the run's finishers."""

from __future__ import annotations

from pipelines.card.finisher import CardFinisher
from pipelines.engine.config import PipelineConfig
from pipelines.engine.parts import Finisher
from pipelines.engine.plan import Plan, make_plan
from pipelines.export.finisher import ExportFinisher
from pipelines.source.pool import PoolReader
from pipelines.source.readers import SourceSpec


def build_plan(config: PipelineConfig) -> Plan:
    """Check the input and resolve the stages now, before anything is written."""
    source = PoolReader(
        SourceSpec(
            path=config.input,
            format=config.input_format,
            url_column=config.columns.url,
            caption_column=config.columns.caption,
            uid_column=config.columns.uid,
            keep_columns=tuple(config.columns.keep),
            max_row_bytes=config.input_max_row_bytes,
        )
    )
    finishers: list[Finisher] = []
    if config.export is not None:
        finishers.append(ExportFinisher(config.export))
    finishers.append(CardFinisher(config.output_dir.rstrip("/") + "/" + config.name))
    return make_plan(config, source, tuple(finishers))
