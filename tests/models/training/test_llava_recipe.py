"""The VLM recipe on tiny random models: both stages learn, rejects are written, resume replays the curve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.training.llava_data import iter_vlm_file
from models.training.llava_recipe import VlmTask, VlmTrainConfig, train_vlm
from models.training.shards import epoch_samples
from tests.http_server import make_image

CAPTIONS = ["a red square on grey", "two dogs run on the sand", "a boat on a calm lake", "a tall tree in snow"]


def write_llava_export(root: Path, bad: bool = False) -> Path:
    """A LLaVA export folder as `export: {formats: [llava]}` writes it: images, stage1/ and stage2/ shards."""
    folder = root / "llava"
    (folder / "images" / "00000").mkdir(parents=True)
    stage1, stage2 = [], []
    for i, caption in enumerate(CAPTIONS):
        image = f"images/00000/img{i}.jpg"
        (folder / image).write_bytes(make_image(40, 40, seed=i))
        stage1.append(
            {
                "id": f"img{i}-brief",
                "image": image,
                "conversations": [
                    {"from": "human", "value": "<image>\nDescribe the picture briefly."},
                    {"from": "gpt", "value": caption},
                ],
            }
        )
        stage2.append(
            {
                "id": f"img{i}-conversation",
                "image": image,
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat is in the picture?"},
                    {"from": "gpt", "value": caption},
                    {"from": "human", "value": "Is it a photograph?"},
                    {"from": "gpt", "value": "No, it is a drawing."},
                ],
            }
        )
    if bad:
        (folder / "images" / "00000" / "broken.jpg").write_bytes(b"not an image")
        stage2[:0] = [  # first, so the first batch reads them
            {
                "id": "swapped",
                "image": "images/00000/img0.jpg",
                "conversations": [{"from": "gpt", "value": "<image>\nhello"}, {"from": "human", "value": "hi"}],
            },
            {
                "id": "two-images",
                "image": "images/00000/img0.jpg",
                "conversations": [
                    {"from": "human", "value": "<image>\n<image>\nWhat?"},
                    {"from": "gpt", "value": "Two."},
                ],
            },
            {
                "id": "broken",
                "image": "images/00000/broken.jpg",
                "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Nothing."}],
            },
        ]
    for name, records in (("stage1", stage1), ("stage2", stage2)):
        (folder / name).mkdir()
        (folder / name / "00000.json").write_text(json.dumps(records))
    return folder


def vlm_config(tmp_path: Path, data: Path, **overrides) -> VlmTrainConfig:
    values = {
        "model": "tiny-vit-llama",
        "train_data": [str(data)],
        "output_dir": str(tmp_path / "out"),
        "batch_size": 4,
        "max_steps": 12,
        "lr": 3e-3,
        "warmup_steps": 0,
        "shuffle_buffer": 0,
        "device": "cpu",
        "amp": "off",
        "save_every": 100,
    } | overrides
    return VlmTrainConfig(**values)


def _losses(output_dir: str) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def test_stage_one_trains_only_the_projector_and_lowers_the_loss(tmp_path):
    config = vlm_config(tmp_path, write_llava_export(tmp_path), lr=1e-2)
    task = VlmTask(config, torch.device("cpu"))
    trainable = {name.split(".")[0] for name, p in task.model.named_parameters() if p.requires_grad}
    assert trainable == {"projector"}
    metrics = train_vlm(config)
    losses = _losses(config.output_dir)
    assert metrics["step"] == 12 and "tokens_per_s" in metrics
    # A frozen random LM starts near ln(vocabulary) = 10.8; the projector alone moves it a little, steadily.
    assert sum(losses[-3:]) / 3 < losses[0] - 0.1, losses


def test_stage_two_starts_from_stage_one_and_trains_the_language_model(tmp_path):
    data = write_llava_export(tmp_path)
    stage1 = vlm_config(tmp_path, data, max_steps=2, output_dir=str(tmp_path / "s1"))
    train_vlm(stage1)
    stage2 = vlm_config(tmp_path, data, stage=2, init_checkpoint=str(tmp_path / "s1"), output_dir=str(tmp_path / "s2"))
    task = VlmTask(stage2, torch.device("cpu"))
    trained = torch.load(sorted((tmp_path / "s1" / "checkpoints").glob("*.pt"))[-1], weights_only=False)["model"]
    assert torch.equal(task.model.projector[0].weight, trained["projector.0.weight"])
    assert any(p.requires_grad for p in task.model.language_model.parameters())
    assert not any(p.requires_grad for p in task.model.vision.parameters())
    train_vlm(stage2)
    losses = _losses(stage2.output_dir)
    assert sum(losses[-3:]) / 3 < losses[0] * 0.9, losses


def test_lora_trains_adapters_and_the_projector_only(tmp_path):
    config = vlm_config(
        tmp_path,
        write_llava_export(tmp_path),
        stage=2,
        max_steps=2,
        lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    )
    task = VlmTask(config, torch.device("cpu"))
    names = [name for name, p in task.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or n.startswith("projector.") for n in names)
    assert any("lora_" in n for n in names)
    assert train_vlm(config)["step"] == 2


def test_stage_two_reads_the_record_sets_it_names(tmp_path):
    data = write_llava_export(tmp_path)
    ids = {}
    for sets in (None, [1, 2]):
        config = vlm_config(tmp_path, data, stage=2, record_sets=sets)
        ids[str(sets)] = {
            sample.id.rsplit("-", 1)[1]
            for sample in epoch_samples(
                VlmTask(config, torch.device("cpu")).files, seed=0, epoch=0, shuffle_buffer=0, reader=iter_vlm_file
            )
        }
    assert ids["None"] == {"conversation"} and ids["[1, 2]"] == {"brief", "conversation"}
    with pytest.raises(ValueError):
        vlm_config(tmp_path, data, stage=2, record_sets=[])


def test_length_grouping_puts_samples_of_like_length_in_one_batch(tmp_path):
    data = write_llava_export(tmp_path)  # brief records are shorter than conversations
    lengths = {}
    for grouping in (0, 4):
        config = vlm_config(
            tmp_path, data, stage=2, record_sets=[1, 2], length_grouping=grouping, shuffle_buffer=8, seed=3
        )
        lengths[grouping] = [
            sorted(batch["attention_mask"].sum(dim=1).tolist())
            for batch in VlmTask(config, torch.device("cpu")).batches(epoch=0, skip=0)
        ]
    grouped = lengths[4]
    assert len(grouped) == 2 and sorted(sum(grouped, [])) == sorted(sum(lengths[0], []))
    short, long = sorted(grouped)
    assert max(short) < min(long)
    assert any(max(batch) >= min(other) for batch in lengths[0] for other in lengths[0] if other is not batch)


def test_records_that_cannot_be_encoded_are_counted_and_written_with_their_reason(tmp_path):
    config = vlm_config(tmp_path, write_llava_export(tmp_path, bad=True), stage=2, max_steps=1)
    metrics = train_vlm(config)
    rejected = [json.loads(line) for line in (Path(config.output_dir) / "rejected.jsonl").read_text().splitlines()]
    assert {r["id"]: r["reason"] for r in rejected} == {
        "swapped": "roles_out_of_order",
        "two-images": "image_token_misplaced",
        "broken": "image_undecodable",
    }
    assert metrics["rejected"] == {"roles_out_of_order": 1, "image_token_misplaced": 1, "image_undecodable": 1}


def test_a_resumed_run_continues_the_uninterrupted_loss_curve(tmp_path):
    data = write_llava_export(tmp_path)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train_vlm(vlm_config(tmp_path, data, max_steps=6, batch_size=2, output_dir=str(whole)))
    train_vlm(vlm_config(tmp_path, data, max_steps=6, batch_size=2, save_every=3, output_dir=str(parts)))
    # Drop what came after step 3, as if the run had been killed there; the second epoch starts at step 3.
    (parts / "checkpoints" / "step-00000006.pt").unlink()
    lines = (parts / "metrics.jsonl").read_text().splitlines()[:3]
    (parts / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    train_vlm(vlm_config(tmp_path, data, max_steps=6, batch_size=2, output_dir=str(parts)))
    assert _losses(str(parts)) == pytest.approx(_losses(str(whole)), abs=1e-6)


def test_response_types_choose_the_records_a_stage_trains_on(tmp_path):
    folder = write_llava_export(tmp_path)
    records = json.loads((folder / "stage2" / "00000.json").read_text())
    for i, record in enumerate(records):
        record["meta"] = {"response_type": "presence" if i % 2 else "conversation"}
    (folder / "stage2" / "00000.json").write_text(json.dumps(records))
    config = vlm_config(tmp_path, folder, stage=2, record_sets=[1, 2], response_types=["presence", "brief"])
    task = VlmTask(config, torch.device("cpu"))
    read = [(s.id, s.response_type) for path in task.files for s in task.read_file(path)]
    assert [kind for _, kind in read] == ["presence", "presence"]  # this export's stage-1 records name no type
    assert {i for i, _ in read} == {"img1-conversation", "img3-conversation"}
    none = vlm_config(tmp_path, folder, stage=2, response_types=["detailed"], output_dir=str(tmp_path / "none"))
    with pytest.raises(ValueError, match="yields no batch"):
        train_vlm(none)
