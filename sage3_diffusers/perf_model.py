"""Measured speed of each backend on Hopper, so kernel="auto" (and a family with several kernels) picks the
fastest one for a call instead of a fixed order.

The table is the kernel benchmark bench/kernels_h200_2026-11-27_0509.json (bench/RESULTS.md): NVIDIA H200,
2026-11-27 05:09 UTC, `python -m sage3_diffusers bench kernels`, all backends in the same run, bf16, non-causal,
TFLOPS of the whole call (quantization included); printed by `python bench/perf_table_from_json.py <json>`. Points are (sequence length, TFLOPS) per head dim; estimates
interpolate linearly in log(sequence length) and hold the end values outside the measured range. Only sm_90
has measurements; elsewhere every estimate is None and the dispatcher falls back to the static priorities.
"""
from __future__ import annotations

import math

from .backends.base import AttentionProblem

HOPPER_TFLOPS: dict[str, dict[int, tuple[tuple[int, float], ...]]] = {
    "sdpa": {
        128: ((1024, 547), (4096, 600), (4608, 594), (16384, 612), (44776, 578), (119056, 566)),
        64: ((1024, 414), (4096, 454), (4429, 398), (16384, 460), (17776, 418)),
    },
    "triton_int8_fp8": {
        128: ((1024, 311), (4096, 558), (4608, 536), (16384, 651), (44776, 707), (119056, 685)),
        64: ((1024, 284), (4096, 427), (4429, 406), (16384, 485), (17776, 491)),
    },
    "cuda_sm90_int8_fp8": {
        128: ((1024, 361), (4096, 655), (4608, 647), (16384, 780), (44776, 832), (119056, 856)),
        64: ((1024, 271), (4096, 424), (4429, 409), (16384, 493), (17776, 498)),
    },
}
SOURCE = "bench/kernels_h200_2026-11-27_0509.json, NVIDIA H200, 2026-11-27 05:09 UTC"


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
