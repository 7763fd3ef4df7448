"""Progress bars on the console: one per pipeline phase (shards), one per training run (steps).

Each shows what is done of how much and the time left; a finished bar shows the time it took.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from models.training.progress import listening
from pipelines.cli.console import console


def _time_column() -> TimeRemainingColumn:
    return TimeRemainingColumn(compact=True, elapsed_when_finished=True)


class PhaseBars:
    """A bar per phase of a pipeline run: ``progress(phase, done, total)`` of
    :func:`pipelines.engine.execute.run_pipeline` feeds it (``total`` 0 while the input is still read)."""

    def __init__(self) -> None:
        self.bar = Progress(
            TextColumn("{task.description:<26}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("shards {task.fields[when]}"),
            _time_column(),
            console=console,
        )
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> PhaseBars:
        self.bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.stop()

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase not in self.tasks:
            self.tasks[phase] = self.bar.add_task(phase, total=total or None, when="ETA")
        self.bar.update(
            self.tasks[phase], completed=done, total=total or None, when="took" if total and done >= total else "ETA"
        )


class TrainingBars:
    """A bar per training run, fed by the training loop's reports (a listener of
    :mod:`models.training.progress`): steps, the task's rate (tokens/s, samples/s), the last loss,
    the time left."""

    def __init__(self) -> None:
        self.bar: Progress | None = None
        self.task: TaskID | None = None

    def __call__(self, run: str, step: int, max_steps: int, metrics: dict[str, Any] | None) -> None:
        if self.bar is None or metrics is None:
            self._start(run, step, max_steps)
        if metrics is not None:
            rate = next(
                (f"{v:,.0f} {k.removesuffix('_per_s')}/s" for k, v in metrics.items() if k.endswith("_per_s")), ""
            )
            self.bar.update(
                self.task,
                completed=step,
                rate=rate,
                loss=f"loss {metrics['loss']:.3f}",
                when="took" if step >= max_steps else "ETA",
            )
        if step >= max_steps:
            self.close()

    def _start(self, run: str, step: int, max_steps: int) -> None:
        self.close()
        self.bar = Progress(
            TextColumn("train {task.description}"),
            BarColumn(bar_width=12),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} {task.fields[loss]} {task.fields[when]}"),
            _time_column(),
            console=console,
        )
        self.bar.start()
        self.task = self.bar.add_task(run, total=max_steps, completed=step, rate="", loss="", when="ETA")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


@contextlib.contextmanager
def training_bars() -> Iterator[None]:
    """Draw a bar for every training run inside the block."""
    bars = TrainingBars()
    with listening(bars):
        try:
            yield
        finally:
            bars.close()
