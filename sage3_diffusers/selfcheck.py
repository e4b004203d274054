"""Fail-closed self-check: a compiled kernel proves itself on this machine before the dispatcher trusts it.

The first time the dispatcher selects a compiled backend (anything but exact SDPA and the torch reference
numerics, which are the specification) for a given (device, dtype, head dim, layout, causal), the backend runs a
small random attention problem and its output is compared with SDPA computed in fp32 on the same inputs. The
backend fails when it raises, returns something other than a tensor of the input's shape and dtype, returns a
non-finite value, or its cosine similarity to SDPA is below its family's threshold. A failure disables the
backend for the rest of the process: a warning names the cause, the dispatcher lists "failed self-check: ..."
among the backend's rejection reasons and `auto` / the family falls back as for any backend that cannot run.

Inputs are DiT-like: query and key with a shared per-channel offset (the key's is large, as in real DiT
layers) and logits peaky enough that the softmax is far from uniform (q scaled by 3), where quantization error is
largest. On these inputs the torch reference numerics measure (fp32, CPU, head dims 64 and 128, causal and
not, 5 seeds each): SageAttention3 NVFP4 cos sim 0.979-0.984, SageAttention2++ INT8/FP8 0.9996. The thresholds
sit a few times that error below (fp4 0.95, int8_fp8 0.995): a correct kernel of either family passes with
margin, while the failures this guards against (a kernel reading the wrong layout, an unregistered or stale
build returning garbage, a wrong head mapping) give a cos sim near 0 or NaN.

Cost: one extra small attention call plus an fp32 SDPA per (backend, device, dtype, head dim, layout, causal),
once per process; `python bench/selfcheck_cost.py` measures it. Inside torch.compile tracing the check runs on
real tensors (fake-tensor mode is lifted for it), so the compiled graph holds the checked choice. During CUDA
graph capture it cannot run (it would be captured); it is skipped and the selection is not cached, so the first
call after capture checks it. `SAGE3_SELFCHECK=0` turns the check off; `python -m sage3_diffusers env`
prints the results.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass

import torch

from .backends.base import AttentionBackend, AttentionProblem
from .settings import env_switch

# Lowest cos sim vs fp32 SDPA that a kernel of each family may reach on the check's inputs (see module doc).
THRESHOLDS = {"fp4": 0.95, "int8_fp8": 0.995}
_DEFAULT_THRESHOLD = 0.995
SEQ_Q, SEQ_KV, HEADS = 200, 333, 2  # not tile multiples, Sq != Skv: exercises the kernels' edge paths
Q_SCALE, Q_OFFSET, K_OFFSET, V_OFFSET = 3.0, 0.5, 3.0, 0.5


@dataclass(frozen=True)
class CheckResult:
    backend: str
    key: tuple            # (device, dtype, head dim, layout, causal)
    passed: bool | None   # None: skipped (CUDA graph capture), checked again on the next eager call
    cos_sim: float | None
    threshold: float
    seconds: float
    detail: str           # failure cause, skip reason, or "ok"

    def line(self) -> str:
        dev, dtype, hd, layout, causal = self.key
        what = f"{self.backend} on {dev}, {str(dtype).replace('torch.', '')}, head_dim {hd}, {layout}" + \
            (", causal" if causal else "")
        state = "passed" if self.passed else ("skipped" if self.passed is None else "FAILED")
        cos = f"cos sim {self.cos_sim:.5f} (min {self.threshold})" if self.cos_sim is not None else ""
        return f"{what}: {state} {cos} in {self.seconds * 1e3:.1f} ms" + \
            (f" -- {self.detail}" if self.detail != "ok" else "")


_results: dict[tuple, CheckResult] = {}
_failed: dict[str, str] = {}   # backend name -> cause; the backend is disabled for the process


def enabled() -> bool:
    return env_switch("SAGE3_SELFCHECK", "check compiled kernels, the default", "off")


def needs_check(backend: AttentionBackend) -> bool:
    """Compiled kernels are checked; exact SDPA and the torch reference numerics (the specification) are not."""
    from .backends.reference import _ReferenceBackend
    return backend.family != "sdpa" and not isinstance(backend, _ReferenceBackend)


def failure(backend_name: str) -> str | None:
    """Why the backend is disabled ("failed self-check: ..."), or None."""
    cause = _failed.get(backend_name)
    return None if cause is None else f"failed self-check: {cause}"


def results() -> list[CheckResult]:
    return list(_results.values())


def reset() -> None:
    """Forget every result and re-enable every backend (tests; a rebuilt extension)."""
    from . import dispatch
    _results.clear()
    _failed.clear()
    dispatch._cache.clear()  # selections made while a backend was disabled


def _key(problem: AttentionProblem, device: torch.device) -> tuple:
    return (str(device), problem.dtype, problem.head_dim, problem.layout, problem.is_causal)


def _device(problem: AttentionProblem) -> torch.device:
    if problem.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(problem.device_type)


def check_inputs(problem: AttentionProblem, device: torch.device, seed: int = 0):
    """The check's DiT-like (q, k, v) in the problem's dtype and layout, on `device`."""
    g = torch.Generator().manual_seed(seed)
    d = problem.head_dim

    def rn(*shape):
        return torch.randn(*shape, generator=g)

    q = Q_SCALE * (rn(1, HEADS, SEQ_Q, d) + Q_OFFSET * rn(1, HEADS, 1, d))
    k = rn(1, HEADS, SEQ_KV, d) + K_OFFSET * rn(1, HEADS, 1, d)
    v = rn(1, HEADS, SEQ_KV, d) + V_OFFSET * rn(1, HEADS, 1, d)
    out = []
    for t in (q, k, v):
        t = t.to(device=device, dtype=problem.dtype)
        out.append(t if problem.layout == "HND" else t.transpose(1, 2).contiguous())
    return out


def run_check(backend: AttentionBackend, problem: AttentionProblem) -> CheckResult:
    """Run the check now (no caching, no disabling): the backend on the check's inputs vs fp32 SDPA."""
    device = _device(problem)
    key = _key(problem, device)
    threshold = THRESHOLDS.get(backend.family, _DEFAULT_THRESHOLD)
    t0 = time.perf_counter()
    cos = None
    try:
        with torch.no_grad():
            q, k, v = check_inputs(problem, device)
            scale = problem.head_dim ** -0.5
            out = backend.forward(q, k, v, layout=problem.layout, is_causal=problem.is_causal, sm_scale=scale,
                                  return_lse=False)
            if isinstance(out, tuple):
                out = out[0]
            hnd = [t if problem.layout == "HND" else t.transpose(1, 2) for t in (q, k, v)]
            # The fp32 reference runs on SDPA's math backend whatever backends the caller has pinned (a caller
            # inside `sdpa_kernel([CUDNN_ATTENTION])` has no fp32 kernel enabled: the check must not fail on it).
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel([SDPBackend.MATH]):
                ref = torch.nn.functional.scaled_dot_product_attention(
                    *(t.float() for t in hnd), is_causal=problem.is_causal, scale=scale)
            if problem.layout == "NHD":
                ref = ref.transpose(1, 2)
            if not isinstance(out, torch.Tensor):
                detail = f"returned {type(out).__name__}, not a tensor"
            elif tuple(out.shape) != tuple(q.shape) or out.dtype != q.dtype:
                detail = (f"returned shape {tuple(out.shape)} {out.dtype}, expected {tuple(q.shape)} {q.dtype}")
            elif not bool(torch.isfinite(out).all()):
                detail = f"non-finite output ({int((~torch.isfinite(out)).sum())} of {out.numel()} values)"
            else:
                a, b = out.double().flatten(), ref.double().flatten()
                cos = float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))
                detail = "ok" if cos >= threshold else \
                    f"cos sim {cos:.4f} vs SDPA is below {threshold} for the {backend.family} family"
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    except Exception as e:  # a kernel that raises on a valid problem is as untrustworthy as one that lies
        detail = f"raised {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return CheckResult(backend.name, key, detail == "ok", cos, threshold, time.perf_counter() - t0, detail)


