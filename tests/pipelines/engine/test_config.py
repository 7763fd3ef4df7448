"""Tests of pipelines/engine/config.py and pipelines/engine/plan.py: validation, overrides, stages, phases, hash."""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from curation.basic import TEXT_BATCH
from pipelines.engine.config import (
    PipelineConfig,
    apply_overrides,
    load_config,
    parse_config,
    resolve_stage_class,
)
from pipelines.engine.plan import INPUT_PHASE, config_hash, fingerprint_diff
from pipelines.job import build_plan
from pipelines.source.shards import SourceError, resolve_files
from pipelines.stage import GlobalStage, Resources, Stage, SummedStage
from schemas.columns import CAPTION, IMAGE, URL, WIDTH

REPO_ROOT = Path(__file__).resolve().parents[3]
# Pipeline configs; the demo's model settings (demo-models.yaml) are checked in test_demo_parts.py.
CONFIGS = sorted(p for p in (REPO_ROOT / "configs").glob("*.yaml") if "stages" in yaml.safe_load(p.read_text()))
HERE = __name__  # import path of this module, for stages defined below

CHARS = "curation.basic:CaptionCharacters"
JUNK = "curation.basic:JunkAltText"
LENGTH = "curation.basic:CaptionLength"
DEDUP = "curation.dedup:ExactDuplicates"


# Stages used only by these tests ---------------------------------------------------------------


@dataclass
class SeededSample(Stage):
    """A stage with a ``seed`` field: the pipeline seed is injected unless the config sets one."""

    name: ClassVar[str] = "seeded_sample"
    input_columns: ClassVar[tuple[str, ...]] = (CAPTION,)

    fraction: float = 0.5
    seed: int = 123


@dataclass
class WritesWidth(Stage):
    name: ClassVar[str] = "writes_width"
    input_columns: ClassVar[tuple[str, ...]] = (URL,)
    output_columns: ClassVar[tuple[str, ...]] = (WIDTH,)


@dataclass
class ReadsWidth(Stage):
    name: ClassVar[str] = "reads_width"
    input_columns: ClassVar[tuple[str, ...]] = (WIDTH,)


@dataclass
class ReadsImage(Stage):
    name: ClassVar[str] = "reads_image"
    input_columns: ClassVar[tuple[str, ...]] = (IMAGE, CAPTION)


@dataclass
class WritesUnregistered(Stage):
    name: ClassVar[str] = "writes_unregistered"
    output_columns: ClassVar[tuple[str, ...]] = ("no_such_registered_column",)


@dataclass
class GlobalOverWidth(SummedStage):
    """A global stage whose counting pass needs a column its decide pass does not."""

    name: ClassVar[str] = "global_over_width"
    input_columns: ClassVar[tuple[str, ...]] = ("uid",)

    @property
    def compute_columns(self) -> tuple[str, ...]:
        return ("uid", WIDTH)


@dataclass
class BareGlobal(GlobalStage):
    """A global stage that says nothing of how the pool is read."""

    name: ClassVar[str] = "bare_global"


class NotAStage:
    pass


# Helpers ---------------------------------------------------------------------------------------


@pytest.fixture
def pool(tmp_path) -> str:
    path = tmp_path / "pool.csv"
    # uid and boxes: the columns shipped configs name (columns.uid, columns.keep).
    path.write_text(
        "url,caption,page,uid,boxes\nhttp://a.test/1.jpg,a red bicycle,p1,u1,[]\n"
        "http://a.test/2.jpg,two dogs,p2,u2,[]\n"
    )
    return str(path)


def raw_config(pool: str, *stages, **top) -> dict:
    stages = [s if isinstance(s, dict) else {"stage": s} for s in stages]
    return {"name": "t", "input": pool, "output_dir": "runs", "stages": stages, **top}


def plan_of(raw: dict):
    return build_plan(parse_config(raw))


def has_input(path: str) -> bool:
    try:
        resolve_files(path)
    except SourceError:
        return False
    return True


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# Every shipped config --------------------------------------------------------------------------


def test_configs_exist():
    assert CONFIGS, "no YAML config under configs/"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_loads_and_builds_a_plan(path, pool, tmp_path):
    raw = yaml.safe_load(path.read_text())
    cfg = load_config(path)
    assert cfg.name == raw.get("name", path.stem)
    overrides = []
    if not has_input(cfg.input):
        # The config's pool lives elsewhere (../shared, or written by the demo): use a small file.
        overrides.append(f"input={pool}")
    for index, stage in enumerate(raw["stages"]):
        if "metadata" in stage and not os.path.exists(stage["metadata"]):
            # A MetaCLIP list the user builds first (vlmcurate metadata build): use a small one.
            metadata = tmp_path / "metadata.json"
            metadata.write_text('["dog", "hot dog", "car"]')
            overrides.append(f"stages.{index}.metadata={metadata}")
        if isinstance(stage.get("vocabulary"), str) and not os.path.exists(stage["vocabulary"]):
            objects = tmp_path / "objects.txt"  # an object list the demo writes: use a small one
            objects.write_text("red circle\nblue square\n")
            overrides.append(f"stages.{index}.vocabulary={objects}")
        if str(stage.get("model", "")).startswith("Salesforce/"):
            overrides.append(f"stages.{index}.model=config:blip-tiny")  # a hub checkpoint: no network here
        if "weights" in stage and not os.path.exists(stage["weights"]):
            overrides.append(f"stages.{index}.weights=null")  # a training output: the untrained heads here
    cfg = load_config(path, overrides)
    plan = build_plan(cfg)
    assert [s.import_path for s in plan.stages] == [s["stage"] for s in raw["stages"]]
    assert plan.phase_names[0] == INPUT_PHASE
    assert [s for p in plan.phases for s in p.stages] == plan.stages
    for phase in plan.phases:
        assert phase.name.endswith("_" + phase.stages[-1].name)
        # A global stage only ever opens a phase.
        assert all(not s.is_global for s in phase.stages[1:])
    assert re.fullmatch(r"[0-9a-f]{16}", plan.config_hash)


