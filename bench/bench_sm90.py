"""Times the sm_90a INT8-QK/FP8-PV kernel against SDPA cuDNN bf16 (same run, same card).

python bench/bench_sm90.py [--quick]  -> a table of TFLOPS (4*B*H*Sq*Skv*D, halved for causal), median of
triton.testing.do_bench. Columns: cuDNN bf16; ours including quantization (3 launches); ours kernel alone
(attention launch on pre-quantized inputs); the quantization launches alone (ms).
"""
import argparse
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

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
    print(torch.cuda.get_device_name(), torch.__version__, "cudnn", torch.backends.cudnn.version())
    rows = []
    for name, b, h, s, d, causal in SHAPES[:3] if args.quick else SHAPES:
        q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        scale = d ** -0.5
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            ms_cudnn = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                                warmup=50, rep=300, return_mode="median")
        ms_full = do_bench(lambda: ext.forward(q, k, v, False, causal, scale, False),
                           warmup=50, rep=300, return_mode="median")
        qz = ext.quantize(q, k, v, False)
        ms_kernel = do_bench(lambda: ext.forward_quantized(q, qz, s, h, False, causal, scale, False),
                             warmup=50, rep=300, return_mode="median")
        ms_quant = do_bench(lambda: ext.quantize(q, k, v, False), warmup=20, rep=200, return_mode="median")
        t_c, t_f, t_k = (tflops(b, h, s, d, causal, m) for m in (ms_cudnn, ms_full, ms_kernel))
        rows.append((name, t_c, t_f, t_k, ms_quant, t_f / t_c, t_k / t_c))
        print(f"{name}: cudnn {t_c:.0f}  full {t_f:.0f}  kernel {t_k:.0f}  quant {ms_quant:.3f} ms", flush=True)
        del q, k, v, qz
        torch.cuda.empty_cache()
    print("\n| shape | SDPA cuDNN bf16 | ours incl. quant | ours kernel | quant ms | full/cuDNN | kernel/cuDNN |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.0f} | {r[2]:.0f} | {r[3]:.0f} | {r[4]:.3f} | {r[5]:.2f}x | {r[6]:.2f}x |")


if __name__ == "__main__":
    sys.exit(main())
