"""Attention processors that reproduce diffusers' default processors and swap only the attention op.

One class per family, each with the exact `__call__` parameter names of the processor it replaces
(diffusers passes only the kwargs named in the signature), and `Sage3Processor`, which works on any
of the five families: it dispatches on the module's family (tagged by `apply`, else inferred).

| family        | replaces                         | joint order    | layout | mask handling                         |
|---------------|----------------------------------|----------------|--------|---------------------------------------|
| Flux          | FluxAttnProcessor                | [text, image]  | NHD    | a mask (never passed by Flux) -> SDPA |
| SD3 / SD3.5   | JointAttnProcessor2_0 (+attn2)   | [image, text]  | NHD    | ignored, as the default does          |
| CogVideoX     | CogVideoXAttnProcessor2_0        | [text, video]  | NHD    | a mask (never passed) -> SDPA         |
| HunyuanVideo  | HunyuanVideoAttnProcessor2_0     | [video, text]  | NHD    | key mask -> per-sample key lengths    |
| HunyuanVideo  | AttnProcessor2_0 (token refiner) | text           | HND    | [B,1,S,S] mask -> exact SDPA, counted |
| Mochi         | MochiAttnProcessor2_0            | [video, text]  | NHD    | valid text first -> key lengths       |

Masks stay on the device: a boolean key mask becomes per-sample key lengths (`kv_lens`, int32 [B]) with no host
read, so masked batches compile with fullgraph and export. Backends that take `kv_lens` read them in the kernel;
for one that does not, eager calls run it on per-sample slices (one host read of the lengths) and compiled calls
run exact SDPA with the mask, the reason counted in the stats.

Processors hold no per-layer or per-step state (SD3.5 shares one instance between `attn` and `attn2`):
the layer name (`attn._sage3_layer`), the runtime (`attn._sage3_runtime`: policy, step, stats), the kernel of
the current step (`attn._sage3_kernel`) and the slot for calls made in compiled code (`attn._sage3_slot`)
live on the attention module, set by `apply`. Compiled code reads only `_sage3_kernel` and `_sage3_family`
(strings equal across blocks: one graph serves every block with the same kernel). Without `apply`, a processor
runs its fixed `kernel` (default "fp4") and records its eager calls into `stats.GLOBAL_STATS`.
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
    def _decide(self, attn) -> str:
        if self.kernel is not None:
            return self.kernel
        if torch.compiler.is_compiling():  # the module's own string: equal across blocks with the same kernel
            return getattr(attn, "_sage3_kernel", None) or "fp4"
        runtime = getattr(attn, "_sage3_runtime", None)
        if runtime is not None:
            return runtime.kernel_for(getattr(attn, "_sage3_layer", None) or type(attn).__name__)
        return "fp4"

    @staticmethod
    def _record(attn, requested, backend, reason):
        if torch.compiler.is_compiling():
            slot = getattr(attn, "_sage3_slot", None)
            if slot is not None:  # no slot (no apply): not counted in compiled code
                slot.call = (requested, backend, reason)
            return
        layer = getattr(attn, "_sage3_layer", None) or type(attn).__name__
        runtime = getattr(attn, "_sage3_runtime", None)
        if runtime is not None:
            runtime.record(layer, requested, backend, reason)
        else:
            GLOBAL_STATS.record(0, None, layer, requested, backend, reason)

    def _refuse_context_parallel(self):
        if self._parallel_config is not None:
            from .context_parallel import PROCESSOR_ROUTE_CP_ERROR
            raise NotImplementedError(PROCESSOR_ROUTE_CP_ERROR)

    def _attend(self, attn, q, k, v, *, layout: str, kv_lens=None, rows: str = "all"):
        """Attention with the layer's kernel; see `attend_key_lengths` for `kv_lens` and `rows`."""
        if self._parallel_config is not None and self.supports_context_parallel and kv_lens is None:
            return self._attend_parallel(attn, q, k, v, layout=layout)
        self._refuse_context_parallel()
        kernel = self._decide(attn)
        out, backend, note = attend_key_lengths(q, k, v, kernel, layout, q.shape[-1] ** -0.5, kv_lens, rows)
        self._record(attn, kernel, backend, note)
        return out

    def _attend_parallel(self, attn, q, k, v, *, layout: str):
        """The layer's kernel over the whole context-parallel group (this rank holds a shard of the sequence)."""
        from .context_parallel import parallel_attention
        kernel = self._decide(attn)
        nhd = [t if layout == "NHD" else t.transpose(1, 2) for t in (q, k, v)]
        out = parallel_attention(*nhd, kernel=kernel, parallel_config=self._parallel_config,
                                 on_choice=lambda backend, note: self._record(attn, kernel, backend, note))
        return out if layout == "NHD" else out.transpose(1, 2)

    def _exact(self, attn, q, k, v, *, layout: str, attn_mask, reason: str):
        self._refuse_context_parallel()
        kernel = self._decide(attn)
        out, backend, _ = _op(q, k, v, "sdpa", layout, q.shape[-1] ** -0.5, attn_mask=attn_mask)
        self._record(attn, kernel, backend, reason)
        return out

    def _delegate_exact(self, attn, hidden_states, encoder_hidden_states, attention_mask):
        from diffusers.models.attention_processor import AttnProcessor2_0
        kernel = self._decide(attn)
        out = AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                 attention_mask=attention_mask)
        self._record(attn, kernel, "sdpa", EXACT_REFINER_REASON)
        return out