@pytest.fixture
def demo_overrides(pool, tmp_path):
    metadata = tmp_path / "demo-metadata.json"  # written by `vlmcurate demo` itself
    metadata.write_text('["circle", "square", "red circle"]')
    objects = tmp_path / "demo-objects.txt"
    objects.write_text("red circle\nblue square\n")
    untrained = [f"stages.{name}.weights=null" for name in ("clip_preprocess", "clip_embed", "clip_caption_score")]
    return [
        f"input={pool}",
        f"stages.metaclip_match.metadata={metadata}",
        f"stages.absent_objects.vocabulary={objects}",
    ] + untrained


def test_demo_config_plan(demo_overrides):
    cfg = load_config(REPO_ROOT / "configs" / "demo.yaml", demo_overrides + ["runner=local"])
    plan = build_plan(cfg)
    assert cfg.name == "demo" and cfg.shard_size == 500 and cfg.ray.num_cpus == 2
    # Each global stage opens a phase; Download ends its phase by itself.
    assert plan.phase_names == [
        "00_input",
        "01_caption_length",
        "02_metaclip_match",
        "03_download",
        "04_image_size",
        "05_clip_embed",
        "06_clip_score_top_fraction",
        "07_capfilt_select",
        "08_brief_descriptions",
    ]
    assert plan.phases[1].global_stage is plan.stages[3]  # exact duplicates
    assert plan.phases[2].global_stage is plan.stages[5]  # MetaCLIP balancing, before download
    assert plan.stages[6].stage.allow_addresses == ["127.0.0.1"]
    assert [s.name for s in plan.stages[-7:]] == [
        "blip_preprocess",
        "blip_caption",
        "clip_caption_score",
        "capfilt_select",
        "absent_objects",
        "instruct",
        "brief_descriptions",
    ]
    assert cfg.export.formats == ["webdataset", "parquet", "llava"]


def test_an_explicit_checkpoint_false_keeps_download_in_its_phase(demo_overrides):
    cfg = load_config(REPO_ROOT / "configs" / "demo.yaml", demo_overrides + ["stages.download.checkpoint=false"])
    assert build_plan(cfg).phase_names == [
        "00_input",
        "01_caption_length",
        "02_metaclip_match",
        "03_image_size",
        "04_clip_embed",
        "05_clip_score_top_fraction",
        "06_capfilt_select",
        "07_brief_descriptions",
    ]


def test_webdataset_export_without_images_is_refused_at_build_time(pool):
    cfg = load_config(REPO_ROOT / "configs" / "text-pool.yaml", [f"input={pool}", "export={formats: [webdataset]}"])
    with pytest.raises(ValueError, match="webdataset, which needs image bytes"):
        build_plan(cfg)


def test_llava_export_needs_images_and_instruction_records_at_build_time(pool):
    cfg = load_config(REPO_ROOT / "configs" / "text-pool.yaml", [f"input={pool}", "export={formats: [llava]}"])
    with pytest.raises(ValueError, match="llava, which needs image bytes"):
        build_plan(cfg)
    cfg = load_config(REPO_ROOT / "configs" / "download.yaml", [f"input={pool}", "export={formats: [llava]}"])
    with pytest.raises(ValueError, match="InstructGenerate"):
        build_plan(cfg)


def test_text_pool_config_plan(pool):
    cfg = load_config(REPO_ROOT / "configs" / "text-pool.yaml", [f"input={pool}"])
    plan = build_plan(cfg)
    length = plan.stages[2].stage
    assert (length.min_words, length.min_chars, length.max_chars) == (2, 5, 1000)
    assert plan.stages[3].stage.keys == ["url", "caption"]
    assert plan.phase_names == ["00_input", "01_caption_length", "02_exact_duplicates"]


# load_config -----------------------------------------------------------------------------------


def test_load_config_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ValueError, match=re.escape(f"config file {str(path)!r} does not exist")):
        load_config(path)


def test_load_config_invalid_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nstages: [unclosed\n")
    with pytest.raises(ValueError, match=r"bad\.yaml' is not valid YAML"):
        load_config(path)


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just text\n", "str"), ("", "NoneType")])
def test_load_config_requires_a_mapping(tmp_path, text, kind):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"must hold a mapping of keys, not {kind}"):
        load_config(path)


