"""Real image-text pairs from ``../shared/data`` for the LiT CLIP benchmarks, and their evaluation.

Shared by ``lit_real_check.py`` and ``curation_value.py``: the Flickr8k split (held-out images by
a hash of the name, as the evaluation readers pick them), the Tux Paint stamps composited on
white, webdataset shards written as the export writes them, the evaluation (CIFAR-10 zero-shot,
Flickr8k held-out retrieval) and a memo of the locked towers' outputs, so that models sharing
those towers encode each evaluation image and text once.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"

from models.evaluation import CaptionedImageSet, LabelledImageSet, evaluate_retrieval, evaluate_zeroshot  # noqa: E402
from models.evaluation.datasets import is_heldout  # noqa: E402
from pipelines.export.shards import write_webdataset  # noqa: E402

#: Share of Flickr8k images (by a hash of the name) held out for evaluation; never trained on.
HELDOUT_FRACTION = 0.25

#: The metrics :func:`evaluate` returns, in print order, with chance level for a 200-image set.
METRICS = ("cifar10_top1", "cifar10_top5", "i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5", "pair_auc")


def require_shared() -> None:
    """Exit with a clear message where the shared data is absent (it is not part of the project)."""
    if not SHARED.exists():
        sys.exit(f"skipped: shared data not found at {SHARED}")


def on_white(body: bytes) -> bytes:
    """A (possibly transparent) image composited on white, as JPEG quality 92."""
    with Image.open(io.BytesIO(body)) as image:
        image = image.convert("RGBA")
        canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
        canvas.alpha_composite(image)
        out = io.BytesIO()
        canvas.convert("RGB").save(out, format="JPEG", quality=92)
        return out.getvalue()


def flickr_records(split: str = "train") -> list[dict[str, Any]]:
    """Flickr8k rows ``{"image", "captions"}`` of ``split``: ``train`` (not held out), ``heldout`` or ``all``."""
    folder = SHARED / "flickr8k"
    records = [json.loads(line) for line in (folder / "captions.jsonl").read_text().splitlines() if line.strip()]
    if split == "all":
        return records
    return [r for r in records if is_heldout(r["image"], HELDOUT_FRACTION) == (split == "heldout")]


def flickr_image(name: str) -> bytes:
    return (SHARED / "flickr8k" / "images" / name).read_bytes()


def tux_records() -> list[dict[str, Any]]:
    """Tux Paint stamps ``{"image", "caption", "category", "jpeg"}``, each composited on white."""
    with tarfile.open(SHARED / "tuxpaint" / "stamps.tar") as tar:
        manifest = [json.loads(x) for x in tar.extractfile("manifest.jsonl").read().decode().splitlines()]
        return [
            {
                "image": r["image"],
                "caption": r["caption"],
                "category": r["category"],
                "jpeg": on_white(tar.extractfile(r["image"]).read()),
            }
            for r in manifest
        ]


def write_shards(rows: list[tuple[str, str, bytes]], folder: Path, per_shard: int = 500) -> None:
    """``(key, caption, image bytes)`` rows as webdataset tars, written as the export writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, start in enumerate(range(0, len(rows), per_shard)):
        part = rows[start : start + per_shard]
        with open(folder / f"{index:05d}.tar", "wb") as out:
            write_webdataset(
                pa.table({"uid": [r[0] for r in part], "caption": [r[1] for r in part], "image": [r[2] for r in part]}),
                out,
            )


