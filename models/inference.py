"""What every model stage does before and around its model: pick the device and precision,
size CPU threads while the model runs, and turn stored uint8 pixels into a normalised input batch."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


#: /proc/cpuinfo flags of CPUs that multiply bf16 natively (x86 AVX512-BF16 or AMX, Arm's BF16 extension).
_NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bf16 in hardware, where bf16 autocast trains about 1.5x faster
    than fp32; elsewhere oneDNN emulates it and fp32 is the faster choice. Read from Linux's
    ``/proc/cpuinfo``; False where that is absent (another OS: the safe answer)."""
    try:
        with open(cpuinfo, encoding="utf-8") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() in ("flags", "Features"):
                    return bool(_NATIVE_BF16_FLAGS & set(value.split()))
    except OSError:
        pass
    return False


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto, fp32, fp16 or bf16, got {precision!r}")


def inference_device(device: str, precision: str) -> tuple[torch.device, torch.dtype]:
    """The device (``auto``: the GPU if the worker has one) and compute dtype (``auto``: fp16 on
    a GPU, fp32 on a CPU)."""
    check_precision(precision)
    chosen = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if precision == "auto":
        precision = "fp16" if chosen.type == "cuda" else "fp32"
    return chosen, _DTYPES[precision]


@contextmanager
def cpu_threads(device: torch.device, cpus: float) -> Iterator[None]:
    """On a CPU, run the block with ``ceil(cpus)`` torch threads: the CPUs the runner granted the
    stage, not torch's default of every core of a shared machine. The thread count is the whole
    process's, and a stage may run in the caller's own (``LocalRunner``): it is restored on exit."""
    before = torch.get_num_threads()
    wanted = max(1, math.ceil(cpus)) if device.type == "cpu" else before
    if wanted != before:
        torch.set_num_threads(wanted)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def normalised_pixels(
    buffers: Sequence[bytes], size: int, mean: Sequence[float], std: Sequence[float], device: torch.device, what: str
) -> torch.Tensor:
    """uint8 HWC RGB images of ``size`` x ``size`` as a (N, 3, size, size) float tensor, scaled to
    [0, 1] and normalised. The result is channels-last (the NHWC bytes permuted), which
    convolutions run faster on CPU (oneDNN) and GPU alike. ``what`` names the column and the
    stage that wrote it, for the error when the geometry differs."""
    expected = size * size * 3
    wrong = [len(b) for b in buffers if len(b) != expected]
    if wrong:
        raise ValueError(
            f"{what} hold {wrong[0]} bytes, not {expected} ({size}x{size} RGB): it was "
            f"configured for another model than this stage"
        )
    array = np.frombuffer(b"".join(buffers), dtype=np.uint8).reshape(len(buffers), size, size, 3)
    images = torch.from_numpy(array.copy()).to(device).permute(0, 3, 1, 2).float().div_(255)
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return ((images - mean_t) / std_t).contiguous(memory_format=torch.channels_last)
