"""What every attention backend declares, and the problem description it is judged against."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.autograd.forward_ad as _forward_ad
from torch.utils._python_dispatch import _get_current_dispatch_mode

# Kernel families users choose between; backends implement one of them.
FAMILIES = ("fp4", "int8_fp8", "sdpa")


@dataclass(frozen=True)
class AttentionProblem:
    """Everything a backend needs to decide whether it can take a call (no tensors: hashable, cacheable)."""

    batch: int
    heads_q: int
    heads_kv: int
    seq_q: int
    seq_kv: int
    head_dim: int
    head_dim_v: int
    dtype: torch.dtype
    device_type: str
    capability: tuple[int, int] | None  # CUDA compute capability, None off-CUDA
    layout: str  # "HND" or "NHD"
    is_causal: bool
    return_lse: bool
    has_mask: bool
    has_kv_lens: bool = False  # per-sample key lengths (right-padding as a [B] int32 device tensor)


LAYOUTS = ("HND", "NHD")


@torch._dynamo.assume_constant_result
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def device_capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda":
        return None
    return _cuda_capability(device.index if device.index is not None else torch.cuda.current_device())


def describe_problem(q, k, v, layout: str, is_causal: bool, return_lse: bool, attn_mask,
                     kv_lens=None) -> AttentionProblem:
    """The call as an AttentionProblem, or TypeError / ValueError naming what is structurally wrong with it (the
    one place input shapes are validated: the public API and the kernels' custom ops both use it).

    kv_lens: None or an int32 [B] tensor on q's device; sample b attends to its first kv_lens[b] keys, every query
    row included (what a [B,1,1,N] right-padding key mask does). Its values (1 <= kv_lens[b] <= seq_kv) live on the
    device and are not checked here: that would cost a host sync per call."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D ({'(B, H, S, D)' if layout == 'HND' else '(B, S, H, D)'} for "
                             f"tensor_layout={layout!r}), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if layout not in LAYOUTS:
        raise ValueError(f"tensor_layout must be one of {LAYOUTS}, got {layout!r}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    hd = (1, 2) if layout == "HND" else (2, 1)  # (head dim index, seq dim index)
    b, hq, sq, d = q.shape[0], q.shape[hd[0]], q.shape[hd[1]], q.shape[3]
    hkv, skv = k.shape[hd[0]], k.shape[hd[1]]
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"batch sizes differ: q {b}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[3] != d:
        raise ValueError(f"q and k head dims differ: {d} vs {k.shape[3]}")
    if v.shape[hd[0]] != hkv or v.shape[hd[1]] != skv:
        raise ValueError(f"k and v must have the same heads and sequence length, got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} ({layout})")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv}) for GQA")
    if skv == 0 and sq > 0:
        raise ValueError("key/value sequence length is 0: attention over no keys is undefined")
    if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):
        raise TypeError("attn_mask must be a tensor (bool: True = attend, or additive float) or None")
    if kv_lens is not None:
        if not isinstance(kv_lens, torch.Tensor):
            raise TypeError(f"kv_lens must be an int32 tensor of shape ({b},) or None, got {type(kv_lens).__name__}")
        if kv_lens.dtype != torch.int32 or kv_lens.dim() != 1 or kv_lens.shape[0] != b:
            raise ValueError(f"kv_lens must be an int32 tensor of shape ({b},) (one key length per sample), got "
                             f"{kv_lens.dtype} of shape {tuple(kv_lens.shape)}")
        if kv_lens.device != q.device:
            raise ValueError(f"kv_lens must be on q's device {q.device}, got {kv_lens.device}")
        if attn_mask is not None:
            raise ValueError("pass attn_mask or kv_lens, not both")
    return AttentionProblem(
        batch=b, heads_q=hq, heads_kv=hkv, seq_q=sq, seq_kv=skv, head_dim=d, head_dim_v=v.shape[3],
        dtype=q.dtype, device_type=q.device.type, capability=device_capability(q.device), layout=layout,
        is_causal=bool(is_causal), return_lse=bool(return_lse), has_mask=attn_mask is not None,
        has_kv_lens=kv_lens is not None)


