"""Kernel benchmark and the speed table `kernel="auto"` dispatches by.

    python -m sage3_diffusers bench kernels [--shapes A,B | --quick] [--modes ...] --json out.json --plot out.png
    python -m sage3_diffusers bench table out.json [--out sage3_diffusers/data/perf/<card>.json]
    python -m sage3_diffusers bench plot out.json out.png
    python -m sage3_diffusers bench kernels --dry-run --json out.json   # CPU, tiny shapes: the code path only

kernels: non-causal attention forward on DiT shapes and the FA3-paper grid (B·S = 16k, H·D = 2048), bf16, DiT-like
inputs (Q with outlier channels, K with a large per-channel offset). Columns: torch SDPA with the flash and the
cuDNN backend forced, every runnable backend of the registry called as users call it
(`sage_attention(q, k, v, kernel=<backend>)`, quantization included), and `auto` (`kernel="auto"`: what the
dispatcher picks in each mode from this card's shipped table, checked against the columns beside it). Each column is measured in every mode users
run (TFLOPS = 4·B·H·Sq·Skv·D / time):
  eager_single  one call between CUDA events, the device idle before it (host launch cost exposed); median
  eager_stream  calls back to back, time / calls (the GPU-bound steady state inside a model)
  graph         a CUDA graph holding several calls, replayed; median per call (no host cost)
  compile       torch.compile of a function around the call, then back to back as eager_stream
Within a mode the columns take turns (one sample of each per repeat, the order rotating and alternating direction,
an untimed call of the column before each sample), so a drift of the card's clocks over a row moves all columns
alike; each entry is the median of its repeats, with their spread. Plus host µs per call (CPU time of the Python call, no synchronization, in short batches so the launch queue never
fills; median over batches; the SDPA columns with their backend pinned once around the batches, as a user pins it
around a model, so the pin's own cost is not counted) and the peak extra GPU memory of one call (torch.cuda.max_memory_allocated above what
was allocated before it, after warm-up). Ratios are to SDPA cuDNN in the same process and mode. Graph mode only:
the Triton kernel alone (Q, K, V quantized beforehand) and cuDNN's FP8 attention (bench/cudnn_fp8.py, per-tensor
scales, its attention call alone), present when `import cudnn` works. Accuracy vs fp32 SDPA (cos sim, relative
L1) over up to 1024 query rows per shape.

--dry-run runs the same code on the CPU with tiny shapes, our `sdpa` and `reference_int8_fp8` backends, fp32,
no graph mode, no memory column, torch.compile with `--compile-backend` (default "eager" there): a test of the
code path, not a measurement.

table: the per-card data file of `perf_model` (see its docstring) from a `kernels --json` result: TFLOPS per
dispatchable backend, per mode, per head dim and sequence length. Older results (graph replays only, columns
sdpa_cudnn / triton_incl_quant / <backend>) are read as the graph mode.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import perf_model
from .extras import headless_pyplot

MODE_HELP = {
    "eager_single": "one call between CUDA events, device idle before it; median",
    "eager_stream": "calls back to back, time / calls; median of interleaved repeats",
    "graph": "CUDA graph of several calls, replayed; median per call over interleaved replays",
    "compile": "torch.compile'd function around the call, calls back to back; median of interleaved repeats",
}
MODES = perf_model.MODES
GRAPH_ONLY = ("triton_kernel", "cudnn_fp8")  # diagnostics: not what users call
RAW_SDPA = ("sdpa_flash", "sdpa_cudnn")
DRY_RUN_BACKENDS = ("sdpa", "reference_int8_fp8")
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
    Shape("Wan2.1-14B-720p", 1, 40, 75600, 128),
]
GRID_SHAPES = [Shape(f"grid-hd{d}-S{s // 1024}k", 16384 // s, 2048 // d, s, d)
               for d in (64, 128) for s in (1024, 4096, 16384)]
QUICK_NAMES = ("Flux-1024", "SD3.5-L-1024", "grid-hd64-S4k", "grid-hd128-S4k")
DRY_RUN_SHAPES = [Shape("tiny-hd64", 1, 2, 96, 64), Shape("tiny-hd128", 2, 2, 160, 128)]


def shapes_for(quick: bool, names: str | None = None, dry_run: bool = False) -> list[Shape]:
    every = DIT_SHAPES + GRID_SHAPES + DRY_RUN_SHAPES
    if names:
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        known = {s.name: s for s in every}
        missing = [n for n in wanted if n not in known]
        if missing:
            raise SystemExit(f"unknown shape(s) {missing}; known: {sorted(known)}")
        return [known[n] for n in wanted]
    if dry_run:
        return list(DRY_RUN_SHAPES)
    return [s for s in every if s.name in QUICK_NAMES] if quick else DIT_SHAPES + GRID_SHAPES


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sage3_diffusers bench", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    k = sub.add_parser("kernels", help="attention kernels in every mode: TFLOPS, host µs, memory, accuracy")
    k.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_NAMES)}")
    k.add_argument("--shapes", default=None, help="comma-separated shape names (overrides --quick)")
    k.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)} (default: all)")
    k.add_argument("--columns", default=None,
                   help="comma list of columns to measure (default: sdpa_flash, sdpa_cudnn, every runnable backend, "
                        "auto, triton_kernel, cudnn_fp8)")
    k.add_argument("--json", dest="json_path", default=None, help="write results as JSON here")
    k.add_argument("--plot", dest="plot_path", default=None, help="write a PNG here (needs matplotlib)")
    k.add_argument("--no-accuracy", action="store_true", help="skip the fp32 SDPA accuracy comparison")
    k.add_argument("--budget-ms", type=float, default=250.0,
                   help="device time per measurement; sets the call counts (default 250)")
    k.add_argument("--max-calls", type=int, default=30, help="most calls per measurement (default 30)")
    k.add_argument("--host-calls", type=int, default=20, help="calls per host-time batch (default 20)")
    k.add_argument("--compile-backend", default=None,
                   help='torch.compile backend for the compile mode (default "inductor"; "eager" with --dry-run)')
    k.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, sdpa + reference only: the code path")
    t = sub.add_parser("table", help="write the per-card speed table of kernel='auto' from a `kernels --json` file")
    t.add_argument("json_in", nargs="+", help="one or more results of the same card (their rows are joined)")
    t.add_argument("--out", default=None, help="default: sage3_diffusers/data/perf/<card>.json")
    t.add_argument("--source-name", default=None,
                   help="how the table names its source JSON (default: the paths given, as written)")
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


# ---- timing -------------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _elapsed_ms(run, device: torch.device) -> float:
    """Time from the start of `run()` until the device has finished what it launched."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    run()
    return (time.perf_counter() - t0) * 1e3


