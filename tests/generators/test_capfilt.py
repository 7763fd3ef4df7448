"""CapFilt captioning with a tiny random BLIP: counts, sampling, seeds, runners, bad images."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from generators.capfilt import BlipCaption
from schemas.columns import CAPTION_SEED, SYNTHETIC_CAPTIONS
from tests.conftest import read_phase, read_rejects, run_pipeline_dict


def _config(tmp_path, name, **caption):
    captions = [f"photo {i}" for i in range(12)]
    captions[5] = "a corrupt file"
    path = tmp_path / "pool.parquet"
    pq.write_table(pa.table({"url": [f"http://img.test/{i}.png" for i in range(12)], "caption": captions}), path)
    return {
        "name": name,
        "input": str(path),
        "output_dir": str(tmp_path / "runs"),
        "shard_size": 6,
        "stages": [
            {"stage": "tests.stages:PaintImages"},
            {"stage": "generators.capfilt:BlipPreprocess"},
            {
                "stage": "generators.capfilt:BlipCaption",
                "num_captions": 3,
                "max_new_tokens": 8,
                "resources": {"batch_size": 4},
                **caption,
            },
        ],
    }


def test_captions_per_image_differ_reproduce_and_agree_across_runners(tmp_path, runner_factory):
    results = {}
    for kind in ("local", "ray"):
        plan, manifest = run_pipeline_dict(_config(tmp_path, f"cap-{kind}"), runner_factory(kind))
        rows = read_phase(plan.run_uri, manifest.final_phase)
        results[kind] = (rows["uid"].to_pylist(), rows[SYNTHETIC_CAPTIONS].to_pylist(), rows[CAPTION_SEED].to_pylist())
        assert Counter(read_rejects(plan.run_uri)["reason"].to_pylist()) == {"decode_error": 1}
        assert "blip_pixels" not in rows.column_names
    assert results["local"] == results["ray"]
    captions = results["local"][1]
    assert len(captions) == 11 and all(len(c) == 3 for c in captions)
    assert all(len(set(c)) > 1 for c in captions)  # sampling: the three captions of an image differ
    # The prompt "a picture of" is continued whole and then cut from the caption.
    assert not any(c.startswith("a picture") for row in captions for c in row)
    plan, manifest = run_pipeline_dict(_config(tmp_path, "cap-again"), runner_factory("local"))
    assert read_phase(plan.run_uri, manifest.final_phase)[SYNTHETIC_CAPTIONS].to_pylist() == captions
    plan, manifest = run_pipeline_dict(_config(tmp_path, "cap-seed", seed=7), runner_factory("local"))
    assert read_phase(plan.run_uri, manifest.final_phase)[SYNTHETIC_CAPTIONS].to_pylist() != captions


def test_beam_search_gives_the_same_beams_in_every_run_whatever_the_seed():
    import numpy as np

    from schemas.columns import BLIP_PIXELS, SOURCE_INDEX

    beams = []
    for seed in (0, 0, 7):  # a model set up anew each time
        stage = BlipCaption(num_beams=3, num_captions=3, max_new_tokens=8, device="cpu", seed=seed)
        stage.setup()
        size = stage._bundle.image_size
        pixels = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
        out = stage(pa.table({SOURCE_INDEX: [0, 1], BLIP_PIXELS: pa.array([p.tobytes() for p in pixels])}))
        beams.append(out[SYNTHETIC_CAPTIONS].to_pylist())
    assert beams[0] == beams[1] == beams[2]  # beam search draws nothing: the seed plays no part
    assert len(beams[0]) == 2 and all(len(set(c)) == 3 for c in beams[0])  # three different beams per image


def test_parameters_are_checked():
    with pytest.raises(ValueError, match="num_captions"):
        BlipCaption(num_captions=0)
    with pytest.raises(ValueError, match="at most num_beams"):
        BlipCaption(num_beams=2, num_captions=5)
    with pytest.raises(ValueError, match="top_p"):
        BlipCaption(top_p=0)


def test_select_policies_and_the_no_caption_reject():
    from generators.capfilt_filter import CapFiltSelect
    from schemas.columns import CAPTION, CAPTION_SCORES, CAPTION_SOURCE, SELECTED_CAPTIONS, WEB_CAPTION
    from schemas.rejects import REJECT_DETAIL, REJECT_REASON

    batch = pa.table(
        {
            CAPTION: ["web ok", "web bad", "all bad"],
            SYNTHETIC_CAPTIONS: [["s1", "s2"], ["s3", "s4"], ["s5"]],
            CAPTION_SCORES: pa.array([[0.6, 0.9, 0.7], [0.2, 0.55, 0.8], [0.1, 0.4]], pa.list_(pa.float32())),
        }
    )
    web_first = CapFiltSelect(policy="web_first")(batch)
    assert web_first[CAPTION].to_pylist()[:2] == ["web ok", "s4"]
    assert web_first[CAPTION_SOURCE].to_pylist()[:2] == ["web", "synthetic"]
    assert web_first[WEB_CAPTION].to_pylist() == ["web ok", "web bad", "all bad"]
    assert web_first[REJECT_REASON].to_pylist() == [None, None, "capfilt_no_caption"]
    assert '"best_score": 0.4' in web_first[REJECT_DETAIL][2].as_py()
    best = CapFiltSelect(policy="best")(batch)
    assert best[CAPTION].to_pylist()[:2] == ["s1", "s4"] and best[SELECTED_CAPTIONS].to_pylist()[:2] == [["s1"], ["s4"]]
    every = CapFiltSelect(policy="all")(batch)
    assert every[SELECTED_CAPTIONS].to_pylist()[:2] == [["s1", "s2", "web ok"], ["s4", "s3"]]
    with pytest.raises(ValueError, match="policy must be one of"):
        CapFiltSelect(policy="longest")


def _view_of_kept(tmp_path, name: str, table: pa.Table):
    """The card's view for stage ``name`` of a finished run whose kept rows are ``table``."""
    from pipelines.card.view import CardView
    from pipelines.engine.ledger import summarise
    from pipelines.engine.rundir import RunDir
    from schemas.manifest import Manifest, ShardEntry, StageCounts

    rundir = RunDir(str(tmp_path / name))
    rows = table.num_rows
    entry = ShardEntry(phase="01_x", shard=0, rows_in=rows, rows_out=rows, stages={name: StageCounts(rows, rows, {})})
    rundir.write_shard(entry, table, None)
    manifest = Manifest(name=name, config_hash="h", config={}, versions={}, created_at="t", updated_at="t")
    manifest.phases = [summarise("01_x", [name], {0: entry}, 1)]
    return CardView(rundir, manifest, name, None)


