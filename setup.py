"""Build script. Metadata lives in pyproject.toml; this file only decides which CUDA extensions to build.

Extensions (each only when its sources exist and its target is requested); kernel <name> is csrc/<name>/
(*.cu + binding.cpp) -> sage3_diffusers._C_<name> -> sage3_diffusers/backends/cuda_<name>.py:
- sage3_diffusers._C_sm90: INT8-QK/FP8-PV attention, sm_90a.
- sage3_diffusers._C_fp4:  NVFP4 attention: sm_120a/121a (hardware block-scaled MMA) and, when
  SAGE3_FP4_EMULATED=1, sm_90a (the same kernel with an emulated MMA: a test build).
- sage3_diffusers._C_fp4_testing: csrc/fp4/testing/, the FP4 MMA test hooks used by tests/gpu; built only with
  SAGE3_BUILD_TEST_EXT=1 or SAGE3_FP4_EMULATED=1, for the same targets as _C_fp4. Never needed at run time.

Targets come from TORCH_CUDA_ARCH_LIST (e.g. "9.0a;12.0a"; "9.0" and "12.0" mean the same) or else the
GPUs present. SAGE3_EXTENSIONS=sm90,fp4 limits what is built; SAGE3_SKIP_CUDA_BUILD=1 builds nothing.
Use `pip install -e . --no-build-isolation` so the build sees your installed (CUDA) torch.
"""
from __future__ import annotations

import glob
import os
import sys
import warnings

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _say(msg: str) -> None:
    print(f"sage3-diffusers: {msg}", file=sys.stderr)


def _skip(msg: str) -> None:
    # A warning, so pip shows it even with -q (plain build output is hidden unless -v).
    warnings.warn(f"sage3-diffusers: CUDA extension skipped: {msg}", stacklevel=2)


def _requested_archs(torch) -> set[str]:
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        items = env.replace(",", ";").replace(" ", ";").split(";")
    else:
        items = [f"{maj}.{mi}" for maj, mi in
                 (torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count()))]
    archs = set()
    for item in filter(None, (s.strip().split("+")[0] for s in items)):
        base = item.rstrip("af")
        if base in ("9.0",):
            archs.add("90a")
        elif base in ("12.0", "12.1"):
            archs.add(base.replace(".", "") + "a")
    return archs


def _cutlass_include() -> list[str]:
    try:
        import cutlass_library  # from the nvidia-cutlass wheel; never vendored
    except ImportError:
        return []
    inc = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
    return [inc] if os.path.isdir(inc) else []


def _gencode(arch: str) -> str:
    return f"-gencode=arch=compute_{arch},code=sm_{arch}"


def cuda_extensions():
    if os.environ.get("SAGE3_SKIP_CUDA_BUILD") == "1":
        _skip("SAGE3_SKIP_CUDA_BUILD=1")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        _skip("torch is not importable in the build environment "
              "(install torch first and use `pip install --no-build-isolation`)")
        return [], {}
    if torch.version.cuda is None:
        _skip(f"torch {torch.__version__} is a CPU-only build (the SDPA and reference paths still work)")
        return [], {}
    if CUDA_HOME is None:
        _skip("no CUDA toolkit (nvcc) found; set CUDA_HOME")
        return [], {}
    archs = _requested_archs(torch)
    wanted = set(filter(None, os.environ.get("SAGE3_EXTENSIONS", "sm90,fp4").split(",")))
    include = [os.path.join(ROOT, "csrc")] + _cutlass_include()
    common_nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", "-Xptxas=-v"]
    exts = []

    def add(name: str, folder: str, gencodes: list[str], defines: list[str]) -> None:
        sources = sorted(glob.glob(os.path.join("csrc", folder, "*.cu")))
        binding = os.path.join("csrc", folder, "binding.cpp")
        if not sources or not os.path.exists(binding):
            _say(f"{name} skipped: no sources under csrc/{folder}")
            return
        exts.append(CUDAExtension(
            name=f"sage3_diffusers.{name}",
            sources=[binding] + sources,
            include_dirs=include,
            extra_compile_args={"cxx": ["-O3", "-std=c++17"] + defines,
                                "nvcc": common_nvcc + gencodes + defines},
            libraries=["cuda"],
        ))
        _say(f"building {name} for {', '.join(g.split('code=')[1] for g in gencodes)}")

    if "sm90" in wanted:
        if "90a" in archs:
            add("_C_sm90", "sm90", [_gencode("90a")], [])
        else:
            _say("_C_sm90 skipped: no sm_90 target requested (TORCH_CUDA_ARCH_LIST / GPU)")
    if "fp4" in wanted:
        gencodes = [_gencode(a) for a in sorted(archs) if a.startswith("12")]
        if "90a" in archs and os.environ.get("SAGE3_FP4_EMULATED") == "1":
            gencodes.append(_gencode("90a"))
        if gencodes:
            # The binding reports which device images exist (backend availability reasons).
            fp4_defines = [f"-DSAGE3_FP4_SM{a.upper()}" for a in sorted(archs) if a.startswith("12")]
            fp4_defines += ["-DSAGE3_FP4_SM90A_EMULATED"] if _gencode("90a") in gencodes else []
            add("_C_fp4", "fp4", gencodes, fp4_defines)
            if os.environ.get("SAGE3_BUILD_TEST_EXT") == "1" or os.environ.get("SAGE3_FP4_EMULATED") == "1":
                add("_C_fp4_testing", "fp4/testing", gencodes, [])
        else:
            _say("_C_fp4 skipped: needs an sm_120a/121a target, or sm_90a with SAGE3_FP4_EMULATED=1")
    return exts, ({"build_ext": BuildExtension} if exts else {})


ext_modules, cmdclass = cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
