"""Training progress for whoever shows it: the command line listens and draws a bar per run.

:class:`~models.training.loop.TrainLoop` reports the step it starts from (``metrics`` None) and
then every optimizer step of the main process. With no listener (a library caller, a Ray Train
worker) a report costs nothing; the steps still go to the log and to ``metrics.jsonl``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

#: ``listener(run, step, max_steps, metrics)``; ``run`` names the run (its output folder).
Listener = Callable[[str, int, int, "dict[str, Any] | None"], None]

_listeners: list[Listener] = []


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Hand ``listener`` every report while the block runs."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


def report(run: str, step: int, max_steps: int, metrics: dict[str, Any] | None = None) -> None:
    for listener in list(_listeners):
        listener(run, step, max_steps, metrics)