def test_select_card_notes_count_the_extra_captions_policy_all_passes_on(tmp_path):
    from generators.capfilt_filter import CapFiltSelect
    from schemas.columns import CAPTION, CAPTION_SCORES

    batch = pa.table(
        {
            CAPTION: ["web ok", "web bad", "only web"],
            SYNTHETIC_CAPTIONS: [["s1", "s2"], ["s3", "s4"], ["s5"]],
            CAPTION_SCORES: pa.array([[0.6, 0.9, 0.7], [0.2, 0.55, 0.8], [0.9, 0.1]], pa.list_(pa.float32())),
        }
    )
    every = CapFiltSelect(policy="all")
    notes = every.card_notes(_view_of_kept(tmp_path, "all", every(batch)))
    assert "**2** (66.7%) carry a synthetic caption" in notes  # policy all chooses the best-scoring caption
    assert "2 kept rows also pass 3 more captions on in `selected_captions`" in notes
    web_first = CapFiltSelect(policy="web_first")
    assert "more captions" not in web_first.card_notes(_view_of_kept(tmp_path, "web_first", web_first(batch)))


def test_capfilt_pipeline_scores_every_candidate_and_closes_its_ledger(tmp_path, runner_factory):
    from schemas.columns import CAPTION_SCORES, CAPTION_SOURCE

    raw = _config(tmp_path, "capfilt")
    raw["stages"] += [
        {"stage": "generators.capfilt_filter:BlipItmScore", "resources": {"batch_size": 4}},
        {"stage": "generators.capfilt_filter:CapFiltSelect", "threshold": 0.5},
    ]
    plan, manifest = run_pipeline_dict(raw, runner_factory("local"))
    totals = manifest.stage_totals()
    rows = read_phase(plan.run_uri, manifest.final_phase)
    assert all(len(s) == 4 and all(0 <= x <= 1 for x in s) for s in rows[CAPTION_SCORES].to_pylist())
    assert set(rows[CAPTION_SOURCE].to_pylist()) <= {"web", "synthetic"}
    select = totals["capfilt_select"]
    assert select.rows_in == 11 and select.rows_kept + select.rejected.get("capfilt_no_caption", 0) == 11


