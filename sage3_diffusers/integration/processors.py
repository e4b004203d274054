"""Attention processors that reproduce diffusers' default processors and swap only the attention op.

One class per family, each with the exact `__call__` parameter names of the processor it replaces
(diffusers passes only the kwargs named in the signature), and `Sage3Processor`, which works on any
of the five families: it dispatches on the module's family (tagged by `apply`, else inferred).

| family        | replaces                         | joint order    | layout | mask handling                         |
|---------------|----------------------------------|----------------|--------|---------------------------------------|
| Flux          | FluxAttnProcessor                | [text, image]  | NHD    | a mask (never passed by Flux) -> SDPA |
| SD3 / SD3.5   | JointAttnProcessor2_0 (+attn2)   | [image, text]  | HND    | ignored, as the default does          |
| CogVideoX     | CogVideoXAttnProcessor2_0        | [text, video]  | HND    | a mask (never passed) -> SDPA         |
| HunyuanVideo  | HunyuanVideoAttnProcessor2_0     | [video, text]  | NHD    | right-padding -> per-sample key prefix|
| HunyuanVideo  | AttnProcessor2_0 (token refiner) | text           | HND    | [B,1,S,S] mask -> exact SDPA, counted |
| Mochi         | MochiAttnProcessor2_0            | [video, text]  | HND    | per-sample valid text prefix          |

Processors hold no per-layer or per-step state (SD3.5 shares one instance between `attn` and `attn2`):
the layer name (`attn._sage3_layer`) and the runtime (`attn._sage3_runtime`: policy, step, stats, mask
lengths) live on the attention module, set by `apply`. Without them, a processor runs its fixed
`kernel` (default "fp4") and records into `stats.GLOBAL_STATS`.
"""
from __future__ import annotations

import torch

from ..api import choose
from .stats import GLOBAL_STATS

EXACT_REFINER_REASON = "token refiner / generic attention with an arbitrary mask: diffusers AttnProcessor2_0 (SDPA)"


def _check_kernel_name(kernel):
    if kernel is None:
        return None
    from .policy import allowed_kernels
    if kernel not in allowed_kernels():
        raise ValueError(f"Sage3Processor(kernel=...): unknown kernel {kernel!r}; allowed: "
                         f"{', '.join(allowed_kernels())}")
    return kernel


