"""The Stage contract: what every curation and generation step looks like to the runners.

A stage is a small dataclass. Its fields are its parameters (validated against the config when a
pipeline is built); ``input_columns`` and ``output_columns`` say what it reads and writes;
``resources`` says what one worker needs. ``setup()`` runs once per worker before the first
batch (load a model there), and ``__call__`` maps a batch to a batch.

The runner hands a stage only its ``input_columns`` and merges back only its
``output_columns``, so a stage cannot read or clobber what it did not declare. A stage never
deletes rows: it returns exactly as many rows as it received, in the same order, and marks the
ones to drop with a reason (:class:`Rejections`). The runner moves those rows to the rejects
sink and counts them in the ledger.

Decisions that need the whole pool (entry counts, a global score cutoff, duplicate clusters)
are a :class:`GlobalStage`, in one of two forms, neither of which gathers rows in one process:
a :class:`SummedStage` counts rows by key, summed over the pool (MetaCLIP's entries, score
histograms); a :class:`KeyedStage` brings the rows of each key together and decides them there
(duplicates), writing its decisions by shard; a :class:`LinkedStage` is a keyed stage whose
reductions find edges, clustered in one task. ``decide`` then maps every batch with the result.

Stages never import Ray: the same object runs in-process under ``LocalRunner`` and inside Ray
Data workers under ``RayRunner``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from schemas.rejects import REJECT_DETAIL, REJECT_REASON

GiB = 2**30


@dataclass
class Resources:
    """What one worker of a stage needs; every field can be overridden from the YAML config.

    ``batch_size`` is the number of rows per call of the stage. ``concurrency`` is the number of
    workers (actors for stages with ``setup``, tasks otherwise); ``None`` lets the runner size
    the pool from the cluster. ``gpus`` greater than zero asks for a GPU where the cluster has
    one and falls back to the CPU, with a warning, where it has none. ``memory`` (bytes) is what
    one worker holds at its peak, model included: Ray places workers where that much is free
    (stages that load a model declare a measured figure; ``None`` asks for nothing).
    """

    cpus: float = 1.0
    gpus: float = 0.0
    batch_size: int = 1024
    concurrency: int | None = None
    memory: int | None = None

    def __post_init__(self) -> None:
        if self.cpus <= 0:
            raise ValueError(f"resources.cpus must be > 0, got {self.cpus}")
        if self.gpus < 0:
            raise ValueError(f"resources.gpus must be >= 0, got {self.gpus}")
        if self.batch_size < 1:
            raise ValueError(f"resources.batch_size must be >= 1, got {self.batch_size}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"resources.concurrency must be >= 1 or null, got {self.concurrency}")
        if self.memory is not None and self.memory < 1:
            raise ValueError(f"resources.memory must be >= 1 (bytes) or null, got {self.memory}")


def default_resources(**overrides: Any) -> Any:
    """A stage's own default resources: ``resources: Resources = default_resources(batch_size=...)``.

    The field stays keyword-only, so a stage can still declare required parameters.
    """
    return field(default_factory=lambda: Resources(**overrides), kw_only=True)


@dataclass(frozen=True)
class Cutoff:
    """A threshold a stage applied to a numeric column: rows on one side of ``value`` left."""

    column: str
    value: float
    label: str


@dataclass(kw_only=True)
class Stage:
    """Base class of every pipeline step (see the module docstring for the contract)."""

    #: Default name of the stage in the ledger and in reject records.
    name: ClassVar[str] = "stage"
    #: Columns the stage reads; the runner passes exactly these.
    input_columns: ClassVar[tuple[str, ...]] = ()
    #: Columns the stage writes (new or replaced), registered in ``schemas.columns``.
    output_columns: ClassVar[tuple[str, ...]] = ()
    #: Whether its phase ends after it unless the config says otherwise (``checkpoint:``), so
    #: that what it produced at great cost (downloads) is on disk before anything else runs.
    checkpoint_after: ClassVar[bool] = False

    resources: Resources = field(default_factory=Resources)

    def setup(self) -> None:
        """Load models or other per-worker state; called once per worker before any batch."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        raise NotImplementedError(f"{type(self).__name__} does not implement __call__")

    def identity(self) -> dict[str, Any]:
        """What else determines this stage's output besides its parameters (the content of a file
        it reads, say); part of the config hash, so a changed file is a changed config."""
        return {}

    def worker_env(self) -> dict[str, str]:
        """Environment variables this stage's workers need from the driver (an endpoint's API key
        named in the config): the Ray runner sets them in the workers' runtime environment."""
        return {}

    def cutoffs(self, summary: Any) -> list[Cutoff]:
        """The thresholds this stage applied to numeric columns, for the dataset card's
        histograms; ``summary`` is what ``describe`` recorded in the manifest (global stages)."""
        return []

    def card_notes(self, view: Any) -> str | None:
        """The stage's own section of the dataset card (markdown, under a heading with its name), or
        None. ``view`` is a :class:`pipelines.card.view.CardView`: the stage's ``describe`` summary,
        counts and aggregate, lazy scans of the rows kept to the end and of every row it saw, and
        the card's figures (``view.figure``, ``view.plot``) and images."""
        return None

    def is_transient(self, reason: str) -> bool:
        """Whether a row this stage rejected for ``reason`` may pass on another attempt.

        ``vlmcurate retry-failed`` re-runs such rows; the default is that no rejection is.
        """
        return False

    @property
    def has_setup(self) -> bool:
        """Whether the stage overrides ``setup`` (it then runs in long-lived actors)."""
        return type(self).setup is not Stage.setup


