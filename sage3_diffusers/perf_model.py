"""Measured speed of each backend on Hopper, so kernel="auto" (and a family with several kernels) picks the
fastest one for a call instead of a fixed order.

The table is the kernel benchmark bench/kernels_h200_2026-11-27_0326.json (bench/RESULTS.md): NVIDIA H200,
2026-11-27 03:26 UTC, `python -m sage3_diffusers bench kernels`, all backends in the same run, bf16, non-causal,
TFLOPS of the whole call (quantization included); printed by `python bench/perf_table_from_json.py <json>`. Points are (sequence length, TFLOPS) per head dim; estimates
interpolate linearly in log(sequence length) and hold the end values outside the measured range. Only sm_90
has measurements; elsewhere every estimate is None and the dispatcher falls back to the static priorities.
"""
from __future__ import annotations

import math

from .backends.base import AttentionProblem

HOPPER_TFLOPS: dict[str, dict[int, tuple[tuple[int, float], ...]]] = {
    "sdpa": {  # torch SDPA, cuDNN backend
        128: ((1024, 540), (4096, 598), (4608, 588), (16384, 616), (44776, 564), (119056, 563)),
        64: ((1024, 415), (4096, 453), (4429, 395), (16384, 461), (17776, 419)),
    },
    "triton_int8_fp8": {
        128: ((1024, 332), (4096, 555), (4608, 541), (16384, 670), (44776, 718), (119056, 697)),
        64: ((1024, 283), (4096, 424), (4429, 404), (16384, 482), (17776, 494)),
    },
    "cuda_sm90_int8_fp8": {
        128: ((1024, 348), (4096, 636), (4608, 628), (16384, 792), (44776, 832), (119056, 859)),
        64: ((1024, 262), (4096, 406), (4429, 396), (16384, 472), (17776, 480)),
    },
}
SOURCE = "bench/kernels_h200_2026-11-27_0326.json, NVIDIA H200, 2026-11-27 03:26 UTC"


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
