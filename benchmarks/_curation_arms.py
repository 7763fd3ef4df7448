"""The arms of ``curation_value.py``: pipeline configs cut from one config, their runs, the oracle's
shards, and where each kind of row went.

Every arm keeps the Download stage. The other stages fall into ablation groups by their names:
``text_rules`` (caption_characters, junk_alt_text, caption_length), ``metaclip`` (metaclip_match
and metaclip_balance), ``clip_score`` (clip_preprocess, clip_embed and every stage after
clip_embed whose name starts with ``clip_score``: the score filter), and each other stage alone
(exact_duplicates, image_size, image_duplicates, image_near_duplicates). An arm with
image_near_duplicates keeps clip_preprocess and clip_embed, whose embeddings it compares, even
without the score filter.
"""

from __future__ import annotations

import contextlib
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks._real_pairs import FrozenTowerCache, write_shards
from schemas.columns import KEEP_PROBABILITY

DOWNLOAD = "pipelines.download:Download"
GROUP_OF = {
    "caption_characters": "text_rules",
    "junk_alt_text": "text_rules",
    "caption_length": "text_rules",
    "metaclip_match": "metaclip",
    "metaclip_balance": "metaclip",
    "clip_preprocess": "clip_score",
    "clip_embed": "clip_score",
}
EMBEDDING = ("clip_preprocess", "clip_embed")
NEAR_DUPLICATES = "image_near_duplicates"


def stage_name(entry) -> str:
    """The name of a config's stage entry (its ``name``, or its class's)."""
    from pipelines.engine.config import resolve_stage_class

    return entry.name or resolve_stage_class(entry.stage).name


def stage_groups(config) -> dict[str, list[str]]:
    """The config's stage names but the download's, by ablation group, in pipeline order."""
    groups: dict[str, list[str]] = {}
    embedded = False
    for entry in config.stages:
        if entry.stage == DOWNLOAD:
            continue
        name = stage_name(entry)
        group = "clip_score" if embedded and name.startswith("clip_score") else GROUP_OF.get(name, name)
        groups.setdefault(group, []).append(name)
        embedded |= name == "clip_embed"
    return groups


def arm_config(config, arm: str, groups: set[str], runner: str):
    """``config`` named ``<name>-<arm>`` with the download and the stages of ``groups`` only."""
    keep = {name for group, names in stage_groups(config).items() if group in groups for name in names}
    if NEAR_DUPLICATES in keep:
        keep |= set(EMBEDDING)
    stages = [e for e in config.stages if e.stage == DOWNLOAD or stage_name(e) in keep]
    return config.model_copy(update={"name": f"{config.name}-{arm}", "stages": stages, "runner": runner})


def ablation_configs(config, runner: str) -> dict[str, object]:
    """Arm name -> config: the recipe without each group (``minus-<group>``), then each group alone
    (``only-<group>``)."""
    groups = list(stage_groups(config))
    minus = {f"minus-{g}": arm_config(config, f"minus-{g}", set(groups) - {g}, runner) for g in groups}
    return minus | {f"only-{g}": arm_config(config, f"only-{g}", {g}, runner) for g in groups}


@contextlib.contextmanager
def memoised_towers(module, towers: FrozenTowerCache, text: bool = False) -> Iterator[None]:
    """``module.load_clip`` returns bundles whose locked towers ``towers`` memoises, while inside."""
    original = module.load_clip
    module.load_clip = lambda *a, **k: towers.attach(original(*a, **k), text=text)
    try:
        yield
    finally:
        module.load_clip = original


