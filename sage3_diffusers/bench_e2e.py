"""End-to-end benchmark: one transformer forward of each model family at its real size and resolution.

    python -m sage3_diffusers bench e2e --model flux --layers 2,4 --variants sdpa,int8_fp8 --json out.json

The transformer is built from the real model's config with random weights (no download), optionally with fewer
blocks (`--layers`, per block kind) so the run fits a time budget; the per-forward time of each variant is
measured with CUDA events (median of `--iters` after warm-up) and reported with the ratio to diffusers' own
processors (SDPA, cuDNN backend pinned first) and the attention share of the forward. Random weights give
meaningless images but representative timings: every block has the real shapes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


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


def _time_forward(model, inputs, iters: int, warmup: int) -> list[float]:
    times = []
    with torch.inference_mode():
        for i in range(warmup + iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(**inputs, return_dict=False)
            end.record()
            torch.cuda.synchronize()
            if i >= warmup:
                times.append(start.elapsed_time(end))
    return times


def _install(model, variant: str) -> None:
    """variant: "sdpa_default" (diffusers' own attention) or a kernel ("sdpa", "int8_fp8", "fp4", or a backend
    name) for every attention layer through `apply` (our backend or our processors, per the family's route)."""
    import sage3_diffusers
    sage3_diffusers.remove(model)
    if variant != "sdpa_default":
        sage3_diffusers.apply(model, kernel=variant, log_summary=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="sage3-diffusers bench e2e", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="flux", choices=sorted(MODEL_CONFIGS))
    ap.add_argument("--layers", default=None, help="blocks per kind, e.g. 2,4 for Flux (double,single); default: all")
    ap.add_argument("--variants", default="sdpa_default,int8_fp8",
                    help="comma list: sdpa_default (diffusers' processors), sdpa, int8_fp8, fp4 or a backend name")
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--frames", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
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
    rows = []
    for variant in args.variants.split(","):
        _install(model, variant)
        times = _time_forward(model, inputs, args.iters, args.warmup)
        rows.append({"variant": variant, "median_ms": statistics.median(times), "min_ms": min(times),
                     "times_ms": times})
    import sage3_diffusers
    sage3_diffusers.remove(model)
    base = next((r["median_ms"] for r in rows if r["variant"] == "sdpa_default"), rows[0]["median_ms"])
    print(f"{'variant':<28} {'median ms':>10} {'min ms':>9} {'speed-up':>9}")
    for r in rows:
        r["speedup_vs_sdpa_default"] = base / r["median_ms"]
        print(f"{r['variant']:<28} {r['median_ms']:>10.2f} {r['min_ms']:>9.2f} {r['speedup_vs_sdpa_default']:>8.2f}x")
    result = {"card": card, "model": args.model, "height": h, "width": w, "frames": f, "batch": b,
              "layers": layers, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    if args.plot:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib not installed: no plot")
        else:
            fig, ax = plt.subplots(figsize=(6, 3))
            ax.barh([r["variant"] for r in rows], [r["median_ms"] for r in rows])
            ax.set_xlabel("ms per transformer forward (median)")
            ax.set_title(f"{args.model} {h}x{w}x{f}, {card}")
            fig.tight_layout()
            fig.savefig(args.plot, dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
