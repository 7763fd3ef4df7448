"""BLIP CapFilt's filter and the choice of caption(s) per row.

A scorer writes ``caption_scores``, one score per candidate caption of a row, the web caption
first and then the synthetic ones:

- ``BlipItmScore``: BLIP's filter, the ITM head's softmax probability of "match". The image goes
  through the vision encoder once and its features are shared by all its candidates.
- ``ClipCaptionScore``: the alternative, the CLIP score (ITC cosine) against the row's
  ``image_embedding``, LAION-COCO's way of ranking sampled captions.

``CapFiltSelect`` keeps the candidates at or above ``threshold`` (in the scorer's units: 0.5 for
ITM, as BLIP's authors describe) and chooses the row's caption by ``policy``; a row with none left
is rejected with ``capfilt_no_caption``. The web caption, when replaced, stays in ``web_caption``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from generators.capfilt_card import selection_section
from models.clip_inference import ClipInference
from pipelines.stage import GiB, Rejections, Resources, Stage, default_resources
from schemas.columns import (
    BLIP_PIXELS,
    CAPTION,
    CAPTION_SCORES,
    CAPTION_SOURCE,
    IMAGE_EMBEDDING,
    SELECTED_CAPTIONS,
    SYNTHETIC_CAPTIONS,
    UID,
    WEB_CAPTION,
)
from schemas.embeddings import embedding_matrix

NO_CAPTION = "capfilt_no_caption"
POLICIES = ("web_first", "best", "all")


@dataclass
class BlipItmScore(Stage):
    """Writes ``caption_scores``: the ITM match probability of the web and synthetic captions."""

    name: ClassVar[str] = "blip_itm_score"
    input_columns: ClassVar[tuple[str, ...]] = (BLIP_PIXELS, CAPTION, SYNTHETIC_CAPTIONS)
    output_columns: ClassVar[tuple[str, ...]] = (CAPTION_SCORES,)

    model: str = "config:blip-tiny"
    max_text_tokens: int = 35
    device: str = "auto"
    precision: str = "auto"
    # memory: one actor (blip-tiny, shards of 96 rows) peaked at 0.55 GiB; shards of 500 rows of
    # pixels add about 0.6 GiB (BlipCaption's difference)
    resources: Resources = default_resources(batch_size=32, gpus=1.0, memory=int(1.5 * GiB))

    def __post_init__(self) -> None:
        from models.inference import check_precision

        check_precision(self.precision)

    def setup(self) -> None:
        import torch

        from models.blip import load_blip
        from models.inference import inference_device

        self._torch = torch
        self._device, self._dtype = inference_device(self.device, self.precision)
        self._bundle = load_blip("itm", self.model, device=str(self._device), dtype=self._dtype)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from generators.capfilt import blip_pixels
        from models.inference import cpu_threads

        torch, model = self._torch, self._bundle.model
        texts, owner = candidate_texts(batch)
        pixels = blip_pixels(batch, self._bundle, self._device).to(self._dtype)
        tokens = self._bundle.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_text_tokens, return_tensors="pt"
        ).to(self._device)
        with cpu_threads(self._device, self.resources.cpus), torch.inference_mode():
            image = model.vision_model(pixel_values=pixels).last_hidden_state
            image = image[torch.from_numpy(owner).to(self._device)]
            text = model.text_encoder(
                input_ids=tokens.input_ids,
                attention_mask=tokens.attention_mask,
                encoder_hidden_states=image,
                encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long, device=self._device),
            ).last_hidden_state
            match = model.itm_head(text[:, 0, :]).float().softmax(-1)[:, 1].cpu().numpy()
        return pa.table({CAPTION_SCORES: scores_per_row(match, owner, batch.num_rows)})


@dataclass
class ClipCaptionScore(ClipInference, Stage):
    """Writes ``caption_scores``: the CLIP score (ITC, the image-text cosine) of every candidate.

    The alternative filter to BLIP's ITM head, and LAION-COCO's ranking: the row's
    ``image_embedding`` (from ``ClipEmbed`` earlier in the pipeline, same CLIP) against the
    embedding of the web caption and of each synthetic one. Only the text tower runs here; the
    web caption's score is the row's ``clip_score`` up to the float16 storage of the image embedding.
    Thresholds are cosines (DataComp's ViT-B/32 cut: 0.28).
    """

    name: ClassVar[str] = "clip_caption_score"
    input_columns: ClassVar[tuple[str, ...]] = (UID, IMAGE_EMBEDDING, CAPTION, SYNTHETIC_CAPTIONS)
    output_columns: ClassVar[tuple[str, ...]] = (CAPTION_SCORES,)

    # memory: one actor of configs/demo.yaml (LiT towers, batches of 256) peaked at 2.0 GiB
    resources: Resources = default_resources(batch_size=256, gpus=1.0, memory=int(2.5 * GiB))

    def __call__(self, batch: pa.Table) -> pa.Table:

        torch = self._torch
        texts, owner = candidate_texts(batch)
        images = torch.from_numpy(embedding_matrix(batch, None).astype(np.float32))
        tokens = self._bundle.tokenizer(texts).to(self._device)
        with self._inference():
            text = self._bundle.model.encode_text(tokens)
        text = torch.nn.functional.normalize(text.float(), dim=-1).cpu()
        if text.shape[1] != images.shape[1]:
            raise ValueError(
                f"image_embedding has {images.shape[1]} dimensions, this CLIP's text embedding "
                f"{text.shape[1]}: score with the CLIP that ClipEmbed used"
            )
        images = torch.nn.functional.normalize(images, dim=-1)[torch.from_numpy(owner)]
        cosine = (images * text).sum(-1).numpy()
        return pa.table({CAPTION_SCORES: scores_per_row(cosine, owner, batch.num_rows)})


def candidate_texts(batch: pa.Table) -> tuple[list[str], np.ndarray]:
    """Every row's candidates, web caption first then its synthetic ones, flattened, and the row
    each belongs to."""
    web = batch[CAPTION].to_pylist()
    synthetic = batch[SYNTHETIC_CAPTIONS].to_pylist()
    candidates = [[w or ""] + list(s or []) for w, s in zip(web, synthetic)]
    owner = np.repeat(np.arange(batch.num_rows), [len(c) for c in candidates])
    return [t for c in candidates for t in c], owner


def scores_per_row(scores: np.ndarray, owner: np.ndarray, rows: int) -> pa.Array:
    """Flat per-candidate ``scores`` regrouped into one list per row (``owner`` is sorted)."""
    offsets = np.searchsorted(owner, np.arange(rows + 1)).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(scores.astype(np.float32)))


@dataclass
class CapFiltSelect(Stage):
    """Chooses each row's caption among the candidates whose score is >= ``threshold``.

    ``policy``: ``web_first`` keeps the web caption if it passes, else the best synthetic one;
    ``best`` takes the highest-scoring candidate; ``all`` does the same and lists every passing
    candidate, best first, in ``selected_captions`` (several training pairs per image), which
    otherwise holds the one chosen.
    """

    name: ClassVar[str] = "capfilt_select"
    input_columns: ClassVar[tuple[str, ...]] = (CAPTION, SYNTHETIC_CAPTIONS, CAPTION_SCORES)
    output_columns: ClassVar[tuple[str, ...]] = (CAPTION, WEB_CAPTION, CAPTION_SOURCE, SELECTED_CAPTIONS)

    threshold: float = 0.5
    policy: str = "web_first"
    resources: Resources = default_resources(batch_size=4096)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold is an ITM probability or a CLIP cosine, in [-1, 1]; got {self.threshold}")

    def __call__(self, batch: pa.Table) -> pa.Table:
        rejections = Rejections(batch.num_rows)
        chosen, sources, selected, failed, details = [], [], [], [], []
        rows = zip(batch[CAPTION].to_pylist(), batch[SYNTHETIC_CAPTIONS].to_pylist(), batch[CAPTION_SCORES].to_pylist())
        for web, synthetic, scores in rows:
            candidates = [web] + list(synthetic or [])
            if len(scores) != len(candidates):
                raise ValueError(
                    f"{len(scores)} caption_scores for {len(candidates)} candidates: "
                    f"was BlipItmScore run after the captioner?"
                )
            passing = sorted((s, -i) for i, s in enumerate(scores) if s >= self.threshold)[::-1]
            if not passing:
                chosen.append(web)
                sources.append(None)
                selected.append([])
                failed.append(True)
                details.append(json.dumps({"best_score": round(max(scores), 4), "threshold": self.threshold}))
                continue
            best = -passing[0][1]
            pick = 0 if self.policy == "web_first" and scores[0] >= self.threshold else best
            chosen.append(candidates[pick])
            sources.append("web" if pick == 0 else "synthetic")
            selected.append([candidates[-i] for _, i in passing] if self.policy == "all" else [candidates[pick]])
            failed.append(False)
            details.append(None)
        rejections.add(np.array(failed), NO_CAPTION, pa.array(details, pa.string()))
        return rejections.attach(
            pa.table(
                {
                    CAPTION: pa.array(chosen, pa.string()),
                    WEB_CAPTION: batch[CAPTION],
                    CAPTION_SOURCE: pa.array(sources, pa.string()),
                    SELECTED_CAPTIONS: pa.array(selected, pa.list_(pa.string())),
                }
            )
        )

    def card_notes(self, view: Any) -> str | None:
        return selection_section(view, self.threshold, self.policy)
