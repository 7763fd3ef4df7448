"""``vlmcurate train ...`` and ``vlmcurate eval ...``: the model side of the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
import yaml
from pydantic import ValidationError

from pipelines.cli_common import console, errors
from pipelines.config import apply_overrides, format_validation_error

train_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train models on curated shards.")
eval_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Evaluate CLIP models.")

ModelOption = Annotated[str | None, typer.Option(help="CLIP architecture, e.g. lit-effnet-minilm or ViT-B-32.")]
PretrainedOption = Annotated[str | None, typer.Option(help="open_clip pretrained tag or weights file.")]
CheckpointOption = Annotated[str | None, typer.Option(help="A `vlmcurate train clip` output folder or .pt file.")]


@train_app.command("clip")
def train_clip_command(
    config: Annotated[Path, typer.Argument(help="Training YAML, e.g. configs/train/clip.yaml.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. max_steps=10.")] = None,
) -> None:
    """Train (or resume) a CLIP contrastively on exported shards."""
    _train("clip", config, overrides)


@train_app.command("vlm")
def train_vlm_command(
    config: Annotated[Path, typer.Argument(help="Training YAML, e.g. configs/train/vlm-stage1.yaml.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. max_steps=10.")] = None,
) -> None:
    """Train (or resume) one stage of the LLaVA-style VLM on exported shards."""
    _train("vlm", config, overrides)


def _train(recipe: str, config: Path, overrides: list[str] | None) -> None:
    from models.training.distributed import load_recipe

    config_class, train = load_recipe(recipe)
    with errors():
        raw = apply_overrides(yaml.safe_load(config.read_text()) or {}, overrides or [])
        distributed = raw.pop("distributed", None)
        try:
            cfg = config_class.model_validate(raw)
        except ValidationError as e:
            raise ValueError("invalid training config:\n" + format_validation_error(e, config_class)) from None
        if distributed and distributed.get("num_workers", 1) > 1:
            from models.training.distributed import train_distributed

            metrics = train_distributed(recipe, cfg, **distributed)
        else:
            metrics = train(cfg)
        console.print(f"trained to step {metrics.get('step')}; checkpoints in {Path(cfg.output_dir) / 'checkpoints'}")


@eval_app.command("zeroshot")
def eval_zeroshot(
    data: Annotated[str, typer.Argument(help="Labelled images: a folder <class>/<image> or such a tar.")],
    model: ModelOption = None, pretrained: PretrainedOption = None, checkpoint: CheckpointOption = None,
    per_class: Annotated[int | None, typer.Option(help="At most this many images per class.")] = None,
    batch_size: int = 64,
) -> None:
    """Zero-shot top-1/top-5 accuracy with the project's prompt templates."""
    from models.clip import load_clip
    from models.evaluation import LabelledImageSet, evaluate_zeroshot

    with errors():
        bundle = load_clip(model, pretrained=pretrained, checkpoint=checkpoint)
        result = evaluate_zeroshot(bundle, LabelledImageSet(data, per_class=per_class), batch_size=batch_size)
        console.print_json(json.dumps({k: v for k, v in result.items() if k != "per_class"}, default=str))


@eval_app.command("retrieval")
def eval_retrieval(
    captions: Annotated[str, typer.Argument(help="JSONL rows {image, captions: [...]}.")],
    images: Annotated[str | None, typer.Option(help="Folder of the images (default: beside the JSONL).")] = None,
    model: ModelOption = None, pretrained: PretrainedOption = None, checkpoint: CheckpointOption = None,
    split: Annotated[str, typer.Option(help="all, train or heldout (a stable hash split of image names).")] = "heldout",
    limit: Annotated[int | None, typer.Option(help="At most this many images.")] = None,
) -> None:
    """Image-to-text and text-to-image recall@k, and the true-vs-shuffled pair ROC AUC."""
    from models.clip import load_clip
    from models.evaluation import CaptionedImageSet, evaluate_retrieval

    with errors():
        bundle = load_clip(model, pretrained=pretrained, checkpoint=checkpoint)
        result = evaluate_retrieval(bundle, CaptionedImageSet(captions, images, split=split, limit=limit))
        console.print_json(json.dumps(result, default=str))
