"""Context parallelism (Ulysses, ring, unified) with our kernels, on diffusers' own engine.

diffusers' `enable_parallelism(config=ContextParallelConfig(...))` shards a transformer's sequence over ranks
(split/gather hooks from the model's `_cp_plan`) and gives every dispatcher-aware processor the config; the
attention backend then runs diffusers' templated Ulysses / ring / unified attention, which calls a backend's
`forward_op` on local or rotated key chunks and merges ring partials by their log-sum-exp. `parallel_attention`
is that backend side for our kernels: its `forward_op` picks a backend through our dispatcher and asks it for
(out, lse); every backend's LSE is that of the unsmoothed scores (tests/test_lse.py), which the merge needs.

Scope and limits:
- Inference only: inputs that require grad raise (our kernels have no backward).
- No causal masks, no GQA (diffusers' templated attention has neither) and no dropout.
- Masks: a query-independent boolean key mask ([B, S_kv] or [B, 1, 1, S_kv] over the *local* keys, True = keep) is
  all-gathered into the global key order (once per mask tensor: a model passes the same one to every layer), and
  each `forward_op` call attends only to the valid keys of the chunk it is given (packed per sample; a
  right-padding mask is a plain prefix). This works for Ulysses, ring, unified and both "anything" variants.
  An additive 0 / large-negative bias counts as such a mask. Anything else (a mask with a query dimension, other
  float masks) raises. A sample whose first chunk (the rank's own
  under ring attention, all keys under Ulysses) is entirely masked raises: diffusers' LSE merge cannot start from
  an empty chunk (it would produce NaN), and attention over no keys is undefined.
- Model plans: the model registry holds plans for models diffusers ships without one (`ModelFamily.cp_plan`):
  HunyuanVideo (dispatcher route) and CogVideoX (our processors only: its own call SDPA directly);
  `prepare_context_parallel(transformer)` attaches the plan and the hooks it needs (`apply` calls it).
"""
from __future__ import annotations

import torch

from ..api import choose

PROCESSOR_ROUTE_CP_ERROR = (
    "sage3_diffusers: this attention processor cannot run under context parallelism (it would attend only within "
    "each rank's shard). Context parallelism works through sage3_diffusers.apply() on models whose processors call "
    "dispatch_attention_fn (Flux, Wan, Qwen-Image, LTX, HunyuanVideo, ...) and on CogVideoX, or through "
    "set_attention_backend('sage3' or 'sage2pp')")

# ------------------------------------------------------------------------------------------- the attention op


def _check_call(query, key, value, is_causal, parallel_config):
    cp = getattr(parallel_config, "context_parallel_config", None)
    if cp is None:
        raise ValueError("parallel_attention needs a diffusers ParallelConfig with a context_parallel_config "
                         f"(set up by transformer.enable_parallelism), got {type(parallel_config).__name__}")
    if cp._mesh is None:
        raise ValueError("the ContextParallelConfig has no device mesh yet: call transformer.enable_parallelism "
                         "(or ParallelConfig.setup) first")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        raise RuntimeError("sage3_diffusers context-parallel attention is inference-only: the inputs require grad "
                           "(run under torch.no_grad() / torch.inference_mode())")
    if is_causal:
        raise ValueError("context-parallel attention does not take is_causal=True (diffusers' templated attention "
                         "has no causal mode)")
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(f"query, key, value must be (B, S, H, D), got {tuple(query.shape)}, {tuple(key.shape)}, "
                         f"{tuple(value.shape)}")
    if key.shape[2] != query.shape[2]:
        raise ValueError(f"context-parallel attention does not take GQA ({query.shape[2]} query heads, "
                         f"{key.shape[2]} key/value heads): diffusers' templated attention has no GQA")
    return cp


def _local_key_mask(attn_mask, batch, seq_kv):
    """The mask as a [B, S_kv] bool key mask (True = keep), or ValueError if it is not one. Takes what the one-GPU
    path takes as a key mask (`masks`): bool, or an additive bias of 0 / large negative, over the keys only."""
    from .masks import _as_4d, _keep
    keep = _keep(attn_mask)
    if keep is None:
        raise ValueError("context-parallel attention takes only key masks: boolean (True = keep) or an additive bias "
                         f"of 0 / large negative values; got a {attn_mask.dtype} mask with other values")
    if keep.shape[-1] != seq_kv:
        raise ValueError(f"context-parallel attention: the mask covers {keep.shape[-1]} keys but this rank "
                         f"holds {seq_kv} (the mask must be over the rank's local keys, as the model's plan shards "
                         "them)")
    m4 = _as_4d(keep, batch)
    if m4 is None or m4.shape[0] not in (1, batch) or m4.shape[1] != 1 or m4.shape[2] != 1:
        raise ValueError(f"context-parallel attention takes only query-independent key masks, [B, S_kv], "
                         f"[B, 1, S_kv] or [B, 1, 1, S_kv]; got shape {tuple(attn_mask.shape)}")
    return m4[:, 0, 0, :].expand(batch, seq_kv)


