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

# family: (diffusers class name, config overrides of the class defaults, names of the block-count arguments)
MODEL_CONFIGS = {
    "flux": ("FluxTransformer2DModel", {"guidance_embeds": True}, ("num_layers", "num_single_layers")),
    "sd35": ("SD3Transformer2DModel", {"num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
                                       "pos_embed_max_size": 192, "qk_norm": "rms_norm"}, ("num_layers",)),
    "cogvideox": ("CogVideoXTransformer3DModel", {}, ("num_layers",)),
    "hunyuan_video": ("HunyuanVideoTransformer3DModel", {}, ("num_layers", "num_single_layers")),
    "mochi": ("MochiTransformer3DModel", {}, ("num_layers",)),
}


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
    """Transformer kwargs at the pipeline's real shapes (latents: VAE /8 spatially, video /4 temporally)."""
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    lat_h, lat_w = height // 8, width // 8
    lat_f = (frames - 1) // 4 + 1 if frames > 1 else 1
    if family == "flux":  # 2x2 packed latents, 512 T5 tokens
        h2, w2 = lat_h // 2, lat_w // 2
        img_ids = torch.zeros(h2, w2, 3, device=device)
        img_ids[..., 1] = torch.arange(h2, device=device)[:, None]
        img_ids[..., 2] = torch.arange(w2, device=device)[None, :]
        return dict(hidden_states=rnd(batch, h2 * w2, 64), encoder_hidden_states=rnd(batch, 512, 4096),
                    pooled_projections=rnd(batch, 768), timestep=torch.full((batch,), 0.5, device=device),
                    img_ids=img_ids.flatten(0, 1), txt_ids=torch.zeros(512, 3, device=device),
                    guidance=torch.full((batch,), 3.5, device=device))
    if family == "sd35":  # 77 CLIP + 256 T5 tokens
        return dict(hidden_states=rnd(batch, 16, lat_h, lat_w), encoder_hidden_states=rnd(batch, 333, 4096),
                    pooled_projections=rnd(batch, 2048), timestep=torch.full((batch,), 500.0, device=device))
    if family == "cogvideox":  # frames second, 226 T5 tokens
        return dict(hidden_states=rnd(batch, lat_f, 16, lat_h, lat_w), encoder_hidden_states=rnd(batch, 226, 4096),
                    timestep=torch.full((batch,), 500, device=device, dtype=torch.long))
    if family == "hunyuan_video":  # 256 Llama tokens, right-padded: keep 200 valid
        mask = torch.zeros(batch, 256, device=device, dtype=torch.bool)
        mask[:, :200] = True
        return dict(hidden_states=rnd(batch, 16, lat_f, lat_h, lat_w), timestep=torch.full((batch,), 500.0, device=device),
                    encoder_hidden_states=rnd(batch, 256, 4096), encoder_attention_mask=mask,
                    pooled_projections=rnd(batch, 768), guidance=torch.full((batch,), 6016.0, device=device))
    if family == "mochi":  # 12 latent channels, /6 temporal compression
        lat_f = (frames - 1) // 6 + 1
        mask = torch.zeros(batch, 256, device=device, dtype=torch.bool)
        mask[:, :200] = True
        return dict(hidden_states=rnd(batch, 12, lat_f, lat_h, lat_w), encoder_hidden_states=rnd(batch, 256, 4096),
                    timestep=torch.full((batch,), 500.0, device=device), encoder_attention_mask=mask)
    raise ValueError(f"unknown family {family!r}; known: {sorted(MODEL_CONFIGS)}")


DEFAULT_SIZES = {  # (height, width, frames, batch): the pipelines' defaults (batch 2 where CFG is batched)
    "flux": (1024, 1024, 1, 1),
    "sd35": (1024, 1024, 1, 2),
    "cogvideox": (480, 720, 49, 2),
    "hunyuan_video": (720, 1280, 129, 1),
    "mochi": (480, 848, 163, 2),
}


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
    """variant: "sdpa_default" (diffusers' own processors) or a kernel ("sdpa", "int8_fp8", "fp4", or a backend
    name) for every attention layer through our processors."""
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
