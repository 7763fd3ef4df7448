"""The dataset card as a finisher of a run: written once the run is recorded complete."""

from __future__ import annotations

from pipelines.card.writer import CARD, write_card
from pipelines.engine.parts import FinishedRun


class CardFinisher:
    """Writes ``README.md`` (and its plots) into the run directory; a failure costs only the card."""

    name = "dataset card"
    required = False  # the rows are complete and recorded without their description

    def __init__(self, run_uri: str) -> None:
        self.redo_hint = f"`vlmcurate card {run_uri}` writes it again"

    def check(self, columns: list[str]) -> None:
        """The card describes whatever columns the run has."""

    def outputs(self) -> list[str]:
        return [CARD]

    def finish(self, run: FinishedRun) -> bool:
        if not run.changed and run.rundir.exists(run.rundir.path(CARD)):  # a rerun of a finished run
            return False
        write_card(run.rundir, run.manifest, run.plan.stages)
        return True
