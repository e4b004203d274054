"""Shared driver of the examples: build a pipeline (hub weights, or tiny random components with --tiny),
install Sage3 attention with a policy, generate, save PNG / GIF / MP4, print wall time and kernel stats."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
try:
    import sage3_diffusers  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def family_spec(family: str):
    """The model registry's entry: hub id, pipeline class, the model card's call arguments, prompt, video."""
    from sage3_diffusers.integration import models
    return models.get(family)


def _kernel(text: str) -> str:
    from sage3_diffusers.integration.policy import allowed_kernels
    if text not in allowed_kernels():
        raise argparse.ArgumentTypeError(f"unknown kernel {text!r}; allowed: {', '.join(allowed_kernels())}")
    return text


def parse_args(family: str, argv=None):
    from sage3_diffusers.integration.policy import PolicyError, bundled_policies, load_policy
    from sage3_diffusers.integration.report import positive_int

    ap = argparse.ArgumentParser(description=f"{family} with Sage3 attention (SageAttention3 / SageAttention2++)")
    ap.add_argument("--tiny", action="store_true", help="tiny random components built from config: CPU, offline")
    ap.add_argument("--policy", default=family,
                    help=f"a bundled policy name ({', '.join(bundled_policies())}), a policy YAML file or a kernel "
                         f"(default: {family}, the bundled {family} policy); see docs/diffusers.md")
    ap.add_argument("--kernel", type=_kernel, metavar="KERNEL",
                    help="one kernel for every layer and step instead of the policy: auto, fp4, int8_fp8, sdpa or a "
                         "backend name")
    ap.add_argument("--no-sage", action="store_true", help="baseline: diffusers' own attention")
    ap.add_argument("--prompt", default=family_spec(family).example.prompt)
    ap.add_argument("--steps", type=positive_int,
                    help="denoising steps, >= 1 (default: 4 with --tiny, the model card's value otherwise)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="outputs", help="output directory")
    ap.add_argument("--fallback", choices=("auto", "emulate", "error"),
                    help="when a kernel is missing: auto = next family (default on GPU), emulate = torch "
                         "emulation of its numerics (default on CPU), error")
    ap.add_argument("--compile", action="store_true", help="torch.compile the transformer")
    ap.add_argument("--model", help="override the hub id (real mode)")
    ap.add_argument("--cp", choices=("ulysses", "ring", "unified", "ulysses_anything", "ring_anything"),
                    help="context parallelism over the processes of `torchrun --nproc-per-node N` (one GPU each; "
                         "CPU processes with --tiny); *_anything: token counts (or heads) that do not split evenly")
    args = ap.parse_args(argv)
    if args.tiny and family_spec(family).tiny_pipeline is None:
        ap.error(f"--tiny: the {family} family has no tiny pipeline (sage3_diffusers/integration/models/ declares "
                 f"none for it); run it on hub weights, or test its tiny transformer directly")
    if not args.kernel and not args.no_sage:
        try:  # a bad policy is a usage error, before any model is built
            load_policy(args.policy)
        except PolicyError as e:
            ap.error(f"--policy: {e}")
    return args


def setup_context_parallel(args):
    """--cp: join torchrun's process group and pin this process to its GPU. Returns (rank, world)."""
    import torch.distributed as dist
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        raise SystemExit("--cp needs several processes: torchrun --nproc-per-node N examples/<model>.py --cp ...")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:  # diffusers places rank r at r % torch.accelerator.device_count(), 0 on a CPU-only machine
        torch.accelerator.device_count = lambda: 1
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank, world


