"""Measured speed of each backend on Hopper, so kernel="auto" (and a family with several kernels) picks the
fastest one for a call instead of a fixed order.

The table is the kernel benchmark of bench/RESULTS.md ("Triton INT8/FP8" section): NVIDIA H200, 2026-11-27
01:56 UTC, `python -m sage3_diffusers.bench kernels`, all backends in the same run, bf16, non-causal, TFLOPS of
the whole call (quantization included). Points are (sequence length, TFLOPS) per head dim; estimates
interpolate linearly in log(sequence length) and hold the end values outside the measured range. Only sm_90
has measurements; elsewhere every estimate is None and the dispatcher falls back to the static priorities.
"""
from __future__ import annotations

import math

from .backends.base import AttentionProblem

HOPPER_TFLOPS: dict[str, dict[int, tuple[tuple[int, float], ...]]] = {
    "sdpa": {  # torch SDPA, cuDNN backend
        128: ((1024, 553), (4096, 612), (4608, 599), (16384, 612), (44776, 582), (119056, 575)),
        64: ((1024, 419), (4096, 455), (4429, 402), (16384, 463), (17776, 424)),
    },
    "triton_int8_fp8": {
        128: ((1024, 318), (4096, 533), (4608, 517), (16384, 644), (44776, 658), (119056, 662)),
        64: ((1024, 270), (4096, 400), (4429, 380), (16384, 448), (17776, 457)),
    },
    "cuda_sm90_int8_fp8": {
        128: ((1024, 247), (4096, 498), (4608, 482), (16384, 670), (44776, 753), (119056, 759)),
        64: ((1024, 214), (4096, 359), (4429, 351), (16384, 438), (17776, 444)),
    },
}
SOURCE = "bench/RESULTS.md, NVIDIA H200, 2026-11-27"


def _interp(points, seq: int) -> float:
    x = math.log(max(seq, 1))
    xs = [math.log(s) for s, _ in points]
    if x <= xs[0]:
        return points[0][1]
    for (x0, (_, y0)), (x1, (_, y1)) in zip(zip(xs, points), zip(xs[1:], points[1:])):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return points[-1][1]


def estimated_tflops(backend_name: str, p: AttentionProblem) -> float | None:
    """Measured-table estimate for this call, or None where we have no measurement (not sm_90, another head
    dim, a backend never benchmarked)."""
    if p.capability != (9, 0):
        return None
    table = HOPPER_TFLOPS.get(backend_name, {}).get(p.head_dim)
    if table is None:
        return None
    return _interp(table, int(math.sqrt(p.seq_q * p.seq_kv)))
