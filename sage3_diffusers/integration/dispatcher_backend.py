"""Register "sage3" (fp4) and "sage2pp" (int8_fp8) as diffusers attention-dispatcher backends.

After `register_dispatcher_backends()` (done by importing `sage3_diffusers.integration`),
`transformer.set_attention_backend("sage3")` and `with attention_backend("sage2pp"): ...` work.

Limits (prefer `apply` / `Sage3Processor`):
- Only dispatcher-based processors are reached: Flux and HunyuanVideo here. SD3/SD3.5, CogVideoX and
  Mochi call SDPA directly, so for them it is a no-op (diffusers' behaviour, not ours); `backend_warning`
  warns when that happens.
- One kernel for every layer and step: no policy, no step hook. Calls are counted in
  `stats.GLOBAL_STATS` under the layer name "<dispatcher:NAME>".
- A right-padding key mask (HunyuanVideo) costs one host sync per layer here (the processors read it
  once per forward); other masks go to exact SDPA. No context parallelism, no dropout, no LSE.
- diffusers' backend names are a closed enum; registration extends it through private internals of
  diffusers 0.42 (`AttentionBackendName`, `_AttentionBackendRegistry`). `set_attention_backend` also
  sets diffusers' *global* active backend, which `reset_attention_backend()` does not undo:
  `attention_backend("native")` or `_AttentionBackendRegistry.set_active_backend(...)` does.
"""
from __future__ import annotations

from ..api import choose
from .stats import GLOBAL_STATS

DISPATCHER_BACKENDS = {"sage3": "fp4", "sage2pp": "int8_fp8"}
_registered = False


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


def _make_backend_fn(name: str, kernel: str):
    from .processors import _key_prefix_lengths, attend_valid_prefix

    layer = f"<dispatcher:{name}>"

    def sage_dispatch_backend(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                              scale=None, enable_gqa: bool = False, return_lse: bool = False,
                              _parallel_config=None):
        if _parallel_config is not None:
            raise NotImplementedError(f"attention backend {name!r} does not support context parallelism")
        if dropout_p:
            raise ValueError(f"attention backend {name!r} is inference-only: dropout_p must be 0")
        if return_lse:
            raise ValueError(f"attention backend {name!r} does not return the LSE through the dispatcher")
        sm_scale = query.shape[-1] ** -0.5 if scale is None else scale
        valid = None
        if attn_mask is not None:
            valid = _key_prefix_lengths(attn_mask, query.shape[0], key.shape[1])
            if valid is None:
                mask = attn_mask[:, None, None, :] if attn_mask.dim() == 2 else attn_mask
                backend, _ = choose(query, key, value, "sdpa", tensor_layout="NHD", is_causal=is_causal,
                                    attn_mask=mask)
                GLOBAL_STATS.record(0, None, layer, kernel, backend.name, "mask is not right-padding: exact SDPA")
                return backend.forward(query, key, value, layout="NHD", is_causal=is_causal, sm_scale=sm_scale,
                                       return_lse=False, attn_mask=mask)
        out, backend, note = attend_valid_prefix(query, key, value, kernel, "NHD", sm_scale, valid,
                                                 is_causal=is_causal)
        GLOBAL_STATS.record(0, None, layer, kernel, backend, note)
        return out

    sage_dispatch_backend._sage3_kernel = kernel
    return sage_dispatch_backend


def register_dispatcher_backends() -> list[str]:
    """Add "sage3" and "sage2pp" to diffusers' attention dispatcher. Idempotent. Returns the names."""
    global _registered
    if _registered:
        return list(DISPATCHER_BACKENDS)
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    for value, kernel in DISPATCHER_BACKENDS.items():
        member = _extend_enum(AttentionBackendName, value.upper(), value)
        _AttentionBackendRegistry.register(member, constraints=[], supports_context_parallel=False)(
            _make_backend_fn(value, kernel))
    _registered = True
    return list(DISPATCHER_BACKENDS)
