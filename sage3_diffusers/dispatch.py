"""One dispatcher: picks the backend for a call and explains every rejection.

`kernel` is "auto", a family ("fp4", "int8_fp8", "sdpa") or a backend name (see `list_backends()`).
- A backend name must run as asked, else ValueError listing its reasons.
- A family takes its highest-priority backend that can run. When none can, the fallback setting decides:
    "auto"    (default) what is left of the chain fp4 -> int8_fp8 -> sdpa (each more accurate than the one before):
              where this card's table measures every runnable candidate in the call's mode, the fastest of
              them, held to auto's margin before a quantized kernel is taken over exact SDPA (a requested fp4 that
              cannot run on Hopper becomes int8_fp8 on video lengths and exact SDPA where int8_fp8 does not pay);
              otherwise the next family that can run, by priority. One warning per distinct case;
    "emulate" run the family's torch emulation (reference numerics, slow; for accuracy studies);
    "error"   raise ValueError listing every backend's reasons.
- "auto" takes the fastest backend of any family (never an emulation). "Fastest" is decided per execution mode
  (`perf_model.current_mode()`: "eager", "graph" under CUDA-graph capture, "compile" under torch.compile) from
  this card's measured table (`perf_model`) in that mode only, never from a column measured in another mode:
  - every runnable candidate has a measurement of this mode: the fastest of them, except that a quantized kernel
    must beat exact SDPA by AUTO_MARGIN (5%) to be taken; so "auto" chooses exact SDPA (cuDNN) wherever the
    quantized kernels are slower or only within the tables' noise;
  - the card has a table but some runnable candidate has no measurement of this mode: exact SDPA, never a
    quantized kernel on a guess (the rejections say "no <mode> measurement on this card");
  - no table for this card (or a problem off CUDA): the backends' static priorities.
  A family chooses among its own kernels the same way, except that unmeasured it takes them by priority (the
  family runs: it was asked for). The mode is part of every cached decision, so a choice made for one mode is
  never reused in another.
Environment: SAGE3_BACKEND=<backend name> forces one backend for every call; SAGE3_FALLBACK sets the
fallback (`set_fallback` does the same from Python); SAGE3_SELFCHECK=0 turns off the self-check that a
compiled kernel passes before its first use (`selfcheck`).
"""
from __future__ import annotations

import importlib
import operator
import os
import warnings
from dataclasses import dataclass, field

import torch

from . import selfcheck
from .backends.base import FAMILIES, AttentionBackend, AttentionProblem, describe_problem
from .perf_model import BASELINE, DISPATCH_MODES, current_mode, expected_speed, table_for

FALLBACKS = ("auto", "emulate", "error")
_DEGRADE = {"fp4": "int8_fp8", "int8_fp8": "sdpa"}

# Backend modules, imported lazily; each exposes BACKENDS (a list of backend classes).
_BACKEND_MODULES = [
    "sage3_diffusers.backends.sdpa",
    "sage3_diffusers.backends.reference",
    "sage3_diffusers.backends.triton_int8fp8",
    "sage3_diffusers.backends.cuda_sm90",
    "sage3_diffusers.backends.cuda_fp4",
]

_registry: dict[str, AttentionBackend] = {}
_loaded = False
# Selections: (problem, kernel, fallback, mode) -> Selection, and `decide`'s call signatures (mode included) ->
# (backend, note, empty)
# in the same dict, so whatever clears one (new backend, settings, self-check) clears both.
_cache: dict = {}
_CACHE_SIZE = 8192
_warned: set = set()
_fallback_override: str | None = None


@dataclass(frozen=True)
class Selection:
    backend: AttentionBackend | None  # None only from `explain_selection`: no backend runs, the call raises
    requested: str
    rejected: tuple[tuple[str, tuple[str, ...]], ...] = field(default=())
    note: str | None = None  # set when the result is a fallback from what was requested
    mode: str = "eager"  # the execution mode the choice was made for (perf_model.current_mode())

    def explain(self) -> str:
        ran = self.backend.name if self.backend is not None else "no backend (the call raises)"
        lines = [f"requested {self.requested!r} -> {ran}" + (f" ({self.note})" if self.note else "") +
                 f"; chosen for {self.mode} calls"]
        lines += [f"  rejected {name}: {'; '.join(reasons)}" for name, reasons in self.rejected]
        return "\n".join(lines)


