"""Our kernels as diffusers attention-dispatcher backends: the per-layer policy backend `apply` uses, and
"sage3" (fp4) / "sage2pp" (int8_fp8) for users of `set_attention_backend`.

The dispatcher route (what `apply` does for models whose processors call `dispatch_attention_fn`): diffusers'
own processors stay installed; `apply` sets each attention processor's `_attention_backend` to
"sage3_policy" (the processor's own attribute, never diffusers' process-wide active backend) and puts a
forward pre-hook on each attention module that writes the layer name and the runtime into `CURRENT`.
diffusers hands a backend only tensors; the backend reads `CURRENT` to pick that layer's kernel for this
step (`runtime.kernel_for`), records the call in the runtime's stats, and handles masks:
- a boolean key mask ([B, N], [B, 1, N], [B, 1, 1, N], True = keep; any pattern) -> keys and values reordered
  valid-first and per-sample key lengths (`kv_lens`), all on the device: no host sync, fullgraph and export work
  (the processors' mask core: `processors.key_lengths`, `valid_keys_first`, `attend_key_lengths`);
- eagerly, any other padding mask (`masks.padding_plan`: valid keys per sample, in any position, as a bool mask or a 0 /
  -10000 additive bias; or joint padding `valid[q] & valid[k]`) -> the quantized kernels on each sample's
  valid keys (and valid rows). The plan is read once per mask tensor: models that build one mask per
  forward (HunyuanVideo, Qwen-Image) pass the same tensor to every layer; LTX and HunyuanVideo 1.5 build
  one per layer, a host sync each;
- any other mask (under torch.compile: any mask that is not a boolean key mask) -> exact SDPA with the mask,
  counted with its reason.
`CURRENT` is a plain Python object: dynamo traces the pre-hook's attribute writes and the backend's reads
without a graph break. Under torch.compile the backend reads the kernel from the current module's
`_sage3_kernel` and records into its `_sage3_slot` (see `steps`), so compiled blocks share graphs. One model
forward at a time per process (not thread-safe).

Context parallelism (`transformer.enable_parallelism(config=ContextParallelConfig(...))`, before or after
`apply`): with `_parallel_config` set, the backend hands the call to
`sage3_diffusers.integration.context_parallel.parallel_attention(...)` with the layer's kernel (diffusers'
templated Ulysses / ring / unified attention, inference only) and records the backend that actually ran; a
key mask is gathered over the ranks there, any other mask raises. The backends are registered with
`supports_context_parallel=True` only when that module exists (else CP raises NotImplementedError).

Limits of "sage3" / "sage2pp" through `set_attention_backend` (prefer `apply`):
- Only dispatcher-based processors are reached (Flux, HunyuanVideo, Wan, ...). SD3/SD3.5, CogVideoX and
  Mochi call SDPA directly, so for them it is a no-op (diffusers' behaviour, not ours); `backend_warning`
  warns when that happens.
- One kernel for every layer and step: no policy, no step hook. Calls are counted in
  `stats.GLOBAL_STATS` under the layer name "<dispatcher:NAME>".
- A padding mask costs one host sync per layer here; other masks go to exact SDPA.
  No dropout, no LSE (except under context parallelism, where diffusers' ring merge asks for it).
- diffusers' backend names are a closed enum; registration extends it through private internals of
  diffusers 0.42 (`AttentionBackendName`, `_AttentionBackendRegistry`). `set_attention_backend` also
  sets diffusers' *global* active backend, which `reset_attention_backend()` does not undo:
  `attention_backend("native")` or `_AttentionBackendRegistry.set_active_backend(...)` does.
"""
from __future__ import annotations

import importlib.util
import weakref

import torch

from ..api import choose
from .stats import GLOBAL_STATS

POLICY_BACKEND = "sage3_policy"
DISPATCHER_BACKENDS = {"sage3": "fp4", "sage2pp": "int8_fp8"}
_CONTEXT_PARALLEL_MODULE = "sage3_diffusers.integration.context_parallel"
_registered = False


class AttentionContext:
    """The attention layer running now (written by the pre-hooks `apply` installs)."""

    def __init__(self):
        self.runtime = None
        self.layer: str | None = None
        self.module = None


CURRENT = AttentionContext()


