"""CLIP scores: decoding as open_clip does, embeddings and scores, threshold and exact top fraction."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from curation.clip_score import ClipEmbed, ClipPreprocess, ClipScoreThreshold, ClipScoreTopFraction
from models.clip import load_clip
from pipelines.engine.config import parse_config
from pipelines.engine.keyed import summed_counts
from pipelines.job import build_plan
from schemas.columns import CAPTION, CLIP_PIXELS, CLIP_SCORE, IMAGE, IMAGE_EMBEDDING, TEXT_EMBEDDING, UID
from schemas.rejects import REJECT_DETAIL, REJECT_REASON
from tests.conftest import read_phase, read_rejects, run_pipeline_dict, shared_path

MODEL = "tiny-vit"


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _images() -> list[bytes]:
    rng = np.random.default_rng(0)
    return [
        _png(rng.integers(0, 256, (40 + 9 * i, 57 - 5 * i, 3), np.uint8), mode)
        for i, mode in enumerate([None, "RGBA", "L", "P", None])
    ]


def test_pixels_and_embeddings_match_open_clip_on_its_own():
    """The two stages reproduce model.encode_image(preprocess(image)) of a bare open_clip loop."""
    bodies = _images()
    captions = ["a red square", "two dogs on grass", "", "a very long caption " * 40, "ünïcödé ✓"]
    preprocess = ClipPreprocess(model=MODEL)
    pixels = preprocess(pa.table({IMAGE: pa.array(bodies, pa.binary())}))
    embed = ClipEmbed(model=MODEL, device="cpu")
    embed.setup()
    out = embed(pa.table({CLIP_PIXELS: pixels[CLIP_PIXELS], CAPTION: captions}))

    bundle = load_clip(MODEL)
    with torch.no_grad():
        images = torch.stack([bundle.preprocess(Image.open(io.BytesIO(b))) for b in bodies])
        image_ref = torch.nn.functional.normalize(bundle.model.encode_image(images), dim=-1)
        text_ref = torch.nn.functional.normalize(bundle.model.encode_text(bundle.tokenizer(captions)), dim=-1)
    scores_ref = (image_ref * text_ref).sum(-1).numpy()
    np.testing.assert_allclose(out[CLIP_SCORE].to_numpy(), scores_ref, atol=1e-5)
    image_emb = np.array(out[IMAGE_EMBEDDING].to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(image_emb, image_ref.numpy(), atol=2e-3)  # stored as float16
    np.testing.assert_allclose(np.linalg.norm(image_emb, axis=1), 1.0, atol=2e-3)
    text_emb = np.array(out[TEXT_EMBEDDING].to_pylist(), dtype=np.float32)
    np.testing.assert_allclose((image_emb * text_emb).sum(1), scores_ref, atol=3e-3)
    assert out.schema.field(IMAGE_EMBEDDING).type == pa.list_(pa.float16())


def test_identical_image_and_text_embeddings_score_one():
    """Both real towers run on different images and captions, their final layer norms set to emit
    the same constant and their projections made equal: the two embeddings are one vector, and
    the stage's cosine of them is exactly 1, not a scaled dot product."""
    embed = ClipEmbed(model=MODEL, device="cpu")
    embed.setup()
    model = embed._bundle.model
    with torch.no_grad():
        for norm in (model.visual.ln_post, model.ln_final):
            norm.weight.zero_()
            norm.bias.fill_(0.5)
        model.text_projection.copy_(model.visual.proj)  # both towers are 64 wide
    pixels = ClipPreprocess(model=MODEL)(pa.table({IMAGE: pa.array(_images()[:3], pa.binary())}))
    out = embed(pa.table({CLIP_PIXELS: pixels[CLIP_PIXELS], CAPTION: ["a red square", "two dogs", ""]}))
    np.testing.assert_allclose(out[CLIP_SCORE].to_numpy(), 1.0, atol=1e-6)
    expected = torch.nn.functional.normalize(torch.full((3, 64), 0.5) @ model.visual.proj.detach(), dim=-1)
    for column in (IMAGE_EMBEDDING, TEXT_EMBEDDING):  # the constant through each projection, stored as float16
        np.testing.assert_allclose(out[column].to_pylist(), expected.numpy(), atol=1e-3)