def register_backend(backend: AttentionBackend) -> None:
    if backend.family not in FAMILIES:
        raise ValueError(f"backend {backend.name!r} has unknown family {backend.family!r}; allowed: {FAMILIES}")
    _registry[backend.name] = backend
    _cache.clear()


def _ensure_loaded() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _BACKEND_MODULES:
        for cls in importlib.import_module(mod).BACKENDS:
            register_backend(cls())


def list_backends() -> list[AttentionBackend]:
    _ensure_loaded()
    return sorted(_registry.values(), key=lambda b: (FAMILIES.index(b.family), -b.priority))


def get_backend(name: str) -> AttentionBackend:
    _ensure_loaded()
    if name not in _registry:
        raise ValueError(f"unknown backend {name!r}; known: {sorted(_registry)} (or a family: {FAMILIES}, 'auto')")
    return _registry[name]


def set_fallback(mode: str | None) -> None:
    """Set the fallback for families with no runnable kernel (None: back to $SAGE3_FALLBACK or 'auto')."""
    global _fallback_override
    if mode is not None and mode not in FALLBACKS:
        raise ValueError(f"unknown fallback {mode!r}; allowed: {FALLBACKS}")
    _fallback_override = mode
    _cache.clear()


def get_fallback() -> str:
    mode = _fallback_override or os.environ.get("SAGE3_FALLBACK", "auto")
    if mode not in FALLBACKS:
        raise ValueError(f"SAGE3_FALLBACK={mode!r} is not one of {FALLBACKS}")
    return mode


def backend_reasons(backend: AttentionBackend, problem: AttentionProblem) -> list[str]:
    failed = selfcheck.failure(backend.name)
    return backend.unavailable_reasons() or ([failed] if failed else []) or backend.input_reasons(problem)


# kernel="auto" leaves exact SDPA only for a kernel measured at least this much faster in the call's mode: the
# tables' run-to-run noise is a few percent, and within it a lossy kernel would win on noise alone.
AUTO_MARGIN = 1.05


_FALLBACK = "fallback"  # `_pick`'s family for the candidates a family that cannot run falls back to


def _pick(candidates, problem, rejected, mode, family="any"):
    """The candidate to run (None if none can), every other one with its reason in `rejected`: the fastest by the
    card's measurement of `mode` when every runnable candidate has one (for "auto" and a fallback, a quantized
    kernel only when it beats exact SDPA by AUTO_MARGIN); else, on a card with a table, exact SDPA
    for "auto" (family "any": never a quantized kernel on a guess) and the highest priority for a family or a
    fallback; without a table, the highest priority."""
    if not candidates:
        rejected.append((f"{family} kernels", ("none is built or registered in this install",)))
        return None
    runnable = []
    for b in sorted(candidates, key=lambda b: -b.priority):
        reasons = backend_reasons(b, problem)
        if reasons:
            rejected.append((b.name, tuple(reasons)))
        else:
            runnable.append(b)
    if len(runnable) <= 1:
        return runnable[0] if runnable else None
    est = {b.name: expected_speed(b.name, problem, mode, stand_in=False) for b in runnable}
    unmeasured = [name for name, e in est.items() if e is None]
    if not unmeasured:
        best = max(runnable, key=lambda b: est[b.name].tflops)
        exact = next((b for b in runnable if b.name == BASELINE), None)
        slower = [(b.name, (f"slower for this call in {mode} calls: ~{est[b.name].tflops:.0f} vs "
                            f"~{est[best.name].tflops:.0f} TFLOPS for {best.name} (measured: "
                            f"{est[best.name].source})",)) for b in runnable if b is not best]
        if family in ("any", _FALLBACK) and exact is not None and best is not exact and \
                est[best.name].tflops < AUTO_MARGIN * est[BASELINE].tflops:
            gain = est[best.name].tflops / est[BASELINE].tflops
            rejected += [r for r in slower if r[0] != BASELINE]
            rejected.append((best.name, (f"{gain:.2f}x exact {BASELINE} in {mode} calls is within the margin "
                                         f"({AUTO_MARGIN:.2f}x) auto asks before giving up exact attention: the "
                                         f"table's run-to-run noise is a few percent (measured: "
                                         f"{est[best.name].source})",)))
            return exact
        rejected += slower
        return best
    table = table_for(problem)
    if table is None or family != "any" or BASELINE not in est:
        why = "" if table is None else (f"; no {mode} measurement on this card for {', '.join(unmeasured)} at this "
                                        f"call ({table.describe_source})")
        rejected += [(b.name, (f"lower priority than {runnable[0].name}{why}",)) for b in runnable[1:]]
        return runnable[0]
    guess = f"exact {BASELINE} runs rather than a guess ({table.describe_source})"
    for b in runnable:
        if b.name == BASELINE:
            exact = b
        elif est[b.name] is None:
            rejected.append((b.name, (f"no {mode} measurement on this card at this call: {guess}",)))
        else:
            rejected.append((b.name, (f"~{est[b.name].tflops:.0f} TFLOPS in {mode} calls, but {', '.join(unmeasured)} "
                                      f"has no {mode} measurement on this card at this call: {guess}",)))
    return exact