def test_shared_image_features_give_the_models_own_itm_probabilities():
    import numpy as np
    import torch

    from generators.capfilt_filter import BlipItmScore
    from schemas.columns import BLIP_PIXELS, CAPTION, CAPTION_SCORES

    stage = BlipItmScore(device="cpu")
    stage.setup()
    size = stage._bundle.image_size
    pixels = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    batch = pa.table(
        {
            BLIP_PIXELS: pa.array([p.tobytes() for p in pixels], pa.binary()),
            CAPTION: ["a dog", "a red car"],
            SYNTHETIC_CAPTIONS: [["a cat on a mat"], []],
        }
    )
    scores = stage(batch)[CAPTION_SCORES].to_pylist()
    bundle = stage._bundle
    texts, images = ["a dog", "a cat on a mat", "a red car"], [0, 0, 1]
    mean, std = torch.tensor(bundle.mean).view(1, 3, 1, 1), torch.tensor(bundle.std).view(1, 3, 1, 1)
    tensor = (torch.from_numpy(pixels[images]).permute(0, 3, 1, 2).float() / 255 - mean) / std
    tokens = bundle.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        logits = bundle.model(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=tensor, use_itm_head=True
        ).itm_score
    expected = logits.softmax(-1)[:, 1].tolist()
    assert np.allclose(scores[0] + scores[1], expected, atol=1e-5)


def test_clip_caption_scores_rank_candidates_and_match_the_clip_score(tmp_path, runner_factory):
    import numpy as np

    from schemas.columns import CAPTION, CAPTION_SCORES, CAPTION_SOURCE, CLIP_SCORE, WEB_CAPTION

    raw = _config(tmp_path, "capfilt-itc")
    raw["stages"][1:1] = [
        {"stage": "curation.clip_score:ClipPreprocess", "model": "tiny-vit"},
        {"stage": "curation.clip_score:ClipEmbed", "model": "tiny-vit"},
    ]
    raw["stages"] += [
        {"stage": "generators.capfilt_filter:ClipCaptionScore", "model": "tiny-vit"},
        {"stage": "generators.capfilt_filter:CapFiltSelect", "threshold": -1.0, "policy": "best"},
    ]
    plan, manifest = run_pipeline_dict(raw, runner_factory("ray"))
    rows = read_phase(plan.run_uri, manifest.final_phase).to_pylist()
    assert len(rows) == 11
    for row in rows:
        scores = row[CAPTION_SCORES]
        assert len(scores) == 4
        assert abs(scores[0] - row[CLIP_SCORE]) < 2e-3  # the web caption's cosine, float16 image embedding
        candidates = [row[WEB_CAPTION]] + row[SYNTHETIC_CAPTIONS]
        assert row[CAPTION] == candidates[int(np.argmax(scores))]
        assert row[CAPTION_SOURCE] == ("web" if np.argmax(scores) == 0 else "synthetic")
    replaced = sum(row[CAPTION_SOURCE] == "synthetic" for row in rows)
    assert 0 < replaced < 11
    card = (Path(plan.run_uri) / "README.md").read_text()
    assert f"**{replaced:,}** ({replaced / 11:.1%}) carry a synthetic caption" in card
    examples = sorted((Path(plan.run_uri) / "card").glob("capfilt_select-example-*.jpg"))
    assert len(examples) == min(replaced, 4) and f"]({'card/' + examples[0].name})" in card


def test_clip_caption_score_refuses_embeddings_of_another_width():
    from generators.capfilt_filter import ClipCaptionScore
    from schemas.columns import CAPTION, IMAGE_EMBEDDING, UID

    stage = ClipCaptionScore(model="tiny-vit", device="cpu")
    stage.setup()
    batch = pa.table(
        {
            UID: ["a"],
            IMAGE_EMBEDDING: pa.array([[0.5] * 7], pa.list_(pa.float16())),
            CAPTION: ["a dog"],
            SYNTHETIC_CAPTIONS: [["a cat"]],
        }
    )
    with pytest.raises(ValueError, match="7 dimensions"):
        stage(batch)