def _all_gather_seq(x: torch.Tensor, group) -> tuple[torch.Tensor, list[int]]:
    """Concatenate every rank's [B, S_r] tensor along dim 1 in rank order (ranks may hold different S_r)."""
    import torch.distributed as dist
    from diffusers.models._modeling_parallel import gather_size_by_comm

    sizes = gather_size_by_comm(x.shape[1], group)
    width = max(sizes)
    padded = torch.zeros(x.shape[0], width, dtype=torch.uint8, device=x.device)  # gloo has no bool collectives
    padded[:, :x.shape[1]] = x.to(torch.uint8)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:, :n] for p, n in zip(parts, sizes)], dim=1).bool(), sizes


class _ForwardOp:
    """diffusers' `forward_op` for one `parallel_attention` call: attention of the given (local or rotated) chunk
    through our dispatcher, returning (out, lse [B, S, H]) in the model layout.

    With a key mask, `chunk_keys` maps the i-th call to the global key positions of the keys it receives: all of
    them for Ulysses, the ring chunk (ring_rank + i) % ring_degree for ring and unified attention, which is the
    order diffusers' ring attention visits chunks in."""

    def __init__(self, kernel, scale, global_mask, chunk_keys, on_choice):
        self.kernel, self.scale = kernel, scale
        self.global_mask = global_mask  # [B, S_global] bool on the host, or None
        self.chunk_keys = chunk_keys    # call index -> slice of global key positions
        self.on_choice = on_choice  # called once per parallel_attention call (not per chunk or per sample)
        self.calls = 0

    def _attend(self, q, k, v, return_lse):
        """(out, lse [B, S, H] or None). The LSE only where it is used (ring merges; Ulysses asks for none): for
        exact SDPA it costs a second pass over the scores."""
        backend, note = choose(q, k, v, self.kernel, tensor_layout="NHD", return_lse=return_lse)
        if self.on_choice is not None:
            self.on_choice(backend.name, note)
            self.on_choice = None
        res = backend.forward(q, k, v, layout="NHD", is_causal=False, sm_scale=self.scale, return_lse=return_lse)
        if not return_lse:
            return res, None
        return res[0], res[1].transpose(1, 2)  # [B, H, S] -> [B, S, H]

    def __call__(self, ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                 _save_ctx=True, _parallel_config=None):
        if dropout_p:
            raise ValueError("context-parallel attention is inference-only: dropout_p must be 0")
        if self.global_mask is None:
            out, lse = self._attend(query, key, value, return_lse)
        else:
            out, lse = self._masked(query, key, value, return_lse)
        self.calls += 1
        return (out, lse) if return_lse else out

    def _masked(self, query, key, value, return_lse):
        keys = self.chunk_keys(self.calls)
        mask = self.global_mask[:, keys]
        if mask.shape[1] != key.shape[1]:
            raise RuntimeError(f"context-parallel attention: call {self.calls} got {key.shape[1]} keys but the "
                               f"global key mask assigns it {mask.shape[1]}")
        if bool(mask.all()):
            return self._attend(query, key, value, return_lse)
        outs, lses = [], []
        for b in range(query.shape[0]):
            idx = mask[b].nonzero().flatten()
            qb = query[b:b + 1]
            if idx.numel() == 0:
                if self.calls == 0:
                    raise ValueError(f"context-parallel attention: every key of the first chunk is masked for "
                                     f"sample {b} (the rank's own chunk under ring attention, all keys under "
                                     "Ulysses); diffusers' LSE merge cannot start from an empty chunk. Under ring "
                                     "attention use a plan that keeps valid tokens in every rank's shard")
                outs.append(torch.zeros_like(qb))
                lses.append(torch.full(qb.shape[:3], float("-inf"), dtype=torch.float32, device=qb.device))
                continue
            n = idx.numel()
            if bool((idx == torch.arange(n)).all()):  # right padding: the valid keys are a prefix
                kb, vb = key[b:b + 1, :n], value[b:b + 1, :n]
            else:
                dev_idx = idx.to(key.device)
                kb, vb = key[b:b + 1].index_select(1, dev_idx), value[b:b + 1].index_select(1, dev_idx)
            ob, lb = self._attend(qb, kb, vb, return_lse)
            outs.append(ob)
            lses.append(lb)
        return torch.cat(outs, dim=0), (torch.cat(lses, dim=0) if return_lse else None)


def _no_backward(ctx, *args, **kwargs):
    raise RuntimeError("sage3_diffusers context-parallel attention is inference-only (no backward)")