def _reasons_text(rejected) -> str:
    return " | ".join(f"{name}: {'; '.join(reasons)}" for name, reasons in rejected)


def _warn_once(key, msg):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def _select_uncached(problem: AttentionProblem, kernel: str, fallback: str, mode: str,
                     explain_only: bool = False) -> Selection:
    rejected: list = []
    if kernel in _registry:
        b = _registry[kernel]
        reasons = backend_reasons(b, problem)
        if reasons:
            raise ValueError(f"backend {kernel!r} cannot run this call: " + "; ".join(reasons))
        return Selection(b, kernel, mode=mode)
    if kernel == "auto":
        b = _pick([b for b in _registry.values() if b.auto_eligible], problem, rejected, mode)
        return Selection(b, kernel, tuple(rejected), mode=mode)
    if kernel not in FAMILIES:
        raise ValueError(f"unknown kernel {kernel!r}; allowed: 'auto', {FAMILIES} or a backend name "
                         f"{sorted(_registry)}")
    b = _pick([b for b in _registry.values() if b.family == kernel and b.auto_eligible], problem, rejected, mode,
              kernel)
    if b is not None:
        return Selection(b, kernel, tuple(rejected), None, mode)
    if fallback == "error":
        if explain_only:
            return Selection(None, kernel, tuple(rejected),
                             f"no {kernel} backend can run this call and SAGE3_FALLBACK=error", mode)
        raise ValueError(f"no {kernel} backend can run this call (SAGE3_FALLBACK=error): " + _reasons_text(rejected))
    if fallback == "emulate":
        b = _pick([b for b in _registry.values() if b.family == kernel and not b.auto_eligible], problem,
                  rejected, mode, kernel)
        if b is None:
            raise ValueError(f"no {kernel} backend, emulation included, can run this call: " +
                             _reasons_text(rejected))
        return Selection(b, kernel, tuple(rejected), "emulated (SAGE3_FALLBACK=emulate)", mode)
    rest, family = [], kernel
    while family in _DEGRADE:
        family = _DEGRADE[family]
        rest.append(family)
    b = _pick([b for b in _registry.values() if b.family in rest and b.auto_eligible], problem, rejected, mode,
              _FALLBACK)
    if b is None:
        raise ValueError(f"no {kernel} backend, nor any of {rest}, can run this call: " + _reasons_text(rejected))
    note = f"no {kernel} kernel can run this call; fell back to {b.family}"
    _warn_once((kernel, b.name, tuple(rejected)),
               f"sage3_diffusers: {note}. Reasons: " + _reasons_text(rejected) +
               " (set SAGE3_FALLBACK=emulate or =error to change this)")
    return Selection(b, kernel, tuple(rejected), note, mode)


def _selection_key(problem: AttentionProblem, kernel: str, mode: str) -> tuple:
    return problem, _forced_kernel(kernel), get_fallback(), mode


