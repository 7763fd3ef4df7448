"""MetaCLIP: metadata files, matching (against references written from the rules), balancing."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from curation.metaclip.build import build_metadata, pmi_bigrams, wordnet_lemmas
from curation.metaclip.card import kept_entry_counts
from curation.metaclip.matching import EntryMatcher
from curation.metaclip.metadata import MetadataError, load_metadata
from curation.metaclip.stages import (
    keep_probability,
    threshold_for_head_factor,
    threshold_for_tail_share,
    uniform_draws,
)
from pipelines.card.view import CardView
from pipelines.engine.rundir import RunDir
from tests.conftest import read_phase, read_rejects, run_pipeline_dict, shared_path

PUNCTUATION, WHITESPACE = ",.;:?!`", "\t\n\r"


def normalized(text: str) -> str:
    """MetaCLIP's normalisation, written out again from the rules for the references."""
    text = f" {text} "
    for mark in PUNCTUATION:
        text = text.replace(mark, f" {mark} ")
    for char in WHITESPACE:
        text = text.replace(char, " ")
    return text


def plain_loop(text: str, entries: list[str]) -> list[int]:
    """The rule itself: entry e matches when " e " occurs in the normalised text."""
    spaced = normalized(text)
    return [i for i, entry in enumerate(entries) if f" {entry} " in spaced]


def span_reference(texts: list[str], entries: list[str]) -> list[list[int]]:
    """Exact and fast: " e " occurs iff a substring starting and ending at a space equals it."""
    padded: dict[str, list[int]] = {}
    for i, entry in enumerate(entries):
        padded.setdefault(f" {entry} ", []).append(i)
    widest = max(entry.count(" ") for entry in entries) + 1  # spaces inside a padded entry, minus one
    result = []
    for text in texts:
        spaced = normalized(text)
        spaces = [i for i, ch in enumerate(spaced) if ch == " "]
        found: set[int] = set()
        for a, start in enumerate(spaces):
            for end in spaces[a + 1 : a + 2 + widest]:
                found.update(padded.get(spaced[start : end + 1], ()))
        result.append(sorted(found))
    return result


def match(entries, texts, **options) -> list[list[int]]:
    return EntryMatcher(entries, **options).match(pa.array(texts, pa.string())).to_pylist()


# Matching: hand-written cases ---------------------------------------------------------------

ENTRIES = [
    "dog",
    "hot dog",
    "hot",
    "New York",
    "York",
    "new york",
    "a",
    "Mr. Smith",
    "dog .",
    "café",
    "東京",
    "U.S.",
    "e-mail",
    "rock 'n' roll",
    "C++",
]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A hot dog in New York.", ["dog", "hot dog", "hot", "New York", "York"]),  # "A" is not "a"
        ("hot dog.", ["dog", "hot dog", "hot", "dog ."]),  # the dot is wrapped: " dog . "
        ("hotdog", []),  # no word boundary, no match
        ("a dog, a cat; a bird!", ["dog", "a"]),  # punctuation wrapped, overlaps counted once
        ("new york\tcity", ["new york"]),  # tab becomes a space; case kept
        ("Mr. Smith", []),  # the entry is not normalised: " Mr .  Smith "
        ("un café à Paris", ["café"]),
        ("旅行 東京 2024", ["東京"]),
        ("the U.S. army", []),  # " U . S . " never contains " U.S. "
        ("send an e-mail now", ["e-mail"]),
        ("rock 'n' roll forever", ["rock 'n' roll"]),
        ("C++ code", ["C++"]),
        ("", []),
        ("   ", []),
    ],
)
def test_matching_edge_cases(text, expected):
    got = match(ENTRIES, [text])[0]
    assert got == sorted(ENTRIES.index(e) for e in expected) == plain_loop(text, ENTRIES)


def test_case_insensitive_and_extra_punctuation():
    entries = ["New York", "York", "dog"]
    assert match(entries, ["I love NEW YORK"], case_sensitive=False) == [[0, 1]]
    assert match(entries, ["I love NEW YORK"]) == [[]]
    assert match(entries, ["dog/cat"]) == [[]]
    assert match(entries, ["dog/cat"], extra_punctuation="/") == [[2]]
    # entries that differ only by case share an automaton key and both match
    assert match(["Apple", "apple"], ["an APPLE a day"], case_sensitive=False) == [[0, 1]]


