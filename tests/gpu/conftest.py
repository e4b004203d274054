"""Shared fixtures of the GPU kernel tests."""
import pytest
import torch

from sage3_diffusers.numerics.attention_common import LN2, LOG2E, expand_kv_heads, online_softmax_attention
from sage3_diffusers.numerics.formats import e4m3_round
from sage3_diffusers.numerics.metrics import accuracy_metrics
from sage3_diffusers.numerics.sage2pp_reference import (P_FP8_OFFSET_LOG2, sage2pp_attention_reference,
                                                        sage2pp_quantize)


def sage2pp_reference_kv_len(q, k, v, kv_len, *, is_causal=False, sm_scale=None, row_sum="quantized_p"):
    """What a kernel with per-sample key lengths computes for one batch entry: the SageAttention2++ reference
    with the quantization over all Skv keys (K mean, K group scales and V channel scales include the padding)
    and the keys >= kv_len masked out. q [1, Hq, Sq, D], k/v [1, Hkv, Skv, D] (HND), 1 <= kv_len <= Skv.
    Returns (out fp32, lse fp32 natural log)."""
    hq, sq, d = q.shape[1], q.shape[2], q.shape[3]
    skv = k.shape[2]
    scale = d ** -0.5 if sm_scale is None else sm_scale
    qz = sage2pp_quantize(q, k, v)
    k_i8 = expand_kv_heads(qz.k_int8, hq)
    k_s = expand_kv_heads(qz.k_scale.unsqueeze(-1), hq).squeeze(-1)
    v_f8 = expand_kv_heads(qz.v_fp8, hq)
    q_scaled = qz.q_scale * (scale * LOG2E)

    def scores_log2(start, end):
        t = (qz.q_int8 @ k_i8[..., start:end, :].transpose(-1, -2)) * q_scaled.unsqueeze(-1) * k_s[..., None, start:end]
        keys = torch.arange(start, end, device=q.device)
        return t.masked_fill(keys >= kv_len, float("-inf"))

    acc, l, m = online_softmax_attention(
        scores_log2, e4m3_round, lambda s, e: v_f8[..., s:e, :], seq_q=sq, seq_kv=skv, kv_tile=128,
        p_offset_log2=P_FP8_OFFSET_LOG2, is_causal=is_causal, device=q.device,
        row_sum_of_quantized_p=row_sum == "quantized_p")
    out = acc / l.unsqueeze(-1) * expand_kv_heads(qz.v_scale.unsqueeze(-2), hq)
    k_mean = expand_kv_heads(qz.k_mean, hq)
    lse = (m + torch.log2(l) - P_FP8_OFFSET_LOG2) * LN2 + scale * (q.float() @ k_mean.transpose(-1, -2)).squeeze(-1)
    return out, lse


def _hnd(x, layout):
    return x if layout == "HND" else x.transpose(1, 2)


def check_kv_lens(out, lse, q, k, v, lens, layout, causal, *, sm_scale=None, row_sum, min_cos, max_rel_l1,
                  lse_rtol):
    """A kernel's output under per-sample key lengths `lens` (a list), each batch entry against
    (1) `sage2pp_reference_kv_len` (same quantization, keys >= kv_len masked): the kernel's usual tolerances
        (min_cos, max_rel_l1, lse_rtol relative to the largest |LSE|), and
    (2) the reference run on the entry's valid prefix alone: loose (the prefix alone is quantized differently,
        cos >= 0.9992 / rel_l1 <= 0.05 between the two references on these inputs), yet far tighter than
        attending to the padding would give.
    An entry whose clamped length is 0 must give zero rows and LSE -inf. lse may be None."""
    qh, kh, vh = (_hnd(x, layout).float() for x in (q, k, v))
    oh = _hnd(out, layout).float()
    for b, n in enumerate(lens):
        n_eff = max(0, min(n, kh.shape[2]))
        if n_eff == 0:
            assert (oh[b] == 0).all(), "an entry with no keys must give zero rows"
            if lse is not None:
                assert torch.isneginf(lse[b]).all(), "an entry with no keys must give LSE -inf"
            continue
        ref_o, ref_lse = sage2pp_reference_kv_len(qh[b:b + 1], kh[b:b + 1], vh[b:b + 1], n_eff, is_causal=causal,
                                                  sm_scale=sm_scale, row_sum=row_sum)
        m = accuracy_metrics(oh[b:b + 1], ref_o)
        assert m["cos_sim"] > min_cos and m["rel_l1"] < max_rel_l1, (b, n, m)
        if lse is not None:
            err = (lse[b:b + 1] - ref_lse).abs().max().item()
            assert err < lse_rtol * max(1.0, ref_lse.abs().max().item()), (b, n, err)
        prefix = sage2pp_attention_reference(qh[b:b + 1], kh[b:b + 1, :, :n_eff], vh[b:b + 1, :, :n_eff],
                                             is_causal=causal, sm_scale=sm_scale, row_sum=row_sum)
        mp = accuracy_metrics(oh[b:b + 1], prefix.float())
        assert mp["cos_sim"] > 0.995 and mp["rel_l1"] < 0.1, (b, n, mp)


@pytest.fixture
def kv_lens_check():
    """`check_kv_lens`: a kernel's output under per-sample key lengths against the references."""
    return check_kv_lens


@pytest.fixture(params=[
    (1, 12, 12, False, None),
    (2, 8, 4, True, None),        # GQA, causal, B > 1 (the LSE is copied chunk by chunk)
    (2, 6, 6, False, [300, 77]),  # per-sample key lengths, a last chunk narrower than the others
], ids=["mha", "gqa-causal-b2", "kv-lens"])
def head_chunk_case(request):
    """(batch, query heads, key/value heads, causal, key lengths or None) of the head-chunk tests of each
    quantized backend (backends/head_chunks.py)."""
    return request.param
