"""Command line: `python -m sage3_diffusers COMMAND` (or `sage3-diffusers COMMAND`).

Commands: `env` (what is installed, built and can run here), `bench` (kernel table, end-to-end forward), `report`
(per-layer accuracy of a model), `calibrate` (a policy within an error budget). Each command's own options:
`python -m sage3_diffusers COMMAND --help`.
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import warnings

import torch

from .backends.base import FAMILIES, AttentionProblem, CompiledExtension, build_hint
from .backends.cuda_fp4 import FP4_EXT
from .backends.cuda_sm90 import SM90_EXT
from . import perf_model, selfcheck
from .dispatch import FALLBACKS, backend_reasons, get_fallback, list_backends, select_backend
from .extras import MissingExtraError

PROG = "python -m sage3_diffusers"
_EXTENSIONS = ((SM90_EXT, "sm90", "9.0a"), (FP4_EXT, "fp4", "12.0a"))
_PROBE_KERNELS = ("auto", "fp4", "int8_fp8")

ENV_DESCRIPTION = ("Versions, GPU, which CUDA extensions are built (and how to build them here), the active SAGE3_* "
                   "settings, the bundled policies, and which attention backends can run a Flux-like bf16 call on "
                   "this machine and why the others cannot (head_dim 128; for head_dim 64 only what differs).")
# Subcommands of `bench`: name -> (module whose main() runs it, whether main() gets the name as its first
# argument, help).
BENCH_COMMANDS = {
    "kernels": ("sage3_diffusers.bench", True, "attention kernels in every mode: TFLOPS, host µs, memory, accuracy "
                                               "(GPU)"),
    "table": ("sage3_diffusers.bench", True, "write the per-card speed table of kernel='auto' from a `kernels --json` "
                                             "file"),
    "plot": ("sage3_diffusers.bench", True, "draw the PNG of a `bench kernels --json` result"),
    "e2e": ("sage3_diffusers.bench_e2e", False, "one transformer forward at a model's real size, per processor "
                                                "variant (GPU)"),
    "cp": ("sage3_diffusers.bench_cp", False, "context parallel: one forward on N processes vs one (under "
                                              "torchrun)"),
}
# Other commands: name -> (module whose main() runs it, help).
COMMANDS = {
    "report": ("sage3_diffusers.integration.report", "per-layer accuracy of a model vs exact SDPA (text, JSON, "
                                                     "heat map PNG)"),
    "calibrate": ("sage3_diffusers.integration.calibrate", "per-layer/per-step policy within an error budget, from "
                                                           "your prompts"),
}


def _extension_status(ext: CompiledExtension) -> str:
    return "built" if ext.module() is not None else f"not built ({ext.error})"


def _probe_problem(head_dim: int) -> AttentionProblem:
    on_cuda = torch.cuda.is_available()
    return AttentionProblem(
        batch=1, heads_q=24, heads_kv=24, seq_q=4608, seq_kv=4608, head_dim=head_dim, head_dim_v=head_dim,
        dtype=torch.bfloat16, device_type="cuda" if on_cuda else "cpu",
        capability=torch.cuda.get_device_capability() if on_cuda else None, layout="HND", is_causal=False,
        return_lse=False, has_mask=False)


def _backend_lines(problem: AttentionProblem) -> dict[str, str]:
    """backend or kernel -> its line for `problem` (keys keep the display order)."""
    lines = {}
    for b in list_backends():
        reasons = backend_reasons(b, problem)
        state = "can run" if not reasons else "cannot run: " + "; ".join(reasons)
        tag = "" if b.auto_eligible else " [emulation, never auto]"
        lines[b.name] = f"  {b.name:<22} {b.family:<9} {state}{tag}"
    for kernel in _PROBE_KERNELS:
        try:
            with warnings.catch_warnings():  # the note below says the same
                warnings.simplefilter("ignore")
                sels = {mode: select_backend(problem, kernel, mode) for mode in perf_model.DISPATCH_MODES}
            eager = sels["eager"]
            others = [f"{mode} calls: {sel.backend.name}" for mode, sel in sels.items()
                      if mode != "eager" and sel.backend is not eager.backend]
            lines[f"kernel={kernel}"] = (f"  kernel={kernel!r} -> {eager.backend.name}" +
                                         (f" ({eager.note})" if eager.note else "") +
                                         (f" in eager calls; {'; '.join(others)}" if others else " in every mode"))
        except ValueError as e:
            lines[f"kernel={kernel}"] = f"  kernel={kernel!r} -> error: {e}"
    return lines


def _settings_lines() -> list[str]:
    lines = []
    try:
        lines.append(f"fallback when a family has no kernel: {get_fallback()} (SAGE3_FALLBACK, set_fallback)")
    except ValueError as e:
        lines.append(f"fallback when a family has no kernel: INVALID: {e}; every attention call raises until it is "
                     f"fixed or unset (allowed: {', '.join(FALLBACKS)})")
    overrides = sorted((k, v) for k, v in os.environ.items() if k.startswith("SAGE3_"))
    if overrides:
        lines.append("active SAGE3_* environment overrides:")
        known = {"auto", *FAMILIES, *(b.name for b in list_backends())}
        for k, v in overrides:
            bad = k == "SAGE3_BACKEND" and v and v not in known
            lines.append(f"  {k}={v}" + (" (INVALID: not a backend name or kernel; every attention call raises)"
                                         if bad else ""))
    else:
        lines.append("active SAGE3_* environment overrides: none")
    return lines


def _bundled_line() -> str:
    from .integration.policy import bundled_policies
    names = bundled_policies()
    example = "flux" if "flux" in names else names[0] if names else None
    return (f"bundled policies: {', '.join(names)} (by name: sage3_diffusers.apply(pipe, {example!r}))" if names
            else "bundled policies: none found (the install lacks sage3_diffusers/configs/*.yaml)")


def env_report() -> str:
    pkg = importlib.import_module("sage3_diffusers")
    lines = [f"sage3-diffusers {pkg.__version__} ({os.path.dirname(pkg.__file__)})",
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
        lines.append('diffusers: not installed (needed for apply, the processors, report, the examples: '
                     'pip install "sage3-diffusers[diffusers]")')
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            maj, mi = torch.cuda.get_device_capability(i)
            lines.append(f"GPU {i}: {torch.cuda.get_device_name(i)}, sm_{maj}{mi}")
    else:
        lines.append("GPU: none visible to torch (CUDA not available)")
    lines.append("compiled extensions:")
    for ext, target, arch in _EXTENSIONS:
        status = _extension_status(ext)
        lines.append(f"  {ext.name}: {status}" + ("" if status == "built" else f"; {build_hint(target, arch)}"))
    lines += _settings_lines()
    lines.append(f"speed table for kernel='auto': {perf_model.describe()}")
    lines.append(_bundled_line())
    wide = _backend_lines(_probe_problem(128))
    lines.append("backends for a Flux-like bf16 call (head_dim 128, 4608 tokens) on this machine:")
    by_name = {b.name: b for b in list_backends()}
    for key, line in wide.items():
        lines.append(line)
        if key in by_name:
            lines.append(f"  {'':<22} {'':<9} verified: {by_name[key].verified}")
    narrow = _backend_lines(_probe_problem(64))
    differs = [line for key, line in narrow.items() if line != wide.get(key)]
    lines.append("at head_dim 64: " + ("the same" if not differs else "what differs:"))
    lines += differs
    lines += selfcheck.report_lines()  # the selections above ran the check of each compiled kernel they chose
    return "\n".join(lines)


def build_parser(prog: str = PROG) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """(the top-level parser, the `bench` parser)."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Quantized attention (SageAttention3 / SageAttention2++) for Diffusers.",
        epilog=f"Each command's options: {prog} COMMAND --help. Python API: sage3_diffusers.apply(pipe, 'flux').")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    sub.add_parser("env", help="versions, GPU, built kernels, settings, bundled policies, which backends can run "
                               "here and why not", description=ENV_DESCRIPTION)
    bench = sub.add_parser("bench", help="benchmarks: " + ", ".join(BENCH_COMMANDS),
                           description="Benchmarks (GPU). Each subcommand's options: "
                                       f"{prog} bench SUBCOMMAND --help.")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="SUBCOMMAND", title="subcommands")
    for name, (_, _, help_text) in BENCH_COMMANDS.items():
        bench_sub.add_parser(name, help=help_text, add_help=False)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=f"{help_text} (see `{prog} {name} --help`)", add_help=False)
    return parser, bench


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    parser, bench = build_parser(prog)
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        print(f"\n{prog}: error: no command given; choose one of the commands above", file=sys.stderr)
        return 2
    try:
        if args.command == "env":
            if rest:
                parser.error(f"env takes no arguments, got {' '.join(rest)}")
            print(env_report())
            return 0
        if args.command == "bench":
            if args.bench_command is None:
                bench.print_help(sys.stderr)
                print(f"\n{prog} bench: error: no subcommand given; choose one of the subcommands above",
                      file=sys.stderr)
                return 2
            module, pass_name, _ = BENCH_COMMANDS[args.bench_command]
            return importlib.import_module(module).main(([args.bench_command] if pass_name else []) + rest) or 0
        return importlib.import_module(COMMANDS[args.command][0]).main(rest) or 0
    except MissingExtraError as e:
        print(f"{prog} {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