def _forced_kernel(kernel: str) -> str:
    """`kernel`, or what SAGE3_BACKEND forces (checked: an unknown name is an error naming the variable)."""
    forced = os.environ.get("SAGE3_BACKEND")
    if not forced:
        return kernel
    if forced != "auto" and forced not in FAMILIES and forced not in _registry:
        raise ValueError(f"SAGE3_BACKEND={forced!r} is not a backend name or kernel; allowed: 'auto', {FAMILIES} "
                         f"or a backend name {sorted(_registry)} (unset it to let each call choose)")
    return forced


def _checked_mode(mode: str | None) -> str:
    if mode is None:
        return current_mode()
    if mode not in DISPATCH_MODES:
        raise ValueError(f"unknown execution mode {mode!r}; allowed: {DISPATCH_MODES} (None: the current one)")
    return mode


def select_backend(problem: AttentionProblem, kernel: str = "auto", mode: str | None = None) -> Selection:
    """Choose the backend for `problem` in execution `mode` ("eager", "graph", "compile"; None: the mode this call
    runs in, `perf_model.current_mode()`). Cached per (problem, kernel, settings, mode)."""
    _ensure_loaded()
    key = _selection_key(problem, kernel, _checked_mode(mode))
    _, kernel, fallback, mode = key
    sel = _cache.get(key)
    if sel is None:
        sel = _select_uncached(problem, kernel, fallback, mode)
        trusted = selfcheck.vet(sel.backend, problem)  # compiled kernels prove themselves once (selfcheck.py)
        while trusted is False:  # now disabled with "failed self-check: ..." as its reason: choose again
            _cache.clear()
            sel = _select_uncached(problem, kernel, fallback, mode)
            trusted = selfcheck.vet(sel.backend, problem)
        if trusted:  # None: unchecked during CUDA graph capture, so not cached
            _cache[key] = sel
    return sel


def explain_selection(problem: AttentionProblem, kernel: str = "auto", mode: str | None = None) -> Selection:
    """`select_backend`, except that where the fallback setting "error" makes the call raise, the Selection
    says so (backend None, every rejection listed) instead of raising. Unknown names still raise."""
    _ensure_loaded()
    kernel = _forced_kernel(kernel)
    fallback = get_fallback()
    mode = _checked_mode(mode)
    if fallback != "error":
        return select_backend(problem, kernel, mode)
    return _select_uncached(problem, kernel, fallback, mode, explain_only=True)


# Representative sequence lengths under torch.compile: quarter octaves from 1 to 2**20 tokens.
_SEGMENT_LENGTHS = tuple(sorted({round(2 ** (i / 4)) for i in range(81)}))


def _problem_at(fields: tuple, seq: int) -> AttentionProblem:
    p = AttentionProblem(*fields)
    return AttentionProblem(p.batch, p.heads_q, p.heads_kv, seq, seq, p.head_dim, p.head_dim_v, p.dtype,
                            p.device_type, p.capability, p.layout, p.is_causal, p.return_lse, p.has_mask,
                            p.has_kv_lens)


@torch._dynamo.assume_constant_result
def _length_segments(fields: tuple, kernel: str, mode: str) -> tuple:
    """((smallest seq_q*seq_kv, backend name, note), ...): the choice in `mode` at every representative length,
    runs of equal choices merged. One segment (no measured table, or one backend wins at every length) means the
    choice does not depend on the lengths at all."""
    segments: list = []
    for seq in _SEGMENT_LENGTHS:
        sel = select_backend(_problem_at(fields, seq), kernel, mode)
        if not segments or segments[-1][1:] != (sel.backend.name, sel.note):
            segments.append((0 if not segments else seq * seq, sel.backend.name, sel.note))
    return tuple(segments)


