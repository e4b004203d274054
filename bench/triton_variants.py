"""A/B of the Triton INT8/FP8 variants in one GPU run (< 3 min on one H200): every quantization path and every
attention variant, timed alone, with the accuracy of each against the torch reference (so a wrong variant shows).

python bench/triton_variants.py [shape names, comma-separated] [--json out.json]
Default shapes: Flux-1024 (1,24,4608,128), SD3.5-L-1024 (2,38,4429,64), grid-hd128-S{1,4,16}k.
Columns: quantization paths (SAGE3_TRITON_QUANT v4 / v5 / v5s, SAGE3_TRITON_STATS cpasync / prefetch) in µs and
as a multiple of a bf16 copy of Q, K, V; attention kernel alone per config (TFLOPS); total = best quantization +
best attention vs SDPA cuDNN bf16. Accuracy: cos sim and rel L1 of each variant's output vs
sage2pp_attention_reference on the first two heads. Times: median of CUDA-graph replays (sage3_diffusers.bench).
"""
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton

from sage3_diffusers.bench import dit_inputs, shapes_for, time_ms
from sage3_diffusers.kernels.triton import int8fp8 as tk
from sage3_diffusers.numerics.metrics import accuracy_metrics
from sage3_diffusers.numerics.sage2pp_reference import sage2pp_attention_reference

QUANT_VARIANTS = [("v4", "cpasync"), ("v5", "cpasync"), ("v5", "prefetch"), ("v5s", "cpasync"), ("v5s", "prefetch")]
DEFAULT_SHAPES = "Flux-1024,SD3.5-L-1024,grid-hd128-S1k,grid-hd128-S4k,grid-hd128-S16k"
REF_HEADS = 2


def attn_variants(d):
    c = tk.AttnConfig
    base = list(tk._CANDIDATES_BASE[d])
    kg = list(tk._CANDIDATES_KG[d])
    return base + kg + [c(64, 4, 3, False, True, True)]  # + the reference's exact product order


def _env(quant, stats):
    os.environ["SAGE3_TRITON_QUANT"] = quant
    os.environ["SAGE3_TRITON_STATS"] = stats


