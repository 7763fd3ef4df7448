"""Training on Ray Train with two CPU workers: the CLIP recipe, and the VLM recipe from the command line.

The recipes themselves are tested in tests/models/training/; here they run as distributed jobs.
"""

from __future__ import annotations

import json

from models.clip import load_clip
from tests.models.training.test_clip_recipe import _config, shards  # noqa: F401 - shards: the fixture
from tests.models.training.test_llava_recipe import write_llava_export


def test_ray_train_runs_the_recipe_on_two_cpu_workers(request, tmp_path, ray_session):
    from models.training.distributed import train_distributed

    config = _config(request.getfixturevalue("shards"), tmp_path, max_steps=3, save_every=3)
    metrics = train_distributed("clip", config, num_workers=2)
    assert metrics["step"] == 3
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert load_clip(checkpoint=str(tmp_path)).source["step"] == 3


def test_ray_train_runs_stage_two_on_two_cpu_workers_from_the_cli(tmp_path, ray_session):
    from typer.testing import CliRunner

    from pipelines.cli.main import app

    data = write_llava_export(tmp_path)
    shard = data / "stage2" / "00000.json"
    records = json.loads(shard.read_text())
    shard.write_text(json.dumps(records[:2]))  # two shards: one per worker
    (data / "stage2" / "00001.json").write_text(json.dumps(records[2:]))
    config = tmp_path / "vlm.yaml"
    config.write_text(
        json.dumps(
            {
                "model": "tiny-vit-llama",
                "stage": 2,
                "train_data": [str(tmp_path)],
                "output_dir": str(tmp_path / "out"),
                "batch_size": 1,
                "max_steps": 2,
                "lr": 1e-3,
                "device": "cpu",
                "amp": "off",
                "distributed": {"num_workers": 2},
            }
        )
    )
    result = CliRunner().invoke(app, ["train", "vlm", str(config)])
    assert result.exit_code == 0, result.output
    steps = [json.loads(x)["step"] for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2] and (tmp_path / "out" / "checkpoints" / "step-00000002.pt").is_file()