@dataclass(kw_only=True)
class GlobalStage(Stage):
    """A decision over the whole pool, then applied batch by batch: subclass :class:`SummedStage`
    or :class:`KeyedStage`, which say how the pool is read.

    Its state (saved with the run, so a resumed run decides exactly as before) comes from the
    pool's ``compute_columns``; ``decide`` maps a batch of ``input_columns`` using it, like
    ``__call__`` for an ordinary stage. ``describe`` turns the state into a JSON-friendly
    summary for the manifest (a chosen cutoff, the number of clusters).
    """

    @property
    def compute_columns(self) -> tuple[str, ...]:
        return self.input_columns

    def decide(self, batch: pa.Table, state: Any) -> pa.Table:
        raise NotImplementedError

    def describe(self, state: Any) -> dict[str, Any]:
        return {}

    def __call__(self, batch: pa.Table) -> pa.Table:
        raise TypeError(f"{type(self).__name__} is a GlobalStage: the runner decides it over the pool, then decide")


#: The column of a :class:`KeyedStage`'s features that rows are grouped by (an integer).
KEY = "key"
#: The column the runner adds to features: True for the rows of earlier runs (``pinned_runs``).
PINNED = "pinned"
#: The column of a :class:`SummedStage`'s counts summed by :data:`KEY`.
COUNT = "count"


@dataclass(kw_only=True)
class SummedStage(GlobalStage):
    """A whole-pool decision from counts summed by key (MetaCLIP's matches per entry; the rows
    above a rank, narrowed down pass by pass).

    ``counts(batch, state)`` turns one whole shard's ``compute_columns`` into rows of :data:`KEY` and
    :data:`COUNT`; the runner sums them by key over the pool (Ray Data's ``groupby(...).sum(...)``
    under Ray) and ``from_counts(totals, state)`` returns ``(state, done)`` from the totals, one
    row per key, sorted by key. ``state`` is None on the first pass; a stage that is not done is
    counted again with its new state. The keys of a pass must be bounded by something other than
    the pool (the entries of a metadata, 65,536 buckets), as its totals reach the driver.
    """

    def counts(self, batch: pa.Table, state: Any) -> pa.Table:
        raise NotImplementedError

    def from_counts(self, totals: pa.Table, state: Any) -> tuple[Any, bool]:
        raise NotImplementedError


@dataclass(kw_only=True)
class KeyedStage(GlobalStage):
    """A whole-pool decision made key group by key group, with no row gathered in one process.

    ``features`` turns a batch of ``compute_columns`` into rows (one or more per input row) of
    :data:`KEY`, the ``source_index`` and whatever ``reduce`` needs. The runner brings every row
    of a key together (a hash shuffle under Ray) and calls ``reduce`` with tables holding whole
    keys, sorted by key; ``reduce`` returns the decided rows (with their ``source_index``) and a
    small dict of facts, and ``summarise`` merges the facts of every call into the stage's
    summary, its state. The decided rows are written by shard: each shard's ``decide`` receives
    only its own (None where it has none), so no worker holds the decisions of the whole pool.
    The kept rows of the runs in ``pinned_runs`` join with :data:`PINNED` true and negative
    ``source_index``: they are compared, never decided.

    A stage whose keys must be learnt from the pool first (k-means cells) asks for a sample:
    ``sample_size(rows)`` of the pool's ``rows`` (every n-th row by ``source_index``:
    :func:`pipelines.stage.sampling.systematic_sample`) reach ``fit(sample, rows)`` in one task,
    and what it returns is the ``model`` argument of ``features`` (None where nothing was fit).
    """

    def sample_size(self, rows: int) -> int:
        """How many of the pool's ``rows`` ``fit`` should see; 0 (the default): nothing to fit."""
        return 0

    def fit(self, sample: pa.Table, rows: int) -> Any:
        raise NotImplementedError

    def pinned_runs(self) -> list[str]:
        return []

    @property
    def pinned_columns(self) -> tuple[str, ...]:
        """The columns read from the kept rows of ``pinned_runs`` (``features`` sees those)."""
        return self.compute_columns

    def features(self, batch: pa.Table, model: Any = None) -> pa.Table:
        raise NotImplementedError

    def reduce(self, group: pa.Table) -> tuple[pa.Table, dict[str, Any]]:
        raise NotImplementedError

    def summarise(self, facts: list[dict[str, Any]]) -> Any:
        raise NotImplementedError


