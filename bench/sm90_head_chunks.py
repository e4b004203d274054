"""Memory against speed of the sm90 kernel when one attention call runs in chunks of heads.

One call quantizes q, k and v into 1-byte copies (1.5x the bf16 output) before the attention launch, so its
peak extra memory is about 2.5x SDPA's (SDPA's extra memory is its output). Running the call over chunks of
heads, each writing its slice of one output, bounds the quantized copies to one chunk; this script measures what
that costs in speed: per shape and chunk size, ms per call back to back, TFLOPS, the ratio to cuDNN SDPA in the
same process, and the peak extra MiB of one call next to SDPA's.

    python bench/sm90_head_chunks.py [--shapes HunyuanVideo-720p,Wan2.1-14B-720p] [--chunks 0,12,8,4,2,1] [--json F]

chunk 0 = one call over all heads. The backend runs large calls in chunks of `CHUNK_KV_HEADS` heads
(backends/head_chunks.py), chosen from this script's numbers.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sage3_diffusers.backends.cuda_sm90 import SM90_EXT
from sage3_diffusers.bench import DIT_SHAPES, GRID_SHAPES, dit_inputs, peak_extra_mib, time_eager_stream


def chunked_call(ext, q, k, v, heads_per_chunk: int):
    """The sm90 forward over chunks of heads (HND, no GQA), each writing its slice of one output."""
    scale = q.shape[-1] ** -0.5
    if heads_per_chunk == 0 or heads_per_chunk >= q.shape[1]:
        def call():
            res = ext.forward(q, k, v, False, False, scale, False)
            if isinstance(res, str):
                raise RuntimeError(res)
            return res[0]
        return call

    def call():
        out = torch.empty_like(q)
        for h0 in range(0, q.shape[1], heads_per_chunk):
            h = slice(h0, h0 + heads_per_chunk)
            res = ext.forward(q[:, h], k[:, h], v[:, h], False, False, scale, False, out=out[:, h])
            if isinstance(res, str):
                raise RuntimeError(res)
        return out
    return call


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="HunyuanVideo-720p,Wan2.1-14B-720p,Mochi")
    ap.add_argument("--chunks", default="0,12,8,4,2,1")
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args(argv)
    ext = SM90_EXT.require()
    dev = torch.device("cuda")
    by_name = {s.name: s for s in DIT_SHAPES + GRID_SHAPES}
    rows = []
    print(f"{torch.cuda.get_device_name()}; back to back, {args.calls} calls per timing, median of 3")
    print(f"{'shape':20s} {'chunk':>5s} {'ms':>8s} {'TFLOPS':>7s} {'x cuDNN':>8s} {'extra MiB':>10s} {'x SDPA mem':>10s}")
    for name in args.shapes.split(","):
        shape = by_name[name]
        q, k, v = dit_inputs(shape, device=dev)
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            def sdpa(q=q, k=k, v=v):
                return F.scaled_dot_product_attention(q, k, v)
            sdpa(), sdpa()
            base_ms = time_eager_stream(sdpa, dev, args.calls)
            base_mib = peak_extra_mib(sdpa, dev)
        print(f"{name:20s} {'cuDNN':>5s} {base_ms:8.2f} {shape.flops / base_ms / 1e9:7.0f} {1:8.2f} {base_mib:10.0f} {1:10.2f}")
        for c in (int(x) for x in args.chunks.split(",")):
            fn = chunked_call(ext, q, k, v, c)
            fn(), fn()
            ms = time_eager_stream(fn, dev, args.calls)
            mib = peak_extra_mib(fn, dev)
            rows.append({"shape": name, "heads_per_chunk": c, "ms": ms, "tflops": shape.flops / ms / 1e9,
                         "ratio_to_cudnn": base_ms / ms, "extra_mib": mib, "sdpa_extra_mib": base_mib,
                         "cudnn_ms": base_ms})
            print(f"{name:20s} {c if c else 'all':>5} {ms:8.2f} {shape.flops / ms / 1e9:7.0f} {base_ms / ms:8.2f} "
                  f"{mib:10.0f} {mib / base_mib:10.2f}")
        del q, k, v, fn, sdpa
        torch.cuda.empty_cache()
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