def test_load_config_name_defaults_to_file_stem(tmp_path, pool):
    path = write_yaml(tmp_path / "my-pool.yaml", {"input": pool})
    assert load_config(path).name == "my-pool"
    path = write_yaml(tmp_path / "other.yaml", {"name": "given", "input": pool})
    assert load_config(path).name == "given"


def test_load_config_defaults(tmp_path, pool):
    cfg = load_config(write_yaml(tmp_path / "c.yaml", {"input": pool}))
    defaults = (cfg.runner, cfg.shard_size, cfg.seed, cfg.output_dir, cfg.input_format, cfg.input_max_row_bytes)
    assert defaults == ("local", 10_000, 0, "runs", "auto", 4 << 20)
    assert cfg.columns.model_dump() == {"url": "auto", "caption": "auto", "uid": None, "keep": []}
    assert cfg.stages == []


# Top-level validation --------------------------------------------------------------------------

ALLOWED_TOP = (
    "name, input, input_format, input_max_row_bytes, columns, output_dir, runner, shard_size, seed, ray, stages"
)


def test_unknown_top_level_key(pool):
    with pytest.raises(ValueError, match=re.escape(f"colums: unknown key; allowed keys: {ALLOWED_TOP}")):
        parse_config({**raw_config(pool), "colums": {"url": "URL"}})


def test_unknown_top_level_key_in_yaml_file(tmp_path, pool):
    path = write_yaml(tmp_path / "c.yaml", {"input": pool, "shardsize": 10})
    with pytest.raises(ValueError, match=r"invalid config:\n  shardsize: unknown key; allowed keys: name, input"):
        load_config(path)


@pytest.mark.parametrize(
    "section, key, allowed",
    [
        ("columns", "urll", "url, caption, uid, keep"),
        ("ray", "cpus", "address, num_cpus, num_gpus, object_store_memory, temp_dir"),
    ],
)
def test_unknown_nested_key_lists_that_sections_keys(pool, section, key, allowed):
    with pytest.raises(ValueError, match=re.escape(f"{section}.{key}: unknown key; allowed keys: {allowed}")):
        parse_config({**raw_config(pool), section: {key: 1}})


@pytest.mark.parametrize(
    "key, value, expected",
    [
        (
            "shard_size",
            "many",
            "shard_size: Input should be a valid integer, unable to parse string as an integer (got 'many')",
        ),
        ("shard_size", 0, "shard_size: Input should be greater than or equal to 1 (got 0)"),
        ("runner", "rey", "runner: Input should be 'local' or 'ray' (got 'rey')"),
        ("input_format", "xml", "input_format: Input should be 'auto', 'parquet', 'csv', 'tsv' or 'jsonl' (got 'xml')"),
        ("input_max_row_bytes", 0, "input_max_row_bytes: Input should be greater than or equal to 1 (got 0)"),
        ("seed", "abc", "seed: Input should be a valid integer"),
        ("name", "has space", "name: String should match pattern"),
        ("columns", {"keep": "page"}, "columns.keep: Input should be a valid list (got 'page')"),
        ("ray", {"num_cpus": 0}, "ray.num_cpus: Input should be greater than or equal to 1 (got 0)"),
        ("stages", {"stage": LENGTH}, "stages: Input should be a valid list"),
    ],
)
def test_wrong_type_names_key_and_allowed_values(pool, key, value, expected):
    with pytest.raises(ValueError, match=re.escape(expected)):
        parse_config({**raw_config(pool), key: value})


def test_missing_required_keys():
    with pytest.raises(ValueError) as info:
        parse_config({"shard_size": 5})
    assert "name: required key is missing" in str(info.value)
    assert "input: required key is missing" in str(info.value)


def test_every_problem_is_reported_on_its_own_line(pool):
    with pytest.raises(ValueError) as info:
        parse_config({**raw_config(pool), "shard_size": "many", "runner": "rey", "colums": {}})
    lines = str(info.value).splitlines()
    assert lines[0] == "invalid config:"
    assert sorted(line.split(":")[0].strip() for line in lines[1:]) == ["colums", "runner", "shard_size"]


@pytest.mark.parametrize(
    "entry, expected",
    [
        ({"stage": LENGTH, "name": "bad name"}, "stages.0.name: String should match pattern"),
        ({"stage": LENGTH, "checkpoint": "maybe"}, "stages.0.checkpoint: Input should be a valid boolean"),
        ({"name": "x"}, "stages.0.stage: required key is missing"),
        ({"stage": LENGTH, "resources": [1]}, "stages.0.resources: Input should be a valid dictionary"),
    ],
)
def test_stage_entry_validation(pool, entry, expected):
    with pytest.raises(ValueError, match=re.escape(expected)):
        parse_config(raw_config(pool, entry))


# Stages: parameters, resources, import paths ---------------------------------------------------