def _quant_fn(q, k, v, quant, stats):
    def run():
        _env(quant, stats)
        if quant == "v4":
            tk.quantize_kv(k, v)
            tk.quantize_q(q)
        else:
            tk.quantize_qkv(q, k, v, mode=quant)
    return run


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    json_path = None
    if "--json" in argv:
        i = argv.index("--json")
        json_path = argv[i + 1]
        del argv[i:i + 2]
    names = argv[0] if argv else DEFAULT_SHAPES
    print("card:", torch.cuda.get_device_name(), "| triton", triton.__version__, "| torch", torch.__version__)
    saved = {k: os.environ.get(k) for k in ("SAGE3_TRITON_QUANT", "SAGE3_TRITON_STATS")}
    rows = []
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for shape in shapes_for(False, names):
        q, k, v = dit_inputs(shape)
        b, h, s, d = q.shape
        tf = lambda ms: shape.flops / ms / 1e9  # noqa: E731
        row = {"shape": shape.name, "BHSD": [b, h, s, d], "quant_us": {}, "attn": {}, "acc": {}}

        def cudnn():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v)
        ms_cudnn, _ = time_ms(cudnn, target_ms=20, replays=5)
        dst = [torch.empty_like(x) for x in (q, k, v)]
        ms_copy, _ = time_ms(lambda: [o.copy_(x) for o, x in zip(dst, (q, k, v))], target_ms=20, replays=5)
        del dst
        nbytes = 3 * q.numel() * 2
        row.update(cudnn_us=ms_cudnn * 1e3, copy_qkv_us=ms_copy * 1e3)
        print(f"\n{shape.name} {tuple(q.shape)}: SDPA cuDNN bf16 {ms_cudnn * 1e3:.0f} us ({tf(ms_cudnn):.0f} TF); "
              f"bf16 copy of Q,K,V {ms_copy * 1e3:.1f} us ({2 * nbytes / ms_copy / 1e6:.0f} GB/s)")
        # quantization paths: time, and the same outputs as v4 (Q, V exact; K within one step)
        ref_kv = tk.quantize_kv(k, v)
        ref_q = tk.quantize_q(q)
        for quant, stats in QUANT_VARIANTS:
            name = f"{quant}/{stats}" if quant != "v4" else "v4"
            try:
                ms, _ = time_ms(_quant_fn(q, k, v, quant, stats), target_ms=20, replays=5)
                _env(quant, stats)
                if quant == "v4":
                    same = "reference path"
                else:
                    kv, qq = tk.quantize_qkv(q, k, v, mode=quant)
                    ok = (torch.equal(qq[0], ref_q[0]) and torch.equal(qq[1], ref_q[1])
                          and torch.equal(kv.v_q.view(torch.uint8), ref_kv.v_q.view(torch.uint8))
                          and (kv.k_int8.int() - ref_kv.k_int8.int()).abs().max().item() <= 1)
                    same = "outputs == v4" if ok else "OUTPUTS DIFFER FROM v4"
                row["quant_us"][name] = ms * 1e3
                # least traffic of the two-pass scheme: read Q,K,V, read K,V again, write int8/fp8 Q,K,V = 13 B/elt
                print(f"  quant {name:14s} {ms * 1e3:7.1f} us = {ms / ms_copy:4.2f}x copy  "
                      f"({13 * q.numel() / ms / 1e6:.0f} GB/s of the 13 B/element minimum)  {same}")
            except Exception as e:  # noqa: BLE001
                print(f"  quant {name}: FAILED {type(e).__name__}: {str(e)[:200]}")
        for key, val in saved.items():
            if val is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = val
        # attention variants on the same quantized inputs (v4 quantization: identical Q/V, K as before)
        hs = slice(0, min(REF_HEADS, h))
        ref = sage2pp_attention_reference(q[:, hs], k[:, hs], v[:, hs])
        for cfg in attn_variants(d):
            try:
                ms, _ = time_ms(lambda: tk.attention_quantized(q, ref_kv, config=cfg, q_quant=ref_q),
                                target_ms=20, replays=5)
                o, _ = tk.attention_quantized(q, ref_kv, config=cfg, q_quant=ref_q)
                met = accuracy_metrics(o[:, hs], ref)
                flag = "" if met["cos_sim"] > 0.9995 and met["rel_l1"] < 5e-3 else "  <-- WRONG vs reference"
                row["attn"][str(cfg)] = ms * 1e3
                row["acc"][str(cfg)] = {kk: float(vv) for kk, vv in met.items()}
                print(f"  attn {str(cfg):32s} {ms * 1e3:7.1f} us {tf(ms):5.0f} TF  cos {met['cos_sim']:.6f} "
                      f"relL1 {met['rel_l1']:.2e}{flag}")
            except Exception as e:  # noqa: BLE001
                print(f"  attn {cfg}: FAILED {type(e).__name__}: {str(e)[:200]}")
        if row["quant_us"] and row["attn"]:
            qn, qus = min(row["quant_us"].items(), key=lambda x: x[1])
            an, aus = min(row["attn"].items(), key=lambda x: x[1])
            tot = (qus + aus) / 1e3
            row["best"] = {"quant": qn, "attn": an, "total_us": tot * 1e3, "x_cudnn": ms_cudnn / tot}
            print(f"  best: {qn} + {an} = {tot * 1e3:.0f} us, {tf(tot):.0f} TF, x cuDNN {ms_cudnn / tot:.2f}")
            if "v4" in row["quant_us"]:
                a0 = row["attn"].get(str(tk._CANDIDATES_BASE[d][0]))
                if a0:
                    t0 = (row["quant_us"]["v4"] + a0) / 1e3
                    print(f"  before (v4 + {tk._CANDIDATES_BASE[d][0]}): {t0 * 1e3:.0f} us, x cuDNN {ms_cudnn / t0:.2f}")
        rows.append(row)
        del q, k, v, ref_kv, ref_q
        torch.cuda.empty_cache()
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
