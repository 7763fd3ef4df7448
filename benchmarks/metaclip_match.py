"""MetaCLIP substring matching: the project's matcher against a plain loop and plain pyahocorasick.

Texts: the real alt-text of ../shared/data (LAION-style 10,000) and COCO's 25,014 captions.
Metadata: about 500,000 real entries built offline: WordNet 3.0 lemma names, wordfreq unigrams,
then bigrams (and trigrams if needed) of the Flickr8k, LAION-style and COCO captions, most
frequent first, to reach --entries. Three matchers, same semantics (MetaCLIP 1), one run:

- the plain loop (``" " + e + " " in text`` over every entry), timed on a sample, per text;
- a straightforward pyahocorasick implementation: normalise each text in Python, iterate the
  automaton over it, collect the distinct entry ids;
- ours (``curation.metaclip.matching.EntryMatcher``): vectorised normalisation, segment ids by
  hash join, one-word entries by array lookup, longer windows by a keyed join, all checked
  exactly; batches of 16,384 captions (the stage's batch size), output as Arrow lists.

Each side is timed producing its own native output (Python lists for pyahocorasick, Arrow
lists for ours); the comparison happens after the clock stops.

Matches must be identical (all texts for pyahocorasick, the sample for the loop).

    .venv/bin/python benchmarks/metaclip_match.py [--entries 500000] [--loop-sample 40]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import ahocorasick
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curation.metaclip.build import build_metadata  # noqa: E402
from curation.metaclip.matching import EntryMatcher, normalize  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
BATCH = 16384


def load_texts() -> list[str]:
    laion = pq.read_table(SHARED / "alttext" / "laion_style_10000.parquet", columns=["TEXT"])["TEXT"].to_pylist()
    coco = [a["caption"] for a in json.loads((SHARED / "coco" / "captions_val2017.json").read_text())["annotations"]]
    return [t for t in laion if t is not None] + coco


def corpus_ngrams(texts: list[str], n: int) -> list[str]:
    counts: Counter[str] = Counter()
    for text in texts:
        tokens = [t for t in normalize(text).split() if t.isalnum()]
        counts.update(" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return [gram for gram, _ in counts.most_common()]


def build_entries(target: int, texts: list[str]) -> list[str]:
    entries, _ = build_metadata(unigrams=400_000)
    flickr = (SHARED / "flickr8k" / "all_captions_text_only.csv").read_text(encoding="utf-8").splitlines()[1:]
    corpus = texts + [line.split(",", 1)[1] for line in flickr if "," in line]
    present = set(entries)
    for n in (2, 3, 4):
        for gram in corpus_ngrams(corpus, n):
            if len(entries) >= target:
                return entries
            if gram not in present:
                entries.append(gram)
                present.add(gram)
    return entries


def plain_loop(text: str, padded: list[str]) -> list[int]:
    spaced = normalize(text)
    return [i for i, entry in enumerate(padded) if entry in spaced]


def pyahocorasick_baseline(entries: list[str]):
    automaton = ahocorasick.Automaton()
    for i, entry in enumerate(entries):
        automaton.add_word(f" {entry} ", i)
    automaton.make_automaton()

    def match(text: str) -> list[int]:
        return sorted({i for _, i in automaton.iter(normalize(text))})

    return match


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=500_000)
    parser.add_argument("--loop-sample", type=int, default=40)
    args = parser.parse_args()
    if not (SHARED / "coco").exists():
        sys.exit(f"skipped: {SHARED} not found (clone the project beside ../shared)")
    texts = load_texts()
    entries = build_entries(args.entries, texts)
    print(f"{len(texts):,} texts, {len(entries):,} metadata entries")

    start = time.perf_counter()
    baseline = pyahocorasick_baseline(entries)
    base_build = time.perf_counter() - start
    start = time.perf_counter()
    expected = [baseline(t) for t in texts]
    base_s = time.perf_counter() - start

    start = time.perf_counter()
    matcher = EntryMatcher(entries)
    ours_build = time.perf_counter() - start
    batches = [pa.array(texts[offset : offset + BATCH], pa.string()) for offset in range(0, len(texts), BATCH)]
    start = time.perf_counter()
    results = [matcher.match(batch) for batch in batches]  # Arrow lists, as the stage writes them
    ours_s = time.perf_counter() - start
    got = [ids for result in results for ids in result.to_pylist()]
    if got != expected:
        sys.exit(f"FAILED: {sum(a != b for a, b in zip(got, expected))} texts matched differently")

    padded = [f" {e} " for e in entries]
    sample = random.Random(0).sample(range(len(texts)), args.loop_sample)
    start = time.perf_counter()
    for i in sample:
        if plain_loop(texts[i], padded) != got[i]:
            sys.exit(f"FAILED: text {i} differs from the plain loop")
    loop_per_text = (time.perf_counter() - start) / len(sample)

    n = len(texts)
    matches = sum(map(len, got))
    print(f"{matches:,} matches ({matches / n:.1f} per text); identical in all three")
    print(f"plain loop:    {1 / loop_per_text:12,.1f} texts/s (timed on {len(sample)} texts)")
    print(f"pyahocorasick: {n / base_s:12,.0f} texts/s (automaton built in {base_build:.1f} s)")
    print(f"ours:          {n / ours_s:12,.0f} texts/s (automaton built in {ours_build:.1f} s)")
    print(f"ours vs plain loop: {loop_per_text * n / ours_s:,.0f}x")
    print(f"result: metaclip_match ours={n / ours_s:.0f} baseline={n / base_s:.0f} ratio={base_s / ours_s:.2f} texts/s")


if __name__ == "__main__":
    main()
