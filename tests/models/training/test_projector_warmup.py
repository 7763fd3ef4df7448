"""The stage-1 warm start of the projector on the words of each record's answer."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from models.training import progress
from models.training.llava_recipe import VlmTask, VlmTrainConfig, train_vlm
from models.training.projector_warmup import ProjectorWarmup, warm_projector
from tests.models.training.test_llava_recipe import vlm_config, write_llava_export


def _config(tmp_path, **overrides) -> VlmTrainConfig:
    return vlm_config(tmp_path, write_llava_export(tmp_path), **{"batch_size": 2, "max_steps": 2} | overrides)


def test_the_warm_start_lowers_its_loss_and_trains_the_projector_alone(tmp_path):
    task = VlmTask(_config(tmp_path), torch.device("cpu"))
    before = {name: p.detach().clone() for name, p in task.model.named_parameters()}
    reports = []
    with progress.listening(lambda *report: reports.append(report)):
        summary = warm_projector(task, ProjectorWarmup(epochs=15, batch_size=2, lr=1e-2))
    assert [(run, step, total) for run, step, total, _ in reports] == [
        ("out projector warm start", epoch, 15) for epoch in range(16)
    ]  # a bar for the terminal: where it starts, then each epoch with its loss
    assert reports[-1][3]["loss"] == pytest.approx(summary["loss"], abs=1e-5)
    assert summary["records"] == 4 and summary["epochs"] == 15
    assert summary["loss"] < summary["first_loss"] - 0.3, summary  # from ln(19 words) towards ln(~7)
    changed = {name.split(".")[0] for name, p in task.model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {"projector"}


def test_the_warm_start_reads_at_most_max_samples_records(tmp_path):
    task = VlmTask(_config(tmp_path), torch.device("cpu"))
    assert warm_projector(task, ProjectorWarmup(epochs=1, max_samples=3))["records"] == 3


def test_stage_one_warms_the_projector_once_and_not_again_on_resume(tmp_path):
    warmup = {"epochs": 2, "batch_size": 2}
    first = train_vlm(_config(tmp_path, projector_warmup=warmup, save_every=2))
    assert first["projector_warmup"]["records"] == 4 and first["step"] == 2
    resumed = train_vlm(
        _config(tmp_path / "again", projector_warmup=warmup, max_steps=3, output_dir=str(tmp_path / "out"))
    )
    assert resumed["step"] == 3 and "projector_warmup" not in resumed


def test_the_warm_start_is_refused_in_stage_two(tmp_path):
    with pytest.raises(ValidationError, match="projector_warmup is a stage-1 setting"):
        _config(tmp_path, stage=2, projector_warmup={"epochs": 1})