def evaluate(bundle, per_class: int, heldout_images: int) -> dict:
    """Zero-shot on CIFAR-10 test (``per_class`` images a class) and retrieval on held-out Flickr8k."""
    zeroshot = evaluate_zeroshot(bundle, LabelledImageSet(SHARED / "cifar10" / "test.tar", per_class=per_class))
    retrieval = evaluate_retrieval(
        bundle,
        CaptionedImageSet(
            SHARED / "flickr8k" / "captions.jsonl",
            split="heldout",
            heldout_fraction=HELDOUT_FRACTION,
            limit=heldout_images,
        ),
        ks=(1, 5, 10),
    )
    return {
        "cifar10_top1": zeroshot["top1"],
        "cifar10_top5": zeroshot["top5"],
        "i2t_R@1": retrieval["image_to_text"]["R@1"],
        "i2t_R@5": retrieval["image_to_text"]["R@5"],
        "t2i_R@1": retrieval["text_to_image"]["R@1"],
        "t2i_R@5": retrieval["text_to_image"]["R@5"],
        "pair_auc": retrieval["pair_auc"]["auc"],
        "heldout_images": retrieval["n_images"],
    }


def chance(heldout_images: int, captions_per_image: int = 5) -> dict[str, float]:
    """Chance level of :func:`evaluate`'s metrics (image->text counts any of an image's captions)."""
    n = heldout_images
    return {
        "cifar10_top1": 0.1,
        "cifar10_top5": 0.5,
        "i2t_R@1": captions_per_image / (captions_per_image * n),
        "i2t_R@5": 5 * captions_per_image / (captions_per_image * n),
        "t2i_R@1": 1 / n,
        "t2i_R@5": 5 / n,
        "pair_auc": 0.5,
    }


class FrozenTowerCache:
    """Memoises the locked towers of LiT bundles by their input, across models that share them.

    :meth:`attach` wraps the ``forward`` of ``model.visual.trunk`` (per image: an image seen
    before, in any batch, is not encoded again) and, with ``text``, of ``model.text.transformer``
    (per call: the same batch of tokens). The modules, their weights and the model's state dict
    stay as they are. Stored outputs are keyed by a digest of the tower's weights and of the
    input, and used only in eval mode without autograd, where an image's output does not depend
    on its batch. The heads still run, so a model gives what it gives without the cache, and an
    image or text set is encoded once for all the models that share the packaged towers.
    """

    def __init__(self) -> None:
        self.store: dict[tuple[str, str], Any] = {}
        self.hits = 0
        self.misses = 0

    def attach(self, bundle, text: bool = True):
        trunk = bundle.model.visual.trunk
        trunk.forward = self._per_image(trunk, trunk.forward, "image:" + _digest_module(trunk))
        if text:
            tower = bundle.model.text.transformer
            tower.forward = self._per_call(tower, tower.forward, "text:" + _digest_module(tower))
        return bundle

    def _per_image(self, module: torch.nn.Module, forward, tag: str):
        def memoised(images: torch.Tensor) -> torch.Tensor:
            if module.training or torch.is_grad_enabled():
                return forward(images)
            keys = [
                (tag, hashlib.blake2b(row.contiguous().numpy().tobytes(), digest_size=16).hexdigest())
                for row in images.detach().cpu()
            ]
            missing = [i for i, key in enumerate(keys) if key not in self.store]
            self.hits += len(keys) - len(missing)
            self.misses += len(missing)
            if missing:
                for i, output in zip(missing, forward(images[missing])):
                    self.store[keys[i]] = output.clone()
            return torch.stack([self.store[key] for key in keys]).to(images.device)

        return memoised

    def _per_call(self, module: torch.nn.Module, forward, tag: str):
        def memoised(*args, **kwargs):
            if module.training or torch.is_grad_enabled():
                return forward(*args, **kwargs)
            digest = hashlib.blake2b(digest_size=16)
            for value in list(args) + [kwargs[k] for k in sorted(kwargs)]:
                if isinstance(value, torch.Tensor):
                    digest.update(str((tuple(value.shape), value.dtype)).encode())
                    digest.update(value.detach().cpu().contiguous().numpy().tobytes())
                else:
                    digest.update(repr(value).encode())
            key = (tag, digest.hexdigest())
            if key not in self.store:
                self.store[key] = forward(*args, **kwargs)
            return self.store[key]

        return memoised


def _digest_module(module: torch.nn.Module) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
