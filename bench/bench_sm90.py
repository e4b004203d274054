"""Times the sm_90a INT8-QK/FP8-PV kernel against SDPA cuDNN bf16 (same run, same card).

python bench/bench_sm90.py [--quick]  -> a table of TFLOPS (4*B*H*Sq*Skv*D, halved for causal), median of
CUDA-graph replays (sage3_diffusers.bench.time_graph). Columns: cuDNN bf16; ours including quantization (3 launches); ours kernel alone
(attention launch on pre-quantized inputs); the quantization launches alone (ms).
"""
import argparse
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    from sage3_diffusers.bench import time_graph

    def time_ms(fn):  # median of CUDA-graph replays of 20 calls (no launch gaps / CPU overhead)
        return time_graph(fn, torch.device("cuda"), calls=20)
    print(torch.cuda.get_device_name(), torch.__version__, "cudnn", torch.backends.cudnn.version(), flush=True)
    rows = []
    for name, b, h, s, d, causal in SHAPES[:3] if args.quick else SHAPES:
        q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        scale = d ** -0.5

        def cudnn():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        qz = ext.quantize(q, k, v, False, True)  # q_kmean defined: the list passes back as Sequence[Tensor]
        ms = {"cudnn": time_ms(cudnn)}
        ms["full"] = time_ms(lambda: ext.forward(q, k, v, False, causal, scale, False))
        ms["kernel"] = time_ms(lambda: ext.forward_quantized(q, qz, s, h, False, causal, scale, False))
        quant_ms = time_ms(lambda: ext.quantize(q, k, v, False, False))
        t = {key: tflops(b, h, s, d, causal, m) for key, m in ms.items()}
        rows.append((name, t, quant_ms))
        print(f"{name}: " + "  ".join(f"{key} {val:.0f}" for key, val in t.items()) +
              f"  quant {quant_ms:.3f} ms", flush=True)
        del q, k, v, qz
        torch.cuda.empty_cache()
    print("\nTFLOPS; ratios against SDPA cuDNN bf16 in the same run. full = incl. quantization; kernel = attention "
          "launch alone.")
    print("| shape | cuDNN bf16 | full | kernel | quant ms | full/cuDNN | kernel/cuDNN |")
    print("|---|---|---|---|---|---|---|")
    for name, t, qms in rows:
        print(f"| {name} | {t['cudnn']:.0f} | {t['full']:.0f} | {t['kernel']:.0f} | {qms:.3f} | "
              f"{t['full'] / t['cudnn']:.2f}x | {t['kernel'] / t['cudnn']:.2f}x |")


if __name__ == "__main__":
    sys.exit(main())
