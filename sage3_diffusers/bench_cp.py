"""Context-parallel benchmark: one transformer forward on N GPUs (Ulysses, ring, unified) against one GPU.

    torchrun --nproc-per-node 4 -m sage3_diffusers bench cp --model hunyuan_video --layers 2,4 --json cp.json
    torchrun --nproc-per-node 2 -m sage3_diffusers bench cp --tiny --model flux      # CPU / gloo smoke run

Rank 0 first times the forward alone (no parallelism): diffusers' default attention and our kernel (the
"sage2pp"/"sage3" dispatcher backend). Then, for each mode, every rank builds the same model (same seed), runs
`enable_parallelism(ContextParallelConfig(...))` and the forward is timed over all ranks (the slowest rank's time
per forward, median of `--iters` after warm-up). Reported: ms per forward, speed-up over our one-GPU run and over
diffusers' one-GPU default, scaling efficiency (speed-up over our one-GPU run / GPUs), and the output's cos sim and
max abs difference to our one-GPU output. Real shapes with random weights (as `bench e2e`), or `--tiny` models on
CPU processes (gloo) to check that the command runs; CPU timings say nothing about the kernels.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from .extras import headless_pyplot

DISPATCHER_NAME = {"int8_fp8": "sage2pp", "fp4": "sage3"}
MODES = ("ulysses", "ring", "unified")
_TINY_SHAPES = {"flux": dict(grid=(1, 4, 4), text_len=8), "hunyuan_video": dict(grid=(2, 4, 4), text_len=12),
                "cogvideox": dict(grid=(3, 2, 2), text_len=12)}


def _init_distributed():
    """(rank, world, device, created) from torchrun's environment (world 1 without it); created: this call
    initialised the process group (and the benchmark destroys it at the end)."""
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
        # diffusers places each rank at rank % torch.accelerator.device_count(), which is 0 on a CPU-only machine.
        torch.accelerator.device_count = lambda: 1
    created = world > 1 and not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device, created


def mode_degrees(mode: str, world: int) -> tuple[int, int] | None:
    """(ring_degree, ulysses_degree) of `mode` on `world` ranks, or None where the mode does not apply."""
    if world < 2:
        return None
    if mode == "ulysses":
        return 1, world
    if mode == "ring":
        return world, 1
    if mode == "unified":
        return (2, world // 2) if world >= 4 and world % 2 == 0 else None
    raise ValueError(f"unknown mode {mode!r}; allowed: {MODES}")


def _build(args, device, dtype):
    """(model, inputs) with the same weights and inputs on every rank."""
    if args.tiny:
        from .integration.tiny import tiny_transformer, transformer_inputs
        if args.model not in _TINY_SHAPES:
            raise SystemExit(f"--tiny supports {sorted(_TINY_SHAPES)}")
        model = tiny_transformer(args.model, layers=1).to(device)
        return model, transformer_inputs(args.model, batch=1, config=model.config, device=device,
                                         **_TINY_SHAPES[args.model])
    from .bench_e2e import DEFAULT_SIZES, build_transformer, make_inputs
    h, w, f, b = DEFAULT_SIZES[args.model]
    h, w, f, b = args.height or h, args.width or w, args.frames or f, args.batch or b
    layers = tuple(int(x) for x in args.layers.split(",")) if args.layers else None
    torch.manual_seed(0)
    model = build_transformer(args.model, layers, device, dtype)
    inputs = make_inputs(args.model, b, device, dtype, height=h, width=w, frames=f,
                         gen=torch.Generator(device=device).manual_seed(0))
    inputs["return_dict"] = False
    return model, inputs


def _set_kernel(model, variant: str) -> None:
    """variant: "default" (diffusers' own attention) or one of our kernel families: through its dispatcher backend,
    or through our processors for models that call SDPA directly (CogVideoX)."""
    if variant == "default":
        return
    if type(model).__name__ == "CogVideoXTransformer3DModel":
        from .integration import apply
        apply(model, kernel=variant, log_summary=False)
        return
    from .integration import register_dispatcher_backends
    register_dispatcher_backends()
    model.set_attention_backend(DISPATCHER_NAME[variant])


def _time(model, inputs, iters, warmup, device, world) -> tuple[list[float], torch.Tensor]:
    import torch.distributed as dist
    times, out = [], None
    with torch.inference_mode():
        for i in range(warmup + iters):
            if world > 1:
                dist.barrier()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model(**inputs)[0]
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = torch.tensor([(time.perf_counter() - t0) * 1e3], dtype=torch.float64)
            if world > 1:  # a forward lasts as long as its slowest rank
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=_cpu_group())
            if i >= warmup:
                times.append(elapsed.item())
    return times, out


_CPU_GROUP = None


def _cpu_group():
    """A gloo group for the host-side timing reductions (NCCL needs device tensors)."""
    global _CPU_GROUP
    import torch.distributed as dist
    if _CPU_GROUP is None:
        _CPU_GROUP = dist.new_group(backend="gloo")
    return _CPU_GROUP


def _compare(out, ref) -> dict:
    a, b = out.double().flatten().cpu(), ref.double().flatten().cpu()
    return {"cos": torch.nn.functional.cosine_similarity(a, b, dim=0).item(), "max_abs": (a - b).abs().max().item()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sage3_diffusers bench cp", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="hunyuan_video", help="flux, hunyuan_video, cogvideox (or a family of bench "
                                                             "e2e whose transformer has a context-parallel plan)")
    ap.add_argument("--tiny", action="store_true", help="tiny random model (CPU/gloo smoke run)")
    ap.add_argument("--layers", help="blocks per kind, e.g. 2,4 (as bench e2e); default: all")
    ap.add_argument("--kernel", default="int8_fp8", choices=sorted(DISPATCHER_NAME))
    ap.add_argument("--modes", default=",".join(MODES), help="comma list of ulysses, ring, unified")
    ap.add_argument("--no-baseline", action="store_true", help="skip diffusers' default attention on one GPU")
    ap.add_argument("--anything", action="store_true",
                    help="ulysses_anything / ring_anything: token counts or heads that do not split evenly")
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--frames", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", help="write results here (rank 0)")
    ap.add_argument("--plot", help="write a PNG chart here (rank 0)")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r}; allowed: {', '.join(MODES)}")

    import torch.distributed as dist
    import warnings
    from diffusers import ContextParallelConfig
    from .integration.context_parallel import prepare_context_parallel

    rank, world, device, created = _init_distributed()
    if device.type == "cpu" and not args.tiny:
        print("bench cp: real shapes need CUDA GPUs; use --tiny for a CPU smoke run")
        return 2
    if device.type == "cpu":
        import sage3_diffusers
        sage3_diffusers.set_fallback("emulate")  # the quantized numerics, emulated
        warnings.simplefilter("ignore")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows, reference = [], None

    # One GPU: rank 0 alone.
    if rank == 0:
        for variant in (["default"] if not args.no_baseline else []) + [args.kernel]:
            model, inputs = _build(args, device, dtype)
            _set_kernel(model, variant)
            times, out = _time(model, inputs, args.iters, args.warmup, device, 1)
            rows.append({"mode": "none", "gpus": 1, "variant": variant, "median_ms": statistics.median(times),
                         "times_ms": times})
            if variant == args.kernel:
                reference = out.float().cpu()
            del model, out
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if world > 1:
        dist.barrier()

    for mode in modes:
        degrees = mode_degrees(mode, world)
        if degrees is None:
            if rank == 0:
                print(f"skip {mode}: needs {'4+ (even) ranks' if mode == 'unified' else '2+ ranks'}, have {world}")
            continue
        model, inputs = _build(args, device, dtype)
        heads = getattr(model.config, "num_attention_heads", None)
        anything = {f"{mode}_anything": True} if args.anything and mode != "unified" else {}
        if heads is not None and heads % degrees[1] and not anything:
            if rank == 0:
                print(f"skip {mode}: {heads} heads do not split over ulysses degree {degrees[1]}")
            continue
        _set_kernel(model, args.kernel)
        prepare_context_parallel(model)
        model.enable_parallelism(config=ContextParallelConfig(ring_degree=degrees[0], ulysses_degree=degrees[1],
                                                              **anything))
        times, out = _time(model, inputs, args.iters, args.warmup, device, world)
        row = {"mode": mode + ("_anything" if anything else ""), "gpus": world, "ring_degree": degrees[0], "ulysses_degree": degrees[1],
               "variant": args.kernel, "median_ms": statistics.median(times), "times_ms": times}
        if rank == 0 and reference is not None:
            row.update(_compare(out.float().cpu(), reference))
        rows.append(row)
        del model, out
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if rank == 0:
        _report(args, rows, card, world)
    if world > 1:
        dist.barrier()
    if created:
        dist.destroy_process_group()
    return 0


def _report(args, rows, card, world):
    ours = next((r["median_ms"] for r in rows if r["mode"] == "none" and r["variant"] == args.kernel), None)
    default = next((r["median_ms"] for r in rows if r["mode"] == "none" and r["variant"] == "default"), None)
    print(f"{args.model}{' (tiny)' if args.tiny else ''}, layers {args.layers or 'all'}, {card}, {world} rank(s)")
    print(f"{'mode':<9} {'gpus':>4} {'variant':<9} {'median ms':>10} {'vs ours 1':>9} {'vs default 1':>12} "
          f"{'efficiency':>10} {'cos':>10} {'max abs':>9}")
    for r in rows:
        if ours is not None:
            r["speedup_vs_ours_1gpu"] = ours / r["median_ms"]
            if r["mode"] != "none":
                r["efficiency"] = r["speedup_vs_ours_1gpu"] / r["gpus"]
        if default is not None:
            r["speedup_vs_default_1gpu"] = default / r["median_ms"]
        fmt = lambda key, spec: format(r[key], spec) if key in r else "-"  # noqa: E731
        print(f"{r['mode']:<9} {r['gpus']:>4} {r['variant']:<9} {r['median_ms']:>10.2f} "
              f"{fmt('speedup_vs_ours_1gpu', '>8.2f')}x {fmt('speedup_vs_default_1gpu', '>11.2f')}x "
              f"{fmt('efficiency', '>10.2f')} {fmt('cos', '>10.7f')} {fmt('max_abs', '>9.2e')}")
    result = {"card": card, "world": world, "model": args.model, "tiny": args.tiny, "layers": args.layers,
              "kernel": args.kernel, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    if args.plot:
        plt = headless_pyplot()
        if plt is None:
            print("matplotlib not installed: no plot")
            return
        labels = [f"{r['mode']} x{r['gpus']} {r['variant']}" for r in rows]
        fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.5))
        ax.barh(labels, [r["median_ms"] for r in rows])
        for i, r in enumerate(rows):
            if "efficiency" in r and r["mode"] != "none":
                ax.text(r["median_ms"], i, f" {r['speedup_vs_ours_1gpu']:.2f}x, eff {r['efficiency']:.2f}",
                        va="center", fontsize=8)
        ax.set_xlabel("ms per transformer forward (median, slowest rank)")
        ax.set_title(f"{args.model} context parallel, {card}")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