def enter_layer_hook(runtime, layer: str):
    """A forward pre-hook for the attention module `layer`: makes it the current layer of `runtime`."""
    def sage3_enter_layer(module, args):
        CURRENT.runtime = runtime
        CURRENT.layer = layer
        CURRENT.module = module
    return sage3_enter_layer


def context_parallel_available() -> bool:
    return importlib.util.find_spec(_CONTEXT_PARALLEL_MODULE) is not None


def _extend_enum(enum_cls, member_name: str, value: str):
    existing = enum_cls._value2member_map_.get(value)
    if existing is not None:
        return existing
    member = str.__new__(enum_cls, value)
    member._name_, member._value_ = member_name, value
    member.__objclass__ = enum_cls
    enum_cls._value2member_map_[value] = member
    enum_cls._member_map_[member_name] = member
    enum_cls._member_names_.append(member_name)
    return member


def backend_member(name: str = POLICY_BACKEND):
    """diffusers' `AttentionBackendName` member of one of our backends (registering them if needed)."""
    register_dispatcher_backends()
    from diffusers.models.attention_dispatch import AttentionBackendName
    return AttentionBackendName(name)


def _padding_plan(runtime, attn_mask, batch, seq_q, seq_kv):
    """`masks.padding_plan` of the mask, or None. With a runtime, read once per mask tensor (held weakly: a
    [B, 1, S, S] mask is not kept alive past its layer)."""
    from .masks import padding_plan
    if runtime is None or torch.compiler.is_compiling():
        return padding_plan(attn_mask, batch, seq_q, seq_kv)
    cached = getattr(runtime, "_dispatch_mask", None)
    if cached is not None and cached[0]() is attn_mask and cached[1] == (batch, seq_q, seq_kv):
        return cached[2]
    plan = padding_plan(attn_mask, batch, seq_q, seq_kv)
    runtime._dispatch_mask = (weakref.ref(attn_mask), (batch, seq_q, seq_kv), plan)
    return plan


def _record(runtime, layer, requested, backend, reason=None, slot=None):
    if torch.compiler.is_compiling():
        if slot is not None:
            slot.call = (requested, backend, reason)
        elif runtime is not None:
            runtime.record(layer, requested, backend, reason)
    elif runtime is not None:
        runtime.record(layer, requested, backend, reason)
    else:
        GLOBAL_STATS.record(0, None, layer, requested, backend, reason)