class _Sage3Base:
    """Shared attention-op plumbing. `kernel`: fixed kernel for every call (overrides the runtime's policy);
    None = ask the runtime attached by `apply` (or "fp4" without one)."""

    family: str | None = None
    # Filled by diffusers' `enable_parallelism`. Processors with `supports_context_parallel` then attend through
    # `context_parallel.parallel_attention` (the model needs our sequence plan: `prepare_context_parallel`); the
    # others raise instead of attending only within the rank's shard.
    _parallel_config = None
    supports_context_parallel = False

    def __init__(self, kernel: str | None = None):
        self.kernel = _check_kernel_name(kernel)

    def __repr__(self):
        return f"{type(self).__name__}(kernel={self.kernel!r})"

    # -------------------------------------------------------------- attention op
    def _decide(self, attn):
        layer = getattr(attn, "_sage3_layer", None) or type(attn).__name__
        runtime = getattr(attn, "_sage3_runtime", None)
        if self.kernel is not None:
            kernel = self.kernel
        elif runtime is not None:
            kernel = runtime.kernel_for(layer)
        else:
            kernel = "fp4"
        return layer, runtime, kernel

    @staticmethod
    def _record(runtime, layer, requested, backend, reason):
        if runtime is not None:
            runtime.record(layer, requested, backend, reason)
        elif not torch.compiler.is_compiling():  # no runtime to flush compiled calls into: not counted
            GLOBAL_STATS.record(0, None, layer, requested, backend, reason)

    def _refuse_context_parallel(self):
        if self._parallel_config is not None:
            from .context_parallel import PROCESSOR_ROUTE_CP_ERROR
            raise NotImplementedError(PROCESSOR_ROUTE_CP_ERROR)

    def _attend(self, attn, q, k, v, *, layout: str, valid: list[int] | None = None, rows: str = "all"):
        """Attention with the layer's kernel; see `attend_valid_prefix` for `valid` and `rows`."""
        if self._parallel_config is not None and self.supports_context_parallel and valid is None:
            return self._attend_parallel(attn, q, k, v, layout=layout)
        self._refuse_context_parallel()
        layer, runtime, kernel = self._decide(attn)
        out, backend, note = attend_valid_prefix(q, k, v, kernel, layout, q.shape[-1] ** -0.5, valid, rows)
        self._record(runtime, layer, kernel, backend, note)
        return out

    def _attend_parallel(self, attn, q, k, v, *, layout: str):
        """The layer's kernel over the whole context-parallel group (this rank holds a shard of the sequence)."""
        from .context_parallel import parallel_attention
        layer, runtime, kernel = self._decide(attn)
        nhd = [t if layout == "NHD" else t.transpose(1, 2) for t in (q, k, v)]
        out = parallel_attention(*nhd, kernel=kernel, parallel_config=self._parallel_config,
                                 on_choice=lambda backend, note: self._record(runtime, layer, kernel, backend, note))
        return out if layout == "NHD" else out.transpose(1, 2)

    def _exact(self, attn, q, k, v, *, layout: str, attn_mask, reason: str):
        self._refuse_context_parallel()
        layer, runtime, kernel = self._decide(attn)
        out, backend, _ = _op(q, k, v, "sdpa", layout, q.shape[-1] ** -0.5, attn_mask=attn_mask)
        self._record(runtime, layer, kernel, backend, reason)
        return out

    def _delegate_exact(self, attn, hidden_states, encoder_hidden_states, attention_mask):
        from diffusers.models.attention_processor import AttnProcessor2_0
        layer, runtime, kernel = self._decide(attn)
        out = AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                 attention_mask=attention_mask)
        self._record(runtime, layer, kernel, "sdpa", EXACT_REFINER_REASON)
        return out


def _op(q, k, v, kernel, layout, sm_scale, attn_mask=None, is_causal=False):
    backend, note = choose(q, k, v, kernel, tensor_layout=layout, attn_mask=attn_mask, is_causal=is_causal)
    out = backend.forward(q, k, v, layout=layout, is_causal=is_causal, sm_scale=sm_scale, return_lse=False,
                          attn_mask=attn_mask)
    return out, backend.name, note


def attend_valid_prefix(q, k, v, kernel, layout, sm_scale, valid=None, rows="all", is_causal=False):
    """Attention where sample b attends only to its first valid[b] keys (a right-padding key mask),
    without passing a mask to the kernel. rows="all": every query row attends to the valid keys (what a
    [B,1,1,N] key mask does); rows="valid": only the valid prefix attends among itself and the other rows
    are zero (Mochi). Samples with equal valid length share one call. Returns (out, backend name, note)."""
    seq_dim = 2 if layout == "HND" else 1
    total = k.shape[seq_dim]
    if valid is None or all(n == total for n in valid):
        return _op(q, k, v, kernel, layout, sm_scale, is_causal=is_causal)
    pieces, b = [], 0
    while b < len(valid):
        e = b
        while e + 1 < len(valid) and valid[e + 1] == valid[b]:
            e += 1
        n = valid[b]
        qb, kb, vb = q[b:e + 1], k[b:e + 1].narrow(seq_dim, 0, n), v[b:e + 1].narrow(seq_dim, 0, n)
        if rows == "valid":
            qb = qb.narrow(seq_dim, 0, n)
        ob, backend, note = _op(qb, kb, vb, kernel, layout, sm_scale, is_causal=is_causal)
        if rows == "valid" and n < total:
            pad = list(ob.shape)
            pad[seq_dim] = total - n
            ob = torch.cat([ob, ob.new_zeros(pad)], dim=seq_dim)
        pieces.append(ob)
        b = e + 1
    return torch.cat(pieces, dim=0), backend, note


