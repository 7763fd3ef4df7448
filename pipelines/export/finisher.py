"""The export as a finisher of a run: checked against the final columns before the run, written
by the runner's tasks (one per export shard) once the last phase has finished."""

from __future__ import annotations

from pipelines.engine.config import ExportConfig
from pipelines.engine.parts import FinishedRun
from pipelines.export.shards import (
    LLAVA,
    ExportJob,
    export_done,
    export_settings,
    finish_export,
    plan_export,
    write_export_shard,
)
from schemas.columns import BRIEF_RECORDS, IMAGE, INSTRUCTIONS


class ExportFinisher:
    """Writes the kept rows in the configured formats under the run directory's export folder."""

    name = "export"
    required = True  # a run is complete with its export

    def __init__(self, options: ExportConfig) -> None:
        self.options = options
        self.redo_hint = "rerun the same command: the run resumes at its export"

    def check(self, columns: list[str]) -> None:
        """Fail before the run, not at its end, when a format lacks the columns it needs."""
        for name in ("webdataset", LLAVA):
            if name in self.options.formats and IMAGE not in columns:
                raise ValueError(
                    f"export.formats includes {name}, which needs image bytes, but no stage writes the "
                    "image column: add a download stage (pipelines.download:Download) or export parquet only"
                )
        if LLAVA in self.options.formats and not {INSTRUCTIONS, BRIEF_RECORDS} & set(columns):
            raise ValueError(
                "export.formats includes llava, which needs instruction records: add "
                "generators.instruct:InstructGenerate (stage 2) and/or generators.instruct:BriefDescriptions "
                "(stage 1)"
            )

    def outputs(self) -> list[str]:
        return [self.options.folder]

    def finish(self, run: FinishedRun) -> bool:
        """Write the export unless it is there with these settings; record it in the manifest."""
        options, rundir = self.options, run.rundir
        rows = sum(e.rows_out for e in run.entries.values())
        settings = export_settings(options.formats, options.samples_per_shard, run.phase, rows)
        written = not export_done(rundir, options.folder, settings)
        if written:
            rundir.remove_folder(options.folder)  # an export with other settings, or a partial one
            shards = plan_export(run.entries, options.samples_per_shard)
            job = ExportJob(rundir, run.phase, options.folder, tuple(options.formats))
            counts = list(run.runner.map_tasks(write_export_shard, job, shards))
            finish_export(rundir, options.folder, settings, counts)
        run.manifest.export = {
            **settings,
            "folder": rundir.path(options.folder),
            "shards": -(-rows // options.samples_per_shard),
        }
        return written