def backend_for(problem: AttentionProblem, kernel: str = "auto",
                mode: str | None = None) -> tuple[AttentionBackend, str | None]:
    """(backend, fallback note) as `select_backend` chooses them, safe inside torch.compile: while tracing, the
    choice is made once per graph for the "compile" mode (the graph holds only the chosen backend's op) and
    changing settings later does not retrace (call torch.compiler.reset() or recompile).

    Under torch.compile the sizes never reach the choice as values, so static and dynamic shapes are handled
    alike and no size is specialized: the batch counts as 1 (no backend depends on it); head counts and head dims
    are model constants (`operator.index`: a guard on their value if they are symbolic); the sequence lengths
    choose through `_length_segments`: the choice is computed at seq_q = seq_kv = L for L on quarter octaves
    from 1 to 2**20 tokens, and the graph compares seq_q*seq_kv with the boundaries where that choice changes.
    So dynamo guards only on those boundaries: where one backend wins at every length (no measured table for this
    device, e.g. any CPU) there is no guard and one graph serves every length; with a measured table, one graph
    per length range with a different winner. Eagerly the choice uses the exact lengths; compiled it may differ
    from it within a quarter octave of a crossover."""
    mode = _checked_mode(mode)
    if mode != "compile":
        sel = select_backend(problem, kernel, mode)
        return sel.backend, sel.note
    p = problem
    fields = (1, operator.index(p.heads_q), operator.index(p.heads_kv), 1, 1, operator.index(p.head_dim),
              operator.index(p.head_dim_v), p.dtype, p.device_type, p.capability, p.layout, p.is_causal,
              p.return_lse, p.has_mask, p.has_kv_lens)
    segments = _length_segments(fields, kernel, mode)
    _, name, note = segments[0]
    if len(segments) > 1:
        area = p.seq_q * p.seq_kv
        for bound, seg_name, seg_note in segments[1:]:
            if area >= bound:
                name, note = seg_name, seg_note
    return _registry[name], note


# The settings' raw values, for the cache key only: os.environ.get encodes the name and decodes the value on every
# read (~1 µs each, twice per call); the mapping's own storage answers the same question for the key in ~0.05 µs.
# Where that storage is not there (not CPython's os.environ), the plain reads.
_ENV_STORE = getattr(os.environ, "_data", None)
if isinstance(_ENV_STORE, dict) and callable(getattr(os.environ, "encodekey", None)):
    _BACKEND_VAR, _FALLBACK_VAR = os.environ.encodekey("SAGE3_BACKEND"), os.environ.encodekey("SAGE3_FALLBACK")

    def _settings_key():
        return _ENV_STORE.get(_BACKEND_VAR), _fallback_override or _ENV_STORE.get(_FALLBACK_VAR)
else:
    def _settings_key():
        return os.environ.get("SAGE3_BACKEND"), _fallback_override or os.environ.get("SAGE3_FALLBACK")


def _call_key(q, k, v, kernel, layout, is_causal, return_lse, attn_mask, kv_lens, mode):
    return (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device, kernel, layout,
            is_causal, return_lse, None if attn_mask is None else type(attn_mask),
            None if kv_lens is None else (type(kv_lens), kv_lens.dtype, kv_lens.shape, kv_lens.device),
            _settings_key(), mode)


def decide(q, k, v, kernel: str, layout: str, is_causal: bool, return_lse: bool, attn_mask=None, kv_lens=None):
    """(backend, fallback note or None, empty) for one call: what `sage_attention` and the processors run.
    empty: the call has no query, batch or head, and needs no kernel.

    Eagerly (and under CUDA-graph capture) the answer is cached per call signature (shapes, dtypes, devices,
    flags, settings, execution mode), so a repeated call costs the mode check and one dict lookup: inputs are
    validated (`describe_problem`) and the backend chosen on a miss only. Under torch.compile it is traced: the
    validation becomes guards, the choice `backend_for`'s."""
    mode = current_mode()
    if mode == "compile":
        p = describe_problem(q, k, v, layout, is_causal, return_lse, attn_mask, kv_lens)
        backend, note = backend_for(p, kernel, mode)
        return backend, note, p.seq_q == 0 or p.batch == 0 or p.heads_q == 0
    key = _call_key(q, k, v, kernel, layout, is_causal, return_lse, attn_mask, kv_lens, mode)
    hit = _cache.get(key)
    if hit is None:
        _ensure_loaded()
        p = describe_problem(q, k, v, layout, is_causal, return_lse, attn_mask, kv_lens)
        backend, note = backend_for(p, kernel, mode)
        hit = (backend, note, p.seq_q == 0 or p.batch == 0 or p.heads_q == 0)
        if _selection_key(p, kernel, mode) in _cache:  # not cached: a choice not yet vetted (selfcheck, graph capture)
            if len(_cache) >= _CACHE_SIZE:
                _cache.clear()
            _cache[key] = hit
    return hit
