"""CLIP scores as stages: decode on CPUs, embed on the accelerator, filter by score.

- :class:`ClipPreprocess` (CPU tasks) decodes each image and resizes and crops it exactly as
  the model's open_clip transform does, handing the model stage ``clip_pixels`` (uint8 RGB, a
  column that lives only inside the phase), so decoding scales with CPU workers and never
  starves the model.
- :class:`ClipEmbed` (actors, a GPU each where the cluster has one) normalises the pixels,
  encodes images and captions in one pass per batch and writes L2-normalised
  ``image_embedding`` and ``text_embedding`` (float16, for dedup) and ``clip_score``: the raw
  cosine of the two float32 embeddings, in [-1, 1], as DataComp reports it (OpenAI's
  CLIPScore is ``100 * max(cos, 0)``; multiply by 100 to compare with it). Captions longer than
  the model's context are truncated by its tokenizer.
- :class:`ClipScoreThreshold` keeps rows with ``clip_score >= min_score``;
  :class:`ClipScoreTopFraction` keeps the top ``fraction`` of the whole pool by score (DataComp's
  "CLIP score top 30%"), exactly: a global two-pass step whose cutoff (score, uid) is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.rank_selection import Narrowing, counted, narrow, pass_keys, score_of
from models.clip_inference import ClipInference, ClipModelRef
from pipelines.stage import COUNT, KEY, Cutoff, GiB, Rejections, Resources, Stage, SummedStage, default_resources
from pipelines.stage.decode import DEFAULT_MAX_PIXELS, decode_to_pixels
from schemas.columns import CAPTION, CLIP_PIXELS, CLIP_SCORE, IMAGE, IMAGE_EMBEDDING, TEXT_EMBEDDING, UID
from schemas.embeddings import float16_lists

BELOW_THRESHOLD = "clip_score_below_threshold"
BELOW_TOP_FRACTION = "clip_score_below_top_fraction"


@dataclass
class ClipPreprocess(ClipModelRef, Stage):
    """Decodes ``image`` into the model's input geometry (``clip_pixels``); bad bytes are rejects.

    Reads the model's preprocessing from its configs (``models.clip.preprocess_spec``) when the
    pipeline is built; the pixels match what the model's own open_clip transform produces
    before ``ToTensor`` and ``Normalize``.
    """

    name: ClassVar[str] = "clip_preprocess"
    input_columns: ClassVar[tuple[str, ...]] = (IMAGE,)
    output_columns: ClassVar[tuple[str, ...]] = (CLIP_PIXELS,)

    max_pixels: int = DEFAULT_MAX_PIXELS
    resources: Resources = default_resources(batch_size=256)

    def __post_init__(self) -> None:
        from models.clip import preprocess_spec

        self._check_model()
        self._spec = preprocess_spec(self.model, pretrained=self.pretrained, checkpoint=self.weights)

    def identity(self) -> dict[str, Any]:
        return {"preprocess": self._spec.as_dict()}  # all that the pixels depend on

    def __call__(self, batch: pa.Table) -> pa.Table:
        pixels, failures = decode_to_pixels(batch[IMAGE].to_pylist(), geometry_transform(self._spec), self.max_pixels)
        rejections = Rejections(batch.num_rows)
        rejections.add_each(failures)
        return rejections.attach(pa.table({CLIP_PIXELS: pa.array(pixels, pa.binary())}))


def geometry_transform(spec: Any) -> Any:
    """open_clip's eval transform for ``spec`` up to the tensor conversion (PIL in, PIL out)."""
    from open_clip.transform import image_transform
    from torchvision import transforms as T

    full = image_transform(
        spec.image_size,
        is_train=False,
        mean=spec.mean,
        std=spec.std,
        resize_mode=spec.resize_mode,
        interpolation=spec.interpolation,
    )
    steps = [
        t
        for t in full.transforms
        if not isinstance(t, (T.ToTensor, T.Normalize)) and type(t).__name__ != "MaybeToTensor"
    ]
    return T.Compose(steps)


@dataclass
class ClipEmbed(ClipInference, Stage):
    """Embeds images (from ``clip_pixels``) and captions; writes both embeddings and ``clip_score``.

    On a cluster without GPUs the runner falls back to a CPU actor granted the node's cores
    (``resources.gpus`` asks for 1 by default).
    """

    name: ClassVar[str] = "clip_embed"
    input_columns: ClassVar[tuple[str, ...]] = (CLIP_PIXELS, CAPTION)
    output_columns: ClassVar[tuple[str, ...]] = (IMAGE_EMBEDDING, TEXT_EMBEDDING, CLIP_SCORE)

    # memory: one actor of configs/demo.yaml (LiT towers, batches of 64, shards of 500 rows) peaked
    # at 2.2 GiB (Ray Data's measure); larger batches and models need more.
    resources: Resources = default_resources(batch_size=256, gpus=1.0, memory=3 * GiB)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from models.inference import normalised_pixels

        torch = self._torch
        spec = self._bundle.spec
        images = normalised_pixels(
            batch[CLIP_PIXELS].to_pylist(),
            spec.image_size,
            spec.mean,
            spec.std,
            self._device,
            "clip_pixels (ClipPreprocess)",
        )
        tokens = self._bundle.tokenizer(batch[CAPTION].to_pylist()).to(self._device)
        with self._inference():
            image_emb = self._bundle.model.encode_image(images)
            text_emb = self._bundle.model.encode_text(tokens)
        image_emb = torch.nn.functional.normalize(image_emb.float(), dim=-1)
        text_emb = torch.nn.functional.normalize(text_emb.float(), dim=-1)
        scores = (image_emb * text_emb).sum(-1)
        return pa.table(
            {
                IMAGE_EMBEDDING: float16_lists(image_emb.cpu().numpy()),
                TEXT_EMBEDDING: float16_lists(text_emb.cpu().numpy()),
                CLIP_SCORE: pa.array(scores.cpu().numpy().astype(np.float32)),
            }
        )