def _op(q, k, v, kernel, layout, sm_scale, attn_mask=None, is_causal=False, kv_lens=None):
    backend, note = choose(q, k, v, kernel, tensor_layout=layout, attn_mask=attn_mask, is_causal=is_causal,
                           kv_lens=kv_lens)
    if kv_lens is None:
        out = backend.forward(q, k, v, layout=layout, is_causal=is_causal, sm_scale=sm_scale, return_lse=False,
                              attn_mask=attn_mask)
    else:
        out = backend.forward(q, k, v, layout=layout, is_causal=is_causal, sm_scale=sm_scale, return_lse=False,
                              kv_lens=kv_lens)
    return out, backend.name, note


def attend_key_lengths(q, k, v, kernel, layout, sm_scale, kv_lens=None, rows="all", is_causal=False):
    """Attention where sample b attends only to its first kv_lens[b] keys (int32 [B] on the device; None: all).
    rows="all": every query row attends to those keys (what a [B,1,1,N] key mask does); rows="valid": query
    rows at positions >= kv_lens[b] are zero (Mochi: padded text rows). Returns (out, backend name, note).

    The kernel is the one `kernel` gives for the unmasked call. If it takes `kv_lens`, it gets them. If not:
    eagerly it runs on per-sample slices (samples with equal lengths share a call; one host read of the
    lengths); under torch.compile the call is exact SDPA with the equivalent key mask. The note says which."""
    if kv_lens is None:
        return _op(q, k, v, kernel, layout, sm_scale, is_causal=is_causal)
    backend, note = choose(q, k, v, kernel, tensor_layout=layout, is_causal=is_causal)
    seq_dim = 2 if layout == "HND" else 1
    if backend.supports_kv_lens:
        out, name = backend.forward(q, k, v, layout=layout, is_causal=is_causal, sm_scale=sm_scale,
                                    return_lse=False, kv_lens=kv_lens), backend.name
    elif torch.compiler.is_compiling():
        out, name, _ = _op(q, k, v, "sdpa", layout, sm_scale, is_causal=is_causal, kv_lens=kv_lens)
        note = f"{backend.name} takes no kv_lens: under torch.compile the key mask runs as exact SDPA"
    else:
        out, name = _per_sample_slices(q, k, v, kernel, layout, sm_scale, kv_lens.tolist(), is_causal, seq_dim)
        note = note or f"{backend.name} takes no kv_lens: per-sample key slices"
    if rows == "valid":
        positions = torch.arange(q.shape[seq_dim], device=q.device, dtype=kv_lens.dtype)
        keep = positions[None, :] < kv_lens[:, None]  # [B, Sq]
        keep = keep[:, None, :, None] if layout == "HND" else keep[:, :, None, None]
        out = torch.where(keep, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out, name, note


def _per_sample_slices(q, k, v, kernel, layout, sm_scale, lengths, is_causal, seq_dim):
    pieces, b, name = [], 0, None
    while b < len(lengths):
        e = b + 1
        while e < len(lengths) and lengths[e] == lengths[b]:
            e += 1
        n = lengths[b]
        ob, name, _ = _op(q[b:e], k[b:e].narrow(seq_dim, 0, n), v[b:e].narrow(seq_dim, 0, n), kernel, layout,
                          sm_scale, is_causal=is_causal)
        pieces.append(ob)
        b = e
    return torch.cat(pieces, dim=0), name


def key_lengths(attention_mask: torch.Tensor, batch: int, total: int):
    """Per-sample key counts (int32 [B], on the mask's device, no host read) of a boolean key mask [B,N],
    [B,1,N] or [B,1,1,N] (True = keep); None when the mask has another structure (decided from its dtype and
    shape only). The counts are the key lengths of the call only if the mask is a right-padding mask (valid keys
    first): true by construction for some models (see the callers), else make it so with `valid_keys_first`."""
    if attention_mask.dtype != torch.bool or attention_mask.shape[-1] != total or \
            attention_mask.dim() not in (2, 3, 4) or attention_mask.numel() != batch * total:
        return None
    return attention_mask.reshape(batch, total).sum(dim=1, dtype=torch.int32)


def valid_keys_first(valid: torch.Tensor):
    """(order int64 [B, N], key counts int32 [B]) for a boolean key mask [B, N]: `order` lists each sample's valid
    keys first, in their original order, then the others (a stable sort on the device). Gathering keys and values
    along `order` turns any key mask into a right-padding one: attention does not depend on the order of keys."""
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
    return order, valid.sum(dim=1, dtype=torch.int32)


def gather_tokens(x: torch.Tensor, order: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """x's tokens along `seq_dim` (1 or 2 of a 4-D tensor) in each sample's `order` [B, N]."""
    shape = [x.shape[0], 1, 1, 1]
    shape[seq_dim] = order.shape[1]
    return x.gather(seq_dim, order.reshape(shape).expand(x.shape))


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
        # The default works in HND (B, H, S, D); here q, k, v stay NHD (B, S, H, D) views of the projections, so
        # the attention output (NHD from our kernels, and from SDPA, which follows q's layout) flattens to
        # (B, S, H*D) without the copy the default's transpose(1, 2).reshape makes. Same values: the q/k norms
        # act on the last dim, and joining text after image on the sequence dim is the same join.
        batch = hidden_states.shape[0]
        n_img = hidden_states.shape[1]
        query, key, value = _linear_qkv(attn, hidden_states, "to_qkv", ("to_q", "to_k", "to_v"))
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            eq, ek, ev = _linear_qkv(attn, encoder_hidden_states, "to_added_qkv",
                                     ("add_q_proj", "add_k_proj", "add_v_proj"))
            eq, ek, ev = (t.view(batch, -1, attn.heads, head_dim) for t in (eq, ek, ev))
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query = torch.cat([query, eq], dim=1)
            key = torch.cat([key, ek], dim=1)
            value = torch.cat([value, ev], dim=1)

        out = self._attend(attn, query, key, value, layout="NHD")
        out = out.reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
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

        # NHD (B, S, H, D) where the default works in HND: the q/k layer norms read their input in place (on a
        # transposed view they copy it first) and the attention output flattens without a copy (see SD3). RoPE
        # is written into the video rows in place, as the default does, instead of joining a new tensor.
        n_txt = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch, seq, _ = hidden_states.shape
        query, key, value = _linear_qkv(attn, hidden_states, "to_qkv", ("to_q", "to_k", "to_v"))
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query[:, n_txt:] = apply_rotary_emb(query[:, n_txt:], image_rotary_emb, sequence_dim=1)
            if not attn.is_cross_attention:
                key[:, n_txt:] = apply_rotary_emb(key[:, n_txt:], image_rotary_emb, sequence_dim=1)

        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, seq, batch)
            mask = mask.view(batch, attn.heads, -1, mask.shape[-1])
            out = self._exact(attn, query, key, value, layout="NHD", attn_mask=mask,
                              reason="attention_mask given: exact SDPA")
        else:
            out = self._attend(attn, query, key, value, layout="NHD")
        out = out.reshape(batch, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        encoder_out, out = out.split([n_txt, out.size(1) - n_txt], dim=1)
        return out, encoder_out


# ========================================================================================== HunyuanVideo

class HunyuanVideoSage3Processor(_Sage3Base):
    """Replaces `HunyuanVideoAttnProcessor2_0` (dual and single blocks). The boolean key mask becomes per-sample
    key lengths on the device; every query row, padded ones included, gets what masked SDPA gives it.
    Token-refiner modules (`AttnProcessor2_0`, arbitrary [B,1,S,S] mask) run diffusers' own processor, counted."""

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
        kv_lens = key_lengths(attention_mask, batch, total)
        if kv_lens is None:
            return self._exact(attn, query, key, value, layout="NHD", attn_mask=attention_mask,
                               reason="attention mask is not a boolean key mask: exact SDPA")
        if getattr(attn, "_sage3_family", None) != "hunyuan_video":
            # Not placed by `apply` in a HunyuanVideo transformer: the mask may have holes; valid keys first.
            order, kv_lens = valid_keys_first(attention_mask.reshape(batch, total))
            key, value = gather_tokens(key, order, 1), gather_tokens(value, order, 1)
        # Else HunyuanVideoTransformer3DModel.forward built it as `index < video tokens + valid text tokens`: a
        # right-padding key mask by construction, whose counts are the key lengths.
        return self._attend(attn, query, key, value, layout="NHD", kv_lens=kv_lens, rows="all")


# ================================================================================================= Mochi

def _mochi_rope(x, freqs_cos, freqs_sin):
    x_even, x_odd = x[..., 0::2].float(), x[..., 1::2].float()
    cos = (x_even * freqs_cos - x_odd * freqs_sin).to(x.dtype)
    sin = (x_even * freqs_sin + x_odd * freqs_cos).to(x.dtype)
    return torch.stack([cos, sin], dim=-1).flatten(-2)


class MochiSage3Processor(_Sage3Base):
    """Replaces `MochiAttnProcessor2_0`. Per sample, video tokens plus that sample's valid text tokens
    attend among themselves; rows of padded text are zero, as in the default's per-sample loop. The text mask
    (any pattern) becomes valid-text-first order and key lengths on the device."""

    family = "mochi"

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor, image_rotary_emb=None):
        query, key, value = _heads(attn, hidden_states, *_JOINT)
        eq, ek, ev = _heads(attn, encoder_hidden_states, *_ADDED)
        if image_rotary_emb is not None:
            query = _mochi_rope(query, *image_rotary_emb)
            key = _mochi_rope(key, *image_rotary_emb)

        batch, n_vid, n_txt = query.shape[0], query.shape[1], eq.shape[1]
        kv_lens = None
        if attention_mask is not None:
            if attention_mask.numel() != batch * n_txt:
                raise ValueError(f"Mochi attention_mask must hold one flag per text token and sample "
                                 f"({batch}x{n_txt}), got shape {tuple(attention_mask.shape)}")
            # The default gathers each sample's valid text tokens, attends over [video, valid text] and puts the
            # text outputs first, zero rows after: valid text first (a stable sort on the device) is the same.
            order, n_valid = valid_keys_first(attention_mask.reshape(batch, n_txt).bool())
            eq, ek, ev = (gather_tokens(t, order, 1) for t in (eq, ek, ev))
            kv_lens = n_valid + n_vid
        # NHD throughout: the attention output flattens to (B, S, H*D) without a copy (see SD3).
        q = torch.cat([query, eq], dim=1)
        k = torch.cat([key, ek], dim=1)
        v = torch.cat([value, ev], dim=1)
        out = self._attend(attn, q, k, v, layout="NHD", kv_lens=kv_lens, rows="valid")
        out = out.flatten(2, 3)
        out, encoder_out = out.split_with_sizes((n_vid, n_txt), dim=1)
        out = attn.to_out[1](attn.to_out[0](out))
        if hasattr(attn, "to_add_out"):
            encoder_out = attn.to_add_out(encoder_out)
        return out, encoder_out


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
