"""MetaCLIP curation as two stages: match captions to entries, then balance by global counts.

:class:`MetaclipMatch` writes ``metaclip_entries`` and rejects captions that match no entry
(``no_metadata_match``). :class:`MetaclipBalance` is a global stage: each shard counts, per
entry, the captions that match it; the counts are summed over the pool; then a caption matching
entries ``M`` is kept with probability ``1 - prod(1 - t / max(count[e], t) for e in M)`` (reason
``metaclip_sampled_out`` otherwise), so entries with more than ``t`` matches keep about ``t``
and tail entries keep everything. The draw depends only on the seed and the row's uid, never
on partitioning, workers or runner. ``t`` is fixed (MetaCLIP: 20,000 for 400M pairs, 170,000
for 2.5B), derived from the pool's own counts (``head_factor``: an entry is a head when it holds
that many times the mean matches of a matched entry) or from a target tail share; the chosen
``t`` is recorded in the manifest.

With ``online: true`` the balance stage drops nothing: it writes each row's keep probability
(``keep_probability``) and the bundled trainers draw each epoch's subset from it, a new draw every
epoch (MetaCLIP's online balancing in the data loader). Each epoch is as balanced as the offline
subset, but a training run that sees the pool for several epochs sees every head row at some
point instead of the same ``t`` each time; offline is for exports that train elsewhere.

Both stages need only the caption (and uid): they run before download (to save fetching rows
that will be dropped) or after it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.metaclip.card import balance_section, top_entries_section
from curation.metaclip.matching import EntryMatcher
from curation.metaclip.metadata import load_metadata
from pipelines.stage import (
    COUNT,
    KEY,
    GiB,
    Rejections,
    Resources,
    Stage,
    SummedStage,
    default_resources,
    file_digest,
    storage,
)
from schemas.columns import CAPTION, KEEP_PROBABILITY, METACLIP_ENTRIES, UID

NO_METADATA_MATCH = "no_metadata_match"
SAMPLED_OUT = "metaclip_sampled_out"


@dataclass
class MetaclipMatch(Stage):
    """Matches each caption against the entries of ``metadata`` (JSON list or one entry a line).

    ``case_sensitive`` and ``extra_punctuation`` are the only departures from MetaCLIP's rules;
    lists built by ``vlmcurate metadata build`` are mostly lower case, so pair them with
    ``case_sensitive: false``.
    """

    name: ClassVar[str] = "metaclip_match"
    input_columns: ClassVar[tuple[str, ...]] = (CAPTION,)
    output_columns: ClassVar[tuple[str, ...]] = (METACLIP_ENTRIES,)

    metadata: str
    case_sensitive: bool = True
    extra_punctuation: str = ""
    # memory: one actor matching against the demo's 351,224 entries peaked at 0.26 GiB
    resources: Resources = default_resources(batch_size=16384, memory=int(0.4 * GiB))

    def __post_init__(self) -> None:
        load_metadata(self.metadata)  # a bad file fails when the pipeline is built, not in a worker

    def identity(self) -> dict[str, Any]:
        return {"metadata_blake2b": file_digest(self.metadata)}

    def setup(self) -> None:
        self._matcher = EntryMatcher(
            load_metadata(storage.absolute(self.metadata)), self.case_sensitive, self.extra_punctuation
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        entries = self._matcher.match(batch[CAPTION])
        rejections = Rejections(batch.num_rows)
        rejections.add(
            pc.equal(pc.list_value_length(entries), 0), NO_METADATA_MATCH, "the caption matches no metadata entry"
        )
        return rejections.attach(pa.table({METACLIP_ENTRIES: entries}))

    def card_notes(self, view: Any) -> str | None:
        return top_entries_section(view, load_metadata(storage.absolute(self.metadata)))


@dataclass
class MetaclipBalance(SummedStage):
    """Caps head entries at about ``threshold`` matches by sampling; keeps tail entries whole.

    Set exactly one of:

    - ``threshold``: ``t`` itself;
    - ``head_factor``: ``t = head_factor * matches / entries matched``, so an entry is a head when
      it holds that many times a matched entry's mean share of the matches, at any pool size.
      MetaCLIP's ``t`` = 20,000 on its 1.6B-pair pool (500k entries, about 3.5 matches a
      caption, so about 11,200 matches per entry) is a factor of about 1.8. A fixed ``t`` scaled
      down to a small pool (20,000 x 5k / 1.6B is below 1) would cap every entry instead;
    - ``tail_share``: the smallest ``t`` for which entries with fewer than ``t`` matches hold at
      least that share of all matches. On a small pool most entries have a handful of matches,
      so this ``t`` is tiny and balancing drops rows of every common word.

    ``online``: keep every row that has a chance (``keep_probability`` > 0) and write the
    probability instead of drawing once; the bundled trainers draw a new subset each epoch.
    """

    name: ClassVar[str] = "metaclip_balance"
    input_columns: ClassVar[tuple[str, ...]] = (UID, METACLIP_ENTRIES)

    threshold: int | None = 20_000
    head_factor: float | None = None
    tail_share: float | None = None
    seed: int = 0
    online: bool = False
    resources: Resources = default_resources(batch_size=65536)

    def __post_init__(self) -> None:
        rules = {"threshold": self.threshold, "head_factor": self.head_factor, "tail_share": self.tail_share}
        if sum(v is not None for v in rules.values()) != 1:
            raise ValueError(
                f"set exactly one of threshold, head_factor and tail_share (the others to null), got {rules}"
            )
        if self.head_factor is not None and self.head_factor <= 0:
            raise ValueError(f"head_factor must be > 0, got {self.head_factor}")
        if self.threshold is not None and self.threshold < 1:
            raise ValueError(f"threshold must be >= 1, got {self.threshold}")
        if self.tail_share is not None and not 0 < self.tail_share < 1:
            raise ValueError(f"tail_share must be between 0 and 1, got {self.tail_share}")

    @property
    def compute_columns(self) -> tuple[str, ...]:
        return (METACLIP_ENTRIES,)

    @property
    def output_columns(self) -> tuple[str, ...]:
        return (KEEP_PROBABILITY,) if self.online else ()

    def counts(self, batch: pa.Table, state: Any) -> pa.Table:
        """The matches of each entry in a batch."""
        ids = pc.list_flatten(batch[METACLIP_ENTRIES]).to_numpy(zero_copy_only=False)
        entries, n = np.unique(ids, return_counts=True)
        return pa.table({KEY: pa.array(entries, pa.int64()), COUNT: pa.array(n, pa.int64())})

    def from_counts(self, totals: pa.Table, state: Any) -> tuple[dict[str, Any], bool]:
        """The matches of every entry over the pool (a dense vector by entry id) and ``t``: one pass."""
        ids, n = totals[KEY].to_numpy(), totals[COUNT].to_numpy()
        counts = np.zeros(int(ids.max()) + 1 if len(ids) else 0, np.int64)
        counts[ids] = n
        if self.threshold is not None:
            t = self.threshold
        elif self.head_factor is not None:
            t = threshold_for_head_factor(counts, self.head_factor)
        else:
            t = threshold_for_tail_share(counts, self.tail_share)
        return {"threshold": int(t), "counts": counts}, True

    def decide(self, batch: pa.Table, state: dict[str, Any]) -> pa.Table:
        counts, t = state["counts"], state["threshold"]
        probability = keep_probability(batch[METACLIP_ENTRIES], counts, t)
        rejections = Rejections(batch.num_rows)
        if self.online:
            rejections.add(pa.array(probability <= 0), SAMPLED_OUT, "keep probability 0 (no entry matched)")
            return rejections.attach(pa.table({KEEP_PROBABILITY: pa.array(probability, pa.float32())}))
        draws = uniform_draws(self.seed, batch[UID])
        rejections.add(
            pa.array(draws >= probability),
            SAMPLED_OUT,
            lambda fresh: pa.array(
                [
                    f"keep probability {p:.4g}"
                    for p in probability[np.asarray(fresh.to_numpy(zero_copy_only=False), bool)]
                ],
                pa.string(),
            ),
        )
        return rejections.attach(batch.select([]))

    def describe(self, state: dict[str, Any]) -> dict[str, Any]:
        counts, t = state["counts"], state["threshold"]
        matched = counts[counts > 0]
        total = int(matched.sum())
        return {
            "threshold": t,
            "entries_matched": int(len(matched)),
            "head_entries": int((matched > t).sum()),
            "matches": total,
            "tail_share": float(matched[matched < t].sum() / total) if total else 0.0,
            "online": self.online,
        }

    def card_notes(self, view: Any) -> str | None:
        return balance_section(view, view.aggregate())


def keep_probability(entries: pa.ChunkedArray | pa.ListArray, counts: np.ndarray, threshold: int) -> np.ndarray:
    """``1 - prod(1 - t / max(count[e], t))`` over each row's entries (0 for a row with none)."""
    entries = entries.combine_chunks() if isinstance(entries, pa.ChunkedArray) else entries
    ids = pc.list_flatten(entries).to_numpy(zero_copy_only=False)
    p = threshold / np.maximum(counts[ids], threshold) if len(ids) else np.empty(0)
    with np.errstate(divide="ignore"):
        log_miss = np.log1p(-p)  # log(1 - p): -inf for tail entries (p = 1), so keep = 1
    lengths = pc.list_value_length(entries).to_numpy(zero_copy_only=False)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    total = np.bincount(rows, weights=log_miss, minlength=len(lengths)) if len(ids) else np.zeros(len(lengths))
    return np.where(lengths > 0, 1.0 - np.exp(total), 0.0)


