"""NucleusSampler draws from the distribution that transformers' top-p sampling draws from."""

from __future__ import annotations

import pytest
import torch
from transformers import TopPLogitsWarper

from models.sampling import NucleusSampler, nucleus_threshold, sample_nucleus


def _logits(rows: int, vocab: int, scale: float, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("scale", [0.5, 4.0])  # flat rows (sorted in full) and peaked rows (top-k)
@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.99])
def test_the_nucleus_is_the_set_transformers_keeps(scale, top_p):
    logits = _logits(64, 3000, scale)
    kept_by_transformers = torch.isfinite(TopPLogitsWarper(top_p)(None, logits.clone()))
    probs = logits.softmax(-1)
    assert torch.equal(probs >= nucleus_threshold(probs, top_p, candidates=64)[:, None], kept_by_transformers)


def test_topk_and_full_sort_give_the_same_threshold():
    probs = torch.cat([_logits(8, 500, 0.3, 1), _logits(8, 500, 6.0, 2)]).softmax(-1)
    assert torch.equal(nucleus_threshold(probs, 0.9, candidates=16), nucleus_threshold(probs, 0.9, candidates=500))


def test_draws_follow_the_renormalised_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.06, 0.04]))
    rows = logits.repeat(40_000, 1)
    draws = sample_nucleus(rows, top_p=0.85, temperature=1.0, generator=torch.Generator().manual_seed(0))
    frequency = torch.bincount(draws, minlength=5).float() / len(draws)
    expected = torch.tensor([0.5, 0.25, 0.15, 0, 0]) / 0.9  # 0.5 + 0.25 < 0.85 <= 0.9
    assert torch.allclose(frequency, expected, atol=0.01)


def test_temperature_sharpens_and_a_zero_probability_token_is_never_drawn():
    logits = torch.tensor([[2.0, 1.0, float("-inf"), 0.0]]).repeat(20_000, 1)
    cold = sample_nucleus(logits, 1.0, 0.25, torch.Generator().manual_seed(1))
    assert 2 not in cold.tolist()
    assert (cold == 0).float().mean() > 0.97  # exp(8) / (exp(8) + exp(4) + 1)


def test_the_processor_leaves_only_the_drawn_token_and_is_seeded():
    logits = _logits(6, 100, 2.0)

    def drawn(seed):
        out = NucleusSampler(0.9, 1.0, torch.Generator().manual_seed(seed))(None, logits.clone())
        assert torch.isfinite(out).sum(-1).tolist() == [1] * 6
        return out.argmax(-1)

    assert torch.equal(drawn(3), drawn(3))
    assert not torch.equal(drawn(3), drawn(4))


def test_parameters_are_checked():
    with pytest.raises(ValueError, match="top_p"):
        NucleusSampler(1.5, 1.0, torch.Generator())
    with pytest.raises(ValueError, match="temperature"):
        NucleusSampler(0.9, 0.0, torch.Generator())
