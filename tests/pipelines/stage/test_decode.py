"""The header check prices what decoding and resizing will really cost, before any pixel is decoded."""

from __future__ import annotations

import pytest

from pipelines.stage.decode import DecodeLimits, ImageRejected, ResizeSettings, check_header
from tests.images import animated_gif, jpeg, jpeg_claiming, png, repeated_scans

MiB = 1024**2
DEFAULTS = DecodeLimits()


def rejection(body: bytes, limits: DecodeLimits = DEFAULTS, resize: ResizeSettings | None = None):
    with pytest.raises(ImageRejected) as caught:
        check_header(body, limits, resize)
    return caught.value


def test_a_gif_is_priced_as_transparent_whatever_its_first_frame_says():
    bomb = animated_gif(6000)  # 55 KB; decoded as BGRA and alpha-blended in float64: ~2.7 GiB
    assert len(bomb) < 100_000
    refused = rejection(bomb)
    assert refused.reason == "decompression_bomb" and "2.7 GiB" in refused.detail
    assert check_header(animated_gif(300))[1:] == (300, 300)  # an ordinary GIF passes


def test_an_upscale_counts_what_it_makes_against_both_limits():
    strip = png(1, 1000)  # 82 bytes; upscaled to a 512-pixel short side: 512 x 512,000
    upscale = ResizeSettings(image_size=512, resize_only_if_bigger=False)
    refused = rejection(strip, DecodeLimits(), upscale)
    assert refused.reason == "decompression_bomb" and "512x512000 after resizing" in refused.detail
    priced = rejection(strip, DecodeLimits(max_pixels=10**12, max_decode_bytes=50 * MiB), upscale)
    assert priced.reason == "decompression_bomb" and "resizing it to 512x512000" in priced.detail
    assert check_header(strip, DecodeLimits(), ResizeSettings(image_size=512))[1:] == (1, 1000)  # no upscale


@pytest.mark.parametrize(
    "mode, only_if_bigger, size, expected",
    [
        ("keep_ratio", True, (2000, 1000), (1024, 512)),
        ("keep_ratio", True, (400, 300), (400, 300)),
        ("keep_ratio", False, (400, 300), (683, 512)),
        ("center_crop", True, (1000, 2000), (512, 1024)),
        ("keep_ratio_largest", True, (2000, 1000), (512, 256)),
        ("border", False, (100, 50), (512, 512)),
        ("no", False, (7000, 10), (7000, 10)),
    ],
)
def test_the_resize_size_follows_img2dataset_modes(mode, only_if_bigger, size, expected):
    settings = ResizeSettings(image_size=512, resize_mode=mode, resize_only_if_bigger=only_if_bigger)
    assert settings.output_size(*size) == expected


def test_a_jpeg_of_thousands_of_scans_is_a_bomb_and_an_ordinary_progressive_one_is_not():
    refused = rejection(repeated_scans(512, 2000))
    assert refused.reason == "decompression_bomb" and "2,010 JPEG scans > max_jpeg_scans=100" in refused.detail
    assert check_header(jpeg(800, 600, progressive=True))[1:] == (800, 600)


def test_a_jpeg_too_short_for_its_declared_size_is_truncated():
    liar = jpeg_claiming(9400, 9400)  # under 1 KB for 1.38 million blocks
    refused = rejection(liar)
    assert refused.reason == "decode_error" and "1,380,625 blocks" in refused.detail
    # The flattest real JPEGs hold about two bits a block: they pass.
    for progressive in (False, True):
        assert check_header(jpeg(4096, 4096, progressive=progressive, quality=10))[1:] == (4096, 4096)


def test_resize_settings_refuse_unknown_modes_and_formats():
    with pytest.raises(ValueError, match="resize_mode 'squash'"):
        ResizeSettings(resize_mode="squash")
    with pytest.raises(ValueError, match="encode_format 'bmp'"):
        ResizeSettings(encode_format="bmp")
