"""Tests of models/clip_inference.py: which CLIP a stage names, and its identity."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from models.clip_inference import ClipInference, ClipModelRef
from schemas.files import file_digest


@dataclass
class _Named(ClipModelRef):
    pass


def test_a_clip_needs_a_model_or_weights():
    with pytest.raises(ValueError, match="set `model`"):
        ClipInference()


def test_the_identity_is_the_digest_of_the_trained_weights(tmp_path):
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"trained")
    assert _Named(weights=str(weights))._model_identity() == {"checkpoint_blake2b": file_digest(str(weights))}
    assert _Named(model="ViT-B-32")._model_identity() == {}
    with pytest.raises(ValueError, match="bad"):
        ClipInference(model="ViT-B-32", precision="bad")
