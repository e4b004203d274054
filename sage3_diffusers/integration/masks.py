"""Padding masks as the quantized kernels can take them: which keys (and query rows) of each sample are valid.

The quantized kernels take no mask. A padding mask can still run on them when, for every sample, all query
rows and heads see the same set of keys: attention over exactly those keys (gathered, or a slice when they
are contiguous) is what the masked softmax computes. Two shapes of padding mask occur in diffusers' models:

- key padding (`rows="all"`): one set of valid keys per sample, the same for every query row and head.
  Right padding of a [video, text] sequence (HunyuanVideo), text first with padding in the middle
  ([text, pad, image]: Qwen-Image), left padding (LTX-2's Gemma prompts without registers), or an additive
  bias of 0 / large negative values (LTX and LTX-2 pass `(1 - mask) * -10000`, repeated over heads).
- joint padding (`rows="valid"`): the mask is `keep[q] & keep[k]` (HunyuanVideo 1.5 builds it as
  [B, 1, S, S]): valid rows attend to valid keys; rows of padding have no valid key, and get zeros, which is
  what torch's SDPA returns for a fully masked row.

Anything else (a bias with other values, rows that differ) is not a padding mask: `padding_plan` returns
None and the caller runs exact SDPA with the mask. Reading a mask costs one host sync (the per-sample valid
keys, B x S_kv booleans, come to the host); a [B, 1, S, S] mask is reduced on its device first.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# An additive bias at or below this is a masked key: exp(-1e3) underflows to 0 in fp32 next to any
# unmasked score, so dropping the key is what the softmax computes.
MASKED_BIAS = -1.0e3


@dataclass(frozen=True)
class PaddingPlan:
    """Per sample: the valid key positions (`keys[b]`: None = all, `(start, stop)` = a contiguous range,
    or a 1-D index tensor), and whether padded query rows are zero (`rows="valid"`) or attend like the
    others (`rows="all"`)."""
    keys: tuple
    rows: str = "all"

    @property
    def trivial(self) -> bool:
        return self.rows == "all" and all(k is None for k in self.keys)


def _keep(mask: torch.Tensor) -> torch.Tensor | None:
    """Bool keep-mask of a bool mask or an additive bias of 0 / <= MASKED_BIAS; None for any other bias."""
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        return None
    keep = mask == 0
    if not bool((keep | (mask <= MASKED_BIAS)).all()):
        return None
    return keep


def _as_4d(mask: torch.Tensor, batch: int):
    """The mask as [B or 1, H or 1, Sq or 1, Sk] (diffusers passes [B, Sk], [B, 1, Sk], [B, Sq, Sk] or 4-D)."""
    if mask.dim() == 2:
        return mask[:, None, None, :]
    if mask.dim() == 3:
        return mask[:, None, :, :]
    if mask.dim() == 4:
        return mask
    return None


def _key_ranges(keep_rows: torch.Tensor):
    """Per sample (host bool [B, S]): None (all valid), (start, stop) (one contiguous run) or an index tensor."""
    out = []
    total = keep_rows.shape[1]
    for row in keep_rows:
        idx = torch.nonzero(row, as_tuple=False).flatten()
        n = idx.numel()
        if n == 0:
            return None  # a sample without a valid key: its rows are undefined (NaN) in SDPA; leave it to SDPA
        if n == total:
            out.append(None)
        elif int(idx[-1]) - int(idx[0]) + 1 == n:
            out.append((int(idx[0]), int(idx[-1]) + 1))
        else:
            out.append(idx)
    return tuple(out)


def padding_plan(attn_mask: torch.Tensor | None, batch: int, seq_q: int, seq_kv: int) -> PaddingPlan | None:
    """The padding plan of `attn_mask` for a (batch, seq_q, seq_kv) attention, or None when the mask is not
    a key-padding or joint-padding mask (see the module doc). No mask: a trivial plan."""
    if attn_mask is None:
        return PaddingPlan(keys=(None,) * batch)
    keep = _keep(attn_mask)
    if keep is None:
        return None
    keep = _as_4d(keep, batch)
    if keep is None or keep.shape[-1] != seq_kv or keep.shape[0] not in (1, batch) or keep.shape[2] not in (1, seq_q):
        return None
    keep = keep.expand(batch, keep.shape[1], keep.shape[2], seq_kv)
    # Every head the same (LTX repeats the mask over heads).
    if keep.shape[1] > 1 and not bool((keep == keep[:, :1]).all()):
        return None
    keep = keep[:, 0]  # [B, Sq or 1, Sk]
    if keep.shape[1] == 1:
        ranges = _key_ranges(keep[:, 0].cpu())
        return None if ranges is None else PaddingPlan(keys=ranges, rows="all")
    # [B, Sq, Sk]: the same keys for every row (key padding), else valid[q] & valid[k] with valid the
    # diagonal (joint padding). The first and last rows tell which one to check.
    first = keep[:, :1]
    key_only = bool((keep[:, -1:] == first).all())
    if not key_only and seq_q != seq_kv:
        return None
    valid = first[:, 0] if key_only else keep.diagonal(dim1=1, dim2=2)  # [B, Sk]
    if not _rows_match(keep, valid, key_only):
        return None
    ranges = _key_ranges(valid.cpu())
    return None if ranges is None else PaddingPlan(keys=ranges, rows="all" if key_only else "valid")


# Rows of a [B, Sq, Sk] mask compared per chunk of at most this many elements: HunyuanVideo 1.5's
# [1, 1, S, S] mask is S^2 booleans (2.6 GB at 480p, 13 GB at 720p); no full-size temporary is made.
_CHUNK_ELEMENTS = 1 << 27


def _rows_match(keep: torch.Tensor, valid: torch.Tensor, key_only: bool) -> bool:
    """Every row of `keep` [B, Sq, Sk] is `valid` (key padding), or `valid[q] & valid` (joint padding)."""
    batch, seq_q, seq_kv = keep.shape
    step = max(1, _CHUNK_ELEMENTS // max(1, batch * seq_kv))
    checks = []
    for lo in range(0, seq_q, step):
        rows = keep[:, lo:lo + step]
        expected = valid[:, None, :] if key_only else valid[:, lo:lo + step, None] & valid[:, None, :]
        checks.append((rows == expected).all())
    return bool(torch.stack(checks).all())  # one host sync


def _select(x: torch.Tensor, keys, seq_dim: int) -> torch.Tensor:
    if keys is None:
        return x
    if isinstance(keys, tuple):
        return x.narrow(seq_dim, keys[0], keys[1] - keys[0])
    return x.index_select(seq_dim, keys.to(x.device))


def _same(a, b) -> bool:
    if torch.is_tensor(a) and torch.is_tensor(b):
        return a.shape == b.shape and bool(torch.equal(a, b))
    if torch.is_tensor(a) or torch.is_tensor(b):
        return False
    return a == b


def attend_padded(op, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: PaddingPlan, seq_dim: int):
    """Run `op(q, k, v) -> (out, backend, note)` per group of consecutive samples with the same valid keys,
    on the valid keys only (and, for `rows="valid"`, the valid query rows, the others zero). Returns
    (out, backend, note) of the last call."""
    if plan.trivial:
        return op(q, k, v)
    pieces, b, batch = [], 0, q.shape[0]
    backend = note = None
    while b < batch:
        e = b
        while e + 1 < batch and _same(plan.keys[e + 1], plan.keys[b]):
            e += 1
        keys = plan.keys[b]
        qb, kb, vb = q[b:e + 1], _select(k[b:e + 1], keys, seq_dim), _select(v[b:e + 1], keys, seq_dim)
        if plan.rows == "valid" and keys is not None:
            ob, backend, note = op(_select(qb, keys, seq_dim), kb, vb)
            full = list(ob.shape)
            full[seq_dim] = q.shape[seq_dim]
            out = ob.new_zeros(full)
            if isinstance(keys, tuple):
                out.narrow(seq_dim, keys[0], keys[1] - keys[0]).copy_(ob)
            else:
                out.index_copy_(seq_dim, keys.to(ob.device), ob)
            ob = out
        else:
            ob, backend, note = op(qb, kb, vb)
        pieces.append(ob)
        b = e + 1
    return (pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)), backend, note


__all__ = ["PaddingPlan", "padding_plan", "attend_padded", "MASKED_BIAS"]