def _calls(est_ms: float, budget_ms: float, most: int, least: int = 3) -> int:
    return max(least, min(most, int(budget_ms / max(est_ms, 1e-3))))


def time_eager_single(fn, device, calls: int) -> float:
    times = []
    for _ in range(calls):
        _sync(device)
        times.append(_elapsed_ms(fn, device))
    return statistics.median(times)


def time_eager_stream(fn, device, calls: int, repeats: int = 3) -> float:
    def run():
        for _ in range(calls):
            fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        times.append(_elapsed_ms(run, device) / calls)
    return statistics.median(times)


def time_graph(fn, device, calls: int, replays: int = 5) -> float:
    """Median per-call time of replays of a CUDA graph holding `calls` calls. Raises if capture fails."""
    _, sample = _graph_timer(fn, device, calls)
    return statistics.median(sample() for _ in range(replays))


def host_us_per_call(fn, device, calls: int, batches: int = 5) -> float:
    """CPU µs of one Python call without synchronization: batches of `calls` calls, each batch timed on the host
    and drained before the next (so the launch queue never fills and blocks the host); median over batches."""
    per_call = []
    for _ in range(batches):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - t0) / calls * 1e6)
        _sync(device)
    return statistics.median(per_call)


def peak_extra_mib(fn, device) -> float:
    """Peak GPU memory one call allocates above what was allocated before it (output included), in MiB."""
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return peak / 2**20


# ---- columns ------------------------------------------------------------------------------------------------