def test_stage_parameters_are_passed(pool):
    plan = plan_of(
        raw_config(
            pool, {"stage": LENGTH, "min_words": 3, "max_chars": None}, {"stage": JUNK, "rules": ["empty_caption"]}
        )
    )
    length, junk = plan.stages[0].stage, plan.stages[1].stage
    assert (length.min_words, length.max_chars, length.min_chars) == (3, None, 5)
    assert junk.rules == ["empty_caption"]
    assert plan.stages[0].name == "caption_length" and plan.stages[0].import_path == LENGTH


def test_unknown_stage_parameter_lists_allowed(pool):
    expected = (
        "stages[0] (curation.basic:CaptionLength): unknown parameter(s) ['min_word']; "
        "allowed: ['max_chars', 'max_words', 'min_chars', 'min_words'], plus name, checkpoint, resources"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        plan_of(raw_config(pool, {"stage": LENGTH, "min_word": 3}))


def test_unknown_parameter_of_a_later_stage_names_its_index(pool):
    expected = re.escape(
        "stages[1] (curation.dedup:ExactDuplicates): "
        "unknown parameter(s) ['key']; allowed: ['against', 'keep', 'keys', 'normalize_text']"
    )
    with pytest.raises(ValueError, match=expected):
        plan_of(raw_config(pool, LENGTH, {"stage": DEDUP, "key": ["url"]}))


@pytest.mark.parametrize(
    "entry, expected",
    [
        (
            {"stage": LENGTH, "min_words": "many"},
            "min_words: Input should be a valid integer, unable to parse string as an integer (got 'many')",
        ),
        (
            {"stage": LENGTH, "min_words": 2.5},
            "min_words: Input should be a valid integer, got a number with a fractional part (got 2.5)",
        ),
        ({"stage": DEDUP, "keys": "url"}, "keys: Input should be a valid list (got 'url')"),
        ({"stage": DEDUP, "normalize_text": "maybe"}, "normalize_text: Input should be a valid boolean"),
    ],
)
def test_wrong_stage_parameter_type(pool, entry, expected):
    with pytest.raises(ValueError, match=re.escape(f"stages[0] ({entry['stage']}): invalid parameters:")) as info:
        plan_of(raw_config(pool, entry))
    assert expected in str(info.value)


@pytest.mark.parametrize(
    "entry, expected",
    [
        ({"stage": LENGTH, "min_words": 5, "max_words": 2}, "min_words (5) is greater than max_words (2)"),
        ({"stage": LENGTH, "min_chars": -1}, "min_chars must be >= 0 or null, got -1"),
        (
            {"stage": JUNK, "rules": ["empty_caption", "nope"]},
            "rules: unknown rule(s) ['nope']; allowed: ['empty_caption'",
        ),
        ({"stage": DEDUP, "keys": []}, "keys must name at least one column"),
    ],
)
def test_stage_own_checks_are_reported_with_the_stage(pool, entry, expected):
    with pytest.raises(ValueError, match=re.escape(f"stages[0] ({entry['stage']})")) as info:
        plan_of(raw_config(pool, entry))
    assert expected in str(info.value)


def test_resources_overrides_keep_the_stage_defaults(pool):
    plan = plan_of(
        raw_config(
            pool,
            {"stage": LENGTH, "resources": {"cpus": 2, "concurrency": 3}},
            {"stage": DEDUP, "resources": {"cpus": 0.5}},
        )
    )
    assert plan.stages[0].stage.resources == Resources(cpus=2.0, gpus=0.0, batch_size=TEXT_BATCH, concurrency=3)
    # ExactDuplicates' own default batch size survives an override of another key.
    assert plan.stages[1].stage.resources == Resources(cpus=0.5, batch_size=65536)
    assert plan_of(raw_config(pool, DEDUP)).stages[0].stage.resources.batch_size == 65536


def test_unknown_resources_key(pool):
    with pytest.raises(
        ValueError,
        match=re.escape(
            "stages[0] (curation.basic:CaptionLength): unknown resources key(s) ['gpu']; "
            "allowed: ['cpus', 'gpus', 'batch_size', 'concurrency', 'memory']"
        ),
    ):
        plan_of(raw_config(pool, {"stage": LENGTH, "resources": {"gpu": 1}}))


@pytest.mark.parametrize(
    "resources, expected",
    [
        ({"cpus": 0}, "resources.cpus must be > 0"),
        ({"gpus": -1}, "resources.gpus must be >= 0"),
        ({"batch_size": 0}, "resources.batch_size must be >= 1"),
        ({"concurrency": 0}, "resources.concurrency must be >= 1 or null"),
        ({"memory": 0}, "resources.memory must be >= 1 (bytes) or null"),
        ({"batch_size": "big"}, "batch_size: Input should be a valid integer"),
    ],
)
def test_bad_resources_value(pool, resources, expected):
    prefix = re.escape("stages[0] (curation.basic:CaptionLength): invalid resources")
    with pytest.raises(ValueError, match=prefix) as info:
        plan_of(raw_config(pool, {"stage": LENGTH, "resources": resources}))
    assert expected in str(info.value)


@pytest.mark.parametrize(
    "path, expected",
    [
        ("curation.basic", "stage 'curation.basic' must be an import path of the form module:Class"),
        ("curation.basic:", "must be an import path of the form module:Class"),
        (":CaptionLength", "must be an import path of the form module:Class"),
        ("curation.nope:Thing", "stage 'curation.nope:Thing': cannot import 'curation.nope'"),
        ("curation.basic:CaptionLenght", "'CaptionLenght' is not a Stage class in 'curation.basic'"),
        ("pipelines.stage:Resources", "'Resources' is not a Stage class in 'pipelines.stage'"),
        ("pipelines.engine.config:load_config", "'load_config' is not a Stage class in 'pipelines.engine.config'"),
        ("curation.basic:CONTROL_CHARACTERS", "'CONTROL_CHARACTERS' is not a Stage class"),
        (f"{HERE}:NotAStage", "'NotAStage' is not a Stage class"),
        ("pipelines.stage:KeyedStage", "'KeyedStage' is not a Stage class in 'pipelines.stage'"),
        (f"{HERE}:BareGlobal", "a GlobalStage subclasses KeyedStage or SummedStage"),
    ],
)
def test_bad_stage_import_path(pool, path, expected):
    with pytest.raises(ValueError, match=re.escape(expected)):
        plan_of(raw_config(pool, path))


def test_stage_defined_outside_the_package_resolves():
    assert resolve_stage_class(f"{HERE}:SeededSample") is SeededSample
    assert resolve_stage_class(DEDUP).name == "exact_duplicates"


# Seed ------------------------------------------------------------------------------------------


def test_pipeline_seed_is_injected_into_stages_with_a_seed_field(pool):
    plan = plan_of(raw_config(pool, LENGTH, f"{HERE}:SeededSample", seed=7))
    assert plan.stages[1].stage.seed == 7
    assert not hasattr(plan.stages[0].stage, "seed")


def test_default_pipeline_seed_replaces_the_stage_default(pool):
    plan = plan_of(raw_config(pool, f"{HERE}:SeededSample"))
    assert plan.stages[0].stage.seed == 0  # the pipeline's seed (0), not the class default (123)


def test_explicit_stage_seed_wins_over_pipeline_seed(pool):
    raw = raw_config(pool, {"stage": f"{HERE}:SeededSample", "seed": 3, "fraction": 0.25}, seed=7)
    stage = plan_of(raw).stages[0].stage
    assert (stage.seed, stage.fraction) == (3, 0.25)
    assert raw["stages"][0] == {"stage": f"{HERE}:SeededSample", "seed": 3, "fraction": 0.25}


def test_seed_injection_does_not_mutate_the_config(pool):
    cfg = parse_config(raw_config(pool, f"{HERE}:SeededSample", seed=9))
    build_plan(cfg)
    assert cfg.stages[0].params == {}


def test_pipeline_seed_changes_the_hash_only_through_seeded_stages(pool):
    with_seeded = [plan_of(raw_config(pool, f"{HERE}:SeededSample", seed=s)) for s in (1, 2)]
    assert with_seeded[0].config_hash != with_seeded[1].config_hash
    assert fingerprint_diff(with_seeded[0].fingerprint, with_seeded[1].fingerprint) == ["stages.00.params.seed: 1 -> 2"]
    without = [plan_of(raw_config(pool, LENGTH, seed=s)) for s in (1, 2)]
    assert without[0].config_hash == without[1].config_hash


# Overrides -------------------------------------------------------------------------------------


def test_override_top_level_keys_with_yaml_types(pool):
    raw = raw_config(pool, LENGTH)
    out = apply_overrides(raw, ["shard_size=500", "runner=ray", "seed=11", "output_dir=/tmp/x"])
    assert (out["shard_size"], out["runner"], out["seed"], out["output_dir"]) == (500, "ray", 11, "/tmp/x")
    cfg = parse_config(out)
    assert (cfg.shard_size, cfg.runner, cfg.seed) == (500, "ray", 11)
    assert "shard_size" not in raw  # the input dict is left alone


def test_override_nested_key_creates_the_section(pool):
    out = apply_overrides(raw_config(pool), ["columns.url=URL", "columns.caption=TEXT", "ray.num_cpus=4"])
    assert out["columns"] == {"url": "URL", "caption": "TEXT"}
    cfg = parse_config(out)
    assert (cfg.columns.url, cfg.columns.caption, cfg.ray.num_cpus) == ("URL", "TEXT", 4)


@pytest.mark.parametrize(
    "override", ["stages.0.min_words=3", "stages.caption_length.min_words=3", "stages.1.min_words=3"]
)
def test_override_stage_parameter_by_index_or_name(pool, override):
    raw = raw_config(pool, CHARS, LENGTH) if override.startswith("stages.1") else raw_config(pool, LENGTH, CHARS)
    plan = plan_of(apply_overrides(raw, [override]))
    length = next(s.stage for s in plan.stages if s.name == "caption_length")
    assert length.min_words == 3 and isinstance(length.min_words, int)


def test_override_stage_by_its_configured_name(pool):
    raw = raw_config(pool, LENGTH, {"stage": LENGTH, "name": "strict_length"})
    plan = plan_of(apply_overrides(raw, ["stages.strict_length.min_words=6"]))
    assert [s.stage.min_words for s in plan.stages] == [2, 6]


def test_override_yaml_values(pool):
    raw = raw_config(pool, LENGTH, DEDUP)
    out = apply_overrides(
        raw,
        [
            "stages.caption_length.max_chars=null",
            "stages.0.checkpoint=true",
            "stages.exact_duplicates.keys=[url, caption]",
            "columns.keep=[page]",
            "stages.1.normalize_text=yes",
            "stages.0.resources.batch_size=64",
            "columns.uid=",
        ],
    )
    assert out["stages"][0]["max_chars"] is None
    assert out["stages"][0]["checkpoint"] is True
    assert out["stages"][1]["keys"] == ["url", "caption"]
    assert out["columns"] == {"keep": ["page"], "uid": ""}
    assert out["stages"][1]["normalize_text"] is True
    out["columns"]["uid"] = None
    plan = plan_of(out)
    assert plan.stages[0].stage.max_chars is None and plan.stages[0].checkpoint
    assert plan.stages[0].stage.resources.batch_size == 64
    assert plan.source.kept_columns == ("page",)


def test_override_of_an_unknown_key_fails_validation(pool):
    with pytest.raises(ValueError, match=re.escape("shard_sise: unknown key; allowed keys:")):
        parse_config(apply_overrides(raw_config(pool), ["shard_sise=3"]))
    with pytest.raises(ValueError, match=re.escape("unknown parameter(s) ['min_wrds']")):
        plan_of(apply_overrides(raw_config(pool, LENGTH), ["stages.0.min_wrds=3"]))


def test_overrides_through_load_config(tmp_path, pool):
    path = write_yaml(tmp_path / "c.yaml", {"input": "somewhere/else.parquet", "stages": [{"stage": LENGTH}]})
    cfg = load_config(path, [f"input={pool}", "stages.caption_length.min_words=4", "runner=ray"])
    assert (cfg.input, cfg.runner, cfg.stages[0].params) == (pool, "ray", {"min_words": 4})
    assert build_plan(cfg).stages[0].stage.min_words == 4


@pytest.mark.parametrize(
    "override, expected",
    [
        ("shard_size", "override 'shard_size' is not of the form key=value"),
        ("=3", "override '=3' is not of the form key=value"),
        (
            "stages.nope.min_words=3",
            "override 'stages.nope.min_words': no stage named 'nope'; "
            "stages are ['caption_length', 'exact_duplicates']",
        ),
        ("stages.5.min_words=3", "override 'stages.5.min_words': there are only 2 stages"),
        ("stages.0=3", "override 'stages.0' must name a key inside a stage"),
        ("name.x=1", "override 'name.x': 'name' is not a mapping"),
        ("stages.0.min_words.x=1", "override 'stages.0.min_words.x': 'stages.0.min_words' is not a mapping"),
    ],
)
def test_malformed_overrides(pool, override, expected):
    raw = raw_config(pool, {"stage": LENGTH, "min_words": 2}, DEDUP)
    with pytest.raises(ValueError, match=re.escape(expected)):
        apply_overrides(raw, [override])


def test_value_may_contain_equals_sign(pool):
    out = apply_overrides(raw_config(pool), ["output_dir=s3://bucket/a=b"])
    assert out["output_dir"] == "s3://bucket/a=b"


# Stage names and columns -----------------------------------------------------------------------


def test_duplicate_stage_names_rejected(pool):
    with pytest.raises(
        ValueError,
        match=re.escape(
            "stage name 'caption_length' is taken (by another stage, or reserved); give it a distinct `name:`"
        ),
    ):
        plan_of(raw_config(pool, LENGTH, CHARS, LENGTH))
    with pytest.raises(ValueError, match="stage name 'mine' is taken"):
        plan_of(raw_config(pool, {"stage": LENGTH, "name": "mine"}, {"stage": CHARS, "name": "mine"}))
    plan = plan_of(raw_config(pool, LENGTH, {"stage": LENGTH, "name": "caption_length_strict", "min_words": 5}))
    assert [s.name for s in plan.stages] == ["caption_length", "caption_length_strict"]


def test_stage_reading_a_column_nobody_provides(pool):
    with pytest.raises(ValueError) as info:
        plan_of(raw_config(pool, LENGTH, f"{HERE}:ReadsImage"))
    message = str(info.value)
    assert f"stage 'reads_image' ({HERE}:ReadsImage) reads column(s) ['image']" in message
    assert "available here: ['uid', 'source_index', 'url', 'caption']" in message


def test_column_provided_by_an_earlier_stage(pool):
    with pytest.raises(ValueError, match=re.escape("stage 'reads_width'") + ".*" + re.escape("['width']")):
        plan_of(raw_config(pool, f"{HERE}:ReadsWidth", f"{HERE}:WritesWidth"))
    plan = plan_of(raw_config(pool, f"{HERE}:WritesWidth", f"{HERE}:ReadsWidth"))
    assert [s.name for s in plan.stages] == ["writes_width", "reads_width"]


def test_global_stage_compute_columns_are_checked(pool):
    with pytest.raises(ValueError, match=re.escape("stage 'global_over_width'") + ".*" + re.escape("['width']")):
        plan_of(raw_config(pool, f"{HERE}:GlobalOverWidth"))
    plan_of(raw_config(pool, f"{HERE}:WritesWidth", f"{HERE}:GlobalOverWidth"))


def test_dedup_keys_must_exist(pool):
    with pytest.raises(
        ValueError,
        match=re.escape("stage 'exact_duplicates' (curation.dedup:ExactDuplicates) reads column(s) ['page']"),
    ):
        plan_of(raw_config(pool, {"stage": DEDUP, "keys": ["url", "page"]}))
    # A kept input column is available to every stage.
    plan = plan_of(raw_config(pool, {"stage": DEDUP, "keys": ["url", "page"]}, columns={"keep": ["page"]}))
    assert plan.stages[0].stage.keys == ["url", "page"]


def test_stage_writing_an_unregistered_column(pool):
    with pytest.raises((KeyError, ValueError), match="'no_such_registered_column' is not registered"):
        plan_of(raw_config(pool, f"{HERE}:WritesUnregistered"))


def test_keep_columns_must_not_be_reserved(pool):
    with pytest.raises(ValueError, match=re.escape("columns.keep names reserved column(s) ['uid']")):
        plan_of(raw_config(pool, LENGTH, columns={"keep": ["page", "uid"]}))


def test_plan_source_spec_follows_the_config(pool):
    plan = plan_of(
        raw_config(
            pool,
            LENGTH,
            input_format="csv",
            columns={"url": "url", "caption": "caption", "uid": None, "keep": ["page"]},
        )
    )
    src = plan.source.spec
    assert (src.path, src.format, src.url_column, src.caption_column, src.uid_column, src.keep_columns) == (
        pool,
        "csv",
        "url",
        "caption",
        None,
        ("page",),
    )


def test_missing_input_fails_at_build_time(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        plan_of(raw_config(str(tmp_path / "absent.csv"), LENGTH))


# Phases ----------------------------------------------------------------------------------------


def _phases(plan):
    return [(p.name, [s.name for s in p.stages]) for p in plan.phases]


def test_local_stages_form_one_phase(pool):
    plan = plan_of(raw_config(pool, CHARS, JUNK, LENGTH))
    assert _phases(plan) == [("01_caption_length", ["caption_characters", "junk_alt_text", "caption_length"])]
    assert plan.phase_names == ["00_input", "01_caption_length"]
    assert plan.phases[0].global_stage is None


def test_no_stages_means_only_the_input_phase(pool):
    plan = plan_of(raw_config(pool))
    assert plan.phases == [] and plan.phase_names == [INPUT_PHASE]


def test_new_phase_before_every_global_stage_and_after_checkpoints(pool):
    plan = plan_of(
        raw_config(
            pool,
            CHARS,
            {"stage": JUNK, "checkpoint": True},
            LENGTH,
            DEDUP,
            {"stage": LENGTH, "name": "after_dedup"},
        )
    )
    assert _phases(plan) == [
        ("01_junk_alt_text", ["caption_characters", "junk_alt_text"]),
        ("02_caption_length", ["caption_length"]),
        ("03_after_dedup", ["exact_duplicates", "after_dedup"]),
    ]
    assert [p.global_stage.name if p.global_stage else None for p in plan.phases] == [None, None, "exact_duplicates"]


def test_global_stage_first_opens_the_first_phase(pool):
    plan = plan_of(raw_config(pool, DEDUP, LENGTH))
    assert _phases(plan) == [("01_caption_length", ["exact_duplicates", "caption_length"])]
    assert plan.phases[0].global_stage is plan.stages[0]


def test_consecutive_global_stages_and_global_checkpoint(pool):
    plan = plan_of(
        raw_config(pool, DEDUP, {"stage": DEDUP, "name": "dedup_url", "keys": ["url"], "checkpoint": True}, LENGTH)
    )
    assert _phases(plan) == [
        ("01_exact_duplicates", ["exact_duplicates"]),
        ("02_dedup_url", ["dedup_url"]),
        ("03_caption_length", ["caption_length"]),
    ]


def test_checkpoint_before_global_stage_makes_no_empty_phase(pool):
    plan = plan_of(raw_config(pool, {"stage": LENGTH, "checkpoint": True}, DEDUP))
    assert _phases(plan) == [("01_caption_length", ["caption_length"]), ("02_exact_duplicates", ["exact_duplicates"])]


def test_checkpoint_on_last_stage(pool):
    plan = plan_of(raw_config(pool, CHARS, {"stage": LENGTH, "checkpoint": True}))
    assert _phases(plan) == [("01_caption_length", ["caption_characters", "caption_length"])]


def test_phase_numbers_have_two_digits_past_nine(pool):
    stages = [{"stage": LENGTH, "name": f"s{i}", "checkpoint": True} for i in range(11)]
    plan = plan_of(raw_config(pool, *stages))
    assert plan.phase_names == ["00_input"] + [f"{i + 1:02d}_s{i}" for i in range(11)]


# Config hash and fingerprint -------------------------------------------------------------------


def _hash(raw: dict) -> str:
    return plan_of(raw).config_hash


def test_config_hash_is_deterministic(pool):
    raw = raw_config(pool, LENGTH, DEDUP)
    assert _hash(raw) == _hash(copy.deepcopy(raw))
    assert re.fullmatch(r"[0-9a-f]{16}", _hash(raw))


@pytest.mark.parametrize(
    "overrides",
    [
        ["runner=ray"],
        ["output_dir=/elsewhere/runs"],
        ["stages.0.resources.cpus=4"],
        ["stages.1.resources.batch_size=10", "stages.1.resources.concurrency=2"],
        ["ray.num_cpus=8"],
        ["ray.address=auto"],
    ],
)
def test_config_hash_ignores_where_and_how_fast(pool, overrides):
    raw = raw_config(pool, LENGTH, DEDUP)
    assert _hash(apply_overrides(raw, overrides)) == _hash(raw)


@pytest.mark.parametrize(
    "override, changed",
    [
        ("stages.0.min_words=3", "stages.00.params.min_words: 2 -> 3"),
        ("stages.1.keys=[url]", 'stages.01.params.keys: ["url", "caption"] -> ["url"]'),
        ("stages.1.normalize_text=true", "stages.01.params.normalize_text: false -> true"),
        ("stages.0.checkpoint=true", "stages.00.checkpoint: false -> true"),
        ("stages.0.name=length", 'stages.00.name: "caption_length" -> "length"'),
        ("shard_size=7", "shard_size: 10000 -> 7"),
        ("columns.url=url", 'columns.url: "auto" -> "url"'),
        ("input_format=csv", 'input.format: "auto" -> "csv"'),
        ("input_max_row_bytes=65536", "input.max_row_bytes: 4194304 -> 65536"),
    ],
)
def test_config_hash_changes_with_what_decides_the_rows(pool, override, changed):
    raw = raw_config(pool, LENGTH, DEDUP)
    old, new = plan_of(raw), plan_of(apply_overrides(raw, [override]))
    assert old.config_hash != new.config_hash
    assert fingerprint_diff(old.fingerprint, new.fingerprint) == [changed]


def test_config_hash_changes_with_the_input_file(tmp_path, pool):
    raw = raw_config(pool, LENGTH)
    before = plan_of(raw)
    with open(pool, "a") as f:
        f.write("http://a.test/3.jpg,a third row,p3\n")
    after = plan_of(raw)
    assert before.config_hash != after.config_hash
    diff = fingerprint_diff(before.fingerprint, after.fingerprint)
    assert diff and all(line.startswith("input.files:") for line in diff)
    assert before.fingerprint["input"]["files"][0]["file"] == os.path.basename(pool)


def test_added_stage_shows_in_the_diff(pool):
    old, new = plan_of(raw_config(pool, LENGTH)), plan_of(raw_config(pool, LENGTH, DEDUP))
    diff = fingerprint_diff(old.fingerprint, new.fingerprint)
    assert len(diff) == 1 and diff[0].startswith('stages.01: "<absent>" -> {')


def test_fingerprint_diff_unit():
    old = {"a": 1, "b": {"c": [1, 2], "d": "x"}, "gone": True}
    new = {"a": 1, "b": {"c": [1, 3], "d": "x"}, "added": None}
    assert fingerprint_diff(old, new) == [
        'added: "<absent>" -> null',
        "b.c: [1, 2] -> [1, 3]",
        'gone: true -> "<absent>"',
    ]
    assert fingerprint_diff(old, copy.deepcopy(old)) == []
    long = fingerprint_diff({"k": "x" * 500}, {"k": "y"})[0]
    assert long.startswith('k: "xxx') and long.endswith('xxx... -> "y"') and len(long) < 140


def test_config_hash_ignores_key_order():
    assert config_hash({"a": 1, "b": {"c": 2, "d": 3}}) == config_hash({"b": {"d": 3, "c": 2}, "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_run_uri(pool):
    assert plan_of(raw_config(pool, output_dir="out/")).run_uri == "out/t"
    assert plan_of(raw_config(pool, output_dir="s3://bucket/runs")).run_uri == "s3://bucket/runs/t"


def test_parse_config_returns_the_model(pool):
    assert isinstance(parse_config(raw_config(pool)), PipelineConfig)


def test_a_stage_may_have_a_required_parameter(pool):
    entry = {"stage": "tests.stages:MinWords"}
    with pytest.raises(ValueError, match="minimum"):
        plan_of(raw_config(pool, {"stage": "tests.stages:CountSetup"}, entry))
    plan = plan_of(raw_config(pool, {"stage": "tests.stages:CountSetup"}, {**entry, "minimum": 3}))
    assert plan.stages[1].stage.minimum == 3


def test_run_names_cannot_climb_out_of_the_output_dir(pool):
    for name in (".", "..", ".hidden"):
        with pytest.raises(ValueError, match="name"):
            plan_of({**raw_config(pool, LENGTH), "name": name})
    assert plan_of({**raw_config(pool, LENGTH), "name": 2024}).config.name == "2024"
