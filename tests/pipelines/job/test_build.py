"""A config's job: the pool reader as source, the export (when configured) and the card as finishers."""

from __future__ import annotations

import pytest

from pipelines.card.finisher import CardFinisher
from pipelines.demo.pool import write_demo_pool
from pipelines.engine.config import parse_config
from pipelines.export.finisher import ExportFinisher
from pipelines.job import build_plan
from pipelines.source.pool import PoolReader
from tests.conftest import TEXT_ONLY_HOST


@pytest.fixture
def raw(tmp_path):
    pool = tmp_path / "pool.csv"
    write_demo_pool(str(pool), TEXT_ONLY_HOST, rows=20, seed=1)
    return {"name": "job", "input": str(pool), "output_dir": str(tmp_path / "runs"), "stages": []}


def test_a_config_without_export_gets_the_card_only(raw):
    plan = build_plan(parse_config(raw))
    assert isinstance(plan.source, PoolReader)
    assert [type(f) for f in plan.finishers] == [CardFinisher]
    assert plan.fingerprint["input"]["format"] == "auto" and len(plan.fingerprint["input"]["files"]) == 1


def test_the_export_runs_before_the_card_and_is_part_of_the_run(raw):
    plan = build_plan(parse_config({**raw, "export": {"formats": ["parquet"], "folder": "out"}}))
    export, card = plan.finishers
    assert isinstance(export, ExportFinisher) and export.required and export.outputs() == ["out"]
    assert not card.required and card.outputs() == ["README.md"]


def test_an_export_format_without_its_columns_is_refused_before_the_run(raw):
    with pytest.raises(ValueError, match="needs image bytes"):
        build_plan(parse_config({**raw, "export": {"formats": ["webdataset"]}}))
