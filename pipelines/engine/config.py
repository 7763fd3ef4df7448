"""Pipeline configs: YAML → validated :class:`PipelineConfig`, ``key=value`` overrides, stages.

A config names each stage by its import path (``curation.basic:CaptionLength``); the stage's
dataclass fields are its parameters, validated here against the class, so a typo or a wrong type
fails before anything runs, with a message naming the key and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import os
import sys
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from pipelines.engine.chain import PlannedStage
from pipelines.stage import GlobalStage, KeyedStage, LinkedStage, Resources, Stage, SummedStage

#: Default of ``input_max_row_bytes``: the longest record (csv/tsv) or line (jsonl) read, in bytes.
DEFAULT_MAX_ROW_BYTES = 4 << 20


class ColumnsConfig(BaseModel):
    """Which input columns hold the url, the caption and (optionally) a uid; which to carry."""

    model_config = ConfigDict(extra="forbid")
    url: str = "auto"
    caption: str = "auto"
    uid: str | None = None
    keep: list[str] = Field(default_factory=list)


class RayConfig(BaseModel):
    """How the Ray runner reaches a cluster: ``address``, else ``RAY_ADDRESS`` from the environment
    (as ``ray job submit`` sets it), else a new local Ray, never one left running on the machine."""

    model_config = ConfigDict(extra="forbid")
    address: str | None = None
    num_cpus: int | None = Field(default=None, ge=1)
    num_gpus: int | None = Field(default=None, ge=0)
    object_store_memory: int | None = Field(default=None, ge=78643200)
    temp_dir: str | None = None
    #: Workers' output (their warnings, tracebacks, Ray's lines) reaches the driver: its log file, or
    #: the terminal with ``-v``. Without it, it stays in Ray's session folder.
    log_to_driver: bool = True

    @property
    def cluster_address(self) -> str | None:
        """The cluster to join, or None to start a local Ray."""
        return self.address or os.environ.get("RAY_ADDRESS") or None


class ExportConfig(BaseModel):
    """Where and how the kept rows are exported when the run completes (inside the run directory)."""

    model_config = ConfigDict(extra="forbid")
    formats: list[Literal["webdataset", "parquet", "llava"]] = Field(
        default_factory=lambda: ["webdataset", "parquet"], min_length=1
    )
    samples_per_shard: int = Field(default=10_000, ge=1)
    folder: str = Field(default="export", pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.\-/]*$")


class StageConfig(BaseModel):
    """One entry of ``stages``: the import path, optional name/checkpoint/resources, parameters."""

    model_config = ConfigDict(extra="allow")
    stage: str
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_\-]+$")
    checkpoint: bool | None = None
    resources: dict[str, Any] = Field(default_factory=dict)

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class PipelineConfig(BaseModel):
    """A whole pipeline: input, columns, output, runner, sharding, seed and stages."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
    input: str
    input_format: Literal["auto", "parquet", "csv", "tsv", "jsonl"] = "auto"
    # The longest csv/tsv record or jsonl line read; a longer one is rejected as a malformed row.
    input_max_row_bytes: int = Field(default=DEFAULT_MAX_ROW_BYTES, ge=1, le=1 << 30)
    columns: ColumnsConfig = Field(default_factory=ColumnsConfig)
    output_dir: str = "runs"
    runner: Literal["local", "ray"] = "local"
    shard_size: int = Field(default=10_000, ge=1)
    seed: int = 0
    ray: RayConfig = Field(default_factory=RayConfig)
    stages: list[StageConfig] = Field(default_factory=list)
    export: ExportConfig | None = None


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read a YAML config, apply ``key=value`` overrides and validate the result."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"config file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path!r} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"config file {path!r} must hold a mapping of keys, not {type(raw).__name__}")
    raw.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    return parse_config(apply_overrides(raw, overrides))


