"""Direct launches of compiled Triton kernels: a repeated call's launch without Triton's per-launch Python.

`kernel[grid](*args, **meta)` spends most of its host time in `JITFunction.run`: binding the arguments, building
the specialization key and its string, the cache lookup, the launch metadata, and the launcher's Python wrapper.
A launch plan fixes the grid, the constexprs, the options and every integer argument; what still varies between
its calls is the tensors' addresses and the float arguments. `KernelLaunch` launches each new key through Triton,
keeps the `CompiledKernel` that launch returns, and launches later calls with the same key through that kernel's
own launcher with the arguments Triton passes it: the grid, the current stream of the current device, the
function handle, the packed metadata, the kernel's arguments in signature order (constexprs included; the
launcher skips them).

What Triton specializes a compiled kernel on, and where the key of a direct launch holds it:
- constexprs and options (num_warps, num_stages): fixed per `KernelLaunch`;
- integer arguments (i32/i64, equal to 1, divisible by 16): fixed per plan; an integer a plan does not fix
  (the strides of a caller's `out`) goes into the caller's key;
- tensor dtypes and 16-byte alignment of their addresses: the caller's key holds the alignment (`aligned`) of
  every caller tensor and of the workspace (whose buffers sit at multiples of 256 bytes from its start, so they
  share its alignment), and each dtype the plan does not fix;
- floats: not specialized (fp32; the plans pass Python floats, since an int 1 would become a constant);
- Triton's debug flag and instrumentation mode (part of its cache key) and the current device: added here.
A direct launch may pass a device address (an int, or `Address` as a descriptor's base) where Triton was given a
tensor at that address: the launcher reads nothing of a tensor argument but its address.
Not re-checked per call: Triton's check that the module globals a kernel reads have not changed since it was
compiled (ours are constants).

Every launch goes through Triton when: SAGE3_TRITON_DIRECT_LAUNCH=0 (or `DIRECT_LAUNCH = False`), the installed
Triton's runtime does not look as this module expects (`UNSUPPORTED` says why; the interpreter is one such case),
a launch hook is set (`triton.knobs.runtime.launch_enter_hook` / `launch_exit_hook`), the kernel has pre-run
hooks, or a compiled kernel needs scratch memory. CUDA graph capture records the direct launch as it records
Triton's: both launch on the current stream.
"""
from __future__ import annotations

import inspect
import re

import torch

from ...settings import env_switch

# What the fast path relies on in Triton's runtime (whitespace removed). `JITFunction.run` launches with
# this call, after reading the device, the stream and the two knobs of its cache key this way:
_RUN_FRAGMENTS = (
    "device=driver.active.get_current_device()",
    "stream=driver.active.get_current_stream(device)",
    'kwargs["debug"]=kwargs.get("debug",self.debug)orknobs.runtime.debug',
    'kwargs["instrumentation_mode"]=knobs.compilation.instrumentation_mode',
    "forhookinself.pre_run_hooks:",
    "kernel.run(grid_0,grid_1,grid_2,stream,kernel.function,kernel.packed_metadata,launch_metadata,"
    "knobs.runtime.launch_enter_hook,knobs.runtime.launch_exit_hook,*bound_args.values())",
)
# the GPU driver's device and stream are torch's (the fast path reads them the same way)
_DRIVER_FRAGMENTS = ("self.get_current_stream=_cuda_getCurrentRawStream",
                     "self.get_current_device=torch.cuda.current_device")
# the launcher's Python wrapper passes its arguments on after the launch options and the two scratch buffers
# (None when the kernel needs no scratch)
_LAUNCHER_PARAMS = ["self", "gridX", "gridY", "gridZ", "stream", "function", "args"]
_LAUNCHER_FRAGMENTS = (
    "ifsize>0:",
    "self.launch(gridX,gridY,gridZ,stream,function,self.launch_cooperative_grid,self.launch_pdl,global_scratch,"
    "profile_scratch,*args)",
)
_BASE_ARGS_FORMAT = "iiiKKppOOOOOO"  # grid x/y/z, stream, function, cooperative, pdl, 2 scratch, 4 metadata/hooks
_OPTIONS = ("num_warps", "num_stages")  # the launch options a plan may pass (the rest of `meta` are constexprs)