class AttentionBackend:
    """A way to compute attention. Subclasses fill the class attributes and implement `forward`.

    `unavailable_reasons()` says why the backend cannot run on this machine at all (not built, no GPU,
    wrong arch); `input_reasons(problem)` says why it cannot take this call. Both return human-readable
    strings; an empty list means yes.
    """

    name: ClassVar[str]
    family: ClassVar[str]
    priority: ClassVar[int]          # higher wins among supported backends for kernel="auto"
    description: ClassVar[str]
    verified: ClassVar[str]          # how the claim "it works" was checked: "run on H100", "compiled only", ...
    auto_eligible: ClassVar[bool] = True  # False for slow emulations: used only when named or allowed
    dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float16, torch.bfloat16)
    head_dims: ClassVar[tuple[int, ...] | None] = (64, 128)  # None: any
    supports_causal: ClassVar[bool] = True
    supports_lse: ClassVar[bool] = True
    supports_mask: ClassVar[bool] = False
    supports_kv_lens: ClassVar[bool] = False  # takes per-sample key lengths (`kv_lens`, see `forward`)
    supports_gqa: ClassVar[bool] = True

    def unavailable_reasons(self) -> list[str]:
        return []

    def input_reasons(self, p: AttentionProblem) -> list[str]:
        reasons = []
        if p.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            reasons.append(f"dtype {str(p.dtype).replace('torch.', '')} not supported (needs {names})")
        if self.head_dims is not None and p.head_dim not in self.head_dims:
            reasons.append(f"head_dim {p.head_dim} not supported (needs one of {self.head_dims})")
        if p.head_dim_v != p.head_dim:
            reasons.append(f"value head_dim {p.head_dim_v} differs from query/key head_dim {p.head_dim}")
        if p.is_causal and not self.supports_causal:
            reasons.append("is_causal=True not supported")
        if p.return_lse and not self.supports_lse:
            reasons.append("return_lse=True not supported")
        if p.has_mask and not self.supports_mask:
            reasons.append("attn_mask not supported (only exact SDPA takes arbitrary masks)")
        if p.has_kv_lens and not self.supports_kv_lens:
            reasons.append("kv_lens (per-sample key lengths) not supported")
        if p.heads_kv != p.heads_q and not self.supports_gqa:
            reasons.append(f"GQA ({p.heads_q} query heads, {p.heads_kv} kv heads) not supported")
        return reasons

    def check_call(self, p: AttentionProblem) -> None:
        """ValueError naming every reason this backend cannot take the call (a kernel's custom op runs it, so a
        direct call with bad input gets the same clear message as the dispatcher and never reaches C++)."""
        reasons = self.input_reasons(p)
        if reasons:
            raise ValueError(f"{self.name} cannot take this call: " + "; ".join(reasons))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: str, is_causal: bool,
                sm_scale: float, return_lse: bool, attn_mask: torch.Tensor | None = None,
                kv_lens: torch.Tensor | None = None):
        """Returns out (same layout and dtype as q) or (out, lse [B, Hq, Sq] fp32, natural log).

        kv_lens (backends with `supports_kv_lens`): int32 [B] on q's device, read on the device; sample b
        attends to keys 0 .. kv_lens[b]-1 only, every query row included, as with a [B,1,1,N] right-padding key
        mask; with is_causal, query i sees keys j <= i among them. Never given together with attn_mask.
        - The softmax never sees a key beyond kv_lens[b]. Quantization statistics may: the reference backends
          define the numerics as the call on k[b, :kv_lens[b]], v[b, :kv_lens[b]] alone (K mean, key groups and
          tiles, V scales over the valid keys only); the compiled kernels (sm90, Triton) take per-head K mean
          and V channel scales over all seq_kv keys, padding included, which must then be finite, and match the
          reference within their family's quantization error.
        - kv_lens[b] must be in [1, seq_kv]; the device path does not check it (a host sync). Out of range,
          backends differ: the kernels clamp to [0, seq_kv] and give zero rows (LSE -inf) for 0, exact SDPA
          gives NaN rows for 0, the references raise."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} family={self.family}>"


class CudaKernelBackend(AttentionBackend):
    """A compiled kernel built for an exact set of GPU architectures: besides the declared dtypes and shapes it
    needs CUDA tensors on one of `cuda_capabilities` and at least one query and one key."""

    cuda_capabilities: ClassVar[tuple[tuple[int, int], ...]] = ()

    def _capability_reason(self, cap: str) -> str:
        """Why a GPU of compute capability `cap` ("sm_89", or "unknown") cannot run this kernel."""
        raise NotImplementedError

    def input_reasons(self, p: AttentionProblem) -> list[str]:
        reasons = super().input_reasons(p)
        if p.device_type != "cuda":
            reasons.append(f"tensors are on {p.device_type}, needs a CUDA device")
        elif p.capability not in self.cuda_capabilities:
            cap = "unknown" if p.capability is None else f"sm_{p.capability[0]}{p.capability[1]}"
            reasons.append(self._capability_reason(cap))
        if p.seq_q < 1 or p.seq_kv < 1:
            reasons.append(f"empty sequence (seq_q={p.seq_q}, seq_kv={p.seq_kv})")
        return reasons


def through_custom_op(*args) -> bool:
    """Whether a compiled kernel's call goes through its torch.library custom op rather than straight to the op's
    implementation. The op is what every tracer, transform and tensor subclass understands: torch.compile and
    torch.export tracing, dispatch modes (make_fx, FakeTensorMode), functorch transforms (vmap, grad,
    functionalize), forward-mode AD, torch.jit tracing, autograd recording (any input requiring grad: the op then
    says it has no backward instead of dropping the gradient), and any input that is not a plain tensor (a DTensor,
    or ring attention's not-yet-waited all-gather results, whose data the subclass must produce first). Eagerly on
    plain tensors the implementation is called directly: the dispatcher's round trip into Python costs host time
    on every call and adds nothing there. `args`: the call's arguments (those that are not tensors are ignored)."""
    if (torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None
            or torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0
            or torch._C._get_tracing_state() is not None):
        return True
    grad = torch.is_grad_enabled()
    for t in args:
        if isinstance(t, torch.Tensor) and (type(t) is not torch.Tensor or (grad and t.requires_grad)):
            return True
    return False


def run_op(op, impl, *args):
    """One call of a compiled kernel: through its custom op `op` where `through_custom_op` says so or a profiler
    is recording, else `impl` directly. Under a profiler the op is what links the GPU kernels to a CPU op: kernels
    launched inside a `record_function` range alone are attributed to no op (the range's correlation id is of
    another kind), so attention-share measurements and users' traces would lose them. The profiler is asked last:
    torch.compile cannot trace that query (fullgraph fails on it), and while compiling the op is taken anyway."""
    if through_custom_op(*args) or torch.autograd._profiler_enabled():
        return op(*args)
    return impl(*args)


def to_hnd(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x if layout == "HND" else x.transpose(1, 2)


def from_hnd(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x if layout == "HND" else x.transpose(1, 2)


def fake_attention_outputs(q: torch.Tensor, layout: str, return_lse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """What every attention custom op returns, as empty tensors (its torch.library fake implementation):
    out like q, and lse [B, Hq, Sq] fp32 (an empty [0] tensor when return_lse is False)."""
    b, h, s = (q.shape[0], q.shape[2], q.shape[1]) if layout == "NHD" else q.shape[:3]
    return q.new_empty(q.shape), q.new_empty((b, h, s) if return_lse else (0,), dtype=torch.float32)


def build_hint(extensions: str, arch_list: str, extra_env: str = "") -> str:
    """How to build a CUDA extension here, or why it cannot be built on this machine: a CPU-only torch or no
    nvcc gets no build command. In a source checkout: an in-place build; from an installed wheel: a reinstall
    from a checkout."""
    if torch.version.cuda is None:
        return f"building it needs a CUDA build of torch and nvcc (this torch, {torch.__version__}, is CPU-only)"
    import os
    import shutil
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    if shutil.which("nvcc") is None and not os.path.isfile(os.path.join(cuda_home, "bin", "nvcc")):
        return "building it needs nvcc (the CUDA toolkit) on PATH or under CUDA_HOME"
    env = f"SAGE3_EXTENSIONS={extensions} {extra_env}TORCH_CUDA_ARCH_LIST={arch_list}"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if os.path.isfile(os.path.join(root, "setup.py")) and os.path.isdir(os.path.join(root, "csrc")):
        return f"build with: cd {root} && {env} python setup.py build_ext --inplace"
    return (f"build with (from a sage3-diffusers source checkout): {env} pip install . --no-build-isolation "
            f"--no-deps --force-reinstall")


class CompiledExtension:
    """A compiled extension module imported on first use; `module()` is None when it is not built (or was built
    against another torch), and `error` then says why. One instance per extension, shared by its backends and
    `python -m sage3_diffusers env`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._module = None
        self.error: str | None = None

    def module(self):
        if self._module is None and self.error is None:
            try:
                self._module = importlib.import_module(self.name)
            except ImportError as e:
                self.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return self._module

    def require(self):
        """The module, or RuntimeError naming why it is missing."""
        mod = self.module()
        if mod is None:
            raise RuntimeError(f"{self.name} is not built ({self.error})")
        return mod
