"""`vlmcurate train clip` and `vlmcurate eval ...` from the command line."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import yaml
from PIL import Image
from typer.testing import CliRunner

from models.training.clip_recipe import ClipTrainConfig
from pipelines.cli import app
from pipelines.export import write_webdataset

REPO_ROOT = Path(__file__).resolve().parents[2]


def _jpeg(color) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((36, 36, 3), color, np.uint8)).save(out, format="JPEG")
    return out.getvalue()


def test_shipped_training_config_validates():
    raw = yaml.safe_load((REPO_ROOT / "configs" / "train" / "clip.yaml").read_text())
    assert ClipTrainConfig.model_validate(raw).model == "lit-effnet-minilm"


def test_train_then_evaluate_from_the_command_line(tmp_path):
    colors = {"red": (220, 20, 20), "blue": (20, 20, 220)}
    rows = [(f"u{i}", f"a {name} square", _jpeg(color)) for i in range(8) for name, color in colors.items()]
    (tmp_path / "shards").mkdir()
    with open(tmp_path / "shards" / "00000.tar", "wb") as out:
        write_webdataset(pa.table({"uid": [f"{r[0]}-{r[1][2]}" for r in rows], "caption": [r[1] for r in rows],
                                   "image": [r[2] for r in rows]}), out)
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"model": "tiny-vit", "train_data": [str(tmp_path / "shards")],
                                      "output_dir": str(tmp_path / "run"), "batch_size": 8, "lock_image": False,
                                      "lock_text": False}))
    runner = CliRunner()
    result = runner.invoke(app, ["train", "clip", str(config), "max_steps=2", "save_every=2"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "checkpoints" / "step-00000002.pt").exists()

    for name, color in colors.items():
        (tmp_path / "labelled" / name).mkdir(parents=True)
        (tmp_path / "labelled" / name / "0.jpg").write_bytes(_jpeg(color))
    result = runner.invoke(app, ["eval", "zeroshot", str(tmp_path / "labelled"), "--checkpoint", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["n_images"] == 2

    result = runner.invoke(app, ["train", "clip", str(config), "learning_rate=1"])
    assert result.exit_code == 2 and "learning_rate" in result.output