def _sdpa_call(backend):
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    def call(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v)
    # Host time is measured with the backend pinned once around the timed calls, as a user pins it around a
    # model: the context manager's own cost (tens of µs per entry) is not SDPA's.
    call.pinned = (lambda: sdpa_kernel([backend]), lambda q, k, v: F.scaled_dot_product_attention(q, k, v))
    return call


def _api_call(name: str):
    from .api import sage_attention

    def call(q, k, v):
        return sage_attention(q, k, v, kernel=name, tensor_layout="HND")
    return call


def runnable_backends(q, k, v, dry_run: bool) -> list[str]:
    """Backends users can run on this call: every runnable auto-eligible one (none emulated), or on a dry run
    our sdpa and the int8_fp8 reference."""
    from .backends.base import describe_problem
    from .dispatch import backend_reasons, list_backends
    problem = describe_problem(q, k, v, "HND", False, False, None)
    return [b.name for b in list_backends()
            if (b.name in DRY_RUN_BACKENDS if dry_run else b.auto_eligible) and not backend_reasons(b, problem)]


def columns_for(q, k, v, dry_run: bool) -> dict:
    """name -> function of (q, k, v) for every column measured in every mode."""
    cols = {}
    if q.is_cuda:
        from torch.nn.attention import SDPBackend
        cols["sdpa_flash"] = _sdpa_call(SDPBackend.FLASH_ATTENTION)
        cols["sdpa_cudnn"] = _sdpa_call(SDPBackend.CUDNN_ATTENTION)
    for name in runnable_backends(q, k, v, dry_run):
        cols[name] = _api_call(name)
    if q.is_cuda:
        cols["auto"] = _api_call("auto")  # what kernel="auto" runs in each mode (never written to the speed table)
    return cols


def graph_only_columns(q, k, v, cudnn_fp8) -> tuple[dict, dict, dict]:
    """(name -> no-argument function, errors, info) for the graph-mode diagnostics."""
    fns, errors, info = {}, {}, {}
    scale = q.shape[-1] ** -0.5
    try:
        from .kernels.triton import int8fp8 as tk
        kv, q_quant = tk.quantize(q, k, v)
        fns["triton_kernel"] = lambda: tk.attention_quantized(q, kv, sm_scale=scale, q_quant=q_quant)
    except Exception as exc:  # noqa: BLE001 - a diagnostic column never stops the benchmark
        errors["triton_kernel"] = f"{type(exc).__name__}: {exc}"
    if cudnn_fp8 is not None:
        attn, err = cudnn_fp8.make_cudnn_fp8_fn(q, k, v, sm_scale=scale)
        if attn is not None:
            fns["cudnn_fp8"] = attn.run  # attention alone; attn() adds O dequantization
            info["cudnn_fp8"] = attn.info
            info["cudnn_fp8_call"] = attn
        else:
            errors["cudnn_fp8"] = err
    return fns, errors, info


def _cudnn_fp8_module():
    """bench/cudnn_fp8.py (source checkout only) once cudnn-frontend imports: (module, None) or (None, reason)."""
    import importlib.util
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


def _accuracy(outs: dict, q, k, v, rows: torch.Tensor) -> dict:
    import torch.nn.functional as F
    from .numerics.metrics import accuracy_metrics
    ref = F.scaled_dot_product_attention(q[:, :, rows].float(), k.float(), v.float())
    res = {}
    for name, o in outs.items():
        m = accuracy_metrics(o[:, :, rows], ref)
        res[name] = {"cos_sim": m["cos_sim"], "rel_l1": m["rel_l1"]}
    return res


def _compiled(call, backend: str):
    return torch.compile(call, backend=backend, dynamic=False)