def _squeeze(src: str) -> str:
    """Source without comments and whitespace."""
    return re.sub(r"\s+", "", re.sub(r"#[^\n]*", "", src))


def _source(obj) -> str:
    try:
        return _squeeze(inspect.getsource(obj))
    except (OSError, TypeError):
        return ""


def runtime_problem(jit_cls, compiled_cls, launcher_cls, gpu_driver_cls, base_args_format, knobs) -> str | None:
    """None when Triton's runtime launches as the fast path expects, else why not."""
    if getattr(getattr(knobs, "runtime", None), "interpret", False):
        return "the Triton interpreter runs the kernels (TRITON_INTERPRET=1): no launcher"
    run_src = _source(getattr(jit_cls, "run", None))
    missing = [f for f in _RUN_FRAGMENTS if f not in run_src]
    if missing:
        return f"JITFunction.run does not launch as expected (missing {missing[0]!r})"
    drv_src = _source(getattr(gpu_driver_cls, "__init__", None))
    if not all(f in drv_src for f in _DRIVER_FRAGMENTS):
        return "the GPU driver does not take its device and stream from torch"
    if not isinstance(getattr(compiled_cls, "run", None), property):
        return "CompiledKernel.run is not the launcher property"
    call = getattr(launcher_cls, "__call__", None)
    try:
        params = list(inspect.signature(call).parameters.values())
    except (TypeError, ValueError):
        params = []
    if [p.name for p in params] != _LAUNCHER_PARAMS or params[-1].kind != inspect.Parameter.VAR_POSITIONAL:
        return f"the launcher's signature is ({', '.join(p.name for p in params)}), not ({', '.join(_LAUNCHER_PARAMS)})"
    launcher_src = _source(call)
    if not all(f in launcher_src for f in _LAUNCHER_FRAGMENTS):
        return "the launcher does not pass its arguments on as expected"
    if base_args_format != _BASE_ARGS_FORMAT:
        return f"the launcher's base arguments are {base_args_format!r}, not {_BASE_ARGS_FORMAT!r}"
    rt = getattr(knobs, "runtime", None)
    if not all(hasattr(rt, a) for a in ("launch_enter_hook", "launch_exit_hook", "debug")) or \
            not hasattr(getattr(knobs, "compilation", None), "instrumentation_mode"):
        return "triton.knobs lacks the launch hooks, debug or instrumentation_mode"
    return None


def env_enabled() -> bool:
    return env_switch("SAGE3_TRITON_DIRECT_LAUNCH", "direct launches of cached Triton kernels, the default",
                      "every launch through Triton")


def _load():
    """(UNSUPPORTED, Triton's pieces the fast path uses)."""
    try:
        import triton
        from triton import knobs
        from triton.backends import driver as base_driver
        from triton.backends.nvidia import driver as nv_driver
        from triton.compiler.compiler import CompiledKernel
        from triton.knobs import HookChain
        from triton.runtime.jit import JITFunction
    except ImportError as e:
        return f"Triton's runtime is not laid out as expected ({e})", None
    problem = runtime_problem(JITFunction, CompiledKernel, nv_driver.CudaLauncher, base_driver.GPUDriver,
                              getattr(nv_driver, "_BASE_ARGS_FORMAT", None), knobs)
    if problem is not None:
        return f"triton {triton.__version__}: {problem}", None
    return None, (knobs, HookChain, JITFunction, CompiledKernel, nv_driver.CudaLauncher)


UNSUPPORTED, _triton = _load()
_knobs, _HookChain, _JITFunction, _CompiledKernel, _Launcher = _triton or (None,) * 5
DIRECT_LAUNCH = env_enabled() and UNSUPPORTED is None
_current_device = getattr(torch._C, "_cuda_getDevice", None)  # torch.cuda.current_device without its lazy init
_current_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def aligned(t) -> bool:
    """Triton's alignment specialization of a tensor argument: its address is a multiple of 16 bytes."""
    return not t.data_ptr() & 15


