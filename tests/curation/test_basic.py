"""The basic caption rules on hand-written captions, their parameters, and a run on a real pool."""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from curation.basic import (
    BAD_ASPECT_RATIO,
    CONTROL_CHARACTERS,
    DIMENSIONS_CAPTION,
    EMPTY_CAPTION,
    FILENAME_CAPTION,
    GENERIC_CAPTION,
    REPLACEMENT_CHARACTER,
    TOO_FEW_WORDS,
    TOO_LONG,
    TOO_MANY_WORDS,
    TOO_SHORT,
    TOO_SMALL,
    URL_CAPTION,
    CaptionCharacters,
    CaptionLength,
    ImageSize,
    JunkAltText,
)
from pipelines.engine.runner import LocalRunner
from schemas.columns import ORIGINAL_HEIGHT, ORIGINAL_WIDTH
from schemas.rejects import REJECT_DETAIL, REJECT_REASON
from tests.conftest import read_phase, read_rejects, run_pipeline_dict, shared_path

ORDINARY = [
    "a photo of a dog on the beach",
    "2 dogs playing",
    "Canon EOS 5D review",
    "a dog.jpg costume? no: a dog wearing a costume",
    "Sunset over the harbour, 1920 edition",
    "see https://example.com for the full gallery",
    "image of a cat sleeping",
    "Café crème in Paris — morning light",
    "東京の夜景 night view",
    "Tavern Brawl by velinov",
    "2 x 4 lumber stacked",
    "Photo booth at the wedding",
]


def apply(stage, captions: list) -> tuple[list, list]:
    """(reasons, details) per caption; all None when the stage rejected nothing."""
    batch = pa.table({"caption": pa.array(captions, pa.string())})
    out = stage(batch)
    assert isinstance(out, pa.Table)
    assert out.num_rows == len(captions)
    assert set(out.column_names) <= {REJECT_REASON, REJECT_DETAIL}
    if REJECT_REASON not in out.column_names:
        return [None] * len(captions), [None] * len(captions)
    return out[REJECT_REASON].to_pylist(), out[REJECT_DETAIL].to_pylist()


def reason_of(stage, caption: str | None) -> str | None:
    return apply(stage, [caption])[0][0]


# CaptionCharacters -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "caption",
    [
        "bell\x07inside",
        "nul\x00byte",
        "vertical\x0btab",
        "form\x0cfeed",
        "escape\x1b[0m",
        "delete\x7fchar",
        "c1\x85next line",
        "c1\x9fend",
    ],
)
def test_caption_characters_rejects_control_characters(caption):
    reasons, details = apply(CaptionCharacters(), [caption])
    assert reasons == [CONTROL_CHARACTERS]
    assert details == ["caption holds control characters"]


def test_caption_characters_rejects_replacement_character():
    reasons, details = apply(CaptionCharacters(), ["caf\ufffd au lait"])
    assert reasons == [REPLACEMENT_CHARACTER]
    assert "U+FFFD" in details[0]


def test_caption_characters_control_wins_over_replacement():
    assert reason_of(CaptionCharacters(), "bad\x07and\ufffd") == CONTROL_CHARACTERS


def test_caption_characters_keeps_ordinary_and_line_breaks():
    captions = ORDINARY + ["line one\nline two", "col\tcol", "windows\r\nline", "  padded  ", "", None]
    reasons, _ = apply(CaptionCharacters(), captions)
    assert reasons == [None] * len(captions)


@pytest.mark.parametrize("caption", ["line one\nline two", "col\tcol", "carriage\rreturn"])
def test_caption_characters_strict_rejects_line_breaks(caption):
    assert reason_of(CaptionCharacters(allow_line_breaks=False), caption) == CONTROL_CHARACTERS
    assert reason_of(CaptionCharacters(allow_line_breaks=True), caption) is None


