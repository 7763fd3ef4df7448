"""``vlmcurate train ...`` and ``vlmcurate eval ...``: the model side of the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
import yaml
from pydantic import ValidationError

from pipelines.cli.common import console, errors
from pipelines.cli.console import log_to_file
from pipelines.cli.progress_bars import training_bars
from pipelines.engine.config import apply_overrides, format_validation_error

train_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train models on curated shards.")
eval_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Evaluate CLIP and VLM models.")

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
        with log_to_file(Path(cfg.output_dir) / "logs" / "train.log"), training_bars():
            if distributed and distributed.get("num_workers", 1) > 1:
                from models.training.distributed import train_distributed

                metrics = train_distributed(recipe, cfg, **distributed)
            else:
                metrics = train(cfg)
        console.print(f"trained to step {metrics.get('step')}; checkpoints in {Path(cfg.output_dir) / 'checkpoints'}")


@eval_app.command("zeroshot")
def eval_zeroshot(
    data: Annotated[str, typer.Argument(help="Labelled images: a folder <class>/<image> or such a tar.")],
    model: ModelOption = None,
    pretrained: PretrainedOption = None,
    checkpoint: CheckpointOption = None,
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
    model: ModelOption = None,
    pretrained: PretrainedOption = None,
    checkpoint: CheckpointOption = None,
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


@eval_app.command("vlm")
def eval_vlm(
    checkpoint: Annotated[str | None, typer.Option(help="A `vlmcurate train vlm` output folder or .pt file.")] = None,
    model: Annotated[
        str | None, typer.Option(help="An untrained VLM config instead (a baseline), e.g. lit-smollm2.")
    ] = None,
    captions: Annotated[
        str | None, typer.Option(help="JSONL rows {image, captions: [...]}: loss, BLEU-4, CIDEr-D.")
    ] = None,
    images: Annotated[str | None, typer.Option(help="Folder of the caption set's images (default: beside it).")] = None,
    split: Annotated[
        str, typer.Option(help="all, train or heldout (the stable hash split of image names).")
    ] = "heldout",
    limit: Annotated[int | None, typer.Option(help="At most this many caption images.")] = None,
    probe: Annotated[
        str | None, typer.Option(help="JSONL rows {image, instances|objects}: the POPE-style probe.")
    ] = None,
    probe_images: Annotated[str | None, typer.Option(help="Folder of the probe's images (default: beside it).")] = None,
    probe_limit: Annotated[int | None, typer.Option(help="At most this many probe images.")] = None,
    per_image: Annotated[int, typer.Option(help="Probe questions per image and answer (yes and no).")] = 3,
    template: Annotated[
        str | None, typer.Option(help="Chat template to prompt with (default: the one trained).")
    ] = None,
    instruction: Annotated[str, typer.Option(help="Text after the image when asking for a caption.")] = "",
    show: Annotated[int, typer.Option(help="Generated captions to print.")] = 5,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "auto",
    output: Annotated[Path | None, typer.Option(help="Also write the result as JSON here.")] = None,
) -> None:
    """Held-out caption loss, generated captions with BLEU-4 / CIDEr-D (CHAIR too with --probe), the object probe."""
    import torch

    from models.evaluation import CaptionedImageSet
    from models.evaluation.pope import BoxedImageSet
    from models.evaluation.vlm import evaluate_captions, evaluate_probe
    from models.llava import load_llava
    from models.llava_text import prepare_tokenizer
    from models.training.vlm_checkpoint import load_trained_vlm

    with errors():
        if (checkpoint is None) == (model is None):
            raise ValueError("give exactly one of --checkpoint (a trained VLM) and --model (an untrained config)")
        if captions is None and probe is None:
            raise ValueError("nothing to evaluate: give --captions, --probe or both")
        where = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        bundle = load_trained_vlm(checkpoint, device=where) if checkpoint else load_llava(model, device=where)
        if template is not None or model is not None:
            prepare_tokenizer(bundle.tokenizer, template or "plain")
        result: dict = {"checkpoint": checkpoint, "model": bundle.config.vision + " + " + bundle.config.language_model}
        boxed = BoxedImageSet(probe, probe_images, limit=probe_limit) if probe is not None else None
        if captions is not None:
            result["captions"] = evaluate_captions(
                bundle,
                CaptionedImageSet(captions, images, split=split, limit=limit),
                instruction=instruction,
                show=show,
                objects=boxed.objects_by_image() if boxed is not None else None,
            )
            for example in result["captions"]["examples"]:
                console.print(
                    f"{example['image']}: [bold]{example['generated']!r}[/bold] "
                    f"(reference: {example['references'][0]!r})"
                )
        if boxed is not None:
            result["probe"] = evaluate_probe(bundle, boxed, per_image=per_image)
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(result, indent=2, default=str))
        console.print_json(json.dumps(_summary(result), default=str))


def _summary(result: dict) -> dict:
    """The figures of an ``eval vlm`` result, without the per-image lists."""
    summary = {k: v for k, v in result.items() if k not in ("captions", "probe")}
    if "captions" in result:
        summary["captions"] = {k: v for k, v in result["captions"].items() if k not in ("examples", "skipped")}
        summary["captions"]["skipped"] = len(result["captions"]["skipped"])
    if "probe" in result:
        summary["probe"] = {k: v for k, v in result["probe"].items() if k != "skipped"}
        summary["probe"]["skipped"] = len(result["probe"]["skipped"])
    return summary
