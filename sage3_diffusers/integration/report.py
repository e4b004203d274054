"""Per-layer accuracy report: a transformer forward with exact SDPA vs with a quantized kernel.

    python -m sage3_diffusers report --model flux --tiny [--kernel fp4 --kernel int8_fp8] [--json out.json]
        [--steps 8 --plot out.png]

For each attention layer (module output, out-projections included) it prints cos sim, relative L1
and RMSE against the exact run, twice:
- "isolated": the layer re-run with the quantized kernel on exactly the inputs it saw in the exact run
  (the error of that layer alone);
- "propagated": the layer inside a full quantized forward (errors of earlier layers included);
plus the same metrics for the transformer output. Metrics: `sage3_diffusers.numerics.accuracy_metrics`.
Without a GPU kernel for a family, the CPU run uses its torch emulation (fallback "emulate"), so the
numbers describe the numerics, not a kernel; the backend that ran is printed per kernel.

`--steps N` repeats this at N timesteps of a linear schedule from pure noise (1, 1 - 1/N, ..., 1/N in
normalised units) on the same latents; `--plot PNG` draws per-layer x per-step heat maps of the isolated
cos sim and relative L1 (matplotlib). Without `--tiny` the report loads hub weights and needs a CUDA GPU:
with no GPU, or with HF_HUB_OFFLINE=1 and no local copy of the weights, it stops at once saying so.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from ..numerics import accuracy_metrics


def _families() -> list[str]:
    from . import models
    return list(models.names())


def _flatten_output(out):
    if isinstance(out, (tuple, list)):
        return torch.cat([o.detach().float().flatten() for o in out if isinstance(o, torch.Tensor)])
    return out.detach().float().flatten()


def _load(model: str, tiny: bool, dtype, device, layers: int):
    from .tiny import tiny_transformer
    if tiny:
        m = tiny_transformer(model, layers=layers).to(device)
        return m if dtype == torch.float32 else m.to(dtype)
    import diffusers

    from . import models
    fam = models.get(model)
    if not fam.hub_id or not fam.report_shape:
        raise ValueError(f"report: model family {model!r} declares no hub id / report shapes: use --tiny")
    cls = getattr(diffusers, models.get(fam.transformer_family).transformer_classes[0])
    return cls.from_pretrained(fam.hub_id, subfolder="transformer", torch_dtype=dtype).to(device).eval()


def step_timesteps(model: str, steps: int, timestep=None) -> list:
    """Timesteps (model units) of the report's steps: `[timestep]` for one step (None: the model's default
    input), else a linear schedule from pure noise, normalised 1, 1 - 1/steps, ..., 1/steps."""
    from . import models
    if steps == 1:
        return [timestep]
    if timestep is not None:
        raise ValueError("timestep and steps > 1 exclude each other: the steps choose their own timesteps")
    scale = models.get(model).timestep_scale or 1000.0
    return [scale * (1.0 - i / steps) for i in range(steps)]


def run_report(model: str, *, kernels=("fp4", "int8_fp8"), tiny: bool = True, batch: int = 2, seed: int = 0,
               dtype=None, device=None, layers: int = 2, timestep=None, steps: int = 1) -> dict:
    """Per-layer metrics per kernel. result["kernels"][k]: "steps" (one entry per step: timestep, output and
    per-layer metrics), and "layers" / "output" of the first step (the only one unless steps > 1)."""
    from .. import dispatch
    from .install import apply, remove
    from .tiny import transformer_inputs

    for name, value in (("batch", batch), ("layers", layers), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"run_report: {name} must be an integer >= 1, got {value!r}")
    timesteps = step_timesteps(model, steps, timestep)
    device = device or ("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    dtype = dtype or (torch.float32 if device == "cpu" else torch.bfloat16)
    transformer = _load(model, tiny, dtype, device, layers)
    kw = dict(batch=batch, seed=seed, config=transformer.config, dtype=dtype, device=device)
    if not tiny:
        from . import models
        grid, text_len = models.get(model).report_shape
        kw.update(grid=grid, text_len=text_len)

    captured: dict = {}
    mode = {"phase": "exact"}

    def hook(name):
        def fn(module, args, kwargs, output):
            slot = captured.setdefault(name, {})
            if mode["phase"] == "exact":
                slot["args"], slot["kwargs"] = args, dict(kwargs)
                slot["exact"] = _flatten_output(output)
            elif mode["phase"] == "propagated":
                slot["propagated"] = _flatten_output(output)
        return fn

    previous_fallback = dispatch._fallback_override
    if previous_fallback is None and not torch.cuda.is_available():
        dispatch.set_fallback("emulate")
    handles = []
    result = {"model": model, "tiny": tiny, "dtype": str(dtype).replace("torch.", ""), "device": device,
              "batch": batch, "seed": seed, "timesteps": timesteps, "exact_seconds": 0.0, "kernels": {}}
    per_kernel = {k: {"backends": set(), "notes": set(), "seconds": 0.0, "steps": []} for k in kernels}
    try:
        runtime = apply(transformer, kernel="sdpa", log_summary=False)
        for name in runtime.layers:
            handles.append(transformer.get_submodule(name).register_forward_hook(hook(name), with_kwargs=True))
        for step, t in enumerate(timesteps):
            inputs = transformer_inputs(model, timestep=t, **kw)  # the same latents at every step
            runtime = apply(transformer, kernel="sdpa", log_summary=False)
            mode["phase"] = "exact"
            with torch.no_grad():
                t0 = time.perf_counter()
                exact_out = _flatten_output(transformer(**inputs))
                result["exact_seconds"] += time.perf_counter() - t0
            for kernel in kernels:
                acc = per_kernel[kernel]
                runtime = apply(transformer, kernel=kernel, log_summary=False)
                mode["phase"] = "propagated"
                with torch.no_grad():
                    t0 = time.perf_counter()
                    out = _flatten_output(transformer(**inputs))
                    acc["seconds"] += time.perf_counter() - t0
                acc["backends"] |= {c.backend for c in runtime.stats.calls}
                acc["notes"] |= {c.reason for c in runtime.stats.calls if c.reason}
                mode["phase"] = "isolated"
                per_layer = []
                with torch.no_grad():
                    for name in runtime.layers:
                        slot = captured[name]
                        module = transformer.get_submodule(name)
                        iso = _flatten_output(module(*slot["args"], **slot["kwargs"]))
                        per_layer.append({"layer": name,
                                          "isolated": accuracy_metrics(iso, slot["exact"]),
                                          "propagated": accuracy_metrics(slot["propagated"], slot["exact"])})
                acc["steps"].append({"step": step, "timestep": t, "output": accuracy_metrics(out, exact_out),
                                     "layers": per_layer})
        for kernel, acc in per_kernel.items():
            result["kernels"][kernel] = {"backends": sorted(acc["backends"]), "notes": sorted(acc["notes"]),
                                         "seconds": acc["seconds"], "output": acc["steps"][0]["output"],
                                         "layers": acc["steps"][0]["layers"], "steps": acc["steps"]}
    finally:
        for h in handles:
            h.remove()
        remove(transformer)
        dispatch.set_fallback(previous_fallback)
    return result


def format_report(result: dict) -> str:
    lines = [f"accuracy report: {result['model']} ({'tiny random' if result['tiny'] else 'hub weights'}), "
             f"{result['dtype']} on {result['device']}, batch {result['batch']}, seed {result['seed']}"]
    for kernel, r in result["kernels"].items():
        lines.append(f"\n== kernel {kernel}: backends {', '.join(r['backends'])}"
                     + (f" ({'; '.join(r['notes'])})" if r["notes"] else ""))
        steps = r.get("steps") or [{"step": 0, "timestep": None, "output": r["output"], "layers": r["layers"]}]
        for entry in steps:
            if len(steps) > 1:
                lines.append(f"-- step {entry['step']} (timestep {entry['timestep']:g})")
            lines.append(f"{'layer':52s} {'iso cos':>10s} {'iso relL1':>10s} {'iso rmse':>10s}   "
                         f"{'prop cos':>10s} {'prop relL1':>10s} {'prop rmse':>10s}")
            for row in entry["layers"]:
                i, p = row["isolated"], row["propagated"]
                lines.append(f"{row['layer']:52s} {i['cos_sim']:10.6f} {i['rel_l1']:10.2e} {i['rmse']:10.2e}   "
                             f"{p['cos_sim']:10.6f} {p['rel_l1']:10.2e} {p['rmse']:10.2e}")
            o = entry["output"]
            lines.append(f"{'transformer output':52s} {'':32s}   {o['cos_sim']:10.6f} {o['rel_l1']:10.2e} "
                         f"{o['rmse']:10.2e}")
    return "\n".join(lines)


def plot_report(result: dict, path: str) -> str:
    """Write a PNG: per kernel, heat maps (layers x steps) of the isolated cos sim and relative L1."""
    from ..extras import headless_pyplot
    plt = headless_pyplot("report --plot")
    import numpy as np

    kernels = list(result["kernels"])
    first = result["kernels"][kernels[0]]
    layers = [row["layer"] for row in first["steps"][0]["layers"]]
    n_steps = len(first["steps"])
    fig, axes = plt.subplots(len(kernels), 2, squeeze=False,
                             figsize=(4 + 0.5 * n_steps * 2 + 6, 1.5 + 0.28 * len(layers) * len(kernels)))
    for row_axes, kernel in zip(axes, kernels):
        steps = result["kernels"][kernel]["steps"]
        for ax, metric, title, cmap in ((row_axes[0], "cos_sim", "cos sim", "viridis"),
                                        (row_axes[1], "rel_l1", "relative L1", "magma_r")):
            grid = np.array([[entry["layers"][li]["isolated"][metric] for entry in steps]
                             for li in range(len(layers))])
            im = ax.imshow(grid, aspect="auto", cmap=cmap, interpolation="nearest")
            fig.colorbar(im, ax=ax)
            ax.set_title(f"{kernel}: {title} (isolated layer output)", fontsize=9)
            ax.set_xlabel("step (timestep)")
            ax.set_xticks(range(n_steps))
            ax.set_xticklabels([f"{e['step']}" + ("" if e["timestep"] is None else f"\n{e['timestep']:g}")
                                for e in steps], fontsize=7)
            ax.set_yticks(range(len(layers)))
            ax.set_yticklabels(layers, fontsize=7)
            if grid.size <= 400:
                fmt = "{:.4f}" if metric == "cos_sim" else "{:.1e}"
                for (yi, xi), value in np.ndenumerate(grid):
                    r, g, b, _ = im.cmap(im.norm(value))
                    ink = "k" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "w"  # readable on the cell
                    ax.text(xi, yi, fmt.format(value), ha="center", va="center", fontsize=6, color=ink)
    fig.suptitle(f"sage3 accuracy vs exact SDPA: {result['model']} "
                 f"({'tiny random' if result['tiny'] else 'hub weights'}, {result['dtype']} on {result['device']})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (report's and the examples' counts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _check_real_model_runnable(model: str) -> str | None:
    """Why a report on hub weights cannot start here (no hub id or shapes declared; no GPU; offline with no
    local copy), or None."""
    from . import models
    hub_id = models.get(model).hub_id
    if not hub_id or not models.get(model).report_shape:
        return f"model family {model!r} declares no hub id / report shapes: use --tiny"
    if not torch.cuda.is_available():
        return (f"without --tiny the report loads {hub_id} and runs it on a CUDA GPU, and torch sees none "
                f"here; use --tiny for a tiny random model on CPU")
    import os
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline:
        try:
            from huggingface_hub import try_to_load_from_cache
            cached = try_to_load_from_cache(hub_id, "transformer/config.json")
        except Exception:  # noqa: BLE001 - any failure to look counts as "not cached"
            cached = None
        if not isinstance(cached, str):
            return (f"HF_HUB_OFFLINE is set and the local Hugging Face cache has no {hub_id}; download it "
                    f"first or unset HF_HUB_OFFLINE, or use --tiny")
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sage3_diffusers report", description=__doc__.split("\n\n")[0],
                                 epilog="Without --tiny: hub weights on a CUDA GPU (fails at once without one).")
    ap.add_argument("--model", required=True, choices=_families(), help="model family")
    ap.add_argument("--tiny", action="store_true", help="tiny random model built from config (CPU, no download)")
    ap.add_argument("--kernel", action="append", dest="kernels",
                    help="kernel or backend name to compare (repeatable; default: fp4 and int8_fp8)")
    ap.add_argument("--batch", type=positive_int, default=2, help="samples per forward (>= 1, default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=positive_int, default=2,
                    help="blocks per block list of the tiny model (>= 1, default 2)")
    ap.add_argument("--steps", type=positive_int, default=1,
                    help="timesteps to evaluate, a linear schedule from pure noise (>= 1, default 1)")
    ap.add_argument("--timestep", type=float, default=None,
                    help="timestep passed to the model (model units), with --steps 1")
    ap.add_argument("--json", metavar="PATH", help="also write the full result as JSON ('-' = stdout only JSON)")
    ap.add_argument("--plot", metavar="PNG", help="write per-layer x per-step heat maps of the isolated cos sim "
                                                  "and relative L1 (needs matplotlib)")
    args = ap.parse_args(argv)
    from ..extras import require
    from .policy import allowed_kernels
    kernels = args.kernels or ["fp4", "int8_fp8"]
    for k in kernels:
        if k not in allowed_kernels():
            ap.error(f"unknown kernel {k!r}; allowed: {', '.join(allowed_kernels())}")
    if args.timestep is not None and args.steps > 1:
        ap.error("--timestep and --steps > 1 exclude each other: the steps choose their own timesteps")
    require("diffusers", "report")
    if args.plot:
        require("matplotlib", "report --plot")  # before the run, not after it
    if not args.tiny:
        why = _check_real_model_runnable(args.model)
        if why:
            ap.error(why)
    result = run_report(args.model, kernels=kernels, tiny=args.tiny, batch=args.batch, seed=args.seed,
                        layers=args.layers, timestep=args.timestep, steps=args.steps)
    if args.json == "-":
        json.dump(result, sys.stdout, indent=1)
        print()
    else:
        print(format_report(result))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
            print(f"\nwrote {args.json}")
    if args.plot:
        plot_report(result, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr if args.json == "-" else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
