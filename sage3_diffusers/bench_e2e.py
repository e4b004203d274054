"""End-to-end benchmark: one transformer forward of each model family at its real size and resolution.

    python -m sage3_diffusers bench e2e --model flux --layers 2,4 --variants sdpa_default,int8_fp8 [--compile] --json out.json

The transformer is built from the real model's config with random weights (no download), optionally with fewer
blocks (`--layers`, per block kind) so the run fits a time budget; the per-forward time of each variant is
measured with CUDA events (median of `--iters` after warm-up), eagerly and, with `--compile`, under
torch.compile of the transformer (first call, i.e. compilation, timed apart), and reported with the ratio to
diffusers' own processors in the same mode. One more profiled forward per row gives attention's share of the
forward's GPU time (kernels under torch SDPA or our sage3:: ops) and the ceiling it implies, 1 / (1 - share):
the end-to-end speed-up with infinitely fast attention. Random weights give meaningless images but
representative timings: every block has the real shapes.
"""
from __future__ import annotations

import argparse
import sys
import json
import re
import statistics
import time

import torch

from .extras import headless_pyplot


def _bench_families() -> dict:
    """family -> its `models.BenchSpec` (the model registry's families that declare one)."""
    from .integration import models
    return {f.name: f.bench for f in models.families() if f.bench is not None}


def _class_name(family: str) -> str:
    from .integration import models
    fam = models.get(family)
    return fam.bench.transformer_class or models.get(fam.transformer_family).transformer_classes[0]


# family: (diffusers class name, config overrides of the class defaults, names of the block-count arguments)
MODEL_CONFIGS = {name: (_class_name(name), spec.config, spec.layer_args) for name, spec in _bench_families().items()}
# family: (height, width, frames, batch): the pipelines' defaults (batch 2 where CFG is batched)
DEFAULT_SIZES = {name: spec.default_size for name, spec in _bench_families().items()}


def build_transformer(family: str, layers: tuple[int, ...] | None, device, dtype):
    import diffusers
    cls_name, overrides, layer_args = MODEL_CONFIGS[family]
    config = dict(overrides)
    if layers is not None:
        if len(layers) != len(layer_args):
            raise ValueError(f"--layers for {family} takes {len(layer_args)} numbers ({', '.join(layer_args)})")
        config.update(zip(layer_args, layers))
    with torch.device(device):
        model = getattr(diffusers, cls_name)(**config)
    return model.to(dtype).eval()


def make_inputs(family: str, batch: int, device, dtype, *, height: int, width: int, frames: int, gen):
    """Transformer kwargs at the pipeline's real shapes (declared by the family's model module)."""
    specs = _bench_families()
    if family not in specs:
        raise ValueError(f"unknown family {family!r}; known: {sorted(specs)}")
    return specs[family].make_inputs(batch, device, dtype, height=height, width=width, frames=frames, gen=gen)