@dataclass
class ClipScoreThreshold(Stage):
    """Rejects rows whose ``clip_score`` is below ``min_score`` (DataComp's B/32 cut is 0.28; L/14: 0.3)."""

    name: ClassVar[str] = "clip_score_threshold"
    input_columns: ClassVar[tuple[str, ...]] = (CLIP_SCORE,)

    min_score: float

    def __post_init__(self) -> None:
        if not -1.0 <= self.min_score <= 1.0:
            raise ValueError(f"min_score is a raw cosine in [-1, 1], got {self.min_score} (a CLIPScore x100?)")

    def __call__(self, batch: pa.Table) -> pa.Table:
        scores = batch[CLIP_SCORE]
        rejections = Rejections(batch.num_rows)
        below = pc.fill_null(pc.less(scores, self.min_score), True)
        rejections.add(
            below,
            BELOW_THRESHOLD,
            lambda rows: [
                f"clip_score {s:.4f} < {self.min_score}" if s is not None else "no clip_score"
                for s in scores.filter(rows).to_pylist()
            ],
        )
        return rejections.attach(batch.select([]))

    def cutoffs(self, summary: Any) -> list[Cutoff]:
        return [Cutoff(CLIP_SCORE, self.min_score, f"threshold {self.min_score:g}")]


@dataclass
class ClipScoreTopFraction(SummedStage):
    """Keeps exactly the top ``fraction`` of scored rows of the whole pool (ties broken by uid).

    The cutoff ``(score, uid)`` of the ``round(fraction * rows)``-th row in (score desc, uid
    asc) order is found by counting passes over the pool (:mod:`curation.rank_selection`: the
    score's high bits, its low bits, then the tied uids), none of which gathers rows on the
    driver, and is recorded in the manifest. ``decide`` keeps the rows at or above it, on every
    worker, so the result is identical under any runner or sharding.
    """

    name: ClassVar[str] = "clip_score_top_fraction"
    input_columns: ClassVar[tuple[str, ...]] = (UID, CLIP_SCORE)

    fraction: float

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")

    @property
    def compute_columns(self) -> tuple[str, ...]:
        return (UID, CLIP_SCORE)

    def counts(self, batch: pa.Table, state: Any) -> pa.Table:
        valid = batch.filter(pc.is_valid(batch[CLIP_SCORE]))
        where = None if state is None else state["narrowing"]
        keys, n = counted(pass_keys(valid[CLIP_SCORE].to_numpy(zero_copy_only=False), valid[UID], where))
        return pa.table({KEY: keys, COUNT: n})

    def from_counts(self, totals: pa.Table, state: Any) -> tuple[Any, bool]:
        keys, n = totals[KEY].to_numpy(), totals[COUNT].to_numpy()
        if state is None:  # the first pass counts every scored row
            keep = int(round(self.fraction * int(n.sum())))
            result = {
                "fraction": self.fraction,
                "rows_scored": int(n.sum()),
                "rows_kept": keep,
                "cutoff_score": None,
                "cutoff_uid": None,
            }
            if not keep:
                return result, True
            state = {**result, "narrowing": Narrowing(keep)}
        where, uid = narrow(keys, n, state["narrowing"])
        if uid is None:
            return {**state, "narrowing": where}, False
        result = {k: v for k, v in state.items() if k != "narrowing"}
        return {**result, "cutoff_score": score_of(where.score_key), "cutoff_uid": uid}, True

    def decide(self, batch: pa.Table, state: Any) -> pa.Table:
        scores = batch[CLIP_SCORE]
        rejections = Rejections(batch.num_rows)
        if state["cutoff_score"] is None:
            below = pa.array(np.ones(batch.num_rows, dtype=bool))
        else:
            cutoff = pa.scalar(state["cutoff_score"], pa.float32())
            above = pc.or_(
                pc.greater(scores, cutoff),
                pc.and_(pc.equal(scores, cutoff), pc.less_equal(batch[UID], state["cutoff_uid"])),
            )
            below = pc.invert(pc.fill_null(above, False))
        rejections.add(
            below, BELOW_TOP_FRACTION, f"below the top {self.fraction:.2%} cutoff, clip_score {state['cutoff_score']}"
        )
        return rejections.attach(batch.select([]))

    def describe(self, state: Any) -> dict[str, Any]:
        return dict(state)

    def cutoffs(self, summary: Any) -> list[Cutoff]:
        if not summary or summary.get("cutoff_score") is None:
            return []
        return [Cutoff(CLIP_SCORE, summary["cutoff_score"], f"top {self.fraction:.0%} cutoff")]