def test_a_batch_gives_the_same_matches_as_one_text_at_a_time():
    texts = ["a hot dog", "", "New York, New York", "nothing here", "dog"]
    together = match(ENTRIES, texts)
    assert together == [match(ENTRIES, [t])[0] for t in texts]


# Matching: real captions against a large real metadata ---------------------------------------


@pytest.fixture(scope="module")
def real_captions():
    laion = pq.read_table(shared_path("alttext", "laion_style_10000.parquet"), columns=["TEXT"])["TEXT"]
    coco = json.loads(shared_path("coco", "captions_val2017.json").read_text())["annotations"]
    texts = [t for t in laion.to_pylist() if t is not None] + [a["caption"] for a in coco]
    assert len(texts) > 34_000
    return texts


@pytest.fixture(scope="module")
def wordnet_entries():
    entries = wordnet_lemmas()
    assert len(entries) >= 100_000
    return entries


def test_matching_equals_the_references_on_real_captions(real_captions, wordnet_entries):
    got = match(wordnet_entries, real_captions)
    assert got == span_reference(real_captions, wordnet_entries)
    assert sum(map(len, got)) > 100_000  # a real workload: many matches, multi-word ones among them
    sample = random.Random(0).sample(range(len(real_captions)), 150)
    for i in sample:  # the literal loop over 148k entries, on a sample
        assert got[i] == plain_loop(real_captions[i], wordnet_entries)


def test_case_insensitive_matching_equals_the_reference_on_real_captions(real_captions, wordnet_entries):
    sample = [real_captions[i] for i in random.Random(1).sample(range(len(real_captions)), 2000)]
    lower = pc.utf8_lower(pa.array(sample)).to_pylist()
    entries_lower = pc.utf8_lower(pa.array(wordnet_entries)).to_pylist()
    got = match(wordnet_entries, sample, case_sensitive=False)
    assert got == span_reference(lower, entries_lower)


