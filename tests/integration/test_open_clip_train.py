"""open_clip's own trainer (``python -m open_clip_train.main``) trains on our exported shards as they are.

A pool of 24 real images served on loopback is downloaded and exported (webdataset tars of 10
samples + ``sizes.json``); open_clip_train then runs one epoch of the tiny CLIP config
``models/configs/tiny-vit.json`` on CPU, reading the tars and their size from ``sizes.json``
(no ``--train-num-samples``): 24 samples in batches of 12 are two steps, then a checkpoint.

The trainer skips an unreadable sample with a warning (asserted absent) and repeats the shards
to fill its epoch (``with_epoch``), so two steps alone would not show that every sample was
read: the trainer's own reading functions are also run over the tars here and must yield all 24
samples, decoded, with their captions.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys

from pipelines.engine.runner import LocalRunner
from tests.conftest import REPO_ROOT, run_pipeline_dict
from tests.http_server import ImageServer, make_image

SAMPLES, PER_SHARD, BATCH = 24, 10, 12
TINY_VIT = REPO_ROOT / "models" / "configs" / "tiny-vit.json"

# open_clip's main() only knows its built-in configs: register ours, then hand it the command line.
TRAIN = (
    "import sys, open_clip; open_clip.add_model_config(sys.argv.pop(1)); "
    "from open_clip_train.main import main; sys.exit(main(sys.argv[1:]))"
)

# "Train Epoch: 0 [12/24 (50%)] ... Contrastive_loss: 2.4849 (2.4849)"
STEP = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+) \((\d+)%\)\].* Contrastive_loss: (\S+) \(")


def _export(tmp_path):
    server = ImageServer()
    try:
        pool = tmp_path / "pool.csv"
        with open(pool, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["url", "caption"])
            for i in range(SAMPLES):
                writer.writerow([server.add(f"{i}.jpg", make_image(48, 40, seed=i)), f"a small picture numbered {i}"])
        config = {
            "name": "clip",
            "input": str(pool),
            "output_dir": str(tmp_path / "runs"),
            "shard_size": 8,
            "stages": [{"stage": "pipelines.download:Download", "allow_addresses": ["127.0.0.1"], "threads": 4}],
            "export": {"samples_per_shard": PER_SHARD, "formats": ["webdataset"]},
        }
        _, manifest = run_pipeline_dict(config, LocalRunner())
    finally:
        server.close()
    assert manifest.export["rows"] == SAMPLES
    return tmp_path / "runs" / "clip" / "export" / "webdataset"


def _samples_open_clip_reads(urls: str) -> list[dict]:
    """The samples open_clip_train's webdataset pipeline reads from ``urls`` (its own functions)."""
    import webdataset as wds
    from open_clip_train.data import filter_no_caption_or_no_image, tarfile_to_samples_nothrow

    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        tarfile_to_samples_nothrow,
        wds.select(filter_no_caption_or_no_image),
        wds.decode("pilrgb", handler=wds.reraise_exception),
        wds.rename(image="jpg;png;jpeg;webp", text="txt", meta="json"),
    )
    return list(pipeline)


def test_open_clip_train_runs_two_steps_on_the_exported_shards(tmp_path):
    shards = _export(tmp_path)
    sizes = json.loads((shards / "sizes.json").read_text())
    assert sizes == {"00000.tar": 10, "00001.tar": 10, "00002.tar": 4}
    train_data = str(shards / f"{{00000..{len(sizes) - 1:05d}}}.tar")
    samples = _samples_open_clip_reads(train_data)
    assert len(samples) == SAMPLES and len({s["__key__"] for s in samples}) == SAMPLES
    assert sorted(s["text"] for s in samples) == sorted(f"a small picture numbered {i}" for i in range(SAMPLES))
    for sample in samples:
        assert sample["image"].mode == "RGB" and sample["image"].size == (48, 40)
        assert sample["text"] == sample["meta"]["caption"] and sample["__key__"] == sample["meta"]["uid"]

    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
        and not k.startswith(("SLURM_", "OMPI_", "PMI_"))
    }  # open_clip would start distributed training
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "WANDB_MODE": "disabled",
            "NO_ALBUMENTATIONS_UPDATE": "1",
            "CUDA_VISIBLE_DEVICES": "",
            "OMP_NUM_THREADS": "2",
            "PYTHONHASHSEED": "0",
        }
    )
    logs = tmp_path / "logs"
    command = [
        sys.executable,
        "-c",
        TRAIN,
        str(TINY_VIT),
        "--train-data",
        train_data,
        "--dataset-type",
        "webdataset",  # size from sizes.json
        "--model",
        "tiny-vit",
        "--batch-size",
        str(BATCH),
        "--epochs",
        "1",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--lr",
        "1e-3",
        "--warmup",
        "1",
        "--seed",
        "0",
        "--logs",
        str(logs),
        "--name",
        "tiny",
        "--report-to",
        "",
        "--save-frequency",
        "1",
    ]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output

    log = (logs / "tiny" / "out.log").read_text()
    assert "Handling webdataset error" not in log + output, log  # no tar member or sample was skipped
    steps = [m.groups() for m in STEP.finditer(log)]
    assert [(epoch, seen, total, percent) for epoch, seen, total, percent, _ in steps] == [
        ("0", "12", "24", "50"),
        ("0", "24", "24", "100"),
    ], log
    assert all(math.isfinite(float(loss)) and float(loss) > 0 for *_, loss in steps), log

    checkpoint = logs / "tiny" / "checkpoints" / "epoch_1.pt"
    assert checkpoint.is_file() and checkpoint.stat().st_size > 0
    import torch

    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert saved["epoch"] == 1 and saved["name"] == "tiny"
    assert saved["state_dict"]["visual.conv1.weight"].shape == (64, 3, 8, 8)  # tiny-vit: width 64, patch 8