def _key_prefix_lengths(attention_mask: torch.Tensor, batch: int, total: int):
    """Per-sample valid key lengths of a right-padding key mask [B,1,1,N] / [B,N] (bool, True = keep), or
    None when the mask is anything else. One host sync."""
    if attention_mask.dtype != torch.bool or attention_mask.shape[-1] != total or \
            attention_mask.numel() != batch * total:
        return None
    m = attention_mask.reshape(batch, total)
    valid = m.sum(dim=1)
    prefix = (torch.arange(total, device=m.device)[None, :] < valid[:, None]) == m
    host = torch.cat([valid, prefix.all(dim=1).long()]).tolist()
    if not all(host[batch:]):
        return None
    return [int(n) for n in host[:batch]]


def _heads(attn, x, projections, norms):
    """`x` through the three projections `attn.<projections>` as (B, S, heads, head_dim), with the q and k norms
    `attn.<norms>` applied where the module has them (HunyuanVideo and Mochi, joint and added streams)."""
    q, k, v = (getattr(attn, name)(x).unflatten(2, (attn.heads, -1)) for name in projections)
    norm_q, norm_k = (getattr(attn, name) for name in norms)
    if norm_q is not None:
        q = norm_q(q)
    if norm_k is not None:
        k = norm_k(k)
    return q, k, v


_JOINT = (("to_q", "to_k", "to_v"), ("norm_q", "norm_k"))
_ADDED = (("add_q_proj", "add_k_proj", "add_v_proj"), ("norm_added_q", "norm_added_k"))


# ================================================================================================= Flux

class FluxSage3Processor(_Sage3Base):
    """Replaces `FluxAttnProcessor` (double- and single-stream blocks, fused or unfused QKV)."""

    family = "flux"

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, enc_q, enc_k, enc_v = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            enc_q = attn.norm_added_q(enc_q.unflatten(-1, (-1, attn.head_dim)))
            enc_k = attn.norm_added_k(enc_k.unflatten(-1, (-1, attn.head_dim)))
            enc_v = enc_v.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([enc_q, query], dim=1)
            key = torch.cat([enc_k, key], dim=1)
            value = torch.cat([enc_v, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if attention_mask is not None:
            out = self._exact(attn, query, key, value, layout="NHD", attn_mask=attention_mask,
                              reason="attention_mask given: exact SDPA")
        else:
            out = self._attend(attn, query, key, value, layout="NHD")
        out = out.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            n_txt = encoder_hidden_states.shape[1]
            encoder_out, out = out.split_with_sizes([n_txt, out.shape[1] - n_txt], dim=1)
            out = attn.to_out[1](attn.to_out[0](out.contiguous()))
            encoder_out = attn.to_add_out(encoder_out.contiguous())
            return out, encoder_out
        return out


# ============================================================================ SD3 / SD3.5 (+ HunyuanVideo)

def _linear_qkv(attn, x, fused_name, names):
    if getattr(attn, "fused_projections", False) and getattr(attn, fused_name, None) is not None:
        qkv = getattr(attn, fused_name)(x)
        return qkv.chunk(3, dim=-1)
    return tuple(getattr(attn, n)(x) for n in names)


class SD3Sage3Processor(_Sage3Base):
    """Replaces `JointAttnProcessor2_0` (SD3, SD3.5 joint `attn` and image-only `attn2`; fused QKV
    supported, with the q/k norms applied, which diffusers' `FusedJointAttnProcessor2_0` skips).
    Like the default, `attention_mask` is ignored."""

    family = "sd3"

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None):
        batch = hidden_states.shape[0]
        n_img = hidden_states.shape[1]
        query, key, value = _linear_qkv(attn, hidden_states, "to_qkv", ("to_q", "to_k", "to_v"))
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            eq, ek, ev = _linear_qkv(attn, encoder_hidden_states, "to_added_qkv",
                                     ("add_q_proj", "add_k_proj", "add_v_proj"))
            eq, ek, ev = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (eq, ek, ev))
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query = torch.cat([query, eq], dim=2)
            key = torch.cat([key, ek], dim=2)
            value = torch.cat([value, ev], dim=2)

        out = self._attend(attn, query, key, value, layout="HND")
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        if encoder_hidden_states is not None:
            out, encoder_out = out[:, :n_img], out[:, n_img:]
            if not attn.context_pre_only:
                encoder_out = attn.to_add_out(encoder_out)
        out = attn.to_out[1](attn.to_out[0](out))
        if encoder_hidden_states is not None:
            return out, encoder_out
        return out


