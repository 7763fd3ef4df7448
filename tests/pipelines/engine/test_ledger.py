"""The ledger invariant, one rule at a time: each stage closes (rows in = kept + rejected), each
stage receives what the one before it kept, a shard writes what its last stage kept, a phase reads
what the previous phase wrote, and a run accounts for every input row."""

from __future__ import annotations

import re

import pytest

from pipelines.engine.ledger import LedgerError, check_phase, check_run, check_shard, summarise
from schemas.manifest import Manifest, ShardEntry, StageCounts


def _shard(
    phase: str,
    shard: int,
    rows_in: int,
    stages: dict[str, tuple[int, int, dict[str, int]]],
    rows_out: int | None = None,
) -> ShardEntry:
    """An entry whose ``rows_out`` defaults to what its last stage kept (the shard's own input without stages)."""
    counts = {name: StageCounts(*c) for name, c in stages.items()}
    if rows_out is None:
        rows_out = list(counts.values())[-1].rows_kept if counts else rows_in
    return ShardEntry(phase=phase, shard=shard, rows_in=rows_in, rows_out=rows_out, stages=counts)


def _closed(phase: str = "01_filter", shard: int = 0) -> ShardEntry:
    """10 rows in: ``junk`` keeps 8 (2 rejected), ``length`` keeps 5 of those (3 rejected)."""
    return _shard(
        phase, shard, 10, {"junk": (10, 8, {"url_caption": 2}), "length": (8, 5, {"too_short": 1, "too_long": 2})}
    )


def _raises(message: str):
    return pytest.raises(LedgerError, match=f"^{re.escape(message)}$")


# check_shard ---------------------------------------------------------------------------------


def test_a_shard_whose_stages_close_and_chain_passes():
    check_shard(_closed())
    check_shard(_shard("00_input", 3, 7, {}))  # no stages: it writes what it read


def test_a_stage_that_keeps_more_than_it_was_given_minus_its_rejects_does_not_close():
    entry = _shard("01_filter", 4, 10, {"junk": (10, 9, {"url_caption": 2}), "length": (9, 9, {})})
    with _raises("phase '01_filter', shard 4, stage 'junk': 10 rows in but 9 kept + 2 rejected"):
        check_shard(entry)


def test_a_stage_that_loses_rows_does_not_close_even_where_the_chain_holds():
    # rows_in 8, kept 5, rejected 1: two rows vanished, though the stage after it reads its 5.
    entry = _shard(
        "01_filter",
        0,
        10,
        {"junk": (10, 8, {"url_caption": 2}), "length": (8, 5, {"too_short": 1}), "words": (5, 5, {})},
    )
    with _raises("phase '01_filter', shard 0, stage 'length': 8 rows in but 5 kept + 1 rejected"):
        check_shard(entry)


def test_the_first_stage_must_receive_the_rows_the_shard_read():
    entry = _shard("01_filter", 2, 11, {"junk": (10, 8, {"url_caption": 2})})
    with _raises("phase '01_filter', shard 2, stage 'junk': received 10 rows, expected 11"):
        check_shard(entry)


def test_each_later_stage_must_receive_what_the_stage_before_it_kept():
    entry = _shard("01_filter", 1, 10, {"junk": (10, 8, {"url_caption": 2}), "length": (9, 6, {"too_short": 3})})
    with _raises("phase '01_filter', shard 1, stage 'length': received 9 rows, expected 8"):
        check_shard(entry)


def test_a_shard_must_write_what_its_last_stage_kept():
    entry = _shard("01_filter", 5, 10, {"junk": (10, 8, {"url_caption": 2})}, rows_out=7)
    with _raises("phase '01_filter', shard 5: wrote 7 rows but its last stage kept 8"):
        check_shard(entry)


def test_a_shard_without_stages_must_write_what_it_read():
    with _raises("phase '00_input', shard 0: wrote 6 rows but its last stage kept 7"):
        check_shard(_shard("00_input", 0, 7, {}, rows_out=6))


# check_phase ---------------------------------------------------------------------------------


def _input(shard: int, rows_in: int, rows_out: int) -> ShardEntry:
    return _shard("00_input", shard, rows_in, {"read": (rows_in, rows_out, {"bad_url": rows_in - rows_out})})


def test_a_phase_reading_exactly_what_the_previous_phase_wrote_passes():
    previous = {0: _input(0, 12, 10), 1: _input(1, 12, 10)}
    check_phase("01_filter", {0: _closed(shard=0), 1: _closed(shard=1)}, previous)
    check_phase("00_input", previous, None)  # the input phase has nothing before it


def test_a_phase_checks_every_shard_entry_it_holds():
    broken = _shard("01_filter", 1, 10, {"junk": (10, 8, {})})
    with _raises("phase '01_filter', shard 1, stage 'junk': 10 rows in but 8 kept + 0 rejected"):
        check_phase("01_filter", {0: _closed(shard=0), 1: broken}, None)


def test_a_shard_the_previous_phase_never_wrote_is_refused():
    with _raises("phase '01_filter' has shard 1, which the previous phase lacks"):
        check_phase("01_filter", {0: _closed(shard=0), 1: _closed(shard=1)}, {0: _input(0, 12, 10)})


def test_a_shard_reading_other_than_the_previous_phase_wrote_is_refused():
    previous = {0: _input(0, 12, 10), 1: _input(1, 12, 11)}
    with _raises("phase '01_filter', shard 1: read 10 rows, but the previous phase '00_input' wrote 11"):
        check_phase("01_filter", {0: _closed(shard=0), 1: _closed(shard=1)}, previous)


# check_run -----------------------------------------------------------------------------------


def _manifest(input_entries: dict[int, ShardEntry], filter_entries: dict[int, ShardEntry]) -> Manifest:
    manifest = Manifest(name="demo", config_hash="h", config={}, versions={}, created_at="t", updated_at="t")
    manifest.phases = [
        summarise("00_input", ["read"], input_entries, len(input_entries)),
        summarise("01_filter", ["junk", "length"], filter_entries, len(filter_entries)),
    ]
    return manifest


def test_a_run_that_keeps_or_rejects_every_input_row_passes():
    check_run(_manifest({0: _input(0, 12, 10), 1: _input(1, 12, 10)}, {0: _closed(shard=0), 1: _closed(shard=1)}))
    check_run(Manifest(name="empty", config_hash="h", config={}, versions={}, created_at="t", updated_at="t"))


def test_a_run_whose_last_phase_lost_rows_is_refused():
    # 24 rows read, 4 rejected on reading, 10 by the filters: 10 kept. The last phase claims 9.
    filtered = {0: _closed(shard=0), 1: _closed(shard=1)}
    manifest = _manifest({0: _input(0, 12, 10), 1: _input(1, 12, 10)}, filtered)
    manifest.phases[-1].rows_out -= 1
    with _raises("run 'demo': 24 input rows but 9 kept + 14 rejected"):
        check_run(manifest)


def test_a_run_whose_rejects_do_not_add_up_is_refused():
    manifest = _manifest({0: _input(0, 12, 10), 1: _input(1, 12, 10)}, {0: _closed(shard=0), 1: _closed(shard=1)})
    manifest.phases[0].counts["read"].rejected["bad_url"] += 1  # a reject counted twice
    with _raises("run 'demo': 24 input rows but 10 kept + 15 rejected"):
        check_run(manifest)
