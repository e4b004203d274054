"""One-shot GPU check of bench/cudnn_fp8.py (cuDNN FP8 attention through cudnn-frontend), made to debug in one call.

    python3 bench/cudnn_fp8_smoke.py [--shapes 1x24x4608x128,2x38x4429x64,...] [--no-extra]

Prints the card and the cudnn versions (frontend, the backend it bound, torch's), then for (1,24,4608,128) and a
few more shapes: builds the graph (which output type cuDNN took, which plan), checks the output against fp32 SDPA
on all rows (cos sim, rel L1, max abs error, NaN count, amax_s / amax_o), and times the attention call alone
(Q, K, V quantized beforehand) eagerly and, if capture works, as a CUDA graph; TFLOPS = 4·B·H·S²·D / time.
Every failure prints its full traceback and the script goes on; exit status 0 when the main shape passed.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.attention  # noqa: F401 - sdpa_kernel below
import torch.nn.functional as F

from sage3_diffusers.bench import time_eager_stream, time_graph

HERE = Path(__file__).resolve().parent
MAIN = (1, 24, 4608, 128)
EXTRA = [(2, 38, 4429, 64), (1, 24, 4097, 128), (16, 16, 1024, 128), (4, 32, 4096, 64)]


def load():
    spec = importlib.util.spec_from_file_location("cudnn_fp8", HERE / "cudnn_fp8.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def inputs(shape, dit_like: bool):
    g = torch.Generator(device="cuda").manual_seed(0)
    b, h, s, d = shape
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    if dit_like:  # dit_inputs' recipe (outlier Q channels, per-channel K offset); other draw order, other tensors
        q[..., : d // 16] *= 8
        k += (8.0 * torch.randn(h, 1, d, device="cuda", generator=g)).to(k.dtype)
    return q, k, v


def timed(fn, inner=20, reps=5, graph=False):
    """ms per call: `inner` calls back to back (or one CUDA graph of them), median of `reps`; bench's timers."""
    fn()
    dev = torch.device("cuda")
    return time_graph(fn, dev, inner, reps) if graph else time_eager_stream(fn, dev, inner, reps)


def check(mod, shape, dit_like=False) -> bool:
    b, h, s, d = shape
    tag = f"({b},{h},{s},{d}){' dit-like' if dit_like else ''}"
    print(f"\n=== {tag}", flush=True)
    try:
        q, k, v = inputs(shape, dit_like)
        attn, err = mod.make_cudnn_fp8_fn(q, k, v)
        if err:
            print(f"BUILD FAILED: {err}")
            # the same build again, outside the wrapper's try, for the full traceback
            cudnn, _ = mod.import_cudnn()
            if cudnn is not None:
                for kind in ("bf16", "fp8"):
                    try:
                        mod._build(cudnn, mod._handle(cudnn, q.device), q.shape, k.shape, d ** -0.5, kind)
                        print(f"  ({kind} O builds when retried)")
                    except Exception:  # noqa: BLE001
                        print(f"--- traceback, {kind} O:")
                        traceback.print_exc()
            return False
        print("graph:", attn.info)
        out = attn().float()
        torch.cuda.synchronize()
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        cos = F.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
        rel = ((out - ref).abs().sum() / ref.abs().sum()).item()
        nan = int((~torch.isfinite(out)).sum())
        print(f"accuracy vs fp32 SDPA: cos={cos:.6f} relL1={rel:.5f} maxabs={(out - ref).abs().max().item():.4g} "
              f"nonfinite={nan}  amax_s={attn.amax_s.item():.4g} amax_o={attn.amax_o.item():.4g} "
              f"(|ref| max {ref.abs().max().item():.4g})")
        bf = F.scaled_dot_product_attention(q, k, v).float()
        print(f"  (SDPA bf16 for scale: cos={F.cosine_similarity(bf.flatten(), ref.flatten(), dim=0).item():.6f} "
              f"relL1={((bf - ref).abs().sum() / ref.abs().sum()).item():.5f})")
        del ref, bf, out
        ok = cos > 0.99 and nan == 0
        ms = timed(attn.run)
        print(f"eager: {ms:.4f} ms  {mod.tflops(shape, ms):.0f} TFLOPS (attention call only)", flush=True)
        try:
            msg = timed(attn.run, graph=True)
            print(f"cuda-graph: {msg:.4f} ms  {mod.tflops(shape, msg):.0f} TFLOPS (attention call only)")
        except Exception:  # noqa: BLE001
            print("CUDA-graph capture failed (the bench then times eagerly):")
            traceback.print_exc()
            torch.cuda.synchronize()
        try:
            with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.CUDNN_ATTENTION]):
                mc = timed(lambda: F.scaled_dot_product_attention(q, k, v), graph=True)
            print(f"for scale, SDPA cuDNN bf16: {mc:.4f} ms  {mod.tflops(shape, mc):.0f} TFLOPS")
        except Exception as exc:  # noqa: BLE001
            print(f"SDPA cuDNN bf16 not timed: {mod.one_line(exc)}")
        print("PASS" if ok else "FAIL (cos <= 0.99 or non-finite output)")
        return ok
    except Exception:  # noqa: BLE001
        print("ERROR:")
        traceback.print_exc()
        return False


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=None, help="BxHxSxD,... (default: the main shape plus a few more)")
    p.add_argument("--no-extra", action="store_true", help="only (1,24,4608,128)")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU")
        return 2
    print(f"card: {torch.cuda.get_device_name()} sm_{''.join(map(str, torch.cuda.get_device_capability()))}, "
          f"torch {torch.__version__} (CUDA {torch.version.cuda}), torch cuDNN {torch.backends.cudnn.version()}")
    try:
        mod = load()
        cudnn, reason = mod.import_cudnn()
        if cudnn is None:
            print(reason)
            try:
                import cudnn  # noqa: F401,PLC0415 - again, for the traceback
            except Exception:  # noqa: BLE001
                traceback.print_exc()
            return 1
        print("cudnn:", mod.versions(), "module file:", getattr(cudnn, "__file__", "?"))
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        return 1
    if a.shapes:
        shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",")]
        main_ok = all([check(mod, s) for s in shapes])
    else:
        main_ok = check(mod, MAIN)
        check(mod, MAIN, dit_like=True)
        if not a.no_extra:
            for s in EXTRA:
                check(mod, s)
    print("\nmain shape:", "PASS" if main_ok else "FAIL")
    return 0 if main_ok else 1


if __name__ == "__main__":
    sys.exit(main())