def run_curation(config, towers: FrozenTowerCache):
    """Run ``config`` with the project's runner; ``(run directory, manifest)``.

    With the local runner on a CPU, the CLIP stages run in this process in float32, and their
    image tower is memoised by ``towers`` (an image already encoded by another arm, or another
    row of the same image, is not encoded again); elsewhere (Ray workers, autocast on a GPU)
    the stages load their own model.
    """
    import torch

    import models.clip
    from pipelines.engine.execute import run_pipeline
    from pipelines.engine.runner import make_runner
    from pipelines.job import build_plan

    plan = build_plan(config)
    runner = make_runner(config.runner, config.ray)
    memo = config.runner == "local" and not torch.cuda.is_available()
    try:
        with memoised_towers(models.clip, towers) if memo else contextlib.nullcontext():
            manifest = run_pipeline(plan, runner)
    finally:
        runner.close()
    return Path(plan.run_uri), manifest


def _parquets(folder: Path, columns: list[str]) -> pa.Table | None:
    files = sorted(folder.glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in files]) if files else None


def account(run: Path, manifest, kind_of: dict[str, str]) -> tuple[dict[str, Counter], dict[str, list[float]]]:
    """Per kind of row: rows in the pool, rows kept, rows an epoch draws on average (``per_epoch``: the
    sum of the kept rows' keep probabilities), rows rejected by stage; the CLIP scores of each kind."""
    table: dict[str, Counter] = defaultdict(Counter)
    for kind in kind_of.values():
        table[kind]["pool"] += 1
    final = sorted((run / manifest.final_phase).glob("*.parquet"))
    weighted = bool(final) and KEEP_PROBABILITY in pq.read_schema(final[0]).names
    kept_rows = _parquets(run / manifest.final_phase, ["uid", KEEP_PROBABILITY] if weighted else ["uid"])
    uids = kept_rows["uid"].to_pylist() if kept_rows is not None else []
    chances = kept_rows[KEEP_PROBABILITY].to_pylist() if weighted else [1.0] * len(uids)
    for uid, chance in zip(uids, chances):
        table[kind_of[uid]]["kept"] += 1
        table[kind_of[uid]]["per_epoch"] += chance
    for phase in sorted((run / "rejects").glob("*")):  # no folder where nothing was rejected
        rejects = _parquets(phase, ["uid", "stage"])
        if rejects is None:
            continue
        for uid, stage in zip(rejects["uid"].to_pylist(), rejects["stage"].to_pylist()):
            table[kind_of.get(uid, "unread")][stage] += 1
    scores: dict[str, list[float]] = defaultdict(list)
    scored_phase = next((p.name for p in manifest.phases if "clip_embed" in p.counts), None)
    if scored_phase:
        scored = _parquets(run / scored_phase, ["uid", "clip_score"])
        for uid, score in zip(scored["uid"].to_pylist(), scored["clip_score"].to_pylist()):
            scores[kind_of[uid]].append(score)
    return table, scores


def kept(table: dict[str, Counter]) -> dict[str, int]:
    """Rows kept in all, of the clean rows and of the noise rows, and the same per epoch (rounded)."""
    rows = sum(c["kept"] for c in table.values())
    per_epoch = round(sum(c["per_epoch"] for c in table.values()))
    clean_per_epoch = round(table["clean"]["per_epoch"])
    return {
        "rows": rows,
        "clean": table["clean"]["kept"],
        "noise": rows - table["clean"]["kept"],
        "per_epoch": per_epoch,
        "clean_per_epoch": clean_per_epoch,
        "noise_per_epoch": per_epoch - clean_per_epoch,
    }


def write_oracle(run: Path, manifest, kind_of: dict[str, str], folder: Path, per_shard: int) -> None:
    """The run's exported rows that are clean, in export order, as webdataset shards of the export's size."""
    rows: list[tuple[str, str, bytes]] = []
    for file in sorted((run / manifest.final_phase).glob("*.parquet")):
        table = pq.read_table(file, columns=["uid", "caption", "image"])
        rows += [
            (uid, caption, image)
            for uid, caption, image in zip(
                table["uid"].to_pylist(), table["caption"].to_pylist(), table["image"].to_pylist()
            )
            if kind_of[uid] == "clean"
        ]
    write_shards(rows, folder, per_shard)
