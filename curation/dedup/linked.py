"""Dedup stages whose detector links pairs of rows: the edges are found key group by key group
on the cluster, and only the edges reach the one task that clusters them.

A subclass's ``reduce`` finds the verified pairs of a group of keys (rows sharing an LSH bucket,
say) and returns them with :func:`edge_rows`: both ends' ``source_index``, uid, survivor
preference and whether the row belongs to an earlier run. ``cluster`` then takes the connected
components of all edges (a pair found under several keys counts once), picks each cluster's
survivor by the stage's ``keep`` policy and returns one decided row per duplicate. A row in no
edge is its own cluster and is never looked at again, so the clustering task holds memory for the
rows that have a duplicate, not for the pool.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.dedup.base import LARGEST_LISTED, DedupStage, cluster_facts, decided_rows
from curation.dedup.clusters import choose_survivors, connected_components
from pipelines.stage import KEY, PINNED, LinkedStage
from pipelines.stage.sampling import systematic_sample
from schemas.columns import SOURCE_INDEX, UID

#: The column of a dedup stage's features with each row's survivor preference (null: ``first``).
PREFERENCE = "preference"
_ENDS = ("left", "right")
_EDGE_COLUMNS = (SOURCE_INDEX, UID, PREFERENCE, PINNED)
#: Facts of the reductions that are summed over every group of keys.
COUNTED_FACTS = ("rows", "earlier_rows")


def edge_rows(group: pa.Table, left: np.ndarray, right: np.ndarray) -> pa.Table:
    """The pairs ``(left[i], right[i])`` of rows of ``group`` as edges: for each end its
    ``source_index``, uid, preference and whether it is pinned (columns ``left_*``, ``right_*``)."""
    columns = {}
    for end, rows in zip(_ENDS, (left, right)):
        taken = group.select(list(_EDGE_COLUMNS)).take(pa.array(rows, pa.int64()))
        columns.update({f"{end}_{name}": taken[name] for name in _EDGE_COLUMNS})
    return pa.table(columns)


@dataclass
class LinkedDedup(DedupStage, LinkedStage):
    """A dedup stage that finds duplicate pairs per group of keys; see the module docstring.

    Subclasses implement ``features`` (with :data:`PREFERENCE`) and ``reduce`` (edges from
    :func:`edge_rows`, facts counting their ``rows`` and ``earlier_rows``), and may add facts
    of their own to :meth:`summarise` through ``summed_facts``.
    """

    def preference_column(self, batch: pa.Table) -> pa.Array:
        preference = self._preference(batch)
        return pa.nulls(batch.num_rows, pa.float64()) if preference is None else pa.array(preference, pa.float64())

    def cluster(self, edges: pa.Table) -> tuple[pa.Table, dict[str, Any]]:
        if not edges.num_rows:
            empty = choose_survivors(np.zeros(0, np.int64), np.zeros(0, np.int64), None)
            nothing = np.zeros(0, bool)
            return decided_rows(np.zeros(0, np.int64), np.zeros(0, object), empty, nothing), {
                **cluster_facts(empty, nothing, nothing, bool(self.against)),
                "edges": 0,
            }
        ends = {name: [edges[f"{end}_{name}"] for end in _ENDS] for name in _EDGE_COLUMNS}
        index = np.concatenate([column.to_numpy() for column in ends[SOURCE_INDEX]])
        nodes, first, inverse = np.unique(index, return_index=True, return_inverse=True)
        pairs = np.unique(np.sort(inverse.reshape(2, -1).T, axis=1), axis=0)
        uid = np.asarray(pa.chunked_array(ends[UID][0].chunks + ends[UID][1].chunks).to_pylist(), dtype=object)
        pinned = np.concatenate([c.to_numpy(zero_copy_only=False) for c in ends[PINNED]])[first]
        preference = None
        if ends[PREFERENCE][0].null_count < len(edges):
            preference = np.concatenate([c.to_numpy(zero_copy_only=False) for c in ends[PREFERENCE]])[first]
        labels = connected_components(len(nodes), pairs[:, 0], pairs[:, 1])
        clusters = choose_survivors(labels, nodes, preference, pinned)
        duplicate = clusters.duplicate & ~pinned
        facts = {**cluster_facts(clusters, pinned, duplicate, bool(self.against)), "edges": len(pairs)}
        return decided_rows(nodes, uid[first], clusters, duplicate), facts

    def summarise(self, facts: list[dict[str, Any]]) -> dict[str, Any]:
        *reduced, clustered = facts
        reduced = [f for f in reduced if f]  # a partition without rows has no facts
        summed = {k: sum(part.get(k, 0) for part in reduced) for k in (*COUNTED_FACTS, *self.summed_facts)}
        histogram = Counter({int(size): n for size, n in clustered["size_histogram"].items()})
        summary = {
            "rows": summed["rows"],
            "duplicate_rows": clustered["duplicate_rows"],
            "clusters": clustered["clusters"],
            "edges": clustered["edges"],
            "largest": clustered["largest"][:LARGEST_LISTED],
            "size_histogram": dict(sorted(histogram.items())),
            **{k: summed[k] for k in self.summed_facts},
        }
        if self.against:
            summary["earlier_rows"] = summed["earlier_rows"]
            summary["duplicates_of_earlier_runs"] = clustered["duplicates_of_earlier_runs"]
        return summary

    @property
    def summed_facts(self) -> tuple[str, ...]:
        """The subclass's own facts of each reduction, summed into the summary."""
        return ()


def decide_in_process(stage: LinkedDedup, table: pa.Table) -> tuple[pa.Table, pa.Table, pa.Table, dict[str, Any]]:
    """The stage's decision over one in-memory table of its ``compute_columns``, as the local
    runner makes it over a run (for benchmarks and checks on pools that are not a run): the fit
    on the same sample, the features, one ``reduce`` over every key, ``cluster``. Returns the
    features, the edges and the decided rows, and the summary."""
    wanted = stage.sample_size(table.num_rows)
    model = stage.fit(systematic_sample(table, wanted / table.num_rows), table.num_rows) if wanted else None
    features = stage.features(table, model)
    features = features.append_column(PINNED, pa.repeat(pa.scalar(False), features.num_rows))
    features = features.take(pc.sort_indices(features, [(KEY, "ascending")]))
    edges, facts = stage.reduce(features)
    decided, clustered = stage.cluster(edges)
    return features, edges, decided, stage.summarise([facts, clustered])