# ============================================================================================= CogVideoX

class CogVideoXSage3Processor(_Sage3Base):
    """Replaces `CogVideoXAttnProcessor2_0` (text concatenated before the projections, RoPE on video). Under
    context parallelism (our plan shards text and video; `apply` attaches it) it attends through
    `parallel_attention`."""

    family = "cogvideox"
    supports_context_parallel = True

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        n_txt = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch, seq, _ = hidden_states.shape
        query, key, value = _linear_qkv(attn, hidden_states, "to_qkv", ("to_q", "to_k", "to_v"))
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = torch.cat([query[:, :, :n_txt], apply_rotary_emb(query[:, :, n_txt:], image_rotary_emb)], dim=2)
            if not attn.is_cross_attention:
                key = torch.cat([key[:, :, :n_txt], apply_rotary_emb(key[:, :, n_txt:], image_rotary_emb)], dim=2)

        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, seq, batch)
            mask = mask.view(batch, attn.heads, -1, mask.shape[-1])
            out = self._exact(attn, query, key, value, layout="HND", attn_mask=mask,
                              reason="attention_mask given: exact SDPA")
        else:
            out = self._attend(attn, query, key, value, layout="HND")
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        encoder_out, out = out.split([n_txt, out.size(1) - n_txt], dim=1)
        return out, encoder_out


# ========================================================================================== HunyuanVideo

class HunyuanVideoSage3Processor(_Sage3Base):
    """Replaces `HunyuanVideoAttnProcessor2_0` (dual and single blocks). The right-padding key mask
    becomes per-sample key-prefix lengths (from the step hook's one host sync per forward, else from
    the mask); every query row, padded ones included, gets what masked SDPA gives it. Token-refiner
    modules (`AttnProcessor2_0`, arbitrary [B,1,S,S] mask) run diffusers' own processor, counted."""

    family = "hunyuan_video"

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None):
        if getattr(attn, "_sage3_family", None) == "exact" or (
                attn.add_q_proj is None and encoder_hidden_states is None and attention_mask is not None):
            return self._delegate_exact(attn, hidden_states, encoder_hidden_states, attention_mask)
        from diffusers.models.embeddings import apply_rotary_emb

        single = attn.add_q_proj is None and encoder_hidden_states is not None
        if single:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        query, key, value = _heads(attn, hidden_states, *_JOINT)
        if image_rotary_emb is not None:
            if single:
                n_txt = encoder_hidden_states.shape[1]
                query = torch.cat([apply_rotary_emb(query[:, :-n_txt], image_rotary_emb, sequence_dim=1),
                                   query[:, -n_txt:]], dim=1)
                key = torch.cat([apply_rotary_emb(key[:, :-n_txt], image_rotary_emb, sequence_dim=1),
                                 key[:, -n_txt:]], dim=1)
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            eq, ek, ev = _heads(attn, encoder_hidden_states, *_ADDED)
            query = torch.cat([query, eq], dim=1)
            key = torch.cat([key, ek], dim=1)
            value = torch.cat([value, ev], dim=1)

        out = self._masked(attn, query, key, value, encoder_hidden_states, attention_mask)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            n_txt = encoder_hidden_states.shape[1]
            out, encoder_out = out[:, :-n_txt], out[:, -n_txt:]
            if getattr(attn, "to_out", None) is not None:
                out = attn.to_out[1](attn.to_out[0](out))
            if getattr(attn, "to_add_out", None) is not None:
                encoder_out = attn.to_add_out(encoder_out)
            return out, encoder_out
        return out

    def _masked(self, attn, query, key, value, encoder_hidden_states, attention_mask):
        if attention_mask is None:
            return self._attend(attn, query, key, value, layout="NHD")
        batch, total = query.shape[0], key.shape[1]
        valid = None
        runtime = getattr(attn, "_sage3_runtime", None)
        text = runtime.text_valid if runtime is not None else None
        if text is not None and encoder_hidden_states is not None and len(text) == batch:
            n_txt = encoder_hidden_states.shape[1]
            # What HunyuanVideoTransformer3DModel.forward builds: keep idx < latent_len + text_valid.
            valid = [total - n_txt + min(n, n_txt) for n in text]
        else:
            valid = _key_prefix_lengths(attention_mask, batch, total)
        if valid is None:
            return self._exact(attn, query, key, value, layout="NHD", attn_mask=attention_mask,
                               reason="attention mask is not a right-padding key mask: exact SDPA")
        return self._attend(attn, query, key, value, layout="NHD", valid=valid, rows="all")


