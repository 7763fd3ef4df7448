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
from pipelines.cli.main import app
from pipelines.export.shards import write_webdataset

REPO_ROOT = Path(__file__).resolve().parents[3]


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
        write_webdataset(
            pa.table(
                {
                    "uid": [f"{r[0]}-{r[1][2]}" for r in rows],
                    "caption": [r[1] for r in rows],
                    "image": [r[2] for r in rows],
                }
            ),
            out,
        )
    config = tmp_path / "train.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": "tiny-vit",
                "train_data": [str(tmp_path / "shards")],
                "output_dir": str(tmp_path / "run"),
                "batch_size": 8,
                "lock_image": False,
                "lock_text": False,
            }
        )
    )
    runner = CliRunner()
    result = runner.invoke(app, ["train", "clip", str(config), "max_steps=2", "save_every=2"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "checkpoints" / "step-00000002.pt").exists()
    # A progress bar, not a log line per step: those go to the log file.
    log = tmp_path / "run" / "logs" / "train.log"
    assert f"logs: {log}" in result.output and "train run" in result.output and " 2/2 " in result.output
    assert "step 2/2 epoch" not in result.output and "step 2/2 epoch" in log.read_text()

    for name, color in colors.items():
        (tmp_path / "labelled" / name).mkdir(parents=True)
        (tmp_path / "labelled" / name / "0.jpg").write_bytes(_jpeg(color))
    result = runner.invoke(app, ["eval", "zeroshot", str(tmp_path / "labelled"), "--checkpoint", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["n_images"] == 2

    result = runner.invoke(app, ["train", "clip", str(config), "learning_rate=1"])
    assert result.exit_code == 2 and "learning_rate" in result.output


def test_train_a_vlm_stage_then_evaluate_it_from_the_command_line(tmp_path):
    from tests.models.training.test_llava_recipe import write_llava_export

    data = write_llava_export(tmp_path)
    config = tmp_path / "vlm.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": "tiny-vit-llama",
                "stage": 1,
                "train_data": [str(data)],
                "output_dir": str(tmp_path / "vlm"),
                "batch_size": 2,
                "device": "cpu",
            }
        )
    )
    runner = CliRunner()
    result = runner.invoke(app, ["train", "vlm", str(config), "max_steps=2"])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (data / "images" / "00000").iterdir())
    (tmp_path / "captions.jsonl").write_text(
        "\n".join(json.dumps({"image": f"00000/{name}", "captions": ["a small picture"]}) for name in names)
    )
    (tmp_path / "probe.jsonl").write_text(
        "\n".join(
            json.dumps({"image": f"00000/{name}", "objects": ["square", "dog"][i % 2 :]})
            for i, name in enumerate(names)
        )
    )
    out = tmp_path / "eval.json"
    result = runner.invoke(
        app,
        [
            "eval",
            "vlm",
            "--checkpoint",
            str(tmp_path / "vlm"),
            "--captions",
            str(tmp_path / "captions.jsonl"),
            "--images",
            str(data / "images"),
            "--split",
            "all",
            "--probe",
            str(tmp_path / "probe.jsonl"),
            "--probe-images",
            str(data / "images"),
            "--per-image",
            "1",
            "--device",
            "cpu",
            "--output",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    assert written["captions"]["images"] == len(names) and len(written["captions"]["examples"]) == len(names)
    assert {"bleu4", "cider_d", "caption_loss"} <= set(written["captions"])
    assert {"random", "popular", "adversarial"} <= set(written["probe"])

    result = runner.invoke(app, ["eval", "vlm", "--captions", str(tmp_path / "captions.jsonl")])
    assert result.exit_code != 0 and "exactly one of --checkpoint" in result.output
    result = runner.invoke(app, ["eval", "vlm", "--model", "tiny-vit-llama"])
    assert result.exit_code != 0 and "nothing to evaluate" in result.output