def enable_context_parallel(family, pipe, args, world):
    """apply (our kernels with the per-layer / per-step policy; it attaches the model registry's sequence plan where
    diffusers has none), then diffusers' enable_parallelism. Returns (runtime or None, log line)."""
    from diffusers import ContextParallelConfig
    from sage3_diffusers.integration import apply, models
    from sage3_diffusers.integration.context_parallel import prepare_context_parallel

    fam = models.find(family)
    if fam.route == "processor" and not fam.processor.supports_context_parallel:
        raise SystemExit(f"--cp: {family} has no context-parallel path (its processors call SDPA directly and no "
                         "sequence plan exists for it)")
    runtime = None
    if args.no_sage:  # diffusers' own attention; our plan where diffusers has none
        if fam.route == "processor":
            raise SystemExit(f"--cp with {family} needs our processors (diffusers' own cannot run the plan)")
        prepare_context_parallel(pipe.transformer)
        kernel = "diffusers default"
    else:
        runtime = apply(pipe, kernel=args.kernel) if args.kernel else apply(pipe, args.policy)
        kernel = args.kernel or f"policy {runtime.policy.source}"
    mode, anything = args.cp.replace("_anything", ""), args.cp.endswith("_anything")
    degrees = {"ulysses": (1, world), "ring": (world, 1), "unified": (2, world // 2)}[mode]
    if mode == "unified" and (world < 4 or world % 2):
        raise SystemExit("--cp unified needs an even number of processes, 4 or more")
    pipe.transformer.enable_parallelism(config=ContextParallelConfig(
        ring_degree=degrees[0], ulysses_degree=degrees[1], **({f"{mode}_anything": True} if anything else {})))
    return runtime, (f"context parallel {args.cp} over {world} processes (ring {degrees[0]}, ulysses "
                     f"{degrees[1]}), kernel {kernel}")


def build_pipeline(family: str, args):
    if args.tiny:
        from sage3_diffusers.integration.tiny import tiny_pipeline
        return tiny_pipeline(family), "cpu"
    import diffusers
    spec = family_spec(family)
    hub_id, cls_name = spec.hub_id, spec.pipeline_class
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = getattr(diffusers, cls_name).from_pretrained(args.model or hub_id, torch_dtype=torch.bfloat16)
    pipe.to(device)
    if spec.example.video and hasattr(pipe, "vae") and hasattr(pipe.vae, "enable_tiling"):
        pipe.vae.enable_tiling()
    return pipe, device


def call_kwargs(family: str, args):
    if args.tiny:
        from sage3_diffusers.integration.tiny import pipeline_call_kwargs
        return pipeline_call_kwargs(family, prompt=args.prompt, steps=4 if args.steps is None else args.steps,
                                    seed=args.seed)
    kw = dict(family_spec(family).example.call_kwargs)
    if args.steps is not None:
        kw["num_inference_steps"] = args.steps
    kw.update(prompt=args.prompt, generator=torch.Generator("cpu").manual_seed(args.seed))
    return kw


def save(family: str, result, out_dir: Path, tag: str) -> Path:
    """PNG for images; MP4 for videos when the `video` extra (imageio-ffmpeg) is installed, else GIF (Pillow)
    with one line saying how to get MP4."""
    from sage3_diffusers.extras import available, install_hint

    out_dir.mkdir(parents=True, exist_ok=True)
    if not family_spec(family).example.video:
        path = out_dir / f"{family}_{tag}.png"
        result.images[0].save(path)
        return path
    from diffusers.utils import export_to_gif, export_to_video
    frames = result.frames[0]
    if available("imageio_ffmpeg"):
        return Path(export_to_video(frames, str(out_dir / f"{family}_{tag}.mp4"), fps=8))
    print(f"writing a GIF: MP4 needs imageio-ffmpeg, install it with: {install_hint('imageio_ffmpeg')}")
    return Path(export_to_gif(frames, str(out_dir / f"{family}_{tag}.gif"), fps=8))


def run(family: str, argv=None) -> int:
    from sage3_diffusers.extras import MissingExtraError, require
    args = parse_args(family, argv)
    try:
        require("diffusers", f"examples/{family}.py")
    except MissingExtraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    import sage3_diffusers
    from sage3_diffusers.integration import apply

    fallback = args.fallback or ("emulate" if not torch.cuda.is_available() else None)
    if fallback:
        sage3_diffusers.set_fallback(fallback)
    rank, world = setup_context_parallel(args) if args.cp else (0, 1)
    pipe, device = build_pipeline(family, args)
    pipe.set_progress_bar_config(disable=rank != 0)
    runtime = None
    if args.cp:
        runtime, line = enable_context_parallel(family, pipe, args, world)
        if rank == 0:
            print(line)
    elif not args.no_sage:
        runtime = apply(pipe, kernel=args.kernel) if args.kernel else apply(pipe, args.policy)
        print(f"sage3: policy {runtime.policy.source if not args.kernel else 'kernel=' + args.kernel}, "
              f"fallback {sage3_diffusers.dispatch.get_fallback()}, device {device}")
    if args.compile:
        if device == "cpu":
            print("torch.compile on CPU: compiling takes a minute or more (several on a busy machine) before the first "
                  "step runs")
        pipe.transformer = torch.compile(pipe.transformer)
    kw = call_kwargs(family, args)
    t0 = time.perf_counter()
    result = pipe(**kw)
    wall = time.perf_counter() - t0
    if rank != 0:
        return 0
    tag = "baseline" if args.no_sage else (args.kernel or "policy")
    if args.cp:
        tag = f"{tag}_cp_{args.cp}{world}"
    path = save(family, result, Path(args.out), ("tiny_" if args.tiny else "") + tag)
    print(f"saved {path}")
    print(f"wall time {wall:.2f} s ({kw['num_inference_steps']} steps)")
    if runtime is not None:
        print(runtime.stats.summary_line())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run(os.environ.get("SAGE3_EXAMPLE_FAMILY", "flux")))
