"""Around every model stage: device and dtype, CPU threads only while the model runs, pixel batches."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from models.inference import cpu_has_native_bf16, cpu_threads, inference_device, normalised_pixels
from pipelines.stage import Resources


@pytest.fixture
def three_threads():
    """The process runs 3 torch threads (neither torch's default here nor what a stage asks for);
    the test's own changes are undone whatever it asserts."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)


def test_cpu_and_auto_precision_choose_fp32_and_leave_the_thread_count_alone(three_threads):
    assert inference_device("cpu", "auto") == (torch.device("cpu"), torch.float32)
    assert inference_device("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)
    assert torch.get_num_threads() == 3
    with pytest.raises(ValueError, match="precision must be"):
        inference_device("cpu", "int8")


def test_cpu_threads_are_the_granted_cpus_rounded_up_and_restored_after(three_threads):
    with cpu_threads(torch.device("cpu"), 1.5):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 3
    with pytest.raises(RuntimeError, match="model failed"), cpu_threads(torch.device("cpu"), 0.25):
        assert torch.get_num_threads() == 1
        raise RuntimeError("model failed")
    assert torch.get_num_threads() == 3


def test_a_gpu_stage_does_not_touch_the_cpu_thread_count(three_threads):
    with cpu_threads(torch.device("cuda"), 1.0):  # a device object only: no GPU is used
        assert torch.get_num_threads() == 3
    assert torch.get_num_threads() == 3


def _clip_embed():
    from curation.clip_score import ClipEmbed, ClipPreprocess
    from tests.http_server import make_image

    stage = ClipEmbed(model="tiny-vit", device="cpu", resources=Resources(cpus=1.5, batch_size=4))
    images = [make_image(40, 30, seed=i) for i in range(2)]
    pixels = ClipPreprocess(model="tiny-vit")(pa.table({"image": pa.array(images, pa.binary())}))["clip_pixels"]
    return stage, lambda: stage._bundle.model.visual, lambda: pa.table({"clip_pixels": pixels, "caption": ["a", "b"]})


def _blip_caption():
    from generators.capfilt import BlipCaption

    stage = BlipCaption(
        num_captions=2, max_new_tokens=3, min_new_tokens=1, device="cpu", resources=Resources(cpus=1.5, batch_size=4)
    )

    def batch():
        size = stage._bundle.image_size
        pixels = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
        return pa.table({"source_index": [0, 1], "blip_pixels": pa.array([p.tobytes() for p in pixels], pa.binary())})

    return stage, lambda: stage._bundle.model.vision_model, batch


@pytest.mark.parametrize("make", [_clip_embed, _blip_caption], ids=["clip_embed", "blip_caption"])
def test_a_model_stage_runs_its_threads_and_leaves_the_process_as_it_found_it(three_threads, make):
    stage, tower, batch = make()
    stage.setup()
    assert torch.get_num_threads() == 3
    seen = []
    tower().register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    stage(batch())
    assert seen == [2]  # ceil(1.5) while the model ran
    assert torch.get_num_threads() == 3


def test_pixels_are_normalised_channels_last_and_the_wrong_geometry_is_named():
    pixel = bytes([255, 0, 51]) * 4  # a 2x2 image of one colour
    batch = normalised_pixels([pixel], 2, [0.5, 0.0, 0.1], [0.5, 1.0, 0.1], torch.device("cpu"), "px (Stage)")
    assert batch.shape == (1, 3, 2, 2) and batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(batch[0, :, 0, 0], torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match=r"px \(Stage\) hold 11 bytes, not 12 \(2x2 RGB\)"):
        normalised_pixels([pixel[:-1]], 2, [0.0] * 3, [1.0] * 3, torch.device("cpu"), "px (Stage)")


@pytest.mark.parametrize(
    ("line", "native"),
    [
        ("flags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni", True),  # AMD Zen 4, Intel Cooper Lake
        ("flags\t\t: fpu sse avx2 amx_bf16 amx_tile", True),  # Intel Sapphire Rapids
        ("Features\t: fp asimd bf16 i8mm", True),  # Arm v8.6 (Graviton 3)
        ("flags\t\t: fpu sse avx2 avx512f avx512bw", False),  # AVX-512 without bf16: emulated, slower
    ],
)
def test_native_bf16_is_read_from_the_cpus_flags(tmp_path, line, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: x\n{line}\n\nprocessor\t: 1\n{line}\n")
    assert cpu_has_native_bf16(str(cpuinfo)) is native


def test_no_cpuinfo_means_no_native_bf16(tmp_path):
    assert cpu_has_native_bf16(str(tmp_path / "absent")) is False
