"""``vlmcurate demo``: the whole mission on embedded defaults, offline, on a CPU.

In order: the MetaCLIP metadata list (built offline from WordNet and wordfreq), the noisy pool
and its loopback image host (or the user's own pool, ``--data``), the LiT CLIP's heads (trained
once on clean generated scenes when ``runs/lit-clip`` has no checkpoint), the curation job of
``configs/demo.yaml`` (text rules, MetaCLIP, download, image rules, CLIP score, dedup, CapFilt,
instructions, export), stage 1 and stage 2 of the VLM on the run's LLaVA export, and an
evaluation of the final model on fresh scenes (captions and the object-presence probe). The model
side is configured by ``configs/demo-models.yaml``; each of its sections is validated against the
recipe's own config class before anything runs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipelines.engine.config import PipelineConfig, apply_overrides, format_validation_error, load_config
from schemas.manifest import Manifest

REPO_ROOT = Path(__file__).resolve().parents[2]
PIPELINE_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
MODELS_CONFIG = REPO_ROOT / "configs" / "demo-models.yaml"
BOOTSTRAP_FIRST_SCENE = 1_000_000  # scenes the LiT heads learn from: never in a pool
HELDOUT_FIRST_SCENE = 2_000_000  # scenes the VLM is evaluated on


class DemoEval(BaseModel):
    model_config = ConfigDict(extra="forbid")
    heldout_images: int = Field(default=24, ge=1)
    per_image: int = Field(default=1, ge=1)


class DemoModels(BaseModel):
    """``configs/demo-models.yaml``: recipe configs without their paths, which the demo fills in."""

    model_config = ConfigDict(extra="forbid")
    clip: dict[str, Any]
    bootstrap_scenes: int = Field(default=800, ge=2)
    vlm_stage1: dict[str, Any]
    vlm_stage2: dict[str, Any]
    eval: DemoEval = Field(default_factory=DemoEval)
    long: dict[str, dict[str, Any]] = Field(default_factory=dict)

    def clip_config(self, train_data: Path, output_dir: Path) -> Any:
        from models.training.clip_recipe import ClipTrainConfig

        return _validated(ClipTrainConfig, self.clip, "clip", train_data=[str(train_data)], output_dir=str(output_dir))

    def vlm_config(self, stage: int, train_data: Path, output_dir: Path, init: Path | None = None) -> Any:
        from models.training.llava_recipe import VlmTrainConfig

        section = self.vlm_stage1 if stage == 1 else self.vlm_stage2
        paths = {"train_data": [str(train_data)], "output_dir": str(output_dir)}
        if init is not None:
            paths["init_checkpoint"] = str(init)
        return _validated(VlmTrainConfig, section, f"vlm_stage{stage}", **paths)


def _validated(config_class: type[BaseModel], section: dict[str, Any], name: str, **paths: Any) -> Any:
    try:
        return config_class.model_validate({**section, **paths})
    except ValidationError as e:
        detail = format_validation_error(e, config_class)
        raise ValueError(f"{MODELS_CONFIG.name}, section {name}:\n{detail}") from None


def load_demo_models(overrides: list[str], long: bool = False) -> DemoModels:
    """The model config with ``key=value`` overrides, every section checked now (not after curation);
    ``long``: with the keys of its ``long`` section set first (``vlmcurate demo --long``)."""
    raw = yaml.safe_load(MODELS_CONFIG.read_text())
    if long:
        for section, values in raw.get("long", {}).items():
            raw[section] = {**raw.get(section, {}), **values}
    raw = apply_overrides(raw, overrides)
    try:
        models = DemoModels.model_validate(raw)
    except ValidationError as e:
        raise ValueError(f"{MODELS_CONFIG.name}:\n" + format_validation_error(e, DemoModels)) from None
    here = Path("checked")
    models.clip_config(here, here)
    models.vlm_config(1, here, here)
    models.vlm_config(2, here, here, init=here)
    return models


@dataclass(frozen=True)
class DemoPaths:
    """Where the demo writes, all under one folder (``runs`` by default)."""

    root: Path
    metadata: Path
    pool: Path
    objects: Path
    lit_clip: Path
    bootstrap: Path
    run: Path
    stage1: Path
    stage2: Path
    heldout: Path
    evaluation: Path

    @classmethod
    def under(cls, root: Path, long: bool = False) -> DemoPaths:
        """The paths under ``root``; ``long`` gives the models and their evaluation folders of their
        own, so the two budgets never resume each other's checkpoints (the curation is shared)."""
        vlm = "demo-vlm-long" if long else "demo-vlm"
        return cls(
            root,
            metadata=root / "demo-metadata.json",
            pool=root / "demo-pool.csv",
            objects=root / "demo-objects.txt",
            lit_clip=root / "lit-clip",
            bootstrap=root / "demo-bootstrap",
            run=root / "demo",
            stage1=root / f"{vlm}-stage1",
            stage2=root / f"{vlm}-stage2",
            heldout=root / "demo-heldout",
            evaluation=root / ("demo-eval-long.json" if long else "demo-eval.json"),
        )