def test_bad_image_bytes_are_rejects_with_reasons():
    good = _images()[0]
    bodies = [good, good[: len(good) // 2], b"", b"<html>not an image</html>", None]
    out = ClipPreprocess(model=MODEL)(pa.table({IMAGE: pa.array(bodies, pa.binary())}))
    reasons = out[REJECT_REASON].to_pylist()
    assert reasons[0] is None
    assert reasons[1] == "decode_error"
    assert reasons[2:] == ["not_an_image"] * 3
    assert out[CLIP_PIXELS][0].as_py() is not None and out[CLIP_PIXELS][1].as_py() is None


def test_preprocess_for_another_model_is_a_clear_error():
    pixels = ClipPreprocess(model="tiny-effnet-minilm")(pa.table({IMAGE: pa.array(_images()[:1], pa.binary())}))
    embed = ClipEmbed(model=MODEL, device="cpu")
    embed.setup()
    with pytest.raises(ValueError, match="another model"):
        embed(pa.table({CLIP_PIXELS: pixels[CLIP_PIXELS], CAPTION: ["x"]}))


def test_model_is_required_and_scores_are_cosines():
    with pytest.raises(ValueError, match="set `model`"):
        ClipEmbed()
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        ClipScoreThreshold(min_score=28.0)
    with pytest.raises(ValueError, match="fraction"):
        ClipScoreTopFraction(fraction=0.0)


def test_threshold_keeps_scores_at_or_above_it():
    scores = pa.array([0.1, 0.28, 0.2799, None, 0.9], pa.float32())
    out = ClipScoreThreshold(min_score=0.28)(pa.table({CLIP_SCORE: scores}))
    assert out[REJECT_REASON].to_pylist() == [
        "clip_score_below_threshold",
        None,
        "clip_score_below_threshold",
        "clip_score_below_threshold",
        None,
    ]
    assert out[REJECT_DETAIL][0].as_py() == "clip_score 0.1000 < 0.28"
    assert out[REJECT_DETAIL][3].as_py() == "no clip_score"


def _counting_passes(stage, shards: list[pa.Table]):
    """A SummedStage's passes in this process, each shard counted apart and the counts summed."""
    state, done = None, False
    while not done:
        totals = summed_counts(pa.concat_tables([stage.counts(shard, state) for shard in shards]))
        state, done = stage.from_counts(totals, state)
    return state


def test_top_fraction_is_exact_with_ties_broken_by_uid():
    stage = ClipScoreTopFraction(fraction=0.5)
    scores = np.array([0.3, 0.5, 0.5, 0.5, 0.1, 0.2], np.float32)
    uids = ["a", "d", "b", "c", "e", "f"]
    table = pa.table({UID: uids, CLIP_SCORE: scores})
    state = _counting_passes(stage, [table.slice(0, 2), table.slice(2)])
    assert state["rows_kept"] == 3 and state["cutoff_score"] == pytest.approx(0.5) and state["cutoff_uid"] == "d"
    out = stage.decide(table, state)
    kept = [u for u, r in zip(uids, out[REJECT_REASON].to_pylist()) if r is None]
    assert sorted(kept) == ["b", "c", "d"]


@pytest.mark.parametrize("fraction", [0.001, 0.3, 0.5, 0.77, 1.0])
def test_the_cutoff_is_the_row_a_full_sort_finds_whatever_the_ties(fraction):
    rng = np.random.default_rng(7)
    n = 5000
    scores = rng.choice(np.array([0.25, 0.5, -0.0, 0.0, np.nan, 1e-30, -3.5], np.float32), n)
    scores[:1000] = rng.random(1000).astype(np.float32)  # most rows tie, some do not
    prefixes = ["", "abcdef", "abcdefghijkl", "ü"]  # uids sharing 6 and 12 bytes, multi-byte text
    uids = [f"{prefixes[i % 4]}{rng.integers(0, 40)}" + ("x" * (i % 3)) + str(i) for i in range(n)]
    table = pa.table({UID: uids, CLIP_SCORE: scores})
    state = _counting_passes(ClipScoreTopFraction(fraction=fraction), [table.slice(i, 700) for i in range(0, n, 700)])
    # The reference: every row in (score desc, NaN last, uid asc) order, the same cut.
    rank = [(np.isnan(s), -(s + np.float32(0.0)) if not np.isnan(s) else 0.0, u.encode()) for s, u in zip(scores, uids)]
    order = sorted(range(n), key=lambda i: rank[i])
    keep = int(round(fraction * n))
    last = order[keep - 1]
    assert state["rows_kept"] == keep and state["rows_scored"] == n
    assert state["cutoff_uid"] == uids[last]
    assert state["cutoff_score"] == pytest.approx(float(scores[last]), nan_ok=True)


@pytest.fixture(scope="module")
def scored_pool(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    captions = [f"photo {i} of a {'cat' if i % 3 else 'dog'}" for i in range(60)]
    captions[7] = "a corrupt file"
    captions[19] = "an empty body"
    pq.write_table(
        pa.table({"url": [f"http://img.test/{i}.png" for i in range(60)], "caption": captions}), folder / "pool.parquet"
    )
    return folder


def _score_config(folder, name, shard_size, last):
    return {
        "name": name,
        "input": str(folder / "pool.parquet"),
        "output_dir": str(folder / "runs"),
        "shard_size": shard_size,
        "stages": [
            {"stage": "tests.stages:PaintImages"},
            {"stage": "curation.clip_score:ClipPreprocess", "model": MODEL},
            {"stage": "curation.clip_score:ClipEmbed", "model": MODEL, "resources": {"batch_size": 16}},
            last,
        ],
    }


def test_top_fraction_is_identical_under_both_runners_and_any_sharding(scored_pool, runner_factory):
    last = {"stage": "curation.clip_score:ClipScoreTopFraction", "fraction": 0.3}
    kept = {}
    for runner, shard_size in (("local", 60), ("local", 13), ("ray", 25)):
        plan, manifest = run_pipeline_dict(
            _score_config(scored_pool, f"top-{runner}-{shard_size}", shard_size, last), runner_factory(runner)
        )
        rows = read_phase(plan.run_uri, manifest.final_phase)
        kept[(runner, shard_size)] = sorted(rows[UID].to_pylist())
        state = manifest.aggregates["clip_score_top_fraction"]
        assert state["rows_scored"] == 58 and state["rows_kept"] == round(0.3 * 58) == rows.num_rows
        assert min(rows[CLIP_SCORE].to_pylist()) == pytest.approx(state["cutoff_score"])
        assert CLIP_PIXELS not in rows.column_names  # never written to the run
        reasons = Counter(read_rejects(plan.run_uri)["reason"].to_pylist())
        assert reasons == {"decode_error": 1, "not_an_image": 1, "clip_score_below_top_fraction": 58 - 17}
        _check_card(plan.run_uri, manifest, state["cutoff_score"])
    first = next(iter(kept.values()))
    assert all(k == first for k in kept.values())


def _check_card(run_uri, manifest, cutoff):
    """The dataset card has the CLIP-score histogram of every scored row with the cutoff."""
    from pipelines.card.stats import KEPT, REJECTED_HERE, score_histogram
    from pipelines.engine.rundir import RunDir

    card = (Path(run_uri) / "README.md").read_text()
    assert "![clip_score (clip_score_top_fraction)](card/clip_score_top_fraction-clip_score.png)" in card
    assert f"top 30% cutoff: {cutoff:.4g}" in card
    assert (Path(run_uri) / "card" / "clip_score_top_fraction-clip_score.png").read_bytes()[:4] == b"\x89PNG"
    histogram = score_histogram(RunDir(run_uri), manifest, CLIP_SCORE, "clip_score_top_fraction")
    assert histogram.total == 58  # the two undecodable rows never got a score
    assert histogram.counts[KEPT].sum() == 17 and histogram.counts[REJECTED_HERE].sum() == 41
    assert histogram.edges[0] <= cutoff <= histogram.edges[-1]


def test_threshold_in_a_pipeline_records_details(scored_pool, runner_factory):
    last = {"stage": "curation.clip_score:ClipScoreThreshold", "min_score": 0.0}
    plan, manifest = run_pipeline_dict(_score_config(scored_pool, "thr", 30, last), runner_factory("local"))
    rows = read_phase(plan.run_uri, manifest.final_phase)
    assert all(s >= 0.0 for s in rows[CLIP_SCORE].to_pylist())
    rejects = read_rejects(plan.run_uri)
    below = [
        d
        for r, d in zip(rejects["reason"].to_pylist(), rejects["detail"].to_pylist())
        if r == "clip_score_below_threshold"
    ]
    assert rows.num_rows + len(below) == 58 and all(d.endswith("< 0.0") for d in below)


def test_transient_pixels_cannot_cross_a_phase(scored_pool):
    raw = _score_config(scored_pool, "cross", 30, {"stage": "curation.clip_score:ClipScoreThreshold", "min_score": 0.0})
    raw["stages"][1]["checkpoint"] = True
    with pytest.raises(ValueError, match="live only inside a phase"):
        build_plan(parse_config(raw))


def test_lit_towers_embed_real_photos_deterministically():
    """Real photos through the packaged LiT towers: 224 px pixels, repeatable scores."""
    images = sorted(shared_path("flickr8k", "images").glob("*.jpg"))[:4]
    bodies = [p.read_bytes() for p in images]
    pixels = ClipPreprocess(model="lit-effnet-minilm")(pa.table({IMAGE: pa.array(bodies, pa.binary())}))
    assert len(pixels[CLIP_PIXELS][0].as_py()) == 224 * 224 * 3
    embed = ClipEmbed(model="lit-effnet-minilm", device="cpu")
    embed.setup()
    first = embed(pa.table({CLIP_PIXELS: pixels[CLIP_PIXELS], CAPTION: ["a photo"] * 4}))
    again = embed(pa.table({CLIP_PIXELS: pixels[CLIP_PIXELS], CAPTION: ["a photo"] * 4}))
    assert first[CLIP_SCORE].to_pylist() == again[CLIP_SCORE].to_pylist()