def uniform_draws(seed: int, uids: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A uniform number in [0, 1) per uid, from the seed and the uid alone (stable everywhere)."""
    prefix = f"{seed}\x1f".encode()
    blake2b = hashlib.blake2b
    values = [
        int.from_bytes(blake2b(prefix + uid.encode(), digest_size=8).digest(), "little") for uid in uids.to_pylist()
    ]
    return np.array(values, dtype=np.uint64).astype(np.float64) / 2.0**64


def threshold_for_head_factor(counts: np.ndarray, factor: float) -> int:
    """``factor`` times the mean count of the matched entries, rounded up (at least 1)."""
    matched = counts[counts > 0]
    return max(1, int(np.ceil(factor * matched.mean()))) if len(matched) else 1


def threshold_for_tail_share(counts: np.ndarray, share: float) -> int:
    """The smallest t whose tail (entries with fewer than t matches) holds ``share`` of all matches.

    The tail grows only at t = c + 1 for each count c, so the answer is the smallest such value
    at which the matches of entries with count <= c reach the share.
    """
    matched = np.sort(counts[counts > 0])
    if not len(matched):
        return 1
    values, first = np.unique(matched, return_index=True)
    last = np.append(first[1:], len(matched)) - 1
    upto = np.cumsum(matched)[last] / matched.sum()  # share of matches in entries with count <= value
    return int(values[np.flatnonzero(upto >= share)[0]]) + 1