def _time_forward(forward, inputs, iters: int, warmup: int) -> list[float]:
    times = []
    with torch.inference_mode():
        for i in range(warmup + iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            forward(**inputs, return_dict=False)
            end.record()
            torch.cuda.synchronize()
            if i >= warmup:
                times.append(start.elapsed_time(end))
    return times


def _compile(model, fullgraph: bool):
    """torch.compile of the transformer, with a fresh dynamo cache per variant (no guards shared across them)."""
    torch._dynamo.reset()
    return torch.compile(model, fullgraph=fullgraph)


# CPU ops whose GPU time is attention: torch SDPA and its backends (also as inductor's extern calls), and our
# custom ops (namespace sage3::, quantization included). Not inductor's generated kernels: their names list every
# op fused into them, so the kernel that builds a mask or concatenates the inputs an attention op reads carries
# that op's name without being attention.
ATTENTION_OPS = re.compile(
    r"^aten::\w*(scaled_dot_product|flash_attention|efficient_attention|cudnn_attention)|^sage3::")


def attention_share(events, *, on_device: bool = True) -> dict:
    """Attention's share of a profiled forward. on_device: GPU time of the kernels launched under attention ops
    (outermost such op only) over the GPU time of every kernel and copy; otherwise CPU time of the outermost
    attention ops over that of all outermost ops (for a CPU run). ceiling = 1 / (1 - share): the end-to-end
    speed-up with infinitely fast attention."""
    from torch.autograd import DeviceType

    def outermost_attention(e):
        if not ATTENTION_OPS.search(e.name):
            return False
        p = e.cpu_parent
        while p is not None:
            if ATTENTION_OPS.search(p.name):
                return False
            p = p.cpu_parent
        return True

    cpu_ops = [e for e in events if e.device_type == DeviceType.CPU]
    if on_device:
        total = sum(e.device_time_total for e in events if e.device_type == DeviceType.CUDA)
        attn = sum(e.device_time_total for e in cpu_ops if outermost_attention(e))
    else:
        total = sum(e.cpu_time_total for e in cpu_ops if e.cpu_parent is None)
        attn = sum(e.cpu_time_total for e in cpu_ops if outermost_attention(e))
    share = attn / total if total > 0 else float("nan")
    ops = sorted({e.name for e in cpu_ops if outermost_attention(e)})
    return {"attention_ms": attn / 1e3, "total_ms": total / 1e3, "share": share,
            "ceiling": 1.0 / (1.0 - share) if share < 1 else float("inf"), "ops": ops,
            "time": "GPU kernel time" if on_device else "CPU time"}


def profile_attention(forward, inputs) -> dict:
    """One profiled forward (after the timed ones): attention's share of its GPU time."""
    from torch.profiler import ProfilerActivity, profile
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        forward(**inputs, return_dict=False)
        torch.cuda.synchronize()
    return attention_share(prof.events(), on_device=True)


def _measure(model, inputs, variant: str, mode: str, args) -> dict:
    """One row: the forward's times in `mode` ("eager" or "compile"; the compiled first call timed apart) and,
    unless --no-profile, attention's share from one more, profiled forward."""
    forward, first_call_s = model, None
    if mode == "compile":
        forward = _compile(model, args.fullgraph)
        t1 = time.time()
        with torch.inference_mode():
            forward(**inputs, return_dict=False)
        torch.cuda.synchronize()
        first_call_s = time.time() - t1
    times = _time_forward(forward, inputs, args.iters, args.warmup)
    row = {"variant": variant, "mode": mode, "median_ms": statistics.median(times), "min_ms": min(times),
           "times_ms": times}
    if first_call_s is not None:
        row["first_call_s"] = first_call_s
    if not args.no_profile:
        row["attention"] = profile_attention(forward, inputs)
    return row


def _install(model, variant: str) -> None:
    """variant: "sdpa_default" (diffusers' own attention) or a kernel ("sdpa", "int8_fp8", "fp4", or a backend
    name) for every attention layer through `apply` (our backend or our processors, per the family's route)."""
    import sage3_diffusers
    sage3_diffusers.remove(model)
    if variant != "sdpa_default":
        sage3_diffusers.apply(model, kernel=variant, log_summary=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sage3_diffusers bench e2e", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="flux", choices=sorted(MODEL_CONFIGS))
    ap.add_argument("--layers", default=None, help="blocks per kind, e.g. 2,4 for Flux (double,single); default: all")
    ap.add_argument("--variants", default="sdpa_default,int8_fp8",
                    help="comma list: sdpa_default (diffusers' processors), auto, sdpa, int8_fp8, fp4 or a backend name")
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--frames", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true",
                    help="also time each variant under torch.compile of the transformer (ratios per mode)")
    ap.add_argument("--fullgraph", action="store_true", help="torch.compile(..., fullgraph=True) with --compile")
    ap.add_argument("--no-profile", action="store_true",
                    help="skip the profiled forward that measures attention's share (one more forward per row)")
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--plot", default=None, help="write a PNG bar chart here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench e2e needs a CUDA GPU (timings on CPU would say nothing about the kernels)")
        return 2
    h, w, f, b = DEFAULT_SIZES[args.model]
    h, w, f, b = args.height or h, args.width or w, args.frames or f, args.batch or b
    layers = tuple(int(x) for x in args.layers.split(",")) if args.layers else None
    dev, dtype = torch.device("cuda"), torch.bfloat16
    t0 = time.time()
    model = build_transformer(args.model, layers, dev, dtype)
    inputs = make_inputs(args.model, b, dev, dtype, height=h, width=w, frames=f,
                         gen=torch.Generator(device=dev).manual_seed(0))
    card = torch.cuda.get_device_name()
    print(f"{args.model}: {h}x{w}x{f} batch {b}, layers {layers or 'all'}, {card}, built in {time.time() - t0:.1f} s")
    modes = ["eager", "compile"] if args.compile else ["eager"]
    rows = []
    for variant in args.variants.split(","):
        _install(model, variant)
        for mode in modes:
            try:
                rows.append(_measure(model, inputs, variant, mode, args))
            except Exception as exc:  # noqa: BLE001 - e.g. a graph break under --fullgraph: report, go on
                msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                print(f"{variant} ({mode}) failed: {msg}")
                rows.append({"variant": variant, "mode": mode, "error": msg})
    import sage3_diffusers
    sage3_diffusers.remove(model)
    print(f"{'variant':<24} {'mode':<8} {'median ms':>10} {'min ms':>9} {'speed-up':>9} {'attn share':>10} "
          f"{'ceiling':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<24} {r['mode']:<8} failed: {r['error']}")
            continue
        same_mode = [x for x in rows if x["mode"] == r["mode"] and "error" not in x]
        base = next((x["median_ms"] for x in same_mode if x["variant"] == "sdpa_default"), same_mode[0]["median_ms"])
        r["speedup_vs_sdpa_default"] = base / r["median_ms"]
        a = r.get("attention")
        share = f"{a['share']:.0%}" if a else "-"
        ceil = f"{a['ceiling']:.2f}x" if a else "-"
        print(f"{r['variant']:<24} {r['mode']:<8} {r['median_ms']:>10.2f} {r['min_ms']:>9.2f} "
              f"{r['speedup_vs_sdpa_default']:>8.2f}x {share:>10} {ceil:>8}")
    result = {"card": card, "model": args.model, "height": h, "width": w, "frames": f, "batch": b,
              "layers": layers, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "command": "python -m sage3_diffusers bench e2e " + " ".join(argv if argv is not None else sys.argv[1:]),
              "timing": f"CUDA events around one forward, median of {args.iters} after {args.warmup} warm-up",
              "attention_share": "GPU time of kernels under SDPA / sage3:: ops over all GPU time, one profiled forward",
              "rows": rows}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    if args.plot:
        plt = headless_pyplot()
        if plt is None:
            print("matplotlib not installed: no plot")
        else:
            fig, ax = plt.subplots(figsize=(6, 3))
            done = [r for r in rows if "error" not in r]
            ax.barh([f"{r['variant']} ({r['mode']})" for r in done], [r["median_ms"] for r in done])
            ax.set_xlabel("ms per transformer forward (median)")
            ax.set_title(f"{args.model} {h}x{w}x{f}, {card}")
            fig.tight_layout()
            fig.savefig(args.plot, dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
