"""Accounting: every row that enters a stage is kept or rejected with a reason, and nothing else.

:func:`check_shard` verifies one shard's ledger entry; :func:`check_phase` verifies that a phase
received exactly the rows the previous phase kept. A violation raises :class:`LedgerError` and
fails the run: a ledger that does not close means rows were lost or invented.
"""

from __future__ import annotations

from schemas.manifest import Manifest, PhaseSummary, ShardEntry, StageCounts


class LedgerError(RuntimeError):
    """Rows in != rows kept + rows rejected somewhere: the run is wrong and stops."""


def check_shard(entry: ShardEntry) -> None:
    where = f"phase {entry.phase!r}, shard {entry.shard}"
    expected_in = entry.rows_in
    for name, counts in entry.stages.items():
        if not counts.closes:
            raise LedgerError(
                f"{where}, stage {name!r}: {counts.rows_in} rows in but {counts.rows_kept} kept + "
                f"{counts.rows_rejected} rejected"
            )
        if counts.rows_in != expected_in:
            raise LedgerError(f"{where}, stage {name!r}: received {counts.rows_in} rows, expected {expected_in}")
        expected_in = counts.rows_kept
    if entry.rows_out != expected_in:
        raise LedgerError(f"{where}: wrote {entry.rows_out} rows but its last stage kept {expected_in}")


def check_phase(phase: str, entries: dict[int, ShardEntry], previous: dict[int, ShardEntry] | None) -> None:
    """Every shard closes, and (after the input phase) each shard received what the previous kept."""
    for entry in entries.values():
        check_shard(entry)
        if previous is not None:
            before = previous.get(entry.shard)
            if before is None:
                raise LedgerError(f"phase {phase!r} has shard {entry.shard}, which the previous phase lacks")
            if entry.rows_in != before.rows_out:
                raise LedgerError(
                    f"phase {phase!r}, shard {entry.shard}: read {entry.rows_in} rows, but the previous "
                    f"phase {before.phase!r} wrote {before.rows_out}"
                )


def summarise(phase: str, stages: list[str], entries: dict[int, ShardEntry], shards_total: int) -> PhaseSummary:
    counts = {name: StageCounts() for name in stages}
    for entry in entries.values():
        for name, c in entry.stages.items():
            counts.setdefault(name, StageCounts()).add(c)
    return PhaseSummary(
        name=phase,
        stages=stages,
        shards_done=len(entries),
        shards_total=shards_total,
        rows_in=sum(e.rows_in for e in entries.values()),
        rows_out=sum(e.rows_out for e in entries.values()),
        counts=counts,
    )


def check_run(manifest: Manifest) -> None:
    """Every input row is kept by the last phase or rejected by exactly one stage."""
    totals = manifest.stage_totals()
    if not totals or not manifest.phases:
        return
    read = next(iter(totals.values()))
    rejected = sum(c.rows_rejected for c in totals.values())
    kept = manifest.phases[-1].rows_out
    if read.rows_in != kept + rejected:
        raise LedgerError(f"run {manifest.name!r}: {read.rows_in} input rows but {kept} kept + {rejected} rejected")