class Address:
    """A device address where Triton's launcher takes a tensor (it reads `data_ptr()`): the base of a tensor
    descriptor launched directly. A pointer argument launched directly may be a plain int (the launcher takes
    ints as addresses)."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = ptr

    def data_ptr(self) -> int:
        return self.ptr


def _hook_idle(hook) -> bool:
    return hook is None or (type(hook) is _HookChain and not hook.calls)


def direct_state():
    """What a direct launch's key adds to the caller's (the current device, Triton's debug flag and
    instrumentation mode), or None when launches go through Triton now (switched off, a launch hook set)."""
    if not DIRECT_LAUNCH:
        return None
    rt = _knobs.runtime
    if not (_hook_idle(rt.launch_enter_hook) and _hook_idle(rt.launch_exit_hook)):
        return None
    return _current_device(), rt.debug, _knobs.compilation.instrumentation_mode


def current_stream(state):
    """The stream Triton would launch on: the current stream of the current device (`state[0]`)."""
    return _current_stream(state[0])


class KernelLaunch:
    """The launches of one @triton.jit kernel at one call site: a fixed grid and fixed constexprs and options
    (`meta`); per call a key (what the caller's arguments vary in that Triton specializes on, see the module
    docstring; None: launch through Triton) and the positional arguments before the constexprs.

    `launch(key, *args)` launches directly where it can, else through Triton (and keeps what Triton compiled).
    A caller that launches several kernels can look each one's direct launch up first (`entry`) and launch with
    `run_direct`, passing addresses (ints, `Address`) where a tensor sits at a known place in memory."""

    __slots__ = ("fn", "jit", "grid", "meta", "through_triton", "direct", "tail")

    def __init__(self, fn, grid, meta):
        self.fn, self.grid, self.meta = fn, tuple(grid), dict(meta)
        self.jit = _JITFunction is not None and isinstance(fn, _JITFunction)  # not the interpreter's function
        self.through_triton = fn[self.grid]
        self.direct = {}   # (key, state) -> (launcher entry, grid x, y, z, the launcher arguments after the stream)
        self.tail = None   # the constexprs in signature order, after the positional arguments

    def entry(self, state, key):
        """The direct launch of `key` under `state` (`direct_state()`, not None), or None: launch through Triton."""
        if not self.jit or self.fn.pre_run_hooks:
            return None
        return self.direct.get((key, state))

    def run_direct(self, entry, stream, *args):
        run, gx, gy, gz, head = entry
        run(gx, gy, gz, stream, *head, *args, *self.tail)

    def launch(self, key, *args):
        state = direct_state() if key is not None else None
        if state is None or not self.jit or self.fn.pre_run_hooks:
            self.through_triton(*args, **self.meta)
            return
        entry = self.direct.get((key, state))
        if entry is not None:
            self.run_direct(entry, _current_stream(state[0]), *args)
            return
        kernel = self.through_triton(*args, **self.meta)
        self._remember((key, state), kernel, len(args))

    def _remember(self, full, kernel, n_args):
        """Keep `kernel` (what Triton launched for this key) for direct launches, when it and this call site are
        what the fast path knows how to launch."""
        if type(kernel) is not _CompiledKernel:
            return
        if self.tail is None:
            names = list(self.fn.arg_names)
            constexprs = {k: v for k, v in self.meta.items() if k not in _OPTIONS}
            if names[n_args:] != [n for n in names if n in constexprs] or len(constexprs) != len(names) - n_args:
                return  # constexprs not exactly the trailing parameters: Triton's binding is not this simple
            self.tail = tuple(constexprs[n] for n in names[n_args:])
        launcher = kernel.run
        if type(launcher) is not _Launcher or launcher.global_scratch_size > 0 or launcher.profile_scratch_size > 0:
            return
        if len(self.direct) >= 64:
            self.direct.clear()
        gx, gy, gz = (tuple(self.grid) + (1, 1))[:3]
        # the launcher's own entry with what its Python wrapper adds (launch options, no scratch), then the
        # packed metadata; no launch metadata and no hooks (none is set: `direct_state` checks per call)
        self.direct[full] = (launcher.launch, gx, gy, gz,
                             (kernel.function, launcher.launch_cooperative_grid, launcher.launch_pdl, None, None,
                              kernel.packed_metadata, None, None, None))