class Demo:
    """The demo's steps; ``say`` prints a line, ``curate`` runs a pipeline config and returns its manifest."""

    def __init__(
        self,
        paths: DemoPaths,
        models: DemoModels,
        say: Callable[[str], None],
        curate: Callable[[PipelineConfig], Manifest],
    ) -> None:
        self.paths, self.models, self.say, self.curate = paths, models, say, curate
        self.started = time.monotonic()
        self.steps: list[tuple[str, float]] = []  # each step's title and start

    def header(self, text: str) -> None:
        self.steps.append((text, time.monotonic()))
        self.say(f"\n[bold]{len(self.steps)}. {text}[/] (at {time.monotonic() - self.started:.0f} s)")

    def metadata(self, build: Callable[[Path], None]) -> None:
        """The MetaCLIP list the curation matches against; ``build(path)`` writes it (the command
        line hands in ``vlmcurate metadata build``, so the demo needs no import of curation)."""
        self.header("MetaCLIP metadata")
        if self.paths.metadata.exists():
            self.say(f"kept {self.paths.metadata}")
            return
        build(self.paths.metadata)

    def pool(self, base_url: str, rows: int) -> Path:
        from pipelines.demo.pool import write_demo_pool

        self.header("noisy pool")
        lines = write_demo_pool(str(self.paths.pool), base_url, rows=rows)
        self.say(f"{lines:,} lines written to {self.paths.pool}; images served at {base_url}")
        return self.paths.pool

    def lit_clip(self) -> None:
        from models.checkpoint_files import latest_checkpoint
        from models.training.clip_recipe import train_clip

        self.header("LiT CLIP heads")
        found = latest_checkpoint(self.paths.lit_clip / "checkpoints")
        if found is not None:
            self.say(f"kept {found} (delete {self.paths.lit_clip} to train again)")
            return
        shard = write_scene_shard(self.paths.bootstrap, BOOTSTRAP_FIRST_SCENE, self.models.bootstrap_scenes)
        metrics = train_clip(self.models.clip_config(shard, self.paths.lit_clip))
        self.say(
            f"trained on {self.models.bootstrap_scenes:,} clean scenes to step {metrics.get('step')} "
            f"(loss {metrics.get('loss')}): {self.paths.lit_clip}"
        )

    def curation(self, pool: str, runner: str, own_data: bool, boxes_column: str | None) -> Manifest:
        self.header("curation (configs/demo.yaml)")
        weights = str(self.paths.lit_clip)
        overrides = [
            f"input={pool}",
            f"output_dir={self.paths.root}",
            f"runner={runner}",
            f"stages.metaclip_match.metadata={self.paths.metadata}",
            f"stages.clip_preprocess.weights={weights}",
            f"stages.clip_embed.weights={weights}",
            f"stages.clip_caption_score.weights={weights}",
        ]
        if own_data:
            keep = f"[{boxes_column}]" if boxes_column else "[]"
            overrides += [
                f"columns.keep={keep}",
                f"stages.instruct.boxes_column={boxes_column or 'null'}",
                "stages.instruct.absent_column=null",
                "stages.instruct.response_types=[conversation]",  # no object list: no presence questions
                "stages.absent_objects.vocabulary=null",
                "stages.download.allow_addresses=[]",
            ]
        else:
            from pipelines.demo.scenes import object_names

            self.paths.objects.write_text("\n".join(object_names()) + "\n")
            overrides.append(f"stages.absent_objects.vocabulary={self.paths.objects}")
        return self.curate(load_config(PIPELINE_CONFIG, overrides))

    def vlm(self) -> None:
        from models.training.llava_recipe import train_vlm

        for stage, output, init in ((1, self.paths.stage1, None), (2, self.paths.stage2, self.paths.stage1)):
            self.header(f"VLM stage {stage}")
            config = self.models.vlm_config(stage, self.paths.run, output, init)
            metrics = train_vlm(config)
            rejected = metrics.get("rejected") or {}
            self.say(
                f"step {metrics.get('step')}, loss {metrics.get('loss')}, "
                f"{metrics.get('tokens_per_s')} tokens/s; records refused: {rejected or 'none'}; {output}"
            )

    def evaluate(self) -> dict[str, Any]:
        from models.evaluation.datasets import CaptionedImageSet
        from models.evaluation.pope import BoxedImageSet
        from models.evaluation.vlm import evaluate_captions, evaluate_probe
        from models.training.vlm_checkpoint import load_trained_vlm

        self.header("evaluation on fresh scenes")
        settings = self.models.eval
        write_scene_eval_set(self.paths.heldout, HELDOUT_FIRST_SCENE, settings.heldout_images)
        from pipelines.demo.scenes import object_names

        bundle = load_trained_vlm(self.paths.stage2)
        boxed = BoxedImageSet(self.paths.heldout / "probe.jsonl")
        captions = evaluate_captions(
            bundle,
            CaptionedImageSet(self.paths.heldout / "captions.jsonl"),
            show=3,
            objects=boxed.objects_by_image(),
            vocabulary=object_names(),
        )
        probe = evaluate_probe(bundle, boxed, per_image=settings.per_image)
        result = {"model": str(self.paths.stage2), "captions": captions, "probe": probe}
        self.paths.evaluation.write_text(json.dumps(result, indent=2))
        self.say(
            f"caption loss {captions['caption_loss']:.3f} nats/token, BLEU-4 {captions['bleu4']:.3f}, "
            f"CIDEr-D {captions['cider_d']:.3f} on {captions['images']} images"
        )
        named = captions["objects"]
        self.say(
            f"objects the captions name: {named['object_recall']:.0%} of those in the scenes; "
            f"{named['chair_i']:.0%} of those named are not there (CHAIR_i)"
        )
        for example in captions["examples"]:
            self.say(f"  generated {example['generated']!r}; true {example['references'][0]!r}")
        for setting in ("random", "popular", "adversarial"):
            scores = probe[setting]
            self.say(
                f"object probe ({setting}): accuracy {scores['accuracy']:.3f}, F1 {scores['f1']:.3f}, "
                f"yes-ratio {scores['yes_ratio']:.3f}, unanswered {scores['unanswered']}"
            )
        return result

    def summary(self, manifest: Manifest) -> None:
        self.header("where everything went")
        run = self.paths.run
        rows = [
            ("curated rows", f"{run}/{manifest.final_phase}/"),
            ("rejects, with reasons", f"{run}/rejects/"),
            ("dataset card", f"{run}/README.md"),
            ("shards (webdataset, parquet, llava)", f"{run}/export/"),
            ("LiT CLIP", str(self.paths.lit_clip)),
            ("VLM stage 1", str(self.paths.stage1)),
            ("VLM stage 2 (LoRA merged on load)", str(self.paths.stage2)),
            ("evaluation", str(self.paths.evaluation)),
        ]
        for what, where in rows:
            self.say(f"{what:<38} {where}")
        self.say("\ntime per step")
        ends = [start for _, start in self.steps[1:]]
        for number, ((text, start), end) in enumerate(zip(self.steps, ends), start=1):
            self.say(f"{f'{number}. {text}':<38} {end - start:>6.0f} s")
        self.say(f"done in {time.monotonic() - self.started:.0f} s")