def test_caption_characters_replacement_check_can_be_disabled():
    stage = CaptionCharacters(reject_replacement_character=False)
    assert reason_of(stage, "caf\ufffd au lait") is None
    assert reason_of(stage, "bell\x07") == CONTROL_CHARACTERS


def test_caption_characters_mixed_batch():
    reasons, _ = apply(CaptionCharacters(), ["fine caption", "x\x01y", "x\ufffdy", "also fine"])
    assert reasons == [None, CONTROL_CHARACTERS, REPLACEMENT_CHARACTER, None]


# JunkAltText -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("caption", "reason", "detail"),
    [
        ("", EMPTY_CAPTION, "caption is empty or whitespace"),
        ("   \t ", EMPTY_CAPTION, "caption is empty or whitespace"),
        ("IMG_1234.jpg", FILENAME_CAPTION, "filename: IMG_1234.jpg"),
        ("DSC01234", FILENAME_CAPTION, "filename: DSC01234"),
        ("my-photo.JPEG", FILENAME_CAPTION, "filename: my-photo.JPEG"),
        ("  holiday_2019(3).png ", FILENAME_CAPTION, "filename:   holiday_2019(3).png "),
        ("DSCN0042", FILENAME_CAPTION, "filename: DSCN0042"),
        ("PXL_20230101_123456789", FILENAME_CAPTION, "filename: PXL_20230101_123456789"),
        ("screenshot_2023", FILENAME_CAPTION, "filename: screenshot_2023"),
        ("image.webp", FILENAME_CAPTION, "filename: image.webp"),
        ("1920x1080", DIMENSIONS_CAPTION, "dimensions: 1920x1080"),
        ("800 × 600 px", DIMENSIONS_CAPTION, "dimensions: 800 × 600 px"),
        ("640*480 pixels", DIMENSIONS_CAPTION, "dimensions: 640*480 pixels"),
        ("1024 X 768", DIMENSIONS_CAPTION, "dimensions: 1024 X 768"),
        ("https://example.com/a/b.jpg", URL_CAPTION, "url: https://example.com/a/b.jpg"),
        ("HTTP://EXAMPLE.COM", URL_CAPTION, "url: HTTP://EXAMPLE.COM"),
        ("www.example.org/page", URL_CAPTION, "url: www.example.org/page"),
        ("Image", GENERIC_CAPTION, "stock caption: Image"),
        ("  N/A ", GENERIC_CAPTION, "stock caption: N/A"),
        ("No Image", GENERIC_CAPTION, "stock caption: No Image"),
        ("placeholder", GENERIC_CAPTION, "stock caption: placeholder"),
    ],
)
def test_junk_alt_text_reasons(caption, reason, detail):
    reasons, details = apply(JunkAltText(), [caption])
    assert reasons == [reason]
    assert details == [detail]


def test_junk_alt_text_keeps_ordinary_captions():
    captions = ORDINARY + [
        "line one\nline two",
        "IMG 1234 jpg of the bay",
        "photo.png extra words",
        "1920x1080 wallpaper of mountains",
        "logo design ideas",
        "images of spring",
        None,
    ]
    reasons, _ = apply(JunkAltText(), captions)
    assert reasons == [None] * len(captions), [(c, r) for c, r in zip(captions, reasons) if r]


def test_junk_alt_text_mixed_batch_keeps_positions():
    captions = ["a cat on a sofa", "IMG_1.jpg", "", "www.x.com", "a dog", "logo", "300x250"]
    reasons, _ = apply(JunkAltText(), captions)
    assert reasons == [None, FILENAME_CAPTION, EMPTY_CAPTION, URL_CAPTION, None, GENERIC_CAPTION, DIMENSIONS_CAPTION]


def test_junk_alt_text_rules_subset():
    stage = JunkAltText(rules=[URL_CAPTION])
    reasons, _ = apply(stage, ["IMG_1.jpg", "https://x.test/y", "", "image", "1920x1080"])
    assert reasons == [None, URL_CAPTION, None, None, None]
    assert apply(JunkAltText(rules=[]), ["IMG_1.jpg", "", "image"])[0] == [None, None, None]


