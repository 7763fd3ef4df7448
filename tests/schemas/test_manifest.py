"""Ledger counts, shard entries and the manifest: arithmetic and JSON round trips."""

from __future__ import annotations

import json

import pytest

from schemas.manifest import MANIFEST_FORMAT, Manifest, PhaseSummary, ShardEntry, StageCounts

# StageCounts -----------------------------------------------------------------------------------


def test_stage_counts_closes():
    assert StageCounts().closes
    assert StageCounts(10, 7, {"a": 2, "b": 1}).closes
    assert StageCounts(10, 10, {}).closes
    assert not StageCounts(10, 7, {"a": 2}).closes
    assert not StageCounts(10, 9, {"a": 2}).closes
    assert StageCounts(10, 7, {"a": 2, "b": 1}).rows_rejected == 3


def test_stage_counts_add():
    total = StageCounts(5, 4, {"a": 1})
    other = StageCounts(7, 3, {"a": 2, "b": 2})
    total.add(other)
    assert total == StageCounts(12, 7, {"a": 3, "b": 2})
    assert total.closes
    assert other == StageCounts(7, 3, {"a": 2, "b": 2})  # not modified


def test_stage_counts_add_does_not_share_dicts():
    total = StageCounts()
    other = StageCounts(2, 0, {"x": 2})
    total.add(other)
    total.add(StageCounts(1, 0, {"x": 1}))
    assert total.rejected == {"x": 3}
    assert other.rejected == {"x": 2}


def test_stage_counts_dict_round_trip_sorts_reasons():
    counts = StageCounts(6, 2, {"zeta": 3, "alpha": 1})
    d = counts.to_dict()
    assert list(d["rejected"]) == ["alpha", "zeta"]
    assert d == {"rows_in": 6, "rows_kept": 2, "rejected": {"alpha": 1, "zeta": 3}}
    assert StageCounts.from_dict(d) == counts
    assert StageCounts.from_dict(json.loads(json.dumps(d))) == counts


def test_stage_counts_from_dict_coerces_ints():
    loose = {"rows_in": "3", "rows_kept": 2.0, "rejected": {"a": "1"}}
    assert StageCounts.from_dict(loose) == StageCounts(3, 2, {"a": 1})


# ShardEntry ------------------------------------------------------------------------------------


def test_shard_entry_json_round_trip():
    entry = ShardEntry(
        phase="01_caption_length",
        shard=12,
        rows_in=10,
        rows_out=6,
        stages={"junk": StageCounts(10, 8, {"url_caption": 2}), "length": StageCounts(8, 6, {"too_short": 2})},
    )
    text = entry.to_json()
    data = json.loads(text)
    assert data["phase"] == "01_caption_length" and data["shard"] == 12
    assert list(data["stages"]) == ["junk", "length"]
    assert data["stages"]["junk"] == {"rows_in": 10, "rows_kept": 8, "rejected": {"url_caption": 2}}
    back = ShardEntry.from_json(text)
    assert back == entry
    assert list(back.stages) == ["junk", "length"]  # stage order survives


def test_shard_entry_without_stages():
    entry = ShardEntry("00_input", 0, 0, 0, {})
    assert ShardEntry.from_json(entry.to_json()) == entry


# Manifest --------------------------------------------------------------------------------------


def make_manifest() -> Manifest:
    input_phase = PhaseSummary("00_input", ["read"], 2, 2, 10, 9, {"read": StageCounts(10, 9, {"malformed_row": 1})})
    phase = PhaseSummary(
        "01_exact_duplicates",
        ["junk", "exact_duplicates"],
        2,
        2,
        9,
        5,
        {
            "junk": StageCounts(9, 7, {"url_caption": 2}),
            "exact_duplicates": StageCounts(7, 5, {"duplicate": 2}),
        },
    )
    return Manifest(
        name="run",
        config_hash="abcdef0123456789",
        config={"fingerprint": {"shard_size": 5}, "pipeline": {"a": [1]}},
        versions={"python": "3.11", "pyarrow": "26"},
        created_at="2024-01-01T00:00:00+00:00",
        updated_at="2024-01-01T00:01:00+00:00",
        status="complete",
        phases=[input_phase, phase],
        aggregates={"exact_duplicates": {"duplicate_rows": 2, "keys": ["url", "caption"]}},
    )


def test_manifest_json_round_trip():
    manifest = make_manifest()
    text = manifest.to_json()
    back = Manifest.from_json(text)
    assert back == manifest
    assert back.format == MANIFEST_FORMAT
    assert back.final_phase == "01_exact_duplicates"
    assert Manifest.from_json(back.to_json()) == manifest


def test_manifest_json_holds_ledger_totals():
    data = json.loads(make_manifest().to_json())
    assert data["format"] == MANIFEST_FORMAT
    assert list(data["ledger"]) == ["read", "junk", "exact_duplicates"]
    assert data["ledger"]["junk"] == {"rows_in": 9, "rows_kept": 7, "rejected": {"url_caption": 2}}
    assert data["phases"][1]["counts"]["exact_duplicates"]["rejected"] == {"duplicate": 2}


def test_manifest_stage_totals_sum_over_phases():
    manifest = make_manifest()
    manifest.phases.append(PhaseSummary("02_more", ["junk"], 1, 1, 5, 4, {"junk": StageCounts(5, 4, {"generic": 1})}))
    totals = manifest.stage_totals()
    assert list(totals) == ["read", "junk", "exact_duplicates"]
    assert totals["junk"] == StageCounts(14, 11, {"url_caption": 2, "generic": 1})
    # Summing must not modify the phases' own counts.
    assert manifest.phases[1].counts["junk"] == StageCounts(9, 7, {"url_caption": 2})


def test_manifest_defaults():
    manifest = Manifest("run", "hash", {}, {}, "t0", "t0")
    assert manifest.status == "running"
    assert manifest.phases == [] and manifest.aggregates == {}
    assert manifest.final_phase is None
    assert manifest.stage_totals() == {}
    assert Manifest.from_json(manifest.to_json()) == manifest


def test_manifest_without_aggregates_key_reads():
    data = json.loads(make_manifest().to_json())
    del data["aggregates"]
    assert Manifest.from_json(json.dumps(data)).aggregates == {}


@pytest.mark.parametrize("fmt", [None, 0, 2, "1"])
def test_manifest_format_check(fmt):
    data = json.loads(make_manifest().to_json())
    if fmt is None:
        del data["format"]
    else:
        data["format"] = fmt
    with pytest.raises(ValueError, match=f"manifest format {fmt!r} is not {MANIFEST_FORMAT}"):
        Manifest.from_json(json.dumps(data))


def test_phase_summary_round_trip():
    summary = make_manifest().phases[1]
    assert PhaseSummary.from_dict(json.loads(json.dumps(summary.to_dict()))) == summary
