"""Caption metrics: corpus BLEU-4 and CIDEr-D, with the definitions of the COCO caption evaluation.

Both take, per image, one generated caption and its reference captions. Text is lowercased and
split into words on anything that is not a letter, digit or apostrophe (the COCO toolkit runs the
Stanford PTB tokenizer, a Java program, first; on plain captions the two agree except around
rare punctuation, so figures are comparable but not digit-for-digit identical).

- **BLEU-4** (Papineni et al. 2002), corpus level: clipped n-gram precisions for n = 1..4
  pooled over all images, their geometric mean, times the brevity penalty computed from the
  reference length closest to each candidate's.
- **CIDEr-D** (Vedantam et al. 2015, as in the COCO toolkit): per n (1..4), TF-IDF vectors of
  n-grams with document frequencies from the references of the evaluated images; the candidate's
  vector is clipped to each reference's counts, the cosine is damped by a Gaussian of the
  length difference (sigma 6), averaged over references and over n, times 10.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

_WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu4(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 of ``candidates[i]`` against ``references[i]`` (in [0, 1])."""
    _check(candidates, references)
    matched, total = [0] * 4, [0] * 4
    candidate_length = reference_length = 0
    for candidate, refs in zip(candidates, references):
        tokens, ref_tokens = words(candidate), [words(r) for r in refs]
        candidate_length += len(tokens)
        reference_length += min((abs(len(r) - len(tokens)), len(r)) for r in ref_tokens)[1]
        for n in range(1, 5):
            counts = ngrams(tokens, n)
            most = Counter()
            for ref in ref_tokens:
                most |= ngrams(ref, n)
            matched[n - 1] += sum(min(c, most[g]) for g, c in counts.items())
            total[n - 1] += max(len(tokens) - n + 1, 0)
    if min(matched) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matched, total)) / 4
    brevity = 1.0 if candidate_length > reference_length else math.exp(1 - reference_length / max(candidate_length, 1))
    return brevity * math.exp(log_precision)


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], sigma: float = 6.0) -> float:
    """Mean CIDEr-D over the images (0 for no overlap; about 1 for strong captioners on COCO)."""
    _check(candidates, references)
    ref_words = [[words(r) for r in refs] for refs in references]
    documents = len(candidates)
    frequency: Counter[tuple[str, ...]] = Counter()
    for refs in ref_words:
        frequency.update({g for ref in refs for n in range(1, 5) for g in ngrams(ref, n)})
    log_documents = math.log(float(documents))

    def vectors(tokens: list[str]) -> list[dict[tuple[str, ...], float]]:
        out = []
        for n in range(1, 5):
            counts = ngrams(tokens, n)
            out.append({g: c * (log_documents - math.log(max(1.0, frequency[g]))) for g, c in counts.items()})
        return out

    scores = []
    for candidate, refs in zip(candidates, ref_words):
        tokens = words(candidate)
        cand = vectors(tokens)
        per_n = [0.0] * 4
        for ref in refs:
            ref_vectors = vectors(ref)
            damping = math.exp(-((len(tokens) - len(ref)) ** 2) / (2 * sigma**2))
            for n in range(4):
                a, b = cand[n], ref_vectors[n]
                dot = sum(min(value, b[g]) * b[g] for g, value in a.items() if g in b)
                norms = math.sqrt(sum(v * v for v in a.values())) * math.sqrt(sum(v * v for v in b.values()))
                per_n[n] += damping * dot / norms if norms else 0.0
        scores.append(10.0 * sum(per_n) / 4 / len(refs))
    return sum(scores) / len(scores)


def _check(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(candidates) != len(references) or not candidates:
        raise ValueError(f"{len(candidates)} candidates for {len(references)} reference sets (need equal, non-zero)")
    if any(not refs for refs in references):
        raise ValueError("every candidate needs at least one reference caption")