def test_junk_alt_text_rule_order_decides_the_reason():
    # "image.png" is both a file name and (with this list) a stock caption: the first rule wins.
    generic = ["image.png"]
    first = JunkAltText(rules=[GENERIC_CAPTION, FILENAME_CAPTION], generic_captions=generic)
    second = JunkAltText(rules=[FILENAME_CAPTION, GENERIC_CAPTION], generic_captions=generic)
    assert reason_of(first, "Image.PNG") == GENERIC_CAPTION
    assert reason_of(second, "Image.PNG") == FILENAME_CAPTION


def test_junk_alt_text_custom_generic_captions_are_case_insensitive():
    stage = JunkAltText(rules=[GENERIC_CAPTION], generic_captions=["Click Here", "BUY NOW"])
    reasons, _ = apply(stage, ["click here", "  buy now  ", "image", "click here to see more"])
    assert reasons == [GENERIC_CAPTION, GENERIC_CAPTION, None, None]


def test_junk_alt_text_unknown_rule_is_an_error():
    with pytest.raises(ValueError, match=r"unknown rule\(s\) \['filenames'\]") as info:
        JunkAltText(rules=["filenames", URL_CAPTION])
    assert "url_caption" in str(info.value)  # names what is allowed


# CaptionLength ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "caption", "reason", "detail"),
    [
        (CaptionLength(), "hello", TOO_FEW_WORDS, "1 < min_words=2"),
        (CaptionLength(), "   ", TOO_FEW_WORDS, "0 < min_words=2"),
        (CaptionLength(), "a b", TOO_SHORT, "3 < min_chars=5"),
        (CaptionLength(max_words=3), "one two three four", TOO_MANY_WORDS, "4 > max_words=3"),
        (CaptionLength(max_chars=10), "twelve chars", TOO_LONG, "12 > max_chars=10"),
        (CaptionLength(min_words=None, min_chars=3), "ab", TOO_SHORT, "2 < min_chars=3"),
        (CaptionLength(), "word " * 300, TOO_LONG, "1499 > max_chars=1000"),  # trailing space trimmed
    ],
)
def test_caption_length_reasons(stage, caption, reason, detail):
    reasons, details = apply(stage, [caption])
    assert reasons == [reason]
    assert details == [detail]


def test_caption_length_keeps_captions_inside_bounds():
    # The last caption is one 1000-character word: allowed with min_words=1 (max_chars is inclusive).
    captions = ORDINARY + ["two words", "tabs\tand\nnewlines count as spaces", "x" * 1000]
    stage = CaptionLength(min_words=1)
    reasons, _ = apply(stage, captions)
    assert reasons == [None] * len(captions)


def test_caption_length_boundaries_are_inclusive():
    stage = CaptionLength(min_words=2, max_words=3, min_chars=5, max_chars=9)
    reasons, _ = apply(stage, ["ab cd", "a b c", "abc de fg", "a b c d", "abcd", "abcde fghi"])
    assert reasons == [None, None, None, TOO_MANY_WORDS, TOO_FEW_WORDS, TOO_LONG]


def test_caption_length_counts_code_points_not_bytes():
    stage = CaptionLength(min_words=None, min_chars=None, max_chars=5)
    assert reason_of(stage, "ééééé") is None  # 5 code points, 10 bytes
    assert reason_of(stage, "éééééé") == TOO_LONG


def test_caption_length_first_failing_check_wins():
    # One short word: too few words and too short; the word check comes first.
    assert reason_of(CaptionLength(), "ab") == TOO_FEW_WORDS


def test_caption_length_null_bounds_disable_checks():
    stage = CaptionLength(min_words=None, max_words=None, min_chars=None, max_chars=None)
    captions = ["", "x", "word " * 1000]
    assert apply(stage, captions)[0] == [None, None, None]
    assert reason_of(CaptionLength(max_chars=None), "word " * 1000) is None
    assert reason_of(CaptionLength(min_words=None), "single") is None