def _capturing(problem: AttentionProblem) -> bool:
    return problem.device_type == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _real_tensors():
    """Lifts an active fake-tensor mode (torch.compile tracing) so the check computes on real tensors."""
    try:
        from torch._subclasses.fake_tensor import unset_fake_temporarily
    except ImportError:  # pragma: no cover - older torch
        return contextlib.nullcontext()
    return unset_fake_temporarily()


def vet(backend: AttentionBackend, problem: AttentionProblem) -> bool | None:
    """The dispatcher's hook, called when it selects `backend` for `problem` (before caching the selection).
    True: trusted (checked and passed, not a compiled kernel, or checks off). False: failed now or before, and
    disabled (the caller selects again). None: not checked yet because a CUDA graph is being captured (use it,
    do not cache the selection)."""
    if backend.name in _failed:
        return False
    if not needs_check(backend) or not enabled():
        return True
    device = _device(problem)
    key = (backend.name,) + _key(problem, device)
    prior = _results.get(key)
    if prior is not None and prior.passed is not None:
        return prior.passed
    if _capturing(problem):
        _results[key] = CheckResult(backend.name, key[1:], None, None, THRESHOLDS.get(backend.family,
                                    _DEFAULT_THRESHOLD), 0.0, "CUDA graph capture in progress: checked on the "
                                    "first call outside capture")
        return None
    with _real_tensors():
        result = run_check(backend, problem)
    _results[key] = result
    if not result.passed:
        _failed[backend.name] = result.detail
        warnings.warn(f"sage3_diffusers: backend {backend.name!r} failed its self-check on this machine "
                      f"({result.line()}); it is disabled for this process and the dispatcher falls back "
                      f"(SAGE3_SELFCHECK=0 turns the check off)", RuntimeWarning, stacklevel=4)
    return result.passed


def report_lines() -> list[str]:
    """For `python -m sage3_diffusers env`."""
    state = "on" if enabled() else "off (SAGE3_SELFCHECK=0)"
    lines = [f"self-check of compiled kernels: {state}"]
    if not _results:
        lines.append("  no compiled kernel has been selected in this process yet")
    lines += [f"  {r.line()}" for r in _results.values()]
    return lines
