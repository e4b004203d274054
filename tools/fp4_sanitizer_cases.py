"""Small NVFP4 kernel calls for compute-sanitizer (memcheck / racecheck / synccheck): ragged sequences, GQA,
causal, both head dims and dtypes, several query-tile chunks. A developer harness; run it under the sanitizer:
    compute-sanitizer --tool memcheck python3 tools/fp4_sanitizer_cases.py
Prints one line per case and "done" (the sanitizer prints its own error summary)."""
import torch

from sage3_diffusers.backends import cuda_fp4

CASES = [  # (B, Hq, Hkv, Sq, Skv, D, causal, dtype)
    (1, 2, 1, 77, 200, 64, True, torch.bfloat16),
    (2, 2, 2, 130, 129, 128, False, torch.float16),
    (1, 1, 1, 1, 1, 128, False, torch.bfloat16),
    (1, 3, 3, 300, 40, 64, True, torch.float16),
]


def main():
    torch.manual_seed(0)
    cuda_fp4.DELTA_S_CHUNK_BYTES = 1  # one query tile per launch: exercises the chunk offsets
    for b, hq, hkv, sq, skv, d, causal, dtype in CASES:
        q = torch.randn(b, hq, sq, d, device="cuda", dtype=dtype)
        k = torch.randn(b, hkv, skv, d, device="cuda", dtype=dtype)
        v = torch.randn(b, hkv, skv, d, device="cuda", dtype=dtype)
        out, lse = cuda_fp4.fp4_attn(q, k, v, "HND", causal, d ** -0.5, True)
        torch.cuda.synchronize()
        print((b, hq, hkv, sq, skv, d, causal, str(dtype)), "finite:", bool(torch.isfinite(out).all()), flush=True)
    print("done")


if __name__ == "__main__":
    main()
