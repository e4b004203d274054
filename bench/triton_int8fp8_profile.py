"""Breakdown of the Triton INT8/FP8 path on one GPU (< 2 min on one H200 with the default shapes).

python bench/triton_int8fp8_profile.py [shape names, comma-separated] [--json out.json]
Default shapes: Flux-1024 (1,24,4608,128), SD3.5-L-1024 (2,38,4429,64), grid-hd128-S{1,4,16}k.
Per shape:
  * SDPA cuDNN bf16, and a bf16 copy of Q, K, V (the bandwidth yardstick for quantization);
  * quantization: `quantize` (K/V statistics, then one launch for Q, K and V), in µs, as a
    multiple of the copy, and as GB/s of the 13 B/element least traffic (read Q,K,V + K,V again, write int8/fp8);
  * the attention kernel alone for each autotune candidate, plus the reference-order config (no fold), each with
    its accuracy (cos sim, rel L1) against sage2pp_attention_reference on the first two heads;
  * total = quantization + best attention, and the whole autotuned call `int8fp8_attention`, vs cuDNN.
Times: median of CUDA-graph replays (sage3_diffusers.bench.time_graph).
"""
import json
import sys

import torch
import torch.nn.functional as F
import triton

from sage3_diffusers.bench import dit_inputs, shapes_for, time_graph
from sage3_diffusers.kernels.triton import int8fp8 as tk
from sage3_diffusers.numerics.metrics import accuracy_metrics
from sage3_diffusers.numerics.sage2pp_reference import sage2pp_attention_reference

DEFAULT_SHAPES = "Flux-1024,SD3.5-L-1024,grid-hd128-S1k,grid-hd128-S4k,grid-hd128-S16k"
REF_HEADS = 2


def attn_configs(d):
    return list(tk._CANDIDATES[d])


def _t(fn):
    return time_graph(fn, torch.device("cuda"), calls=20, replays=5)


def profile_shape(shape):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v = dit_inputs(shape)
    b, h, s, d = q.shape
    tf = lambda ms: shape.flops / ms / 1e9  # noqa: E731
    row = {"shape": shape.name, "BHSD": [b, h, s, d], "attn_us": {}, "acc": {}}

    def cudnn():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v)
    ms_cudnn = _t(cudnn)
    dst = [torch.empty_like(x) for x in (q, k, v)]
    ms_copy = _t(lambda: [o.copy_(x) for o, x in zip(dst, (q, k, v))])
    del dst
    row.update(cudnn_us=ms_cudnn * 1e3, copy_qkv_us=ms_copy * 1e3)
    print(f"\n{shape.name} {tuple(q.shape)}: SDPA cuDNN bf16 {ms_cudnn * 1e3:.0f} us ({tf(ms_cudnn):.0f} TF); "
          f"bf16 copy of Q,K,V {ms_copy * 1e3:.1f} us ({2 * 3 * q.numel() * 2 / ms_copy / 1e6:.0f} GB/s)")

    kv, qq = tk.quantize(q, k, v)
    ms_quant = _t(lambda: tk.quantize(q, k, v))
    row.update(quant_us=ms_quant * 1e3)
    print(f"  quant Q, K, V (two launches) {ms_quant * 1e3:.1f} us = "
          f"{ms_quant / ms_copy:.2f}x copy ({13 * q.numel() / ms_quant / 1e6:.0f} GB/s of the 13 B/element minimum)")

    hs = slice(0, min(REF_HEADS, h))
    ref = sage2pp_attention_reference(q[:, hs], k[:, hs], v[:, hs])
    print(f"  K-group fold: {kv.k_groups_per_tile()} K scales per key tile (0 = per-score K scale)")
    for cfg in attn_configs(d):
        try:
            ms = _t(lambda: tk.attention_quantized(q, kv, config=cfg, q_quant=qq))
            o, _ = tk.attention_quantized(q, kv, config=cfg, q_quant=qq)
            met = accuracy_metrics(o[:, hs], ref)
            flag = "" if met["cos_sim"] > 0.9995 and met["rel_l1"] < 5e-3 else "  <-- WRONG vs reference"
            row["attn_us"][str(cfg)] = ms * 1e3
            row["acc"][str(cfg)] = {kk: float(vv) for kk, vv in met.items()}
            print(f"  attn {str(cfg):24s} {ms * 1e3:7.1f} us {tf(ms):5.0f} TF  cos {met['cos_sim']:.6f} "
                  f"relL1 {met['rel_l1']:.2e}{flag}")
        except Exception as e:  # noqa: BLE001
            print(f"  attn {cfg}: FAILED {type(e).__name__}: {str(e)[:200]}")
    if row["attn_us"]:
        an, aus = min(row["attn_us"].items(), key=lambda x: x[1])
        tot = ms_quant + aus / 1e3
        row["best"] = {"attn": an, "total_us": tot * 1e3, "x_cudnn": ms_cudnn / tot}
        print(f"  quant + best attn ({an}) = {tot * 1e3:.0f} us, {tf(tot):.0f} TF, x cuDNN {ms_cudnn / tot:.2f}")
    ms_call = _t(lambda: tk.int8fp8_attention(q, k, v))
    row.update(call_us=ms_call * 1e3)
    print(f"  whole call int8fp8_attention: {ms_call * 1e3:.0f} us, {tf(ms_call):.0f} TF, "
          f"x cuDNN {ms_cudnn / ms_call:.2f}")
    return row


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    json_path = None
    if "--json" in argv:
        i = argv.index("--json")
        json_path = argv[i + 1]
        del argv[i:i + 2]
    names = argv[0] if argv else DEFAULT_SHAPES
    print("card:", torch.cuda.get_device_name(), "| triton", triton.__version__, "| torch", torch.__version__)
    rows = []
    for shape in shapes_for(False, names):
        rows.append(profile_shape(shape))
        torch.cuda.empty_cache()
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