def _graph_timer(fn, device, calls: int):
    """(replay, sample) for a CUDA graph holding `calls` calls of `fn` (captured now; raises if capture fails):
    `replay()` runs it once, `sample()` replays it once and returns ms per call."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up on the capture stream
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(calls):
                fn()
    torch.cuda.synchronize()
    return graph.replay, (lambda: _elapsed_ms(graph.replay, device) / calls)


def _mode_timers(mode: str, fns: dict, calls: dict, est: dict, args, device, row: dict) -> dict:
    """column -> (lead_in, sample) in `mode`: `lead_in()` runs what is timed once, untimed (the eager call, the
    graph's replay, the compiled call); `sample()` takes one timing sample (ms per call). What cannot run in this
    mode is recorded in row["errors"]. The objects they need (graphs, compiled functions) live in their closures."""
    timers = {}
    if mode == "compile":
        torch._dynamo.reset()  # one fresh cache per shape, shared by the columns (distinct closures, own guards)
    for name, fn in fns.items():
        n = calls[name]
        try:
            if mode == "eager_single":
                timers[name] = fn, (lambda fn=fn, n=n: time_eager_single(fn, device, n))
            elif mode == "eager_stream":
                timers[name] = fn, (lambda fn=fn, n=n: time_eager_stream(fn, device, n, repeats=1))
            elif mode == "graph":
                if device.type != "cuda":
                    row["errors"][f"{name}/graph"] = "CUDA graphs need CUDA"
                    continue
                timers[name] = _graph_timer(fn, device, _calls(est[name], args.budget_ms / 4, 100, least=1))
            else:  # compile
                cf = _compiled(fn.call, args.compile_backend)
                cfn = (lambda cf=cf, fn=fn: cf(*fn.args))
                cfn(), cfn()
                timers[name] = cfn, (lambda cfn=cfn, n=n: time_eager_stream(cfn, device, n, repeats=1))
        except Exception as exc:  # noqa: BLE001 - report and keep going with the other columns
            row["errors"][f"{name}/{mode}"] = f"{type(exc).__name__}: {exc}"
            print(f"  {row['shape']} {name} {mode}: {row['errors'][f'{name}/{mode}']}", file=sys.stderr)
    return timers


def sample_order(names: list, rep: int) -> list:
    """The order of the columns' samples in repeat `rep`: repeats 2i and 2i + 1 take the columns rotated by i,
    forwards then backwards."""
    if not names:
        return []
    r = (rep // 2) % len(names)
    order = names[r:] + names[:r]
    return order[::-1] if rep % 2 else order


def measure_row(shape: Shape, args, device, dtype, cudnn_fp8) -> dict:
    q, k, v = dit_inputs(shape, dtype=dtype, device=device)
    cols = columns_for(q, k, v, args.dry_run)
    if args.columns:
        wanted = {c.strip() for c in args.columns.split(",")}
        cols = {n: c for n, c in cols.items() if n in wanted}
    modes = args.mode_list
    row = {"shape": shape.name, "B": shape.batch, "H": shape.heads, "S": shape.seq, "D": shape.head_dim,
           "modes": {m: {} for m in modes}, "host_us": {}, "peak_mem_mib": {}, "errors": {}}
    fns, est, calls = {}, {}, {}
    for name, call in cols.items():
        fn = (lambda call=call: call(q, k, v))
        fn.call, fn.args = call, (q, k, v)
        try:
            fn(), fn()  # warm-up (autotuning, extension loading, the dispatcher's cache)
            est[name] = _elapsed_ms(fn, device)
        except Exception as exc:  # noqa: BLE001 - report and keep going with the other columns
            row["errors"][name] = f"{type(exc).__name__}: {exc}"
            print(f"  {shape.name} {name}: {row['errors'][name]}", file=sys.stderr)
            continue
        fns[name], calls[name] = fn, _calls(est[name], args.budget_ms, args.max_calls)
    # The columns take turns within each mode (a sample of every column per repeat), so a drift of the card's
    # clocks or temperature over the row moves every column alike instead of biasing the ratios. The order
    # rotates and alternates direction, so no column always follows the same one, and an untimed call of the
    # column leads into each sample (what the previous column left behind, in caches or clocks, is not timed).
    # Each entry is the median of its samples, with their spread ((max - min) / median) beside it.
    reps = 5 if max(est.values(), default=0.0) < 20 else 3
    for mode in modes:
        timers = _mode_timers(mode, fns, calls, est, args, device, row)
        samples = {name: [] for name in timers}
        for rep in range(reps):
            for name in sample_order(list(timers), rep):
                lead_in, sample = timers[name]
                try:
                    lead_in()
                    samples[name].append(sample())
                except Exception as exc:  # noqa: BLE001
                    row["errors"][f"{name}/{mode}"] = f"{type(exc).__name__}: {exc}"
        for name, xs in samples.items():
            if f"{name}/{mode}" in row["errors"] or not xs:
                continue
            ms = statistics.median(xs)
            row["modes"][mode][name] = {"ms": ms, "tflops": shape.flops / ms / 1e9, "calls": calls[name],
                                        "repeats": len(xs), "spread": (max(xs) - min(xs)) / ms}
        del timers
    for name, fn in fns.items():
        call = cols[name]
        pinned = getattr(call, "pinned", None)
        with (pinned[0]() if pinned else contextlib.nullcontext()):
            host_fn = (lambda bare=pinned[1]: bare(q, k, v)) if pinned else fn
            row["host_us"][name] = host_us_per_call(host_fn, device, args.host_calls if est[name] < 5 else 3,
                                                    batches=5 if est[name] < 5 else 2)
        if device.type == "cuda":
            row["peak_mem_mib"][name] = peak_extra_mib(fn, device)
    if "graph" in modes and device.type == "cuda" and not args.columns:
        extra, errors, info = graph_only_columns(q, k, v, cudnn_fp8)
        for name, err in errors.items():
            row["errors"][name] = err
        for name, fn in extra.items():
            try:
                fn()
                est = _elapsed_ms(fn, device)
                ms = time_graph(fn, device, _calls(est, args.budget_ms / 4, 100, least=1))
                row["modes"]["graph"][name] = {"ms": ms, "tflops": shape.flops / ms / 1e9}
            except Exception as exc:  # noqa: BLE001
                row["errors"][f"{name}/graph"] = f"{type(exc).__name__}: {exc}"
        if "cudnn_fp8" in info:
            row["cudnn_fp8_info"] = info["cudnn_fp8"]
    else:
        info = {}
    base = args.baseline
    for mode, per_col in row["modes"].items():
        ref = per_col.get(base, {}).get("ms")
        for entry in per_col.values():
            entry["vs_baseline"] = ref / entry["ms"] if ref else None
    if not args.no_accuracy:
        n_rows = min(shape.seq, 1024)
        sample = torch.linspace(0, shape.seq - 1, n_rows, device=q.device).round().long().unique()
        outs = {}
        for name, call in cols.items():
            if name not in row["errors"]:
                outs[name] = call(q, k, v)
        if "cudnn_fp8_call" in info:
            try:
                outs["cudnn_fp8"] = info["cudnn_fp8_call"]().clone()
            except Exception as exc:  # noqa: BLE001
                row["errors"]["cudnn_fp8_accuracy"] = f"{type(exc).__name__}: {exc}"
        row["accuracy"] = _accuracy(outs, q, k, v, sample)
        row["accuracy_rows"] = int(sample.numel())
    return row


def run_kernels(args) -> dict:
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        raise SystemExit("bench kernels needs a CUDA GPU (or --dry-run, which tests the code path on the CPU)")
    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.mode_list if m not in MODES]
    if bad:
        raise SystemExit(f"unknown mode(s) {bad}; known: {list(MODES)}")
    if dry:
        args.mode_list = [m for m in args.mode_list if m != "graph"]
    args.compile_backend = args.compile_backend or ("eager" if dry else "inductor")
    args.baseline = "sdpa" if dry else "sdpa_cudnn"
    command = "python -m sage3_diffusers bench " + " ".join(sys.argv[1:] if args.argv is None else args.argv)
    meta = {"card": "cpu (dry run)" if dry else torch.cuda.get_device_name(),
            "capability": None if dry else list(torch.cuda.get_device_capability()),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(), "command": command,
            "dry_run": dry, "dtype": str(dtype).replace("torch.", ""), "baseline": args.baseline,
            "modes": {m: MODE_HELP[m] for m in args.mode_list}, "compile_backend": args.compile_backend,
            "host_us": "CPU µs per call, no synchronization, batches drained between them; median over batches; "
                       "SDPA columns with their backend pinned once around the timed calls",
            "peak_mem_mib": "max_memory_allocated during one call minus memory_allocated before it (after warm-up)",
            "flops": "4·B·H·Sq·Skv·D, non-causal forward",
            "budget_ms": args.budget_ms, "max_calls": args.max_calls}
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    print(f"card: {meta['card']}, torch {torch.__version__}, triton {meta['triton']}, cuDNN {meta['cudnn']}, "
          f"{meta['date']}, modes {', '.join(args.mode_list)}")
    cudnn_fp8 = None
    if not dry and "graph" in args.mode_list:
        cudnn_fp8, reason = _cudnn_fp8_module()
        meta["cudnn_fp8"] = ({**cudnn_fp8.versions(), "timing": "attention call only, Q/K/V quantized to e4m3 "
                              "(per-tensor scales) beforehand and excluded"} if cudnn_fp8 else {"skipped": reason})
        if reason:
            print(f"cudnn_fp8 column skipped: {reason}")
    rows = []
    for shape in shapes_for(args.quick, args.shapes, dry):
        t0 = time.time()
        rows.append(measure_row(shape, args, device, dtype, cudnn_fp8))
        print(format_row(rows[-1], args.baseline) + f"  [{time.time() - t0:.0f} s]", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.json_path:  # after every shape, so a run stopped by a time limit keeps what it measured
            _write_json(_result(meta, rows), args.json_path)
    result = _result(meta, rows)
    print()
    print(format_table(result))
    return result


def _result(meta: dict, rows: list) -> dict:
    columns = []
    for r in rows:
        for per_col in r["modes"].values():
            columns += [c for c in per_col if c not in columns]
    return {"meta": meta, "columns": columns, "rows": rows}


def _write_json(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)


# ---- reports ------------------------------------------------------------------------------------------------

def _fmt(x, spec=".0f"):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def format_row(row: dict, baseline: str) -> str:
    parts = []
    for mode, per_col in row["modes"].items():
        ref = per_col.get(baseline, {}).get("tflops")
        ratios = " ".join(f"{c}={e['vs_baseline']:.2f}x" for c, e in per_col.items()
                          if c != baseline and e.get("vs_baseline"))
        parts.append(f"{mode}: {baseline}={_fmt(ref)} TF {ratios}")
    return f"{row['shape']:<20} " + " | ".join(parts)


def format_table(result: dict) -> str:
    """One markdown table per mode (TFLOPS, ratio to the baseline), then host µs, memory and accuracy."""
    meta, rows = result["meta"], result["rows"]
    base = meta["baseline"]
    cols = result["columns"]
    out = [f"card: {meta['card']}  date: {meta['date']}  TFLOPS = {meta['flops']}; ratios to {base}, same process"]
    for mode in meta["modes"]:
        present = [c for c in cols if any(c in r["modes"].get(mode, {}) for r in rows)]
        if not present:
            continue
        out += ["", f"{mode} ({meta['modes'][mode]}): TFLOPS (x {base})",
                "| shape (B,H,S,D) | " + " | ".join(present) + " |", "|---|" + "---|" * len(present)]
        for r in rows:
            cells = []
            for c in present:
                e = r["modes"].get(mode, {}).get(c)
                cells.append("-" if e is None else
                             _fmt(e["tflops"]) + ("" if c == base or not e.get("vs_baseline")
                                                  else f" ({e['vs_baseline']:.2f}x)"))
            out.append(f"| {r['shape']} ({r['B']},{r['H']},{r['S']},{r['D']}) | " + " | ".join(cells) + " |")
    for key, title, spec in (("host_us", "host µs per call", ".0f"), ("peak_mem_mib", "peak extra MiB of one call",
                                                                      ".0f")):
        present = [c for c in cols if any(c in r.get(key, {}) for r in rows)]
        if present:
            out += ["", f"{title} ({meta[key]})", "| shape | " + " | ".join(present) + " |",
                    "|---|" + "---|" * len(present)]
            out += [f"| {r['shape']} | " + " | ".join(_fmt(r[key].get(c), spec) for c in present) + " |"
                    for r in rows]
    acc_cols = [c for c in cols if any(c in r.get("accuracy", {}) for r in rows)]
    if acc_cols:
        out += ["", "accuracy vs fp32 SDPA: cos sim / rel L1", "| shape | " + " | ".join(acc_cols) + " |",
                "|---|" + "---|" * len(acc_cols)]
        for r in rows:
            a = r.get("accuracy", {})
            out.append(f"| {r['shape']} | " + " | ".join(
                f"{a[c]['cos_sim']:.5f} / {a[c]['rel_l1']:.4f}" if c in a else "-" for c in acc_cols) + " |")
    return "\n".join(out)


def plot(result: dict, path: str) -> bool:
    """One panel per mode (ratio of each column to the baseline, per shape) and one of host µs per call."""
    plt = headless_pyplot()
    if plt is None:
        print(f"matplotlib is not installed: skipping the plot ({path})")
        return False
    meta, rows = result["meta"], result["rows"]
    base = meta["baseline"]
    panels = [m for m in meta["modes"] if any(r["modes"].get(m) for r in rows)] + ["host_us"]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 1.4 * len(rows)), 3.2 * len(panels)), squeeze=False)
    names = [r["shape"] for r in rows]
    for ax, panel in zip(axes[:, 0], panels):
        if panel == "host_us":
            cols = [c for c in result["columns"] if any(c in r["host_us"] for r in rows)]
            values = [[r["host_us"].get(c, 0) for r in rows] for c in cols]
            ax.set_ylabel("host µs / call")
        else:
            cols = [c for c in result["columns"] if any(c in r["modes"].get(panel, {}) for r in rows)]
            values = [[(r["modes"].get(panel, {}).get(c) or {}).get("vs_baseline") or 0 for r in rows] for c in cols]
            ax.axhline(1.0, color="k", linewidth=0.8)
            ax.set_ylabel(f"x {base} ({panel})")
        width = 0.8 / max(1, len(cols))
        for i, (c, vals) in enumerate(zip(cols, values)):
            ax.bar([j + (i - (len(cols) - 1) / 2) * width for j in range(len(rows))], vals, width, label=c)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
        ax.legend(fontsize=7, ncol=min(4, len(cols)))
    axes[0, 0].set_title(f"{meta['card']} — {meta['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")
    return True


# ---- the dispatch table -------------------------------------------------------------------------------------

_LEGACY_COLUMNS = {"sdpa_cudnn": "sdpa", "triton_incl_quant": TRITON_BACKEND}
_NOT_DISPATCHABLE = set(RAW_SDPA) | set(GRAPH_ONLY) | {"triton_incl_quant", "auto"}


def _row_columns_by_mode(row: dict, meta: dict) -> dict:
    """mode -> {backend name: TFLOPS} of one result row, new format or the older graph-only one."""
    if "modes" in row:
        out = {}
        for mode, per_col in row["modes"].items():
            cols = {c: e["tflops"] for c, e in per_col.items() if c not in _NOT_DISPATCHABLE}
            if perf_model.BASELINE not in cols and "sdpa_cudnn" in per_col:
                cols[perf_model.BASELINE] = per_col["sdpa_cudnn"]["tflops"]  # what our sdpa backend pins first
            out[mode] = cols
        return out
    if "graph" not in meta.get("timing", ""):
        raise ValueError(f"cannot tell the timing mode of this result (meta.timing={meta.get('timing')!r})")
    cols = {}
    for c, tf in row.get("tflops", {}).items():
        if row.get("timing", {}).get(c, "cuda-graph") != "cuda-graph":
            continue  # a column whose graph capture failed was timed eagerly: not a graph measurement
        name = _LEGACY_COLUMNS.get(c, c)
        if c in _LEGACY_COLUMNS or c not in _NOT_DISPATCHABLE:
            cols[name] = tf
    return {"graph": cols}


def table_from_result(result: dict, source_name: str) -> dict:
    """The `perf_model` data file for the card of a `kernels --json` result."""
    meta = result["meta"]
    if meta.get("dry_run"):
        note = "dry run on the CPU: exercises the code path, measures nothing about a GPU"
    else:
        note = None
    points: dict = {}  # backend -> mode -> head_dim -> seq -> [tflops]
    modes_seen: list = []
    shapes = []
    for row in result["rows"]:
        shape = {"name": row["shape"], "B": row["B"], "H": row["H"], "S": row["S"], "D": row["D"]}
        if shape not in shapes:  # joined runs measure a shape more than once; its points are averaged below
            shapes.append(shape)
        for mode, cols in _row_columns_by_mode(row, meta).items():
            if cols and mode not in modes_seen:
                modes_seen.append(mode)
            for backend, tf in cols.items():
                points.setdefault(backend, {}).setdefault(mode, {}).setdefault(str(row["D"]), {}) \
                    .setdefault(row["S"], []).append(tf)
    tflops = {b: {m: {hd: [[s, float(f"{sum(v) / len(v):.4g}")] for s, v in sorted(per_s.items())]
                      for hd, per_s in sorted(per_d.items(), key=lambda kv: -int(kv[0]))}
                  for m, per_d in per_mode.items()}
              for b, per_mode in sorted(points.items())}
    if "modes" in meta:
        mode_help = {m: meta["modes"][m] for m in modes_seen if m in meta["modes"]}
    else:
        mode_help = {"graph": meta.get("timing", "median of CUDA-graph replays")}
    table = {
        "card": meta["card"],
        "card_slug": perf_model.card_slug(meta["card"]),
        "capability": meta.get("capability"),
        "source": {"json": source_name, "date": meta.get("date"), "command": meta.get("command"),
                   "torch": meta.get("torch"), "triton": meta.get("triton"), "cudnn": meta.get("cudnn")},
        "generated_by": f"python -m sage3_diffusers bench table {source_name.replace(', ', ' ')}",
        "modes": mode_help,
        "baseline": perf_model.BASELINE,
        "flops": "4·B·H·Sq·Skv·D, non-causal forward, whole call (quantization included)",
        "shapes": shapes,
        "tflops": tflops,
    }
    if note:
        table["note"] = note
    return table


def _compact_json(obj) -> str:
    """Indented JSON with every innermost list and every shape record on one line (diff-friendly tables)."""
    text = json.dumps(obj, indent=1, ensure_ascii=False)
    text = re.sub(r"\[\s*([^\[\]{}]*?)\s*\]", lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text)
    return re.sub(r"\{\s*(\"name\"[^{}]*?)\s*\}", lambda m: "{" + re.sub(r",\s+", ", ", m.group(1)) + "}", text)


def default_table_path(card: str) -> Path:
    return Path(__file__).resolve().parent / "data" / "perf" / f"{perf_model.card_slug(card)}.json"


def join_results(results: list[dict]) -> dict:
    """Rows of several `kernels` results of one card as one result: a run split across time limits, or repeated
    runs of the same shapes, whose measurements of one point the table then averages."""
    first = results[0]
    for r in results[1:]:
        if r["meta"]["card"] != first["meta"]["card"]:
            raise SystemExit(f"results of different cards: {first['meta']['card']!r} and {r['meta']['card']!r}")
    if len(results) == 1:
        return first
    meta = dict(first["meta"])
    meta["command"] = " && ".join(r["meta"].get("command", "?") for r in results)
    meta["date"] = ", ".join(dict.fromkeys(r["meta"].get("date", "?") for r in results))
    if "modes" in meta:
        meta["modes"] = {m: h for r in results for m, h in r["meta"].get("modes", {}).items()}
    return {"meta": meta, "columns": [], "rows": [row for r in results for row in r["rows"]]}


def write_table(json_in: list[str] | str, out: str | None, source_name: str | None) -> Path:
    paths = [json_in] if isinstance(json_in, str) else list(json_in)
    results = []
    for path in paths:
        with open(path) as f:
            results.append(json.load(f))
    table = table_from_result(join_results(results), source_name or ", ".join(paths))
    path = Path(out) if out else default_table_path(table["card"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_compact_json(table) + "\n")
    print(f"{table['card']}: modes {', '.join(table['modes'])}, backends {', '.join(table['tflops'])} -> {path}")
    perf_model.load_table.cache_clear()
    perf_model.available_cards.cache_clear()
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    args.argv = argv
    if args.command == "kernels":
        result = run_kernels(args)
        if args.json_path:
            _write_json(result, args.json_path)
            print(f"JSON written to {args.json_path}")
        if args.plot_path:
            plot(result, args.plot_path)
    elif args.command == "table":
        write_table(args.json_in, args.out, args.source_name)
    elif args.command == "plot":
        with open(args.json_in) as f:
            plot(json.load(f), args.png_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
