"""Where a training run keeps its checkpoints: ``step-NNNNNNNN.pt`` files, the latest one last by name."""

from __future__ import annotations

from pathlib import Path

PATTERN = "step-*.pt"


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"step-{step:08d}.pt"


def latest_checkpoint(folder: Path) -> Path | None:
    found = sorted(folder.glob(PATTERN))
    return found[-1] if found else None
