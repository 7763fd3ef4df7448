"""Near-duplicate captions and images through whole pipeline runs: clusters, survivors, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from curation.dedup import CaptionNearDuplicates, ImageNearDuplicates
from curation.dedup.linked import decide_in_process
from schemas.columns import IMAGE_EMBEDDING, SOURCE_INDEX, UID
from schemas.embeddings import float16_lists
from tests.conftest import read_phase, read_rejects, run_pipeline_dict
from tests.stages import planted_vectors

EMBED = {"stage": "tests.stages:EmbedByGroup"}


def _run(tmp_path, name, captions, stages, runner, shard_size=2):
    path = tmp_path / f"{name}.parquet"
    pq.write_table(
        pa.table({"url": [f"http://img.test/{i}.jpg" for i in range(len(captions))], "caption": captions}), path
    )
    raw = {
        "name": name,
        "input": str(path),
        "output_dir": str(tmp_path / "runs"),
        "shard_size": shard_size,
        "stages": stages,
    }
    return run_pipeline_dict(raw, runner)


def _outcome(plan, stage):
    """({source_index kept}, {source_index rejected: (source_index of survivor, detail)})."""
    uids = read_phase(plan.run_uri, "00_input")
    index_of = dict(zip(uids["uid"].to_pylist(), uids["source_index"].to_pylist()))
    kept = set(read_phase(plan.run_uri, plan.phase_names[-1])["source_index"].to_pylist())
    rejects = read_rejects(plan.run_uri)
    rejected = {}
    for record in rejects.to_pylist() if rejects is not None else []:
        if record["stage"] == stage:
            detail = json.loads(record["detail"])
            rejected[record["source_index"]] = (index_of.get(detail["duplicate_of"], detail["duplicate_of"]), detail)
    return kept, rejected


# A chain across shards: Jaccard(0, 2) = 0.85 and (2, 4) = 0.79 pass 0.7, (0, 4) = 0.67 does not.
CHAIN = [
    "a brown dog runs on the wet sand near the sea at dawn",  # 0
    "two cats sleep on a sofa",  # 1
    "a brown dog runs on the wet sand near the sea at dusk",  # 2
    "",  # 3 empty: never paired
    "a brown dog runs on the dry sand near the sea at dusk today",  # 4 the longest
    "",  # 5
]


@pytest.mark.parametrize(("keep", "survivor"), [("first", 0), ("longest_caption", 4)])
def test_a_caption_chain_across_shards_collapses_to_the_policy_survivor(tmp_path, runner_factory, keep, survivor):
    stage = {"stage": "curation.dedup:CaptionNearDuplicates", "threshold": 0.7, "shingle_size": 1, "keep": keep}
    plan, manifest = _run(tmp_path, f"chain-{keep}", CHAIN, [stage], runner_factory("local"))
    kept, rejected = _outcome(plan, "caption_near_duplicates")
    assert kept == {survivor, 1, 3, 5}
    assert {i: s for i, (s, _) in rejected.items()} == {i: survivor for i in {0, 2, 4} - {survivor}}
    assert all(d["cluster_size"] == 3 and d["keep"] == keep for _, d in rejected.values())
    summary = manifest.aggregates["caption_near_duplicates"]
    assert summary["largest"] == [3] and summary["rows_without_shingles"] == 2
    assert manifest.stage_totals()["caption_near_duplicates"].rejected == {"near_duplicate_caption": 2}


def test_caption_clusters_are_identical_under_both_runners(tmp_path, runner_factory):
    captions = [f"{c} {i // 6}" if c else c for i, c in enumerate(CHAIN * 6)]
    stage = {"stage": "curation.dedup:CaptionNearDuplicates", "threshold": 0.6, "shingle_size": 1}
    results = []
    for kind in ("local", "ray"):
        plan, manifest = _run(tmp_path, f"runners-{kind}", captions, [stage], runner_factory(kind), shard_size=7)
        results.append((_outcome(plan, "caption_near_duplicates"), manifest.aggregates["caption_near_duplicates"]))
    assert results[0] == results[1]


@pytest.mark.parametrize("kind", ["local", "ray"])
def test_captions_are_deduplicated_against_an_earlier_runs_kept_rows(tmp_path, runner_factory, kind):
    stage = {"stage": "curation.dedup:CaptionNearDuplicates", "threshold": 0.7}
    earlier, _ = _run(tmp_path, f"earlier-{kind}", CHAIN[:2], [stage], runner_factory("local"))
    kept_earlier = read_phase(earlier.run_uri, earlier.phase_names[-1])
    later = [{**stage, "keep": "longest_caption", "against": [earlier.run_uri]}]
    plan, manifest = _run(
        tmp_path, f"later-{kind}", CHAIN[2:] + ["two cats sleep on a red sofa"], later, runner_factory(kind)
    )
    kept, rejected = _outcome(plan, "caption_near_duplicates")
    # Rows 0 and 2 (the dusk dogs) join the earlier dawn dog's cluster, which it survives although
    # row 2's caption is longer; the new sofa cat copies the earlier cat. Empty row 1 stays.
    assert kept == {1, 3}
    survivor = dict(zip(kept_earlier["caption"].to_pylist(), kept_earlier["uid"].to_pylist()))
    assert {i: s for i, (s, _) in rejected.items()} == {
        0: survivor[CHAIN[0]],
        2: survivor[CHAIN[0]],
        4: survivor[CHAIN[1]],
    }
    summary = manifest.aggregates["caption_near_duplicates"]
    assert summary["rows"] == 5 and summary["earlier_rows"] == 2 and summary["duplicates_of_earlier_runs"] == 3
    assert summary["size_histogram"] == {"2": 1, "3": 1}


def test_single_row_and_empty_caption_pools(tmp_path, runner_factory):
    stage = {"stage": "curation.dedup:CaptionNearDuplicates"}
    for name, captions in (("one", ["a single caption"]), ("blank", ["", ""])):
        plan, manifest = _run(tmp_path, name, captions, [stage], runner_factory("local"))
        assert manifest.status == "complete" and manifest.phases[-1].rows_out == len(captions)
    image = [EMBED, {"stage": "curation.dedup:ImageNearDuplicates"}]
    _, manifest = _run(tmp_path, "one-image", ["g1"], image, runner_factory("local"))
    assert manifest.phases[-1].rows_out == 1


IMAGES = [
    "g1 a dog on a beach score=0.2",  # 0
    "g2 a red car score=0.9",  # 1
    "g1 a dog on the beach score=0.7",  # 2  same image as 0, near-same caption, best score
    "g3 a tree",  # 3
    "g1 an aerial photo of a coastline",  # 4  same image as 0, a different caption
    "g2 a red car parked score=0.1",  # 5  same image as 1
]


def test_image_duplicates_keep_the_highest_clip_score_under_both_runners(tmp_path, runner_factory):
    stages = [EMBED, {"stage": "curation.dedup:ImageNearDuplicates", "keep": "highest_clip_score"}]
    outcomes = []
    for kind in ("local", "ray"):
        plan, manifest = _run(tmp_path, f"image-{kind}", IMAGES, stages, runner_factory(kind))
        outcomes.append(_outcome(plan, "image_near_duplicates"))
    kept, rejected = outcomes[0]
    assert outcomes[0] == outcomes[1]
    assert kept == {1, 2, 3}
    assert {i: s for i, (s, _) in rejected.items()} == {0: 2, 4: 2, 5: 1}
    summary = manifest.aggregates["image_near_duplicates"]
    assert summary["search"] == "exact" and summary["largest"] == [3, 2]
    card = (Path(plan.run_uri) / "README.md").read_text()
    section = card.split("\n### image_near_duplicates\n")[1]
    assert (
        "3 of 6 rows were duplicates in 2 clusters (survivor: `highest_clip_score`); "
        "largest clusters: 3, 2; clusters by size: 1 of 2, 1 of 3."
    ) in section


def test_pair_policy_keeps_the_same_image_under_a_different_caption(tmp_path, runner_factory):
    stages = [EMBED, {"stage": "curation.dedup:ImageNearDuplicates", "caption_threshold": 0.5}]
    plan, manifest = _run(tmp_path, "pairs", IMAGES, stages, runner_factory("local"))
    kept, rejected = _outcome(plan, "image_near_duplicates")
    assert kept == {0, 1, 3, 4}  # 4 shares 0's image but not its caption
    assert {i: s for i, (s, _) in rejected.items()} == {2: 0, 5: 1}
    assert manifest.stage_totals()["image_near_duplicates"].rejected == {"near_duplicate_pair": 2}


@pytest.mark.parametrize(
    ("captions", "params", "message"),
    [
        (["g1", "g1 noembed"], {}, "have no image_embedding"),
        (["g1", "g1 wide"], {}, "has 9 values, not 8"),
        (["g1", "g2"], {"dim": 512}, "has 8 values, not 512"),
    ],
)
def test_missing_or_mis_sized_embeddings_are_clear_errors(tmp_path, runner_factory, captions, params, message):
    stages = [EMBED, {"stage": "curation.dedup:ImageNearDuplicates", **params}]
    with pytest.raises(Exception, match=message):
        _run(tmp_path, "bad", captions, stages, runner_factory("local"), shard_size=5)


def test_embedding_widths_must_agree_across_shards(tmp_path, runner_factory):
    stages = [EMBED, {"stage": "curation.dedup:ImageNearDuplicates"}]
    with pytest.raises(Exception, match="different widths"):
        _run(tmp_path, "widths", ["g1", "g1 wide"], stages, runner_factory("local"), shard_size=1)


def test_parameters_are_checked():
    with pytest.raises(ValueError, match="keep must be one of"):
        CaptionNearDuplicates(keep="newest")
    with pytest.raises(ValueError, match="bands x rows_per_band"):
        CaptionNearDuplicates(num_perm=16, bands=5, rows_per_band=4)
    with pytest.raises(ValueError, match="cosine"):
        ImageNearDuplicates(threshold=95)
    stage = CaptionNearDuplicates(threshold=0.8)
    assert (stage.bands, stage.rows_per_band) == (16, 8)
    assert CaptionNearDuplicates(threshold=0.8, false_negative_weight=0.5).bands == 9  # datasketch's choice


def test_a_later_pool_is_deduplicated_against_an_earlier_runs_kept_rows(tmp_path, runner_factory):
    stages = [EMBED, {"stage": "curation.dedup:ImageNearDuplicates"}]
    earlier, _ = _run(
        tmp_path, "earlier", ["g1 first", "g2 second", "g2 second again"], stages, runner_factory("local")
    )
    kept_earlier = read_phase(earlier.run_uri, earlier.phase_names[-1])
    assert kept_earlier.num_rows == 2
    later_stages = [
        EMBED,
        {"stage": "curation.dedup:ImageNearDuplicates", "keep": "highest_clip_score", "against": [earlier.run_uri]},
    ]
    plan, manifest = _run(
        tmp_path, "later", ["g2 new score=0.9", "g3 new", "g3 twin", "g4"], later_stages, runner_factory("local")
    )
    kept, rejected = _outcome(plan, "image_near_duplicates")
    assert kept == {1, 3}
    rejects = {r["source_index"]: json.loads(r["detail"]) for r in read_rejects(plan.run_uri).to_pylist()}
    # Row 0 copies the earlier run's g2 row, which survives whatever this pool's scores say.
    g2_uid = kept_earlier.filter(pc.equal(kept_earlier["caption"], "g2 second"))["uid"][0].as_py()
    assert rejects[0]["duplicate_of"] == g2_uid
    summary = manifest.aggregates["image_near_duplicates"]
    assert summary["earlier_rows"] == 2 and summary["duplicates_of_earlier_runs"] == 1 and summary["rows"] == 4
    with pytest.raises(Exception, match="not a completed run"):
        _run(
            tmp_path,
            "nowhere",
            ["g1"],
            [EMBED, {"stage": "curation.dedup:ImageNearDuplicates", "against": [str(tmp_path / "missing")]}],
            runner_factory("local"),
        )


def _planted_pool():
    """The pool of :func:`tests.stages.planted_vectors` in shards of 64 rows, and the planted
    clusters as sets of source_index."""
    vectors, group = planted_vectors()
    table = pa.table(
        {
            UID: [f"row{i}" for i in range(len(vectors))],
            SOURCE_INDEX: list(range(len(vectors))),
            IMAGE_EMBEDDING: float16_lists(vectors),
        }
    )
    members: dict[int, set[int]] = {}
    for index, g in enumerate(group):
        members.setdefault(g, set()).add(index)
    return table.to_batches(64), [m for m in members.values() if len(m) > 1]


def _decision(stage, shards):
    _, _, decided, summary = decide_in_process(stage, pa.Table.from_batches(shards))
    rows = decided.to_pydict()
    return summary, {
        int(i): (str(s), int(n)) for i, s, n in zip(rows["source_index"], rows["survivor_uid"], rows["cluster_size"])
    }


def test_k_means_cells_picked_by_pool_size_find_the_exact_searchs_planted_clusters():
    shards, planted = _planted_pool()
    rows = sum(len(s) for s in shards)
    exact_state, exact = _decision(ImageNearDuplicates(threshold=0.95, index="exact"), shards)
    # exact_max_rows below the pool size: "auto" cuts the pool into cells of about 64 rows, each
    # row searched in its 2 nearest.
    stage = ImageNearDuplicates(threshold=0.95, exact_max_rows=rows - 1, rows_per_cell=64)
    cells_state, cells = _decision(stage, shards)
    assert exact_state["search"] == "exact" and exact_state["cells"] == 1
    assert cells_state["search"] == "cells" and cells_state["cells"] == 10 and cells_state["largest_cell"] < rows / 2
    expected = {i: (f"row{min(cluster)}", len(cluster)) for cluster in planted for i in cluster - {min(cluster)}}
    assert len(planted) == 24 and len(expected) == 48
    assert exact == expected and cells == expected
    assert cells_state["clusters"] == exact_state["clusters"] == 24 and cells_state["edges"] == exact_state["edges"]


@pytest.mark.parametrize("kind", ["local", "ray"])
def test_a_pool_searched_in_cells_decides_as_the_exact_search_does(tmp_path, runner_factory, kind):
    shards, planted = _planted_pool()
    path = tmp_path / "planted.parquet"
    urls = [f"http://img.test/{i}.jpg" for i in range(sum(len(s) for s in shards))]
    pq.write_table(pa.table({"url": urls, "caption": urls}), path)
    outcomes = []
    for index in ("exact", "cells"):
        stage = {"stage": "curation.dedup:ImageNearDuplicates", "threshold": 0.95, "index": index, "rows_per_cell": 64}
        raw = {
            "name": f"cells-{kind}-{index}",
            "input": str(path),
            "output_dir": str(tmp_path / "runs"),
            "shard_size": 100,
            "stages": [{"stage": "tests.stages:PlantedEmbeddings"}, stage],
        }
        plan, manifest = run_pipeline_dict(raw, runner_factory(kind))
        outcomes.append(_outcome(plan, "image_near_duplicates"))
        summary = manifest.aggregates["image_near_duplicates"]
        assert summary["search"] == index and summary["clusters"] == 24
    assert outcomes[0] == outcomes[1]
    kept, rejected = outcomes[1]
    assert {min(cluster) for cluster in planted} <= kept and len(rejected) == 48
