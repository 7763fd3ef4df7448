"""A CLIP inside a stage: which model (architecture, tag, trained weights), loaded once per worker.

Mixins for stages of ``curation`` and ``generators`` alike (ClipEmbed, ClipCaptionScore): they
add the model's fields, its identity (a digest of the trained weights) and the inference
context (device, precision, the stage's CPU threads). The stage class itself brings
``resources`` and the rest of the Stage contract.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from schemas.files import file_digest


@dataclass(kw_only=True)
class ClipModelRef:
    """Which CLIP: an architecture name (``pretrained`` tag or file) and/or trained ``weights`` (a
    ``vlmcurate train clip`` output folder or checkpoint file; not ``checkpoint``, which in a stage
    entry of a pipeline config means "write the phase to disk after this stage")."""

    model: str | None = None
    pretrained: str | None = None
    weights: str | None = None

    def _check_model(self) -> None:
        if not self.model and not self.weights:
            raise ValueError("set `model` (a CLIP architecture) or `weights` (a vlmcurate train clip output)")

    def _model_identity(self) -> dict[str, Any]:
        from models.clip import checkpoint_file

        if self.weights is None:
            return {}
        return {"checkpoint_blake2b": file_digest(str(checkpoint_file(self.weights)))}


@dataclass(kw_only=True)
class ClipInference(ClipModelRef):
    """A CLIP loaded once per worker: on the GPU where the worker has one (``device: auto``), in
    fp16 autocast there (``precision: auto``) and fp32 on a CPU with as many torch threads as the
    worker's CPUs."""

    device: str = "auto"
    precision: str = "auto"

    def __post_init__(self) -> None:
        from models.inference import check_precision

        self._check_model()
        check_precision(self.precision)

    def identity(self) -> dict[str, Any]:
        return self._model_identity()

    def setup(self) -> None:
        import torch

        from models.clip import load_clip
        from models.inference import inference_device

        self._torch = torch
        self._device, dtype = inference_device(self.device, self.precision)
        self._bundle = load_clip(
            self.model, pretrained=self.pretrained, checkpoint=self.weights, device=str(self._device)
        )
        self._autocast_dtype = None if dtype == torch.float32 else dtype

    def _inference(self) -> Any:
        """The context to run the model in: the stage's CPU threads, no autograd, autocast when not fp32."""
        import contextlib

        from models.inference import cpu_threads

        torch = self._torch
        stack = contextlib.ExitStack()
        stack.enter_context(cpu_threads(self._device, self.resources.cpus))
        stack.enter_context(torch.inference_mode())
        stack.enter_context(
            torch.autocast(self._device.type, dtype=self._autocast_dtype, enabled=self._autocast_dtype is not None)
        )
        return stack