def write_scene_shard(folder: Path, first: int, count: int) -> Path:
    """Scenes ``first .. first + count - 1`` with their exact captions as one webdataset tar."""
    from pipelines.demo.scenes import render, scene
    from pipelines.export.shards import write_webdataset

    folder.mkdir(parents=True, exist_ok=True)
    scenes = [scene(i) for i in range(first, first + count)]
    table = pa.table(
        {
            "uid": [f"scene-{i}" for i in range(first, first + count)],
            "caption": [s.caption for s in scenes],
            "image": [render(s) for s in scenes],
        }
    )
    path = folder / "00000.tar"
    with open(path, "wb") as out:
        write_webdataset(table, out)
    return path


def write_scene_eval_set(folder: Path, first: int, count: int) -> None:
    """``images/``, ``captions.jsonl`` and ``probe.jsonl`` (objects from the boxes) for fresh scenes."""
    from pipelines.demo.scenes import instances, render, scene

    (folder / "images").mkdir(parents=True, exist_ok=True)
    captions, probe = [], []
    for i in range(first, first + count):
        s = scene(i)
        name = f"{i}.jpg"
        (folder / "images" / name).write_bytes(render(s))
        captions.append(json.dumps({"image": name, "captions": [s.caption]}))
        probe.append(json.dumps({"image": name, "instances": instances(s)}))
    (folder / "captions.jsonl").write_text("\n".join(captions) + "\n")
    (folder / "probe.jsonl").write_text("\n".join(probe) + "\n")
