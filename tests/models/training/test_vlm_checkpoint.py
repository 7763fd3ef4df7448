"""VLM checkpoints keep only what a stage trained and load back into the same model (LoRA merged)."""

from __future__ import annotations

import pytest
import torch

from models.llava import load_llava
from models.training.llava_recipe import VlmTask, train_vlm
from models.training.loop import TrainLoop
from models.training.vlm_checkpoint import load_trained_vlm, read_checkpoint
from tests.models.training.test_llava_recipe import vlm_config, write_llava_export


def _train_in_process(config) -> VlmTask:
    """What train_vlm does, keeping the task so the trained model can be compared."""
    task = VlmTask(config, torch.device("cpu"))
    loop = TrainLoop(
        task, config.loop_config(), config.output_dir, device=torch.device("cpu"), extra_state=task.checkpoint_extras()
    )
    loop.fit()
    return task


def _logits(model, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(2, 3, 32, 32, generator=generator)
    ids = torch.randint(0, 200, (2, 4 + model.image_tokens), generator=generator)
    ids[:, 1 : 1 + model.image_tokens] = model.image_token_id
    model.eval()
    with torch.no_grad():
        return model(pixels, ids, torch.ones_like(ids)).logits


def test_stage_one_checkpoint_holds_the_projector_and_reloads_the_trained_model(tmp_path):
    config = vlm_config(tmp_path, write_llava_export(tmp_path), max_steps=3)
    task = _train_in_process(config)
    saved = read_checkpoint(config.output_dir)
    assert saved["model"] and all(name.startswith("projector.") for name in saved["model"])
    loaded = load_trained_vlm(config.output_dir)
    assert torch.allclose(_logits(loaded.model), _logits(task.model), atol=1e-5)
    assert loaded.tokenizer.chat_template == task.bundle.tokenizer.chat_template  # stage 1: "plain"
    untrained = load_llava(config.model).model
    assert not torch.allclose(_logits(untrained), _logits(task.model), atol=1e-3)


def test_lora_checkpoint_loads_with_the_adapters_merged_into_the_language_model(tmp_path):
    config = vlm_config(
        tmp_path,
        write_llava_export(tmp_path),
        stage=2,
        max_steps=3,
        lr=1e-2,
        lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    )
    task = _train_in_process(config)
    saved = read_checkpoint(config.output_dir)
    assert any("lora_" in name for name in saved["model"]) and saved["lora"]["r"] == 4
    loaded = load_trained_vlm(config.output_dir)
    assert not any("lora_" in name for name, _ in loaded.model.named_parameters())
    assert torch.allclose(_logits(loaded.model), _logits(task.model), atol=1e-4)


def test_stage_two_starts_from_the_merged_weights_of_a_lora_checkpoint(tmp_path):
    data = write_llava_export(tmp_path)
    lora = vlm_config(
        tmp_path,
        data,
        stage=2,
        max_steps=2,
        lr=1e-2,
        output_dir=str(tmp_path / "lora"),
        lora={"r": 4, "alpha": 8, "target_modules": ["q_proj"]},
    )
    train_vlm(lora)
    follow_up = vlm_config(
        tmp_path, data, stage=2, max_steps=1, init_checkpoint=str(tmp_path / "lora"), output_dir=str(tmp_path / "full")
    )
    start = VlmTask(follow_up, torch.device("cpu")).model.state_dict()
    merged = load_trained_vlm(tmp_path / "lora").model.state_dict()
    untrained = load_llava(follow_up.model).model.state_dict()
    assert start.keys() == merged.keys() and all(torch.equal(start[k], merged[k]) for k in start)
    q_proj = [k for k in start if k.endswith("q_proj.weight")]
    assert q_proj and all(not torch.equal(start[k], untrained[k]) for k in q_proj)  # the adapters' update, merged
    assert train_vlm(follow_up)["step"] == 1


def test_a_checkpoint_of_another_model_is_refused_with_a_reason(tmp_path):
    data = write_llava_export(tmp_path)
    train_vlm(vlm_config(tmp_path, data, max_steps=1, output_dir=str(tmp_path / "vit")))
    other = vlm_config(
        tmp_path,
        data,
        model="tiny-effnet-llama",
        max_steps=1,
        init_checkpoint=str(tmp_path / "vit"),
        output_dir=str(tmp_path / "effnet"),
    )
    with pytest.raises((ValueError, RuntimeError), match="projector|size mismatch"):
        train_vlm(other)


def test_a_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint under"):
        load_trained_vlm(tmp_path)


def test_a_checkpoint_from_before_image_aspect_ratio_loads_as_trained_with_crop(tmp_path):
    config = vlm_config(tmp_path, write_llava_export(tmp_path), max_steps=1)
    train_vlm(config)
    assert load_trained_vlm(config.output_dir).config.image_aspect_ratio == "pad"
    path = sorted((tmp_path / "out" / "checkpoints").glob("*.pt"))[-1]
    saved = torch.load(path, weights_only=False)
    del saved["vlm"]["image_aspect_ratio"]
    torch.save(saved, path)
    assert load_trained_vlm(config.output_dir).config.image_aspect_ratio == "crop"
