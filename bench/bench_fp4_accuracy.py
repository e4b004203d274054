"""Accuracy of the NVFP4 (SageAttention3) CUDA kernel vs fp32 SDPA on DiT-like inputs, next to int8_fp8's.

Inputs: `sage3_diffusers.bench.dit_inputs` (bf16, Q with outlier channels, K with a large per-channel offset),
the DiT shapes of `sage3_diffusers.bench`, all keys, the first `--rows` query rows (whole 128-row blocks, so
the rows computed are exactly those of the full problem; non-causal). Columns, each vs fp32 SDPA on the same
bf16 inputs: the fp4 CUDA kernel (on Hopper: the emulated-MMA build), the SageAttention3 torch reference
(`sage3_attention_reference`), the SageAttention2++ int8_fp8 torch reference (`sage2pp_attention_reference`),
and plain bf16 SDPA (the rounding floor). Also the kernel vs the SageAttention3 reference directly.

Usage: python bench/bench_fp4_accuracy.py [--rows 1024] [--shapes Flux-1024,...] [--json out.json]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json

import torch
import torch.nn.functional as F

from sage3_diffusers.backends import cuda_fp4
from sage3_diffusers.bench import DIT_SHAPES, dit_inputs
from sage3_diffusers.numerics.metrics import accuracy_metrics
from sage3_diffusers.numerics.sage2pp_reference import sage2pp_attention_reference
from sage3_diffusers.numerics.sage3_reference import sage3_attention_reference


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--shapes", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--v-offset", type=float, default=0.0,
                    help="add this times a per-channel N(0,1) offset to V (0: plain dit_inputs)")
    args = ap.parse_args()
    shapes = DIT_SHAPES if not args.shapes else [s for s in DIT_SHAPES if s.name in args.shapes.split(",")]
    cap = torch.cuda.get_device_capability()  # _C_fp4's image for this card: sm_12x hardware MMA, sm_90 emulated
    arch, hw = cap[0] * 100 + cap[1] * 10, cap[0] == 12
    card = torch.cuda.get_device_name()
    print(f"card: {card}; _C_fp4 image sm_{arch // 10}, MMA {'hardware' if hw else 'emulated'}; v_offset {args.v_offset}; "
          f"torch {torch.__version__}; {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC")
    rows = []
    for shape in shapes:
        q, k, v = dit_inputs(shape)
        q = q[:, :, : args.rows]
        if args.v_offset:
            g = torch.Generator(device="cuda").manual_seed(1)
            v = v + (args.v_offset * torch.randn(shape.heads, 1, shape.head_dim, device="cuda", generator=g)).to(v.dtype)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        res = {"shape": shape.name, "B": shape.batch, "H": shape.heads, "Sq": q.shape[2], "Skv": k.shape[2],
               "D": shape.head_dim}
        out_fp4, _ = cuda_fp4.fp4_attn(q, k, v, "HND", False, shape.head_dim ** -0.5, False)
        torch.cuda.synchronize()
        cols = {
            "fp4_cuda": out_fp4,
            "fp4_reference": sage3_attention_reference(q, k, v),
            "int8_fp8_reference": sage2pp_attention_reference(q, k, v),
            "bf16_sdpa": F.scaled_dot_product_attention(q, k, v),
        }
        for name, out in cols.items():
            res[name] = accuracy_metrics(out.float(), ref)
        res["fp4_cuda_vs_fp4_reference"] = accuracy_metrics(out_fp4.float(), cols["fp4_reference"].float())
        rows.append(res)
        del cols, out_fp4, ref
        torch.cuda.empty_cache()
    print(f"\n| shape (B,H,Sq rows,Skv,D) | " + " | ".join(
        f"{c} cos / relL1" for c in ("fp4_cuda", "fp4_reference", "int8_fp8_reference", "bf16_sdpa")) +
        " | fp4_cuda vs fp4_ref cos |")
    print("|---" * 6 + "|")
    for r in rows:
        cells = [f"{r[c]['cos_sim']:.6f} / {r[c]['rel_l1']:.4f}"
                 for c in ("fp4_cuda", "fp4_reference", "int8_fp8_reference", "bf16_sdpa")]
        print(f"| {r['shape']} ({r['B']},{r['H']},{r['Sq']},{r['Skv']},{r['D']}) | " + " | ".join(cells) +
              f" | {r['fp4_cuda_vs_fp4_reference']['cos_sim']:.7f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": card, "mma_hardware": hw, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
