"""Breakdown of the Triton INT8/FP8 path on one GPU: each quantization kernel, the attention kernel per config,
cuDNN bf16 for reference, and a device copy for the bandwidth ceiling. Times: median of CUDA-graph replays.
python bench/triton_int8fp8_profile.py [shape names, comma-separated]"""
import sys

import torch
import triton

from sage3_diffusers.bench import dit_inputs, shapes_for, time_ms
from sage3_diffusers.kernels.triton import int8fp8 as tk
from sage3_diffusers.kernels.triton.int8fp8_quant import _kv_finalize_kernel, _kv_quant_kernel, _kv_stats_kernel

C = tk.AttnConfig
VARIANTS = {
    64: [C(64, 4, 3, True), C(64, 4, 3, True, True), C(64, 4, 3, True, True, True), C(64, 4, 2, True, True),
         C(64, 4, 4, True, True), C(128, 8, 3, True, True), C(64, 4, 3, False, True)],
    128: [C(64, 4, 3, True), C(64, 4, 3, True, True), C(64, 4, 3, True, True, True), C(64, 4, 2, True, True),
          C(64, 4, 4, True, True), C(128, 8, 3, True, True), C(64, 4, 3, False, True)],
}


def main():
    names = sys.argv[1] if len(sys.argv) > 1 else "Flux-1024,SD3.5-L-1024,grid-hd128-S16k,grid-hd64-S16k"
    print("card:", torch.cuda.get_device_name(), "triton", triton.__version__)
    x = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms, _ = time_ms(lambda: y.copy_(x), target_ms=20, replays=5)
    print(f"device copy: {2 * x.numel() / ms / 1e6:.0f} GB/s (read+write)")
    del x, y
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    for shape in shapes_for(False, names):
        q, k, v = dit_inputs(shape)
        b, h, s, d = q.shape
        tf = lambda ms: shape.flops / ms / 1e9  # noqa: E731
        def cudnn():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v)
        ms_cudnn, _ = time_ms(cudnn, target_ms=30, replays=5)
        kv = tk.quantize_kv(k, v)
        ms_q, _ = time_ms(lambda: tk.quantize_kv(k, v), target_ms=30, replays=5)
        nbytes = 2 * k.numel() * k.element_size() * 2 + 2 * k.numel()  # read K,V twice, write int8 + fp8
        print(f"\n{shape.name} {tuple(q.shape)}: cuDNN {ms_cudnn * 1e3:.0f} us ({tf(ms_cudnn):.0f} TF); "
              f"quantize_kv {ms_q * 1e3:.1f} us ({nbytes / ms_q / 1e6:.0f} GB/s effective)")
        # the pieces of quantize_kv
        bh = b * h
        n_chunks = max(1, min(tk._STATS_MAX_CHUNKS, triton.cdiv(tk._STATS_PROGRAMS, bh), triton.cdiv(s, 4 * tk._STATS_BLOCK_S)))
        chunk = triton.cdiv(triton.cdiv(s, n_chunks), tk._STATS_BLOCK_S) * tk._STATS_BLOCK_S
        n_chunks = triton.cdiv(s, chunk)
        ksum = torch.empty((bh, n_chunks, d), device="cuda")
        vmax = torch.empty_like(ksum)
        st = (q.stride(0), q.stride(1), q.stride(2), q.stride(3))
        t_stats, _ = time_ms(lambda: _kv_stats_kernel[(n_chunks, bh)](k, *st, v, *st, ksum, vmax, h, s, chunk,
                             n_chunks, D=d, BLOCK_S=tk._STATS_BLOCK_S, num_warps=4), target_ms=20, replays=5)
        t_fin, _ = time_ms(lambda: _kv_finalize_kernel[(bh,)](ksum, vmax, kv.k_mean, kv.v_scale, s, n_chunks, D=d,
                           SMOOTH_K=True, CHUNKS_P2=triton.next_power_of_2(n_chunks), num_warps=4), target_ms=20, replays=5)
        for sub, warps, unroll in ((32, 4, 1), (32, 4, 2), (32, 8, 4), (32, 4, 4)):
            try:
                t_quant, _ = time_ms(lambda: _kv_quant_kernel[(triton.cdiv(s, 128), bh, 2)](
                    k, *st, v, *st, kv.k_int8, kv.k_scale, kv.k_mean, kv.v_q, kv.v_scale, h, s, kv.seq_pad, D=d,
                    K_BLOCK=128, SUB=sub, K_PER_THREAD=True, V_FP8=True, UNROLL=unroll, num_warps=warps),
                    target_ms=20, replays=5)
                print(f"  quant kernel SUB={sub} warps={warps} unroll={unroll}: {t_quant * 1e3:.1f} us "
                      f"({(k.numel() * 4 + k.numel() * 2) / t_quant / 1e6:.0f} GB/s)")
            except Exception as e:  # noqa: BLE001
                print(f"  quant kernel SUB={sub} warps={warps} unroll={unroll}: failed {type(e).__name__}: {e}")
        print(f"  stats {t_stats * 1e3:.1f} us ({k.numel() * 4 / t_stats / 1e6:.0f} GB/s, {n_chunks} chunks of {chunk}); "
              f"finalize {t_fin * 1e3:.1f} us")
        res = []
        t_qq, _ = time_ms(lambda: tk.quantize_q(q), target_ms=20, replays=5)
        print(f"  quantize_q (separate kernel) {t_qq * 1e3:.1f} us")
        for cfg in VARIANTS[d]:
            try:
                ms, _ = time_ms(lambda: tk.attention_quantized(q, kv, config=cfg), target_ms=30, replays=5)
                res.append((tf(ms), str(cfg), ms))
            except Exception as e:  # noqa: BLE001
                print(f"  attn {cfg}: failed {type(e).__name__}: {str(e)[:200]}")
        for t, c, ms in sorted(res, reverse=True):
            print(f"  attn {c} (incl. Q quant): {ms * 1e3:.0f} us {t:.0f} TF  (+KV quant: {tf(ms + ms_q):.0f} TF, "
                  f"x cuDNN {ms_cudnn / (ms + ms_q):.2f})")
        del q, k, v, kv
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