# Metadata files -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"a": 1}', "holds a JSON dict; it must be a list of strings"),
        ('["dog", 3]', "item 1 is a int (3), not a string"),
        ('["dog", ""]', "item 1 is empty"),
        ('["dog", " cat"]', "item 1 ' cat' has leading or trailing whitespace"),
        ('["dog", "cat", "dog"]', "item 2 'dog' repeats item 0"),
        ('["dog"', "is not valid JSON"),
        ("[]", "holds no entries"),
    ],
)
def test_bad_json_metadata(tmp_path, content, message):
    path = tmp_path / "metadata.json"
    path.write_text(content)
    with pytest.raises(MetadataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_metadata(str(path))


def test_text_metadata_and_its_errors(tmp_path):
    path = tmp_path / "metadata.txt"
    path.write_text("dog\r\nhot dog\ncafé\n")
    assert load_metadata(str(path)) == ["dog", "hot dog", "café"]
    path.write_text("dog\n\ncat\n")
    with pytest.raises(MetadataError, match="line 2 is empty"):
        load_metadata(str(path))
    with pytest.raises(MetadataError, match="does not exist"):
        load_metadata(str(tmp_path / "missing.json"))


def test_metadata_build_offline():
    entries, report = build_metadata(
        unigrams=20_000, bigram_captions=["a hot dog stand"] * 6 + ["a cat"] * 3, min_bigram_count=5, min_pmi=0.5
    )
    assert report.offered["wordnet"] > 140_000 and "Guadeloupe" in entries and "hot dog" in entries
    assert report.added["unigrams"] > 5_000 and "the" in entries
    assert len(entries) == len(set(entries)) == report.total
    assert pmi_bigrams(["a hot dog stand"] * 6 + ["a cat"] * 3, limit=10, min_count=5, min_pmi=0.5) == [
        "dog stand",
        "hot dog",
        "a hot",
    ]


# Balancing ------------------------------------------------------------------------------------


def test_keep_probability_follows_the_formula():
    counts = np.array([100, 10, 1000, 0])
    entries = pa.array([[0], [1], [0, 2], [], [1, 2]], pa.list_(pa.int32()))
    p = keep_probability(entries, counts, threshold=50)
    expected = [0.5, 1.0, 1 - (1 - 0.5) * (1 - 0.05), 0.0, 1.0]
    assert np.allclose(p, expected)


def test_tail_share_threshold_is_the_smallest_reaching_the_share():
    counts = np.array([1, 1, 2, 2, 5, 10, 100, 1000])
    total = counts.sum()
    for share in (0.001, 0.01, 0.02, 0.5, 1.0):
        t = threshold_for_tail_share(counts, share)
        assert counts[counts < t].sum() / total >= share > counts[counts < t - 1].sum() / total


def test_head_factor_threshold_scales_with_the_pool_and_spares_a_flat_one():
    counts = np.array([0, 1, 2, 3, 4, 90])  # mean of the matched entries: 20
    assert threshold_for_head_factor(counts, 1.8) == 36
    assert threshold_for_head_factor(counts * 1000, 1.8) == 36_000  # the same entries are heads at any size
    flat = np.full(500, 40)
    assert (flat > threshold_for_head_factor(flat, 1.8)).sum() == 0  # no entry stands out: nothing is a head
    assert threshold_for_head_factor(np.zeros(3, np.int64), 1.8) == 1


def test_draws_depend_on_seed_and_uid_only():
    uids = pa.array([f"u{i}" for i in range(10_000)])
    a, b = uniform_draws(0, uids), uniform_draws(0, uids.slice(5000))
    assert np.array_equal(a[5000:], b) and 0 <= a.min() and a.max() < 1
    assert abs(a.mean() - 0.5) < 0.02 and not np.array_equal(a, uniform_draws(1, uids))


SKEW = {"alpha": 5000, "beta": 2000, "gamma": 1000, "delta": 400, "epsilon": 150, "zeta": 60, "eta": 20, "theta": 3}


@pytest.fixture(scope="module")
def skewed_pool(tmp_path_factory):
    folder = tmp_path_factory.mktemp("skewed")
    metadata = folder / "metadata.json"
    metadata.write_text(json.dumps(list(SKEW) + ["never"]))
    rows = [
        (f"http://pool.test/{entry}/{i}.jpg", f"a photo of {entry} number {i}")
        for entry, n in SKEW.items()
        for i in range(n)
    ]
    rows += [(f"http://pool.test/none/{i}.jpg", f"nothing to see {i}") for i in range(50)]
    random.Random(0).shuffle(rows)
    pool = folder / "pool.parquet"
    pq.write_table(pa.table({"url": [u for u, _ in rows], "caption": [c for _, c in rows]}), pool)
    return folder, metadata, pool


def _balance_config(folder, metadata, pool, name, shard_size, threshold=200, **rule):
    return {
        "name": name,
        "input": str(pool),
        "output_dir": str(folder / "runs"),
        "shard_size": shard_size,
        "seed": 7,
        "stages": [
            {"stage": "curation.metaclip:MetaclipMatch", "metadata": str(metadata)},
            {"stage": "curation.metaclip:MetaclipBalance", "threshold": threshold, **rule},
        ],
    }


def test_balancing_caps_head_entries_near_t_and_keeps_the_tail(skewed_pool, runner_factory):
    folder, metadata, pool = skewed_pool
    kept_by_setup = {}
    for runner, shard_size in (("local", 1000), ("local", 777), ("ray", 2500)):
        plan, manifest = run_pipeline_dict(
            _balance_config(folder, metadata, pool, f"b-{runner}-{shard_size}", shard_size), runner_factory(runner)
        )
        kept = read_phase(plan.run_uri, manifest.final_phase)
        kept_by_setup[(runner, shard_size)] = sorted(kept["uid"].to_pylist())
        assert manifest.aggregates["metaclip_balance"]["threshold"] == 200
    first = next(iter(kept_by_setup.values()))
    assert all(k == first for k in kept_by_setup.values())  # runners and partitionings agree

    captions = read_phase(plan.run_uri, manifest.final_phase)["caption"].to_pylist()
    kept_per_entry = Counter(c.split()[3] for c in captions)
    t = 200
    for entry, n in SKEW.items():
        if n <= t:
            assert kept_per_entry[entry] == n  # the tail keeps everything
        else:  # Binomial(n, t/n): within 4 standard deviations of t
            sd = math.sqrt(t * (1 - t / n))
            assert abs(kept_per_entry[entry] - t) < 4 * sd, (entry, kept_per_entry[entry])
    rejects = read_rejects(plan.run_uri)
    reasons = Counter(rejects["reason"].to_pylist())
    assert reasons["no_metadata_match"] == 50
    assert reasons["metaclip_sampled_out"] == sum(SKEW.values()) - len(captions)


def test_online_balancing_keeps_every_row_with_the_probability_offline_draws_from(skewed_pool, runner_factory):
    folder, metadata, pool = skewed_pool
    plan, manifest = run_pipeline_dict(
        _balance_config(folder, metadata, pool, "online", 1000, online=True), runner_factory("local")
    )
    kept = read_phase(plan.run_uri, manifest.final_phase)
    assert kept.num_rows == sum(SKEW.values())  # nothing sampled out; only the 50 unmatched rows rejected
    assert Counter(read_rejects(plan.run_uri)["reason"].to_pylist()) == {"no_metadata_match": 50}
    chance = dict(zip(kept["caption"].to_pylist(), kept["keep_probability"].to_pylist()))
    for entry, n in SKEW.items():
        expected = min(1.0, 200 / n)
        assert {round(p, 6) for c, p in chance.items() if c.split()[3] == entry} == {round(expected, 6)}
    assert manifest.aggregates["metaclip_balance"]["online"] is True
    card = (Path(plan.run_uri) / "README.md").read_text()
    assert "Kept to the end, expected per epoch" in card and "a new draw every epoch" in card
    view = CardView(RunDir(plan.run_uri), manifest, "metaclip_balance", manifest.aggregates["metaclip_balance"])
    per_epoch = kept_entry_counts(view)
    assert per_epoch[0] == pytest.approx(200, rel=1e-4) and per_epoch[list(SKEW).index("theta")] == pytest.approx(3)
    # an offline run keeps about the expected number of each head entry's rows
    expected_rows = sum(chance.values())
    offline_plan, offline = run_pipeline_dict(
        _balance_config(folder, metadata, pool, "offline", 1000), runner_factory("local")
    )
    offline_rows = read_phase(offline_plan.run_uri, offline.final_phase).num_rows
    assert abs(offline_rows - expected_rows) < 4 * math.sqrt(expected_rows)


def test_threshold_from_a_tail_share_is_recorded(skewed_pool, runner_factory):
    folder, metadata, pool = skewed_pool
    _, manifest = run_pipeline_dict(
        _balance_config(folder, metadata, pool, "share", 5000, threshold=None, tail_share=0.05), runner_factory("local")
    )
    summary = manifest.aggregates["metaclip_balance"]
    counts = np.array(sorted(SKEW.values()))
    assert summary["threshold"] == threshold_for_tail_share(counts, 0.05)
    assert summary["tail_share"] >= 0.05 and summary["head_entries"] == int((counts > summary["threshold"]).sum())


def test_threshold_from_a_head_factor_caps_only_the_entries_far_above_the_mean(skewed_pool, runner_factory):
    folder, metadata, pool = skewed_pool
    plan, manifest = run_pipeline_dict(
        _balance_config(folder, metadata, pool, "factor", 5000, threshold=None, head_factor=1.8),
        runner_factory("local"),
    )
    t = math.ceil(1.8 * sum(SKEW.values()) / len(SKEW))  # 1,943: alpha and beta are heads
    assert manifest.aggregates["metaclip_balance"]["threshold"] == t
    captions = read_phase(plan.run_uri, manifest.final_phase)["caption"].to_pylist()
    kept_per_entry = Counter(c.split()[3] for c in captions)
    assert all(kept_per_entry[entry] == n for entry, n in SKEW.items() if n <= t)
    assert abs(kept_per_entry["alpha"] - t) < 4 * math.sqrt(t * (1 - t / SKEW["alpha"]))


def test_a_changed_metadata_file_is_a_changed_config(skewed_pool, runner_factory):
    from pipelines.engine.config import parse_config
    from pipelines.job import build_plan

    folder, metadata, pool = skewed_pool
    config = _balance_config(folder, metadata, pool, "identity", 5000)
    before = build_plan(parse_config(config)).config_hash
    copy = folder / "metadata-copy.json"
    copy.write_text(json.dumps(list(SKEW) + ["never", "more"]))
    config["stages"][0]["metadata"] = str(metadata)
    metadata_text = metadata.read_text()
    metadata.write_text(copy.read_text())
    try:
        assert build_plan(parse_config(config)).config_hash != before
    finally:
        metadata.write_text(metadata_text)


def test_bad_metadata_fails_when_the_pipeline_is_built(skewed_pool, tmp_path):
    from pipelines.engine.config import parse_config
    from pipelines.job import build_plan

    folder, metadata, pool = skewed_pool
    bad = tmp_path / "bad.json"
    bad.write_text('["dog", "dog"]')
    with pytest.raises(ValueError, match="repeats item 0"):
        build_plan(parse_config(_balance_config(folder, bad, pool, "bad", 5000)))
    with pytest.raises(ValueError, match="set exactly one of threshold, head_factor and tail_share"):
        build_plan(parse_config(_balance_config(folder, metadata, pool, "bad", 5000, threshold=None)))
    with pytest.raises(ValueError, match="set exactly one"):
        build_plan(parse_config(_balance_config(folder, metadata, pool, "bad", 5000, head_factor=2.0)))


def test_entry_counts_before_and_after_balancing(skewed_pool, runner_factory):
    from pipelines.cli.inspect_run import list_value_counts
    from pipelines.engine.rundir import RunDir

    folder, metadata, pool = skewed_pool
    plan, manifest = run_pipeline_dict(_balance_config(folder, metadata, pool, "counts", 5000), runner_factory("local"))
    before = RunDir(plan.run_uri).load_aggregate("metaclip_balance")[1]["counts"]
    after = list_value_counts(plan.run_uri, manifest.final_phase, "metaclip_entries")
    names = list(SKEW) + ["never"]
    for entry_id, name in enumerate(names):
        n = SKEW.get(name, 0)
        assert (before[entry_id] if entry_id < len(before) else 0) == n  # every match, counted once
        kept = after.get(entry_id, 0)
        if n <= 200:
            assert kept == n  # the tail keeps everything
        else:
            assert kept < n  # head entries were sampled down


def test_balancing_after_download(tmp_path):
    """The stages need only captions and uids: the same config works after a download stage."""
    from pipelines.engine.runner import LocalRunner
    from tests.http_server import ImageServer, make_image

    server = ImageServer()
    metadata = tmp_path / "metadata.json"
    metadata.write_text(json.dumps(["red", "car", "tree"]))
    rows = [
        (server.add(f"{i}.jpg", make_image(40, 30, seed=i)), f"a {['red car', 'tree', 'lake'][i % 3]} {i}")
        for i in range(12)
    ]
    pool = tmp_path / "pool.csv"
    pool.write_text("url,caption\n" + "".join(f"{u},{c}\n" for u, c in rows))
    plan, manifest = run_pipeline_dict(
        {
            "name": "after",
            "input": str(pool),
            "output_dir": str(tmp_path / "runs"),
            "shard_size": 5,
            "stages": [
                {"stage": "pipelines.download:Download", "allow_addresses": ["127.0.0.1"], "threads": 4},
                {"stage": "curation.metaclip:MetaclipMatch", "metadata": str(metadata)},
                {"stage": "curation.metaclip:MetaclipBalance", "threshold": 2},
            ],
        },
        LocalRunner(),
    )
    server.close()
    totals = manifest.stage_totals()
    assert totals["download"].rows_kept == 12
    assert totals["metaclip_match"].rejected == {"no_metadata_match": 4}  # the lakes
    kept = read_phase(plan.run_uri, manifest.final_phase)
    assert kept.num_rows == totals["metaclip_balance"].rows_kept and kept["image"].null_count == 0


def test_metadata_build_command(tmp_path):
    from typer.testing import CliRunner

    from pipelines.cli.main import app

    corpus = tmp_path / "captions.txt"
    corpus.write_text("a hot dog stand\n" * 6 + "a cat\n")
    output = tmp_path / "metadata.txt"
    result = CliRunner().invoke(
        app,
        [
            "metadata",
            "build",
            "--output",
            str(output),
            "--unigrams",
            "1000",
            "--bigrams-from",
            str(corpus),
            "--min-pmi",
            "0.5",
        ],
    )
    assert result.exit_code == 0, result.output
    entries = load_metadata(str(output))
    assert len(entries) > 140_000 and "dog stand" in entries
    assert "wikipedia_titles" in result.output and "(no offline source)" in result.output
