"""The dataset card: the funnel matches the ledger, and it is written when a run completes."""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

from pipelines.demo.pool import write_demo_pool
from tests.conftest import TEXT_ONLY_HOST, run_pipeline_dict


def test_the_card_funnel_is_the_ledger(tmp_path, runner_factory):
    pool = tmp_path / "pool.csv"
    write_demo_pool(str(pool), TEXT_ONLY_HOST, rows=900, seed=3)
    raw = {
        "name": "card",
        "input": str(pool),
        "output_dir": str(tmp_path / "runs"),
        "shard_size": 300,
        "stages": [{"stage": "curation.basic:JunkAltText"}, {"stage": "curation.basic:CaptionLength"}],
    }
    plan, manifest = run_pipeline_dict(raw, runner_factory("local"))
    card = (Path(plan.run_uri) / "README.md").read_text()
    assert card.startswith("# Dataset card: card\n")
    totals = manifest.stage_totals()
    read = totals["read"]
    kept = manifest.phases[-1].rows_out
    assert f"**{read.rows_in:,}** rows in, **{kept:,}** kept" in card
    for name, counts in totals.items():
        row = next(line for line in card.splitlines() if f"| {name} |" in line)
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2:5] == [f"{counts.rows_in:,}", f"{counts.rows_kept:,}", f"{counts.rows_in - counts.rows_kept:,}"]
        for reason, n in counts.rejected.items():
            assert f"{reason} {n:,}" in cells[5]
    assert f"| ray | {manifest.versions['ray']} |" in card
    assert "clip_score" not in card  # no stage applied a cutoff: no histogram section
    # Text rules only: no section whose stage or columns the run lacks, and no image to sample.
    assert re.findall(r"^## (.+)$", card, flags=re.MULTILINE) == [
        "Funnel",
        "Sample pairs",
        "What each stage removed: examples",
        "Provenance",
    ]
    examples = card.split("## What each stage removed: examples")[1].split("## Provenance")[0]
    for name, counts in totals.items():  # every stage that rejected rows shows some, with their reason
        shown = re.findall(rf"^\| {name} \| (\w+) \|", examples, flags=re.MULTILINE)
        assert bool(shown) == bool(counts.rejected) and set(shown) <= set(counts.rejected)
        assert len(shown) <= 3
    assert sorted(p.name for p in (Path(plan.run_uri) / "card").iterdir()) == ["funnel.png"]
    with Image.open(Path(plan.run_uri) / "card" / "funnel.png") as image:
        assert image.format == "PNG" and image.height > 200