@dataclass(kw_only=True)
class LinkedStage(KeyedStage):
    """A :class:`KeyedStage` whose ``reduce`` finds links between rows (verified duplicate pairs)
    rather than decisions: the rows it returns are edges, one per pair, with whatever
    ``cluster`` needs about both ends. The runner gathers the edges of the whole pool, and only
    those, in one task sized by their bytes; ``cluster(edges)`` returns the decided rows (with
    their ``source_index``, written by shard) and its facts. ``summarise`` receives the facts of
    every ``reduce`` and, last, those of ``cluster``. Rows in no edge never reach ``cluster``.
    """

    def cluster(self, edges: pa.Table) -> tuple[pa.Table, dict[str, Any]]:
        raise NotImplementedError


class Rejections:
    """Collects reject reasons for the rows of one batch; the first reason set on a row wins.

    >>> r = Rejections(3)
    >>> r.add([True, False, False], "caption_too_short", "1 word")
    >>> kept_columns_only = r.attach(batch.select([]))
    """

    def __init__(self, num_rows: int) -> None:
        self.num_rows = num_rows
        self._reason: pa.Array = pa.nulls(num_rows, pa.string())
        self._detail: pa.Array = pa.nulls(num_rows, pa.string())

    def add(self, mask: Any, reason: str, detail: Any = None) -> None:
        """Reject the rows where ``mask`` is true (nulls count as false) and that have no reason yet.

        ``detail`` is a string for all rows, a per-row array of strings, or a callable that
        receives the boolean mask of the newly rejected rows and returns one string per such row
        (so that costly details are built for rejected rows only).
        """
        mask = _as_bool_array(mask, self.num_rows)
        fresh = pc.and_(pc.fill_null(mask, False), pc.is_null(self._reason))
        if not pc.any(fresh).as_py():
            return
        self._reason = pc.if_else(fresh, pa.scalar(reason, pa.string()), self._reason)
        if detail is None:
            return
        if callable(detail):
            values = pc.cast(_as_array(detail(fresh)), pa.string())
            self._detail = pc.replace_with_mask(self._detail, fresh, values)
            return
        if isinstance(detail, str):
            detail = pa.scalar(detail, pa.string())
        else:
            detail = pc.cast(_as_array(detail), pa.string())
        self._detail = pc.if_else(fresh, detail, self._detail)

    def add_each(self, rows: Iterable[tuple[int, str, str | None]]) -> None:
        """Reject single rows, each ``(row, reason, detail)`` with its own reason and detail."""
        for row, reason, detail in rows:
            mask = [False] * self.num_rows
            mask[row] = True
            self.add(mask, reason, detail)

    @property
    def any(self) -> bool:
        return self._reason.null_count < self.num_rows

    @property
    def mask(self) -> pa.Array:
        """True for rows rejected so far."""
        return pc.is_valid(self._reason)

    def attach(self, table: pa.Table, num_rows: int | None = None) -> pa.Table:
        """``table`` with the reserved reject columns appended (only when some row is rejected)."""
        if num_rows is not None and num_rows != self.num_rows:
            raise ValueError(f"Rejections for {self.num_rows} rows attached to {num_rows} rows")
        if not self.any:
            return table
        return table.append_column(REJECT_REASON, self._reason).append_column(REJECT_DETAIL, self._detail)


def _as_array(values: Any) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks()
    if isinstance(values, pa.Array):
        return values
    return pa.array(values)


def _as_bool_array(mask: Any, num_rows: int) -> pa.Array:
    array = _as_array(mask)
    if len(array) != num_rows:
        raise ValueError(f"reject mask has {len(array)} values for {num_rows} rows")
    if array.type != pa.bool_():
        array = pc.cast(array, pa.bool_())
    return array