def _chunk_keys(cp, key_sizes):
    """call index -> slice of global key positions of the keys that call receives."""
    bounds = [0]
    for n in key_sizes:
        bounds.append(bounds[-1] + n)
    if cp.ring_degree == 1:  # Ulysses (plain or "anything"): every key, in rank order
        return lambda i: slice(0, bounds[-1])
    per_ring = cp.ulysses_degree  # unified: ring chunk j holds the flattened ranks j*U .. j*U+U-1
    ring_rank = cp._ring_local_rank

    def chunk(i):
        j = (ring_rank + i) % cp.ring_degree
        return slice(bounds[j * per_ring], bounds[(j + 1) * per_ring])

    return chunk


# A model builds its mask once per forward and passes the same tensor to every layer: the gathered global mask is
# kept for that tensor (a strong reference, so its identity cannot be recycled). Every rank runs the same layers on
# the same masks, so all ranks hit or miss together and skip or join the collective together.
_MASK_CACHE: dict = {}


def _global_key_mask(attn_mask, batch, seq_kv, cp):
    """(global key mask [B, S_global] on the host or None when there is none or it keeps every key, call index ->
    slice of global key positions)."""
    if attn_mask is None:
        return None, None
    cached = _MASK_CACHE.get("entry")
    if cached is not None and cached[0] is attn_mask and cached[1] is cp:
        return cached[2]
    local = _local_key_mask(attn_mask, batch, seq_kv)
    gathered, sizes = _all_gather_seq(local, cp._flattened_mesh.get_group())
    global_mask = gathered.cpu()  # one host sync per mask; every chunk's index lists come from it
    result = (None, None) if bool(global_mask.all()) else (global_mask, _chunk_keys(cp, sizes))
    _MASK_CACHE["entry"] = (attn_mask, cp, result)
    return result


def parallel_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, attn_mask=None,
                       is_causal: bool = False, scale: float | None = None, kernel: str, parallel_config,
                       return_lse: bool = False, on_choice=None):
    """Attention of this rank's (B, S_local, H, D) query/key/value shards over the whole context-parallel group,
    through diffusers' templated Ulysses / ring / unified attention with our kernel `kernel` (a family, "auto" or a
    backend name, chosen per call by our dispatcher). Returns out (B, S_local, H, D), or (out, lse (B, S_local, H))
    with return_lse. `on_choice(backend_name, fallback_note)` is called once per call with the dispatcher's choice.
    Inference only; see the module docstring for masks."""
    from diffusers.models.attention_dispatch import _templated_context_parallel_attention

    cp = _check_call(query, key, value, is_causal, parallel_config)
    sm_scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    global_mask, chunk_keys = _global_key_mask(attn_mask, query.shape[0], key.shape[1], cp)
    forward_op = _ForwardOp(kernel, sm_scale, global_mask, chunk_keys, on_choice)
    return _templated_context_parallel_attention(
        query, key, value, None, 0.0, False, sm_scale, False, return_lse,
        forward_op=forward_op, backward_op=_no_backward, _parallel_config=parallel_config)


# ---------------------------------------------------------------------------------------------- model plans
#
# Plans for models diffusers ships without one live in the model registry (`ModelFamily.cp_plan`, with the
# hooks they need in `prepare_cp` / `unprepare_cp`): HunyuanVideo (models/hunyuan_video.py) and CogVideoX
# (models/cogvideox.py).


def _family_with_plan(transformer):
    from . import models
    fam = models.for_transformer(transformer)
    if fam is None or fam.cp_plan is None or getattr(type(transformer), "_cp_plan", None) is not None:
        return None
    return fam


def prepare_context_parallel(transformer) -> bool:
    """Make `transformer.enable_parallelism(config=ContextParallelConfig(...))` work on a model diffusers ships
    without a `_cp_plan`: attach the registry's plan (an instance attribute) and the hooks it needs. Idempotent; a
    no-op (False) for models that have their own plan or none in the registry. Raises for model variants the plan
    cannot shard, and on the processor route unless our processors are installed."""
    fam = _family_with_plan(transformer)
    if fam is None:
        return False
    cls = type(transformer).__name__
    if fam.route == "processor":
        processors = [getattr(m, "processor", None) for m in transformer.modules() if hasattr(m, "processor")]
        if not processors or not all(getattr(p, "supports_context_parallel", False) for p in processors):
            raise ValueError(f"{cls}: diffusers' own attention processors call SDPA directly and cannot run context "
                             "parallelism; install ours first with sage3_diffusers.apply(), which attaches the plan")
    if fam.prepare_cp is not None:
        fam.prepare_cp(transformer)
    transformer._cp_plan = fam.cp_plan()
    return True


def unprepare_context_parallel(transformer) -> None:
    """Undo `prepare_context_parallel` (the model must not have parallelism enabled)."""
    if "_cp_plan" in transformer.__dict__:
        del transformer.__dict__["_cp_plan"]
    fam = _family_with_plan(transformer)
    if fam is not None and fam.unprepare_cp is not None:
        fam.unprepare_cp(transformer)