# ================================================================================================= Mochi

def _mochi_rope(x, freqs_cos, freqs_sin):
    x_even, x_odd = x[..., 0::2].float(), x[..., 1::2].float()
    cos = (x_even * freqs_cos - x_odd * freqs_sin).to(x.dtype)
    sin = (x_even * freqs_sin + x_odd * freqs_cos).to(x.dtype)
    return torch.stack([cos, sin], dim=-1).flatten(-2)


class MochiSage3Processor(_Sage3Base):
    """Replaces `MochiAttnProcessor2_0`. Per sample, video tokens plus that sample's valid text tokens
    attend among themselves; rows of padded text are zero, as in the default's per-sample loop. Valid
    lengths come from the step hook (one host sync per forward) or, without it, from the mask."""

    family = "mochi"

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor, image_rotary_emb=None):
        query, key, value = _heads(attn, hidden_states, *_JOINT)
        eq, ek, ev = _heads(attn, encoder_hidden_states, *_ADDED)
        if image_rotary_emb is not None:
            query = _mochi_rope(query, *image_rotary_emb)
            key = _mochi_rope(key, *image_rotary_emb)

        batch, n_vid, n_txt = query.shape[0], query.shape[1], eq.shape[1]
        runtime = getattr(attn, "_sage3_runtime", None)
        text = runtime.text_valid if runtime is not None and runtime.text_prefix else None
        if text is None or len(text) != batch:
            text = _key_prefix_lengths(attention_mask.bool(), batch, n_txt) if attention_mask is not None else None
        if text is not None:
            q = torch.cat([query, eq], dim=1).transpose(1, 2)
            k = torch.cat([key, ek], dim=1).transpose(1, 2)
            v = torch.cat([value, ev], dim=1).transpose(1, 2)
            out = self._attend(attn, q, k, v, layout="HND", valid=[n_vid + min(n, n_txt) for n in text],
                               rows="valid")
        else:  # text mask with holes: gather the valid tokens per sample, as the default does
            out = self._gathered(attn, query, key, value, eq, ek, ev, attention_mask)
        out = out.transpose(1, 2).flatten(2, 3)
        out, encoder_out = out.split_with_sizes((n_vid, n_txt), dim=1)
        out = attn.to_out[1](attn.to_out[0](out))
        if hasattr(attn, "to_add_out"):
            encoder_out = attn.to_add_out(encoder_out)
        return out, encoder_out

    def _gathered(self, attn, query, key, value, eq, ek, ev, attention_mask):
        outs = []
        total = query.shape[1] + eq.shape[1]
        for b in range(query.shape[0]):
            idx = torch.nonzero(attention_mask[b].flatten(), as_tuple=False).flatten()
            q = torch.cat([query[b:b + 1], eq[b:b + 1, idx]], dim=1).transpose(1, 2)
            k = torch.cat([key[b:b + 1], ek[b:b + 1, idx]], dim=1).transpose(1, 2)
            v = torch.cat([value[b:b + 1], ev[b:b + 1, idx]], dim=1).transpose(1, 2)
            o = self._attend(attn, q, k, v, layout="HND")
            outs.append(torch.nn.functional.pad(o, (0, 0, 0, total - o.shape[2])))
        return torch.cat(outs, dim=0)


