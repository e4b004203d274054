"""Benchmarks. `python -m sage3_diffusers bench kernels [--quick] [--json out.json] [--plot out.png]`

kernels: attention kernels on DiT shapes and the FA3-paper grid (B·S = 16k, H·D = 2048), non-causal forward,
bf16. Columns: torch SDPA flash, SDPA cuDNN, the Triton INT8/FP8 attention kernel alone (Q, K, V quantized
beforehand), the Triton path including all quantization, its ratio to cuDNN, and one column
(including quantization) for every other available int8_fp8 / fp4 backend in the registry. TFLOPS use
4·B·H·Sq·Skv·D. Each time is the median over replays of a CUDA graph holding several calls (no launch gaps,
same for every column). Optional column cudnn_fp8: cuDNN's FP8 (E4M3, per-tensor scales) attention through
cudnn-frontend (bench/cudnn_fp8.py), the attention call alone (quantization excluded); present only when `import
cudnn` works and the graph builds. Accuracy vs fp32 SDPA (cos sim, relative L1) on DiT-like inputs (Q with outlier
channels, K with a large per-channel offset), over up to 1024 query rows per shape.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import statistics
import sys
from dataclasses import dataclass

import torch

TRITON_BACKEND = "triton_int8_fp8"


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    heads: int
    seq: int
    head_dim: int

    @property
    def flops(self) -> float:
        return 4.0 * self.batch * self.heads * self.seq * self.seq * self.head_dim


DIT_SHAPES = [
    Shape("Flux-1024", 1, 24, 4608, 128),
    Shape("SD3.5-L-1024", 2, 38, 4429, 64),
    Shape("CogVideoX-2B-480p", 2, 30, 17776, 64),
    Shape("Mochi", 1, 24, 44776, 128),
    Shape("HunyuanVideo-720p", 1, 24, 119056, 128),
]
GRID_SHAPES = [Shape(f"grid-hd{d}-S{s // 1024}k", 16384 // s, 2048 // d, s, d)
               for d in (64, 128) for s in (1024, 4096, 16384)]
QUICK_NAMES = ("Flux-1024", "SD3.5-L-1024", "grid-hd64-S4k", "grid-hd128-S4k")


def shapes_for(quick: bool, names: str | None = None) -> list[Shape]:
    every = DIT_SHAPES + GRID_SHAPES
    if names:
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        known = {s.name: s for s in every}
        missing = [n for n in wanted if n not in known]
        if missing:
            raise SystemExit(f"unknown shape(s) {missing}; known: {sorted(known)}")
        return [known[n] for n in wanted]
    return [s for s in every if s.name in QUICK_NAMES] if quick else every


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sage3_diffusers bench", description=__doc__.split("\n")[0],
                                epilog="`python -m sage3_diffusers bench e2e --help`: the end-to-end benchmark")
    sub = p.add_subparsers(dest="command", required=True)
    k = sub.add_parser("kernels", help="attention kernel throughput and accuracy")
    k.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_NAMES)}")
    k.add_argument("--shapes", default=None, help="comma-separated shape names (overrides --quick)")
    k.add_argument("--json", dest="json_path", default=None, help="write results as JSON here")
    k.add_argument("--plot", dest="plot_path", default=None, help="write a PNG bar chart here (needs matplotlib)")
    k.add_argument("--no-accuracy", action="store_true", help="skip the fp32 SDPA accuracy comparison")
    k.add_argument("--target-ms", type=float, default=60.0, help="GPU time per graph replay (default 60)")
    k.add_argument("--replays", type=int, default=7, help="graph replays per measurement (median taken)")
    pl = sub.add_parser("plot", help="draw the PNG of a `kernels --json` result")
    pl.add_argument("json_in")
    pl.add_argument("png_out")
    return p.parse_args(argv)


def dit_inputs(shape: Shape, dtype=torch.bfloat16, device="cuda", seed: int = 0):
    """DiT-like q, k, v (HND): Q with outlier channels, K with a large per-channel offset."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    b, h, s, d = shape.batch, shape.heads, shape.seq, shape.head_dim
    q = torch.randn(b, h, s, d, device=device, generator=g, dtype=dtype)
    q[..., : d // 16] *= 8
    k = torch.randn(b, h, s, d, device=device, generator=g, dtype=dtype)
    k += (8.0 * torch.randn(h, 1, d, device=device, generator=g)).to(dtype)
    v = torch.randn(b, h, s, d, device=device, generator=g, dtype=dtype)
    return q, k, v


def time_ms(fn, *, target_ms: float = 60.0, replays: int = 7) -> tuple[float, str]:
    """Median per-call time of `fn` from CUDA-graph replays (falls back to eager events if capture fails)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    est = max(start.elapsed_time(end), 1e-3)
    inner = max(1, min(100, int(target_ms / est)))
    reps = replays if est * inner < 2000 else 3
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()  # warm-up on the capture stream
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                for _ in range(inner):
                    fn()
        torch.cuda.synchronize()
        run, how = graph.replay, "cuda-graph"
    except Exception as exc:  # noqa: BLE001 - any capture failure: time eagerly, and say so
        torch.cuda.synchronize()
        print(f"  (graph capture failed: {type(exc).__name__}: {exc}; timing eagerly)", file=sys.stderr)

        def run():
            for _ in range(inner):
                fn()
        how = "eager"
    times = []
    for _ in range(reps):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times), how


def _sdpa_fn(q, k, v, backend):
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel
    def fn():
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v)
    return fn


def other_backends(shape: Shape, q, k, v):
    """Every other runnable non-emulated int8_fp8 / fp4 backend of the registry for this problem."""
    from .backends.base import describe_problem
    from .dispatch import backend_reasons, list_backends
    problem = describe_problem(q, k, v, "HND", False, False, None)
    return [b for b in list_backends() if b.family in ("int8_fp8", "fp4") and b.auto_eligible
            and b.name != TRITON_BACKEND and not backend_reasons(b, problem)]


def _accuracy(outs: dict, q, k, v, rows: torch.Tensor) -> dict:
    import torch.nn.functional as F
    from .numerics.metrics import accuracy_metrics
    ref = F.scaled_dot_product_attention(q[:, :, rows].float(), k.float(), v.float())
    res = {}
    for name, o in outs.items():
        m = accuracy_metrics(o[:, :, rows], ref)
        res[name] = {"cos_sim": m["cos_sim"], "rel_l1": m["rel_l1"]}
    return res


def _cudnn_fp8_module():
    """bench/cudnn_fp8.py (source checkout only) once cudnn-frontend imports: (module, None) or (None, reason)."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "bench" / "cudnn_fp8.py"
    if not path.is_file():
        return None, f"{path} not found (needs a source checkout)"
    try:
        spec = importlib.util.spec_from_file_location("sage3_bench_cudnn_fp8", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _, reason = mod.import_cudnn()
    except Exception as exc:  # noqa: BLE001 - an optional column never stops the benchmark
        return None, f"bench/cudnn_fp8.py failed to load: {type(exc).__name__}: {exc}"
    return (None, reason) if reason else (mod, None)


def run_kernels(args) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("bench kernels needs a CUDA GPU")
    from torch.nn.attention import SDPBackend
    from .dispatch import get_backend
    from .kernels.triton import int8fp8 as tk
    import triton

    card = torch.cuda.get_device_name()
    meta = {"card": card, "capability": list(torch.cuda.get_device_capability()),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__, "triton": triton.__version__, "cudnn": torch.backends.cudnn.version(),
            "command": "python -m sage3_diffusers.bench " + " ".join(sys.argv[1:] if args.argv is None else args.argv),
            "timing": "median of CUDA-graph replays, non-causal forward, bf16 in/out"}
    print(f"card: {card} (sm_{meta['capability'][0]}{meta['capability'][1]}), torch {torch.__version__}, "
          f"triton {triton.__version__}, cuDNN {meta['cudnn']}, {meta['date']}")
    triton_be = get_backend(TRITON_BACKEND)
    cudnn_fp8, cudnn_fp8_reason = _cudnn_fp8_module()
    cudnn_fp8_said = set()
    if cudnn_fp8 is None:
        print(f"cudnn_fp8 column skipped: {cudnn_fp8_reason}")
        meta["cudnn_fp8"] = {"skipped": cudnn_fp8_reason}
    else:
        meta["cudnn_fp8"] = {**cudnn_fp8.versions(), "timing": "attention call only, Q/K/V quantized to e4m3 "
                             "(per-tensor scales) beforehand and excluded"}
    rows_out = []
    extra_names: list[str] = []
    for shape in shapes_for(args.quick, args.shapes):
        q, k, v = dit_inputs(shape)
        scale = shape.head_dim ** -0.5
        fns = {
            "sdpa_flash": _sdpa_fn(q, k, v, SDPBackend.FLASH_ATTENTION),
            "sdpa_cudnn": _sdpa_fn(q, k, v, SDPBackend.CUDNN_ATTENTION),
        }
        kv = tk.quantize_kv(k, v)
        q_quant = tk.quantize_q(q)
        fns["triton_kernel"] = lambda: tk.attention_quantized(q, kv, sm_scale=scale, q_quant=q_quant)
        fns["triton_incl_quant"] = lambda: triton_be.forward(q, k, v, layout="HND", is_causal=False,
                                                             sm_scale=scale, return_lse=False)
        for be in other_backends(shape, q, k, v):
            fns[be.name] = (lambda be=be: be.forward(q, k, v, layout="HND", is_causal=False, sm_scale=scale,
                                                     return_lse=False))
            if be.name not in extra_names:
                extra_names.append(be.name)
        cudnn_fp8_attn = cudnn_fp8_err = None
        if cudnn_fp8 is not None:
            cudnn_fp8_attn, cudnn_fp8_err = cudnn_fp8.make_cudnn_fp8_fn(q, k, v, sm_scale=scale)
            if cudnn_fp8_attn is not None:
                fns["cudnn_fp8"] = cudnn_fp8_attn.run  # attention alone; cudnn_fp8_attn() adds O dequantization
            elif cudnn_fp8_err not in cudnn_fp8_said:
                cudnn_fp8_said.add(cudnn_fp8_err)
                print(f"  {shape.name} cudnn_fp8: {cudnn_fp8_err}", file=sys.stderr)
        row = {"shape": shape.name, "B": shape.batch, "H": shape.heads, "S": shape.seq, "D": shape.head_dim,
               "ms": {}, "tflops": {}, "timing": {}, "errors": {}}
        for name, fn in fns.items():
            try:
                ms, how = time_ms(fn, target_ms=args.target_ms, replays=args.replays)
            except Exception as exc:  # noqa: BLE001 - report and keep going with the other columns
                row["errors"][name] = f"{type(exc).__name__}: {exc}"
                print(f"  {shape.name} {name}: {row['errors'][name]}", file=sys.stderr)
                continue
            row["ms"][name] = ms
            row["tflops"][name] = shape.flops / ms / 1e9
            row["timing"][name] = how
        row["triton_config"] = str(tk.last_config)
        if cudnn_fp8_err:
            row["errors"]["cudnn_fp8"] = cudnn_fp8_err
        if cudnn_fp8_attn is not None:
            row["cudnn_fp8_info"] = cudnn_fp8_attn.info
        if "sdpa_cudnn" in row["ms"] and "triton_incl_quant" in row["ms"]:
            row["triton_vs_cudnn"] = row["ms"]["sdpa_cudnn"] / row["ms"]["triton_incl_quant"]
        if not args.no_accuracy:
            n = min(shape.seq, 1024)
            sample = torch.linspace(0, shape.seq - 1, n, device=q.device).round().long().unique()
            outs = {"triton_int8_fp8": fns["triton_incl_quant"](), "sdpa_cudnn": fns["sdpa_cudnn"]()}
            for name in extra_names:
                if name in fns:
                    outs[name] = fns[name]()
            if cudnn_fp8_attn is not None:
                try:
                    outs["cudnn_fp8"] = cudnn_fp8_attn().clone()
                except Exception as exc:  # noqa: BLE001
                    row["errors"]["cudnn_fp8_accuracy"] = f"{type(exc).__name__}: {exc}"
            row["accuracy"] = _accuracy(outs, q, k, v, sample)
            row["accuracy_rows"] = int(sample.numel())
            del outs
        rows_out.append(row)
        _print_row(row, extra_names, header=len(rows_out) == 1)
        del q, k, v, kv, q_quant, fns, cudnn_fp8_attn
        torch.cuda.empty_cache()
    result = {"meta": meta, "extra_backends": extra_names, "rows": rows_out}
    print()
    print(format_table(result))
    return result


def _fmt(x, spec=".0f"):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def format_table(result: dict) -> str:
    extra = result["extra_backends"]
    fp8 = _has_cudnn_fp8(result)
    cols = ["shape (B,H,S,D)", "flash", "cuDNN", "triton kernel", "triton +quant", "x cuDNN",
            *[f"{e} +quant" for e in extra], *(["cuDNN fp8 attn only"] if fp8 else []), "cos", "rel L1",
            "cuDNN relL1", *(["cuDNN fp8 cos", "cuDNN fp8 relL1"] if fp8 else [])]
    lines = [f"card: {result['meta']['card']}  date: {result['meta']['date']}  TFLOPS (4·B·H·S²·D / time), "
             f"{result['meta']['timing']}",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result["rows"]:
        t = r["tflops"]
        acc = r.get("accuracy", {})
        cells = [f"{r['shape']} ({r['B']},{r['H']},{r['S']},{r['D']})", _fmt(t.get("sdpa_flash")),
                 _fmt(t.get("sdpa_cudnn")), _fmt(t.get("triton_kernel")), _fmt(t.get("triton_incl_quant")),
                 _fmt(r.get("triton_vs_cudnn"), ".2f"), *[_fmt(t.get(e)) for e in extra],
                 *([_fmt(t.get("cudnn_fp8"))] if fp8 else []),
                 _fmt(acc.get("triton_int8_fp8", {}).get("cos_sim"), ".5f"),
                 _fmt(acc.get("triton_int8_fp8", {}).get("rel_l1"), ".4f"),
                 _fmt(acc.get("sdpa_cudnn", {}).get("rel_l1"), ".4f"),
                 *([_fmt(acc.get("cudnn_fp8", {}).get("cos_sim"), ".5f"),
                    _fmt(acc.get("cudnn_fp8", {}).get("rel_l1"), ".4f")] if fp8 else [])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _has_cudnn_fp8(result: dict) -> bool:
    """The optional cudnn_fp8 column exists when some row timed it."""
    return any("cudnn_fp8" in r.get("tflops", {}) for r in result["rows"])


def _print_row(row, extra, header):
    t = row["tflops"]
    s = " ".join(f"{k}={v:.0f}" for k, v in t.items())
    acc = row.get("accuracy", {}).get("triton_int8_fp8")
    a = f" cos={acc['cos_sim']:.5f} relL1={acc['rel_l1']:.4f}" if acc else ""
    c8 = row.get("accuracy", {}).get("cudnn_fp8")
    a += f" cudnn_fp8: cos={c8['cos_sim']:.5f} relL1={c8['rel_l1']:.4f}" if c8 else ""
    print(f"{row['shape']:<22} TFLOPS: {s}  x cuDNN={_fmt(row.get('triton_vs_cudnn'), '.2f')}{a}", flush=True)


def plot(result: dict, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipping the plot ({path})")
        return False
    cols = ["sdpa_flash", "sdpa_cudnn", "triton_kernel", "triton_incl_quant", *result["extra_backends"],
            *(["cudnn_fp8"] if _has_cudnn_fp8(result) else [])]
    rows = result["rows"]
    width = 0.8 / len(cols)
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(rows)), 4.5))
    for i, c in enumerate(cols):
        xs = [j + (i - (len(cols) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(xs, [r["tflops"].get(c, 0) for r in rows], width, label=c)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["shape"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("TFLOPS (non-causal fwd)")
    ax.set_title(f"{result['meta']['card']} — {result['meta']['date']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    args.argv = argv
    if args.command == "kernels":
        result = run_kernels(args)
        if args.json_path:
            with open(args.json_path, "w") as f:
                json.dump(result, f, indent=2)
            print(f"JSON written to {args.json_path}")
        if args.plot_path:
            plot(result, args.plot_path)
    elif args.command == "plot":
        with open(args.json_in) as f:
            plot(json.load(f), args.png_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
