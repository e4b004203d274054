"""Per-layer accuracy report: a transformer forward with exact SDPA vs with a quantized kernel.

    python -m sage3_diffusers report --model flux --tiny [--kernel fp4 --kernel int8_fp8] [--json out.json]

For each attention layer (module output, out-projections included) it prints cos sim, relative L1
and RMSE against the exact run, twice:
- "isolated": the layer re-run with the quantized kernel on exactly the inputs it saw in the exact run
  (the error of that layer alone);
- "propagated": the layer inside a full quantized forward (errors of earlier layers included);
plus the same metrics for the transformer output. Metrics: `sage3_diffusers.numerics.accuracy_metrics`.
Without a GPU kernel for a family, the CPU run uses its torch emulation (fallback "emulate"), so the
numbers describe the numerics, not a kernel; the backend that ran is printed per kernel.
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


def run_report(model: str, *, kernels=("fp4", "int8_fp8"), tiny: bool = True, batch: int = 2, seed: int = 0,
               dtype=None, device=None, layers: int = 2, timestep=None) -> dict:
    from .. import dispatch
    from .install import apply, remove
    from .tiny import transformer_inputs

    device = device or ("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    dtype = dtype or (torch.float32 if device == "cpu" else torch.bfloat16)
    transformer = _load(model, tiny, dtype, device, layers)
    kw = dict(batch=batch, seed=seed, timestep=timestep, config=transformer.config, dtype=dtype, device=device)
    if not tiny:
        from . import models
        grid, text_len = models.get(model).report_shape
        kw.update(grid=grid, text_len=text_len)
    inputs = transformer_inputs(model, **kw)

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
    try:
        runtime = apply(transformer, kernel="sdpa", log_summary=False)
        for name in runtime.layers:
            handles.append(transformer.get_submodule(name).register_forward_hook(hook(name), with_kwargs=True))
        with torch.no_grad():
            t0 = time.perf_counter()
            exact_out = _flatten_output(transformer(**inputs))
            exact_s = time.perf_counter() - t0
        result = {"model": model, "tiny": tiny, "dtype": str(dtype).replace("torch.", ""), "device": device,
                  "batch": batch, "seed": seed, "exact_seconds": exact_s, "kernels": {}}
        for kernel in kernels:
            runtime = apply(transformer, kernel=kernel, log_summary=False)
            mode["phase"] = "propagated"
            with torch.no_grad():
                t0 = time.perf_counter()
                out = _flatten_output(transformer(**inputs))
                secs = time.perf_counter() - t0
            backends = sorted({c.backend for c in runtime.stats.calls})
            notes = sorted({c.reason for c in runtime.stats.calls if c.reason})
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
            result["kernels"][kernel] = {"backends": backends, "notes": notes, "seconds": secs,
                                         "output": accuracy_metrics(out, exact_out), "layers": per_layer}
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
        lines.append(f"{'layer':52s} {'iso cos':>10s} {'iso relL1':>10s} {'iso rmse':>10s}   "
                     f"{'prop cos':>10s} {'prop relL1':>10s} {'prop rmse':>10s}")
        for row in r["layers"]:
            i, p = row["isolated"], row["propagated"]
            lines.append(f"{row['layer']:52s} {i['cos_sim']:10.6f} {i['rel_l1']:10.2e} {i['rmse']:10.2e}   "
                         f"{p['cos_sim']:10.6f} {p['rel_l1']:10.2e} {p['rmse']:10.2e}")
        o = r["output"]
        lines.append(f"{'transformer output':52s} {'':32s}   {o['cos_sim']:10.6f} {o['rel_l1']:10.2e} "
                     f"{o['rmse']:10.2e}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="sage3-diffusers report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, choices=_families(), help="model family")
    ap.add_argument("--tiny", action="store_true", help="tiny random model built from config (CPU, no download)")
    ap.add_argument("--kernel", action="append", dest="kernels",
                    help="kernel or backend name to compare (repeatable; default: fp4 and int8_fp8)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=2, help="blocks per block list of the tiny model")
    ap.add_argument("--timestep", type=float, default=None, help="timestep passed to the model (model units)")
    ap.add_argument("--json", metavar="PATH", help="also write the full result as JSON ('-' = stdout only JSON)")
    args = ap.parse_args(argv)
    from .policy import allowed_kernels
    kernels = args.kernels or ["fp4", "int8_fp8"]
    for k in kernels:
        if k not in allowed_kernels():
            ap.error(f"unknown kernel {k!r}; allowed: {', '.join(allowed_kernels())}")
    result = run_report(args.model, kernels=kernels, tiny=args.tiny, batch=args.batch, seed=args.seed,
                        layers=args.layers, timestep=args.timestep)
    if args.json == "-":
        json.dump(result, sys.stdout, indent=1)
        print()
        return 0
    print(format_report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