def _make_backend_fn(name: str, kernel: str | None):
    """kernel None: the current layer's kernel from its runtime (the policy backend); else fixed."""
    from .masks import attend_padded
    from .processors import _op, attend_key_lengths, gather_tokens, key_lengths, valid_keys_first

    fixed_layer = f"<dispatcher:{name}>"
    fixed_slot = GLOBAL_STATS.slot(fixed_layer) if kernel is not None else None

    def sage_dispatch_backend(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                              scale=None, enable_gqa: bool = False, return_lse: bool = False,
                              _parallel_config=None):
        if kernel is None:
            runtime, layer = CURRENT.runtime, CURRENT.layer
            if runtime is None:
                raise RuntimeError(f"attention backend {name!r} serves the attention layers that "
                                   "sage3_diffusers.apply() installed; for one kernel on any model use "
                                   "set_attention_backend('sage3') or ('sage2pp')")
            slot = getattr(CURRENT.module, "_sage3_slot", None)
            requested = getattr(CURRENT.module, "_sage3_kernel", None) if torch.compiler.is_compiling() else None
            requested = requested or runtime.kernel_for(layer)
        else:
            runtime, layer, requested, slot = None, fixed_layer, kernel, fixed_slot
        if dropout_p:
            raise ValueError(f"attention backend {name!r} is inference-only: dropout_p must be 0")
        if _parallel_config is not None:
            if not context_parallel_available():
                raise NotImplementedError(
                    f"attention backend {name!r} (kernel {requested!r}, layer {layer}) with context parallelism: "
                    f"not supported without {_CONTEXT_PARALLEL_MODULE}")
            from . import context_parallel
            return context_parallel.parallel_attention(
                query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale, kernel=requested,
                parallel_config=_parallel_config, return_lse=return_lse,
                on_choice=lambda backend, note: _record(runtime, layer, requested, backend, note, slot=slot))
        if return_lse:
            raise ValueError(f"attention backend {name!r} does not return the LSE through the dispatcher")
        # GQA (fewer key/value heads) needs no repeated copies: every backend takes it (`supports_gqa`).
        sm_scale = query.shape[-1] ** -0.5 if scale is None else scale
        batch, total = query.shape[0], key.shape[1]
        if attn_mask is not None:
            backend, note = choose(query, key, value, requested, tensor_layout="NHD", is_causal=is_causal)
            if backend.name == "sdpa":
                # The layer's kernel is exact SDPA (asked for, or what the dispatcher picks for this call): the
                # mask goes to it as diffusers passes it, as the default does, without the reading, gathers and
                # host syncs the quantized kernels need. (Other mask-taking backends, such as calibration's
                # recorder, get the call as the quantized kernels do.)
                mask = attn_mask[:, None, None, :] if attn_mask.dim() == 2 else attn_mask
                _record(runtime, layer, requested, backend.name, note, slot=slot)
                return backend.forward(query, key, value, layout="NHD", is_causal=is_causal, sm_scale=sm_scale,
                                       return_lse=False, attn_mask=mask)
        kv_mask = None if attn_mask is None or is_causal else \
            (attn_mask[:, None, None, :] if attn_mask.dim() == 2 else attn_mask)
        if kv_mask is not None and key_lengths(kv_mask, batch, total) is not None:
            # A boolean key mask: valid keys first and their counts, on the device.
            order, kv_lens = valid_keys_first(kv_mask.reshape(batch, total))
            out, backend, note = attend_key_lengths(query, gather_tokens(key, order, 1),
                                                    gather_tokens(value, order, 1), requested, "NHD", sm_scale,
                                                    kv_lens)
            _record(runtime, layer, requested, backend, note, slot=slot)
            return out
        plan = None
        if attn_mask is not None and torch.compiler.is_compiling():
            plan_reason = "under torch.compile only boolean key masks take the quantized kernels"
            mask = attn_mask[:, None, None, :] if attn_mask.dim() == 2 else attn_mask
            backend, _ = choose(query, key, value, "sdpa", tensor_layout="NHD", is_causal=is_causal, attn_mask=mask)
            _record(runtime, layer, requested, backend.name, f"{plan_reason}: exact SDPA", slot=slot)
            return backend.forward(query, key, value, layout="NHD", is_causal=is_causal, sm_scale=sm_scale,
                                   return_lse=False, attn_mask=mask)
        if attn_mask is not None:
            plan = _padding_plan(runtime, attn_mask, query.shape[0], query.shape[1], key.shape[1])
            if plan is None or (is_causal and not plan.trivial):
                mask = attn_mask[:, None, None, :] if attn_mask.dim() == 2 else attn_mask
                backend, _ = choose(query, key, value, "sdpa", tensor_layout="NHD", is_causal=is_causal,
                                    attn_mask=mask)
                why = "causal with a padding mask" if plan is not None else "mask is not a padding mask"
                _record(runtime, layer, requested, backend.name, f"{why}: exact SDPA", slot=slot)
                return backend.forward(query, key, value, layout="NHD", is_causal=is_causal, sm_scale=sm_scale,
                                       return_lse=False, attn_mask=mask)

        def attend(q, k, v):
            return _op(q, k, v, requested, "NHD", sm_scale, is_causal=is_causal)
        if plan is None or plan.trivial:
            out, backend, note = attend(query, key, value)
        else:
            out, backend, note = attend_padded(attend, query, key, value, plan, seq_dim=1)
        _record(runtime, layer, requested, backend, note, slot=slot)
        return out

    sage_dispatch_backend._sage3_kernel = kernel
    return sage_dispatch_backend


def register_dispatcher_backends() -> list[str]:
    """Add "sage3_policy", "sage3" and "sage2pp" to diffusers' attention dispatcher. Idempotent; sets no
    active backend. Returns the names."""
    global _registered
    names = [POLICY_BACKEND, *DISPATCHER_BACKENDS]
    if _registered:
        return names
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    cp = context_parallel_available()
    for value, kernel in [(POLICY_BACKEND, None), *DISPATCHER_BACKENDS.items()]:
        member = _extend_enum(AttentionBackendName, value.upper(), value)
        _AttentionBackendRegistry.register(member, constraints=[], supports_context_parallel=cp)(
            _make_backend_fn(value, kernel))
    _registered = True
    return names
