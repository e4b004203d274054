"""Times the sm_90a INT8-QK/FP8-PV kernel against SDPA cuDNN bf16 (same run, same card).

python bench/bench_sm90.py [--quick]  -> a table of TFLOPS (4*B*H*Sq*Skv*D, halved for causal), median of
CUDA-graph replays (sage3_diffusers.bench.time_ms). Columns: cuDNN bf16; ours including quantization (3 launches); ours kernel alone
(attention launch on pre-quantized inputs); the quantization launches alone (ms).
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sage3_diffusers import _C_sm90 as ext

SHAPES = [  # name, B, H, S, D, causal
    ("hd128-1k", 16, 16, 1024, 128, False),
    ("hd128-4k", 4, 16, 4096, 128, False),
    ("hd128-16k", 1, 16, 16384, 128, False),
    ("hd64-1k", 16, 32, 1024, 64, False),
    ("hd64-4k", 4, 32, 4096, 64, False),
    ("hd64-16k", 1, 32, 16384, 64, False),
    ("flux-1024", 1, 24, 4608, 128, False),
    ("hunyuan-544p", 1, 24, 67576, 128, False),
    ("cogvideox-5b", 1, 48, 17776, 64, False),
    ("hd128-4k-causal", 4, 16, 4096, 128, True),
]


def tflops(b, h, s, d, causal, ms):
    f = 4.0 * b * h * s * s * d * (0.5 if causal else 1.0)
    return f / (ms * 1e-3) / 1e12


VARIANTS = {  # name: SAGE3_SM90_STAGES (depth of the K/V shared-memory ring)
    "s3": "3",  # default
    "s4": "4",
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    from sage3_diffusers.bench import time_ms  # median of CUDA-graph replays (no launch gaps / CPU overhead)
    print(torch.cuda.get_device_name(), torch.__version__, "cudnn", torch.backends.cudnn.version(), flush=True)
    rows = []
    for name, b, h, s, d, causal in SHAPES[:3] if args.quick else SHAPES:
        q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        scale = d ** -0.5

        def cudnn():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        qz = ext.quantize(q, k, v, False, True)  # q_kmean defined: the list passes back as Sequence[Tensor]
        ms = {"cudnn": time_ms(cudnn)[0]}
        for var, st in VARIANTS.items():
            os.environ["SAGE3_SM90_STAGES"] = st
            ms["full_" + var] = time_ms(lambda: ext.forward(q, k, v, False, causal, scale, False))[0]
            ms["kernel_" + var] = time_ms(
                lambda: ext.forward_quantized(q, qz, s, h, False, causal, scale, False))[0]
        os.environ.pop("SAGE3_SM90_STAGES")
        quant_ms = time_ms(lambda: ext.quantize(q, k, v, False, False))[0]
        t = {key: tflops(b, h, s, d, causal, m) for key, m in ms.items()}
        rows.append((name, t, quant_ms))
        print(f"{name}: " + "  ".join(f"{key} {val:.0f}" for key, val in t.items()) +
              f"  quant {quant_ms:.3f} ms", flush=True)
        del q, k, v, qz
        torch.cuda.empty_cache()
    print("\nTFLOPS; ratios against SDPA cuDNN bf16 in the same run. full = incl. quantization; kernel = attention "
          "launch alone. Variants: s = K/V ring stages (3 default).")
    cols = ["full_s3", "kernel_s3"] + [f"kernel_{v}" for v in VARIANTS if v != "s3"]
    print("| shape | cuDNN bf16 | " + " | ".join(cols) + " | quant ms | best full/cuDNN | best kernel/cuDNN |")
    print("|---|---|" + "---|" * len(cols) + "---|---|---|")
    for name, t, qms in rows:
        best_full = max(t[f"full_{v}"] for v in VARIANTS)
        best_kernel = max(t[f"kernel_{v}"] for v in VARIANTS)
        print(f"| {name} | {t['cudnn']:.0f} | " + " | ".join(f"{t[c]:.0f}" for c in cols) +
              f" | {qms:.3f} | {best_full / t['cudnn']:.2f}x | {best_kernel / t['cudnn']:.2f}x |")
    print("full TFLOPS per variant: " + "; ".join(
        f"{name}: " + ", ".join(f"{v} {t['full_' + v]:.0f}" for v in VARIANTS) for name, t, _ in rows))


if __name__ == "__main__":
    sys.exit(main())
