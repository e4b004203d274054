"""Measured speed of each backend on Hopper, so kernel="auto" (and a family with several kernels) picks the
fastest one for a call instead of a fixed order.

The table is the kernel benchmark bench/kernels_h200_2026-11-27_0657.json (bench/RESULTS.md): NVIDIA H200,
2026-11-27 06:57 UTC, `python -m sage3_diffusers bench kernels`, all backends in the same run, bf16, non-causal,
TFLOPS of the whole call (quantization included); printed by `python bench/perf_table_from_json.py <json>`. Points are (sequence length, TFLOPS) per head dim; estimates
interpolate linearly in log(sequence length) and hold the end values outside the measured range. Only sm_90
has measurements; elsewhere every estimate is None and the dispatcher falls back to the static priorities.
"""
from __future__ import annotations

import math

from .backends.base import AttentionProblem

HOPPER_TFLOPS: dict[str, dict[int, tuple[tuple[int, float], ...]]] = {
    "sdpa": {
        128: ((1024, 546), (4096, 597), (4608, 587), (16384, 616), (44776, 573), (119056, 563)),
        64: ((1024, 418), (4096, 455), (4429, 398), (16384, 463), (17776, 419)),
    },
    "triton_int8_fp8": {
        128: ((1024, 333), (4096, 557), (4608, 538), (16384, 675), (44776, 704), (119056, 691)),
        64: ((1024, 283), (4096, 424), (4429, 407), (16384, 489), (17776, 492)),
    },
    "cuda_sm90_int8_fp8": {
        128: ((1024, 385), (4096, 691), (4608, 700), (16384, 854), (44776, 905), (119056, 931)),
        64: ((1024, 287), (4096, 455), (4429, 432), (16384, 523), (17776, 531)),
    },
}
SOURCE = "bench/kernels_h200_2026-11-27_0657.json, NVIDIA H200, 2026-11-27 06:57 UTC"


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
