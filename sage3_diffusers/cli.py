"""Command line: `sage3-diffusers env` (or `python -m sage3_diffusers env`), plus the bench, report and calibrate
tools."""
from __future__ import annotations

import argparse
import importlib
import platform
import sys
import warnings

import torch

from .backends.base import AttentionProblem, CompiledExtension
from .backends.cuda_fp4 import FP4_EXT
from .backends.cuda_sm90 import SM90_EXT
from . import perf_model, selfcheck
from .dispatch import backend_reasons, get_fallback, list_backends, select_backend

_EXTENSIONS = (SM90_EXT, FP4_EXT)


def _extension_status(ext: CompiledExtension) -> str:
    return "built" if ext.module() is not None else f"not built ({ext.error})"


def _probe_problem(head_dim: int) -> AttentionProblem:
    on_cuda = torch.cuda.is_available()
    return AttentionProblem(
        batch=1, heads_q=24, heads_kv=24, seq_q=4608, seq_kv=4608, head_dim=head_dim, head_dim_v=head_dim,
        dtype=torch.bfloat16, device_type="cuda" if on_cuda else "cpu",
        capability=torch.cuda.get_device_capability() if on_cuda else None, layout="HND", is_causal=False,
        return_lse=False, has_mask=False)


def env_report() -> str:
    lines = [f"sage3-diffusers {importlib.import_module('sage3_diffusers').__version__}",
             f"python {platform.python_version()}, torch {torch.__version__}, CUDA runtime {torch.version.cuda}"]
    try:
        import triton
        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton: not installed")
    try:
        import diffusers
        lines.append(f"diffusers {diffusers.__version__}")
    except ImportError:
        lines.append("diffusers: not installed (needed for the processors only)")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            maj, mi = torch.cuda.get_device_capability(i)
            lines.append(f"GPU {i}: {torch.cuda.get_device_name(i)}, sm_{maj}{mi}")
    else:
        lines.append("GPU: none visible to torch (CUDA not available)")
    lines.append("compiled extensions:")
    lines += [f"  {ext.name}: {_extension_status(ext)}" for ext in _EXTENSIONS]
    lines.append(f"fallback when a family has no kernel: {get_fallback()} (SAGE3_FALLBACK)")
    lines.append(f"speed table for kernel='auto': {perf_model.describe()}")
    for hd in (128, 64):
        p = _probe_problem(hd)
        lines.append(f"backends for a Flux-like bf16 call (head_dim {hd}) on this machine:")
        for b in list_backends():
            reasons = backend_reasons(b, p)
            state = "can run" if not reasons else "cannot run: " + "; ".join(reasons)
            tag = "" if b.auto_eligible else " [emulation, never auto]"
            lines.append(f"  {b.name:<22} {b.family:<9} {state}{tag}")
            lines.append(f"  {'':<22} {'':<9} verified: {b.verified}")
        for kernel in ("auto", "fp4", "int8_fp8"):
            try:
                with warnings.catch_warnings():  # the note below says the same
                    warnings.simplefilter("ignore")
                    sel = select_backend(p, kernel)
                lines.append(f"  kernel={kernel!r} -> {sel.backend.name}" + (f" ({sel.note})" if sel.note else ""))
            except ValueError as e:
                lines.append(f"  kernel={kernel!r} -> error: {e}")
    lines += selfcheck.report_lines()  # the selections above ran the check of each compiled kernel they chose
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sage3-diffusers")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="versions, GPU, built kernels, which backends can run here and why not")
    sub.add_parser("bench", help="`bench kernels ...` (kernel table), `bench e2e ...` (transformer forward) or "
                                 "`bench cp ...` (context parallel, under torchrun)",
                   add_help=False)
    sub.add_parser("report", help="per-layer accuracy report of a model (see `sage3-diffusers report --help`)",
                   add_help=False)
    sub.add_parser("calibrate", help="per-layer/per-step policy within an error budget, from your prompts (see "
                   "`sage3-diffusers calibrate --help`)", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "env":
        print(env_report())
        return 0
    module = {"bench": "sage3_diffusers.bench", "report": "sage3_diffusers.integration.report",
              "calibrate": "sage3_diffusers.integration.calibrate"}[args.command]
    if args.command == "bench" and rest[:1] == ["e2e"]:
        module, rest = "sage3_diffusers.bench_e2e", rest[1:]
    if args.command == "bench" and rest[:1] == ["cp"]:  # run under torchrun: see bench_cp
        module, rest = "sage3_diffusers.bench_cp", rest[1:]
    return importlib.import_module(module).main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