# ======================================================================================== entry point

_FAMILY_PROCESSORS = {"flux": FluxSage3Processor, "sd3": SD3Sage3Processor, "sd35": SD3Sage3Processor,
                      "cogvideox": CogVideoXSage3Processor, "hunyuan_video": HunyuanVideoSage3Processor,
                      "mochi": MochiSage3Processor}


def infer_family(attn, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None) -> str:
    """The family of an attention module: its `apply` tag, else what its class and call look like."""
    tag = getattr(attn, "_sage3_family", None)
    if tag:
        return tag
    cls = type(attn).__name__
    if cls == "FluxAttention":
        return "flux"
    if cls == "MochiAttention":
        return "mochi"
    if getattr(attn, "add_q_proj", None) is not None:
        # SD3 joint blocks get neither a mask nor RoPE; HunyuanVideo dual blocks always get both.
        return "hunyuan_video" if (attention_mask is not None or image_rotary_emb is not None) else "sd3"
    if encoder_hidden_states is not None:
        # Text concatenated before the projections: HunyuanVideo single blocks (no to_out) put it last,
        # CogVideoX (with to_out) first.
        return "hunyuan_video" if getattr(attn, "to_out", None) is None else "cogvideox"
    plain = all(getattr(attn, n, None) in (None, False) for n in ("spatial_norm", "group_norm",
                                                                    "residual_connection"))
    if attention_mask is None and plain and getattr(attn, "rescale_output_factor", 1.0) == 1.0:
        return "sd3"  # image-only self-attention (SD3.5 attn2)
    return "exact"


class Sage3Processor(_Sage3Base):
    """One processor for Flux, SD3/SD3.5, CogVideoX, HunyuanVideo (`set_attn_processor`) and Mochi
    (assign `module.processor`, or use `apply`). Dispatches to the family processor.

    kernel: "fp4", "int8_fp8", "sdpa" or a backend name, fixed for every call; None (default) = the
    policy of the runtime `apply` attached (without one: "fp4"). `family`: force a family instead of
    inferring it per module."""

    def __init__(self, kernel: str | None = None, family: str | None = None):
        super().__init__(kernel)
        if family is not None and family not in _FAMILY_PROCESSORS:
            raise ValueError(f"unknown family {family!r}; allowed: {sorted(_FAMILY_PROCESSORS)}")
        self.family = family
        self._impls = {name: cls(kernel) for name, cls in _FAMILY_PROCESSORS.items()}

    # diffusers' `enable_parallelism` sets this on the processor it finds; the family processors that attend (and
    # refuse, or run, context parallelism) must see it too.
    @property
    def _parallel_config(self):
        return self.__dict__.get("_parallel_config_value")

    @_parallel_config.setter
    def _parallel_config(self, config):
        self.__dict__["_parallel_config_value"] = config
        for impl in self._impls.values():
            impl._parallel_config = config

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None):
        family = self.family or infer_family(attn, encoder_hidden_states, attention_mask, image_rotary_emb)
        if family == "exact":
            return self._delegate_exact(attn, hidden_states, encoder_hidden_states, attention_mask)
        impl = self._impls[family]
        if isinstance(impl, SD3Sage3Processor):
            return impl(attn, hidden_states, encoder_hidden_states, attention_mask)
        return impl(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