def test_caption_length_null_caption_is_not_rejected():
    assert reason_of(CaptionLength(), None) is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_words": 5, "max_words": 4}, r"min_words \(5\) is greater than max_words \(4\)"),
        ({"min_chars": 20, "max_chars": 10}, r"min_chars \(20\) is greater than max_chars \(10\)"),
        ({"min_words": -1}, r"min_words must be >= 0 or null, got -1"),
        ({"min_chars": -2}, r"min_chars must be >= 0 or null, got -2"),
    ],
)
def test_caption_length_invalid_bounds(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CaptionLength(**kwargs)


def test_caption_length_equal_bounds_are_allowed():
    stage = CaptionLength(min_words=2, max_words=2, min_chars=None, max_chars=None)
    assert apply(stage, ["a b", "a", "a b c"])[0] == [None, TOO_FEW_WORDS, TOO_MANY_WORDS]


# ImageSize -------------------------------------------------------------------------------------


def apply_sizes(stage, sizes: list[tuple[int, int]]) -> tuple[list, list]:
    """(reasons, details) per (width, height); all None when the stage rejected nothing."""
    batch = pa.table(
        {
            ORIGINAL_WIDTH: pa.array([w for w, _ in sizes], pa.int32()),
            ORIGINAL_HEIGHT: pa.array([h for _, h in sizes], pa.int32()),
        }
    )
    out = stage(batch)
    assert out.num_rows == len(sizes) and set(out.column_names) <= {REJECT_REASON, REJECT_DETAIL}
    if REJECT_REASON not in out.column_names:
        return [None] * len(sizes), [None] * len(sizes)
    return out[REJECT_REASON].to_pylist(), out[REJECT_DETAIL].to_pylist()


def test_image_size_rejects_a_bad_aspect_ratio_either_way_and_keeps_one_at_the_limit():
    reasons, details = apply_sizes(ImageSize(), [(300, 100), (301, 100), (100, 301), (100, 300), (64, 64)])
    assert reasons == [None, BAD_ASPECT_RATIO, BAD_ASPECT_RATIO, None, None]
    assert details == [None, "301x100 exceeds max_aspect_ratio=3", "100x301 exceeds max_aspect_ratio=3", None, None]


def test_image_size_a_fractional_limit_compares_the_exact_ratio():
    reasons, details = apply_sizes(ImageSize(max_aspect_ratio=2.5), [(250, 100), (251, 100), (1000, 399)])
    assert reasons == [None, BAD_ASPECT_RATIO, BAD_ASPECT_RATIO]
    assert details[1:] == ["251x100 exceeds max_aspect_ratio=2.5", "1000x399 exceeds max_aspect_ratio=2.5"]


def test_image_size_too_small_wins_over_the_aspect_ratio_and_null_disables_a_check():
    reasons, details = apply_sizes(ImageSize(), [(63, 500), (64, 63)])
    assert reasons == [TOO_SMALL, TOO_SMALL]
    assert details == ["63x500 < min_side=64", "64x63 < min_side=64"]
    assert apply_sizes(ImageSize(max_aspect_ratio=None), [(1000, 64)])[0] == [None]
    assert apply_sizes(ImageSize(min_side=None), [(2, 1), (3, 1)]) == ([None, None], [None, None])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_side": 0}, "min_side must be >= 1 or null, got 0"),
        ({"max_aspect_ratio": 0.5}, "max_aspect_ratio must be >= 1 or null, got 0.5"),
    ],
)
def test_image_size_invalid_limits(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ImageSize(**kwargs)


# Questionable behaviour, documented as expected failures ------------------------------------------


@pytest.mark.parametrize("caption", ["hello\u00a0world", "hello\u3000world"])
def test_caption_length_unicode_spaces_separate_words(caption):
    assert reason_of(CaptionLength(min_words=2, min_chars=None), caption) is None


@pytest.mark.parametrize("caption", ["Mary Schenley.jpg", "laundry cleaners.png"])
def test_junk_alt_text_file_names_with_spaces(caption):
    assert reason_of(JunkAltText(), caption) == FILENAME_CAPTION


# The rules on a real pool ---------------------------------------------------------------------------

_FILE_NAME = re.compile(r"\s*[^\s/]+\.(?:jpe?g|png|gif|webp|bmp|tiff?)\s*", re.IGNORECASE)
_URL_ONLY = re.compile(r"\s*(?:https?://|www\.)\S+\s*", re.IGNORECASE)


def test_basic_rules_on_laion_style_pool(tmp_path):
    pool = shared_path("alttext", "laion_style_10000.parquet")
    raw = {
        "name": "basic-rules",
        "input": str(pool),
        "columns": {"url": "auto", "caption": "auto"},
        "output_dir": str(tmp_path),
        "runner": "local",
        "shard_size": 2500,
        "stages": [
            {"stage": "curation.basic:CaptionCharacters"},
            {"stage": "curation.basic:JunkAltText"},
            {"stage": "curation.basic:CaptionLength", "min_words": 2, "min_chars": 5, "max_chars": 1000},
        ],
    }
    plan, manifest = run_pipeline_dict(raw, LocalRunner())
    assert manifest.status == "complete"
    totals = manifest.stage_totals()
    assert list(totals) == ["read", "caption_characters", "junk_alt_text", "caption_length"]
    assert totals["read"].rows_in == 10000
    # The ledger closes at every stage and the stages chain.
    previous = totals["read"].rows_kept
    for name in ("caption_characters", "junk_alt_text", "caption_length"):
        assert totals[name].closes, (name, totals[name])
        assert totals[name].rows_in == previous
        previous = totals[name].rows_kept
    # The pool has junk: each rule rejected something.
    assert totals["junk_alt_text"].rejected.get(FILENAME_CAPTION, 0) > 0
    assert totals["junk_alt_text"].rejected.get(URL_CAPTION, 0) > 0
    assert totals["caption_length"].rejected.get(TOO_FEW_WORDS, 0) > 0

    kept = read_phase(plan.run_uri, plan.phase_names[-1])
    assert kept.num_rows == previous == manifest.phases[-1].rows_out
    rejects = read_rejects(plan.run_uri)
    rejected_total = sum(c.rows_rejected for c in totals.values())
    assert rejects.num_rows == rejected_total
    assert kept.num_rows + rejects.num_rows == 10000
    assert set(kept["uid"].to_pylist()).isdisjoint(rejects["uid"].to_pylist())
    for reason, n in totals["junk_alt_text"].rejected.items():
        assert pc.sum(pc.equal(rejects["reason"], reason)).as_py() == n

    # A sample of kept captions: no single-token file names, no bare URLs, nothing too short.
    sample = kept["caption"].to_pylist()[::7]
    assert len(sample) > 1000
    offenders = [c for c in sample if _FILE_NAME.fullmatch(c) or _URL_ONLY.fullmatch(c)]
    assert offenders == []
    assert all(len(c.split()) >= 2 and 5 <= len(c) <= 1000 for c in sample)
    # And every rejected file-name caption really is one.
    filenames = rejects.filter(pc.equal(rejects["reason"], FILENAME_CAPTION))["caption"].to_pylist()
    image_name = re.compile(
        r"(?i).*\.(jpe?g|png|gif|webp|bmp|tiff?|svg|heic|heif|avif|jfif|ico)\s*"
        r"|\s*(img|dscn?f?|pxl|dcim|image|photo|pic|screenshot|scan|untitled)[\s_\-]*\d+\S*\s*"
    )
    assert filenames and all(image_name.fullmatch(c) for c in filenames)