def parse_config(raw: dict[str, Any]) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ValueError("invalid config:\n" + format_validation_error(e, PipelineConfig)) from None


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Set dotted keys from ``key=value`` strings; values are parsed as YAML (``3``, ``true``, ``[a, b]``).

    Stages are addressed by index or by name: ``stages.0.min_words=2`` or
    ``stages.caption_length.min_words=2``.
    """
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key=value")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        parts = key.split(".")
        target: Any = raw
        for depth, part in enumerate(parts[:-1]):
            if isinstance(target, list):
                target = target[_stage_index(target, part, key)]
            else:
                target = target.setdefault(part, {})
            if not isinstance(target, (dict, list)):
                raise ValueError(f"override {key!r}: {'.'.join(parts[: depth + 1])!r} is not a mapping")
        last = parts[-1]
        if isinstance(target, list):
            raise ValueError(f"override {key!r} must name a key inside a stage, e.g. stages.0.param=value")
        target[last] = value
    return raw


def _stage_index(stages: list, part: str, key: str) -> int:
    if part.isdigit():
        if int(part) >= len(stages):
            raise ValueError(f"override {key!r}: there are only {len(stages)} stages")
        return int(part)
    names = [_entry_name(s) for s in stages]
    if part not in names:
        raise ValueError(f"override {key!r}: no stage named {part!r}; stages are {names}")
    return names.index(part)


def _entry_name(entry: Any) -> str:
    if not isinstance(entry, dict) or "stage" not in entry:
        return "?"
    return entry.get("name") or resolve_stage_class(entry["stage"]).name


def resolve_stage_class(path: str) -> type[Stage]:
    """Import ``module:Class`` and check that it is a Stage."""
    module_name, sep, class_name = path.partition(":")
    if not sep or not module_name or not class_name:
        raise ValueError(f"stage {path!r} must be an import path of the form module:Class")
    if os.getcwd() not in sys.path:  # stage modules beside the user, as `python -m` would find them
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(
            f"stage {path!r}: cannot import {module_name!r}: {e} (the module must be "
            f"importable: installed, in the current directory or on PYTHONPATH)"
        ) from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Stage)) or cls in BASE_CLASSES:
        raise ValueError(f"stage {path!r}: {class_name!r} is not a Stage class in {module_name!r}")
    if issubclass(cls, GlobalStage) and not issubclass(cls, (KeyedStage, SummedStage)):
        raise ValueError(
            f"stage {path!r}: a GlobalStage subclasses KeyedStage or SummedStage, which say how the pool is read"
        )
    return cls


#: The contract's own classes: configs name their subclasses.
BASE_CLASSES = (Stage, GlobalStage, KeyedStage, LinkedStage, SummedStage)


def stage_parameters(cls: type[Stage]) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init and f.name != "resources"}


def build_stage(entry: StageConfig, index: int, seed: int) -> PlannedStage:
    """Instantiate a stage from its config entry, validating parameters against its fields."""
    cls = resolve_stage_class(entry.stage)
    where = f"stages[{index}] ({entry.stage})"
    allowed = stage_parameters(cls)
    params = entry.params
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(
            f"{where}: unknown parameter(s) {unknown}; allowed: {sorted(allowed) or 'none'}, "
            f"plus name, checkpoint, resources"
        )
    if "seed" in allowed and "seed" not in params:
        params["seed"] = seed
    resources = _build_resources(cls, entry.resources, where)
    try:
        stage = TypeAdapter(cls).validate_python({**params, "resources": resources})
    except ValidationError as e:
        raise ValueError(f"{where}: invalid parameters:\n" + format_validation_error(e)) from None
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from None
    checkpoint = cls.checkpoint_after if entry.checkpoint is None else entry.checkpoint
    return PlannedStage(name=entry.name or cls.name, stage=stage, import_path=entry.stage, checkpoint=checkpoint)


def _build_resources(cls: type[Stage], overrides: dict[str, Any], where: str) -> Resources:
    field_ = next(f for f in dataclasses.fields(cls) if f.name == "resources")
    default = field_.default_factory() if field_.default_factory is not dataclasses.MISSING else Resources()
    allowed = [f.name for f in dataclasses.fields(Resources)]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown resources key(s) {unknown}; allowed: {allowed}")
    try:
        return TypeAdapter(Resources).validate_python({**dataclasses.asdict(default), **overrides})
    except ValidationError as e:
        raise ValueError(f"{where}: invalid resources:\n" + format_validation_error(e)) from None
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def format_validation_error(error: ValidationError, model: type[BaseModel] | None = None) -> str:
    """One line per problem, naming the key, what was given and what is allowed."""
    lines = []
    for problem in error.errors():
        loc = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        kind = problem["type"]
        if kind == "extra_forbidden":
            allowed = _allowed_keys(model, problem["loc"][:-1])
            hint = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
            lines.append(f"  {loc}: unknown key{hint}")
        elif kind == "missing":
            lines.append(f"  {loc}: required key is missing")
        elif kind == "value_error":  # raised by a __post_init__ check, which names its field
            where = "" if loc == "(top level)" else f"{loc}: "
            lines.append(f"  {where}{problem['ctx']['error']}")
        else:
            lines.append(f"  {loc}: {problem['msg']} (got {problem.get('input')!r})")
    return "\n".join(lines)


def _allowed_keys(model: type[BaseModel] | None, loc: tuple) -> list[str]:
    for part in loc:
        if model is None:
            return []
        field_ = model.model_fields.get(str(part))
        annotation = field_.annotation if field_ else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return list(model.model_fields) if model is not None else []
