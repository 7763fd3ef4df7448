"""Nucleus (top-p) sampling for ``generate``, without the per-step costs that grow with the vocabulary.

transformers' sampling path sorts every row of the vocabulary at every step (``TopPLogitsWarper``)
and draws with ``torch.multinomial``; on a CPU, for a 30k vocabulary and a batch of a few hundred
sequences, those two take most of a small captioner's time (a profile of ``blip-small``: 36% in the
sort, 20% in the draw). :class:`NucleusSampler` draws from the same distribution (temperature,
then the smallest set of most probable tokens whose mass reaches ``top_p``, renormalised):

- the nucleus threshold comes from the ``candidates`` most probable tokens (``topk``), and only a
  row whose candidates do not reach ``top_p`` (a flat distribution) sorts its probabilities, at
  once when its largest probability shows that they cannot;
- the draw is one seeded uniform per row against the cumulative distribution.

It is a logits processor run under greedy decoding: it leaves only the drawn token finite, so
``argmax`` picks it. Tokens tied with the threshold are all kept (a sort keeps an arbitrary subset).
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import LogitsProcessor


class NucleusSampler(LogitsProcessor):
    """Draws one token per row from the top-p distribution; pass to ``generate(do_sample=False)``."""

    def __init__(self, top_p: float, temperature: float, generator: torch.Generator, candidates: int = 1024) -> None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.top_p, self.temperature, self.generator, self.candidates = top_p, temperature, generator, candidates

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        choice = sample_nucleus(scores, self.top_p, self.temperature, self.generator, self.candidates)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, choice[:, None], 0.0)


def sample_nucleus(
    logits: torch.Tensor, top_p: float, temperature: float, generator: torch.Generator, candidates: int = 1024
) -> torch.Tensor:
    """One token index per row of ``logits``, drawn from its top-p distribution at ``temperature``."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        threshold = nucleus_threshold(probs, top_p, candidates)
        probs = torch.where(probs >= threshold[:, None], probs, 0.0)
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=probs.dtype) * cdf[:, -1:]
    choice = torch.searchsorted(cdf, u, right=True).squeeze(1)
    # u can round up to the total: fall back to the row's last token with any probability.
    last = probs.shape[1] - 1 - probs.flip(-1).ne(0).to(torch.int8).argmax(dim=-1)
    return torch.minimum(choice, last)


def nucleus_threshold(probs: torch.Tensor, top_p: float, candidates: int = 1024) -> torch.Tensor:
    """Per row, the smallest probability in the nucleus: the k-th largest for the smallest k whose
    top-k mass is >= ``top_p``."""
    k = min(candidates, probs.shape[-1])
    threshold = torch.empty(probs.shape[0], dtype=probs.dtype, device=probs.device)
    # k tokens of at most the row's largest probability cannot reach top_p when k * max < top_p:
    # such a row (a flat distribution) goes straight to the sort.
    hopeful = (probs.amax(dim=-1) * k >= top_p).nonzero().squeeze(1)
    covered = torch.zeros(probs.shape[0], dtype=torch.bool, device=probs.device)
    if len(hopeful):
        top = probs[hopeful].topk(k, dim=-1).values
        threshold[hopeful] = _kth_reaching(top, top_p)
        covered[hopeful] = (top.sum(dim=-1) >= top_p) | (k == probs.shape[-1])
    uncovered = (~covered).nonzero().squeeze(1)
    if len(uncovered):
        rows = probs[uncovered]
        if rows.is_cuda:
            ordered = rows.sort(dim=-1, descending=True).values
        else:  # numpy's sort of the values is about twice as fast as torch's on a CPU
            ordered = torch.from_numpy(np.ascontiguousarray(np.sort(rows.numpy(), axis=-1)[:, ::-1]))
        threshold[uncovered] = _kth_reaching(ordered, top_p)
    return threshold


def _kth_reaching(descending: torch.Tensor, top_p: float) -> torch.Tensor:
    cumulative = descending.cumsum(dim=-1)
    index = (cumulative < top_p).sum(dim=-1).clamp_max(descending.shape[-1] - 1)
    return descending.gather(1, index[:, None]).squeeze(1)
