"""GPU tests of the Triton SageAttention2++ kernels against the torch reference (numerics/sage2pp_reference.py).

Kernel vs reference should agree to fp32 rounding (same quantization, same 128-token key tiles, same FP8
rounding of P); kernel vs fp32 SDPA should be as accurate as the reference itself. Outputs are poisoned with
NaN before each run and must be fully written.
"""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from sage3_diffusers.backends.sdpa import exact_lse
from sage3_diffusers.numerics.metrics import accuracy_metrics
from sage3_diffusers.numerics.sage2pp_reference import sage2pp_attention_reference, sage2pp_quantize

ROW_SUM = "p_tilde"  # the Triton kernel's softmax denominator: the fp32 sum of P̃ (see _accumulate_pv)

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
]

DEV = "cuda"


def _k():
    from sage3_diffusers.kernels.triton import int8fp8
    return int8fp8


def _dit_inputs(b, hq, hkv, sq, skv, d, dtype, *, k_offset=8.0, scale=1.0, seed=None):
    """DiT-like: Q with a few outlier channels, K with a large per-channel offset, V plain."""
    g = torch.Generator(device=DEV)
    g.manual_seed(seed if seed is not None else torch.randint(0, 2**31, (1,)).item())
    q = torch.randn(b, hq, sq, d, device=DEV, generator=g)
    q[..., : max(1, d // 16)] *= 8.0
    k = torch.randn(b, hkv, skv, d, device=DEV, generator=g) + k_offset * torch.randn(d, device=DEV, generator=g)
    v = torch.randn(b, hkv, skv, d, device=DEV, generator=g)
    return [(x * scale).to(dtype) for x in (q, k, v)]


def _to_layout(x, layout):
    return x if layout == "HND" else x.transpose(1, 2).contiguous()


def _from_layout(x, layout):
    return x if layout == "HND" else x.transpose(1, 2)


def _exact(q, k, v, causal, scale=None):
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1]).float()


def _check(q, k, v, *, layout="HND", causal=False, gran="per_thread", q_block=128, config=None, use_tma=None,
           pv_fp8=None, tol_ref=5e-3, check_ref=True):
    """q/k/v in HND; run the kernel in `layout` with poisoned outputs; compare with reference and exact."""
    m = _k()
    b, hq, sq, d = q.shape
    qi, ki, vi = (_to_layout(x, layout) for x in (q, k, v))
    snap = [x.clone() for x in (qi, ki, vi)]
    out = torch.full_like(qi, float("nan"))
    lse = torch.full((b, hq, sq), float("nan"), device=DEV)
    o, l = m.int8fp8_attention(qi, ki, vi, layout=layout, is_causal=causal, return_lse=True, qk_quant_gran=gran,
                               q_block=q_block, config=config, use_tma=use_tma, pv_fp8=pv_fp8, out=out, lse=lse)
    assert o.data_ptr() == out.data_ptr() and l.data_ptr() == lse.data_ptr()
    for before, after in zip(snap, (qi, ki, vi)):
        assert torch.equal(before, after), "inputs were modified"
    assert not torch.isnan(o).any(), "output not fully written (NaN poison left) or NaN produced"
    assert not torch.isnan(l).any(), "lse not fully written"
    o = _from_layout(o, layout)
    exact = _exact(q, k, v, causal)
    e_lse = exact_lse(q.float(), k.float(), scale=d ** -0.5, is_causal=causal)
    ref, ref_lse = sage2pp_attention_reference(q, k, v, is_causal=causal, return_lse=True, qk_quant_gran=gran,
                                               q_block=q_block, row_sum=ROW_SUM)
    m_ker = accuracy_metrics(o, exact)
    m_ref = accuracy_metrics(ref, exact)
    if check_ref:
        m_kr = accuracy_metrics(o, ref)
        assert m_kr["cos_sim"] > 0.9995 and m_kr["rel_l1"] < tol_ref, (m_kr, m_ker, m_ref)
        assert (l - ref_lse).abs().max().item() < 1e-2 * max(1.0, ref_lse.abs().max().item()), "lse vs reference"
    # as accurate as the reference numerics (small slack for rounding)
    assert m_ker["rel_l1"] < 1.15 * m_ref["rel_l1"] + 2e-3, (m_ker, m_ref)
    assert m_ker["cos_sim"] > min(0.99, m_ref["cos_sim"] - 0.005), (m_ker, m_ref)
    ref_lse_err = (ref_lse - e_lse).abs().max().item()
    assert (l - e_lse).abs().max().item() <= 1.2 * ref_lse_err + 1e-3 * max(1.0, e_lse.abs().max().item()), \
        "lse vs exact"
    return m_ker


CASES = [
    # b, hq, hkv, sq, skv, d, causal, layout, dtype
    (1, 2, 2, 1, 1, 64, False, "HND", torch.bfloat16),
    (1, 2, 2, 1, 77, 128, False, "NHD", torch.float16),
    (2, 3, 3, 77, 77, 64, False, "HND", torch.bfloat16),
    (3, 4, 4, 77, 77, 128, True, "NHD", torch.bfloat16),
    (1, 2, 2, 300, 300, 128, False, "HND", torch.float16),   # S not a tile multiple
    (1, 2, 2, 300, 300, 64, True, "HND", torch.bfloat16),
    (2, 8, 2, 200, 520, 128, False, "NHD", torch.bfloat16),  # GQA, Sq < Skv
    (1, 6, 3, 520, 200, 64, True, "HND", torch.float16),     # GQA, Sq > Skv, causal (top-left)
    (1, 4, 1, 129, 1000, 64, False, "NHD", torch.float16),   # MQA
    (1, 2, 2, 1024, 1024, 128, True, "HND", torch.bfloat16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_matches_reference_all_configs(case):
    b, hq, hkv, sq, skv, d, causal, layout, dtype = case
    q, k, v = _dit_inputs(b, hq, hkv, sq, skv, d, dtype)
    m = _k()
    for cfg in m._CANDIDATES[d]:
        _check(q, k, v, layout=layout, causal=causal, config=cfg)


@pytest.mark.parametrize("gran,q_block,bm", [("per_block", 128, 64), ("per_block", 64, 128),
                                              ("per_block", 256, 64), ("per_thread", 128, 128)])
def test_granularities(gran, q_block, bm):
    q, k, v = _dit_inputs(2, 4, 2, 333, 400, 128, torch.bfloat16)
    m = _k()
    # K-group fold (one K scale per tile for per_block, four for per_thread)
    _check(q, k, v, gran=gran, q_block=q_block, config=m.AttnConfig(bm, 4 if bm == 64 else 8, 3))


@pytest.mark.parametrize("gran,k_block,groups", [("per_thread", 128, 4), ("per_block", 256, 1), ("per_block", 128, 1),
                                                 ("per_block", 64, 0), ("per_thread", 64, 0)])
def test_kgroup_fold_and_fallback(gran, k_block, groups):
    """The K-group fold where K's grouping allows it (4 or 1 K scales per key tile) and the automatic fallback to
    the per-score K scale (the others)."""
    m = _k()
    q, k, v = _dit_inputs(1, 4, 2, 300, 700, 128, torch.bfloat16)
    assert m.quantize(q, k, v, qk_quant_gran=gran, k_block=k_block)[0].k_groups_per_tile() == groups
    ref = sage2pp_attention_reference(q, k, v, qk_quant_gran=gran, k_block=k_block, row_sum=ROW_SUM)
    cfg = m._CANDIDATES[128][0]
    o, _ = m.int8fp8_attention(q, k, v, qk_quant_gran=gran, k_block=k_block, config=cfg)
    mk = accuracy_metrics(o, ref)
    assert mk["cos_sim"] > 0.9995 and mk["rel_l1"] < 5e-3, (cfg, mk)


def test_quantization_matches_reference():
    m = _k()
    for gran in ("per_thread", "per_block"):
        q, k, v = _dit_inputs(2, 4, 2, 333, 401, 128, torch.bfloat16, k_offset=30.0)
        ref = sage2pp_quantize(q, k, v, qk_quant_gran=gran)
        kv, (qi, qs) = m.quantize(q, k, v, qk_quant_gran=gran)
        assert torch.equal(qi.view(ref.q_int8.shape).float(), ref.q_int8)
        assert torch.equal(qs.view(ref.q_scale.shape), ref.q_scale)
        torch.testing.assert_close(kv.k_mean.view_as(ref.k_mean), ref.k_mean, rtol=1e-6, atol=1e-5)
        ki = kv.k_int8.view(ref.k_int8.shape).float()
        # the K mean is summed in another order than torch's: rare off-by-one roundings only
        assert (ki - ref.k_int8).abs().max() <= 1 and (ki != ref.k_int8).float().mean() < 1e-3
        torch.testing.assert_close(kv.k_scale.view(ref.k_scale.shape), ref.k_scale, rtol=1e-5, atol=0)
        assert torch.equal(kv.v_scale.view(ref.v_scale.shape), ref.v_scale)
        vq = kv.v_q.view(2, 2, 128, kv.seq_pad)
        assert torch.equal(vq[..., :401].float().transpose(-1, -2), ref.v_fp8)
        assert (vq[..., 401:].float() == 0).all()


def test_large_magnitude_and_offset():
    # |x| ~ 1e3: saturated softmax; K with a per-channel offset of ~1e3 on top
    q, k, v = _dit_inputs(1, 4, 4, 257, 257, 128, torch.bfloat16, scale=1e3 / 8, k_offset=8.0)
    _check(q, k, v, check_ref=False)
    q, k, v = _dit_inputs(1, 4, 4, 300, 300, 64, torch.bfloat16, k_offset=1000.0)
    _check(q, k, v)


def test_noncontiguous_views():
    m = _k()
    b, s, h, d = 2, 150, 4, 64
    qkv = torch.randn(b, s, 3, h, d, device=DEV, dtype=torch.bfloat16)  # packed projection output
    qkv[:, :, 1] += 5 * torch.randn(d, device=DEV, dtype=torch.bfloat16)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # NHD views with a gap between tokens
    o, _ = m.int8fp8_attention(q, k, v, layout="NHD")
    o_c, _ = m.int8fp8_attention(q.contiguous(), k.contiguous(), v.contiguous(), layout="NHD")
    assert torch.equal(o, o_c)
    # HND view of NHD storage, and a strided last dim
    big = torch.randn(b, h, s, 2 * d, device=DEV, dtype=torch.float16)
    qs, ks, vs = big[..., ::2], big[..., 1::2] + 3, big[..., ::2] * 0.5
    o2, _ = m.int8fp8_attention(qs, ks, vs, layout="HND")
    o2c, _ = m.int8fp8_attention(qs.contiguous(), ks.contiguous(), vs.contiguous(), layout="HND")
    assert torch.equal(o2, o2c)
    _check(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))


def test_pointer_path_and_fp16_pv():
    q, k, v = _dit_inputs(2, 4, 2, 300, 333, 128, torch.bfloat16)
    _check(q, k, v, use_tma=False, causal=True)
    # sm_80/86 path (FP16 P·V) forced here: not the reference's FP8 numerics, but at least as accurate
    _check(q, k, v, pv_fp8=False, use_tma=False, check_ref=False)


def test_deterministic():
    m = _k()
    q, k, v = _dit_inputs(1, 8, 8, 1000, 1000, 64, torch.float16)
    a, la = m.int8fp8_attention(q, k, v, return_lse=True)
    b, lb = m.int8fp8_attention(q, k, v, return_lse=True)
    assert torch.equal(a, b) and torch.equal(la, lb)


def test_backend_and_dispatch():
    from sage3_diffusers import resolve, sage_attention
    from sage3_diffusers.dispatch import get_backend
    be = get_backend("triton_int8_fp8")
    assert be.unavailable_reasons() == []
    q, k, v = _dit_inputs(1, 4, 2, 100, 130, 64, torch.bfloat16)
    assert resolve(q, k, v, "triton_int8_fp8").backend is be
    assert resolve(q, k, v, "int8_fp8").backend.family == "int8_fp8"
    out, lse = sage_attention(q, k, v, "triton_int8_fp8", return_lse=True, is_causal=True)
    ref, ref_lse = sage2pp_attention_reference(q, k, v, is_causal=True, return_lse=True, row_sum=ROW_SUM)
    assert accuracy_metrics(out, ref)["rel_l1"] < 5e-3
    o_nhd = sage_attention(*(x.transpose(1, 2) for x in (q, k, v)), "triton_int8_fp8", tensor_layout="NHD")
    assert o_nhd.shape == (1, 100, 4, 64)
    assert torch.equal(o_nhd.transpose(1, 2), sage_attention(q, k, v, "triton_int8_fp8"))


def test_custom_op_compile_and_cuda_graph():
    from sage3_diffusers.dispatch import get_backend
    from sage3_diffusers.backends import triton_int8fp8  # noqa: F401
    be = get_backend("triton_int8_fp8")
    q, k, v = _dit_inputs(2, 4, 4, 256, 256, 128, torch.bfloat16)
    scale = 128 ** -0.5
    eager, eager_lse = torch.ops.sage3.triton_int8fp8_attn(q, k, v, "HND", False, scale, True, "per_thread")
    torch.library.opcheck(torch.ops.sage3.triton_int8fp8_attn.default, (q, k, v, "HND", False, scale, True,
                                                                         "per_thread"),
                          test_utils=("test_schema", "test_faketensor"))

    def f(q, k, v):
        o, lse = be.forward(q, k, v, layout="HND", is_causal=False, sm_scale=scale, return_lse=True)
        return o.float() * 2, lse

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True)
    o_c, lse_c = cf(q, k, v)
    assert torch.equal(o_c, eager.float() * 2) and torch.equal(lse_c, eager_lse)

    # CUDA graph: capture after warm-up (autotune done), replay on new data
    sq, sk, sv = (x.clone() for x in (q, k, v))
    be.forward(sq, sk, sv, layout="HND", is_causal=False, sm_scale=scale, return_lse=False)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = be.forward(sq, sk, sv, layout="HND", is_causal=False, sm_scale=scale, return_lse=False)
    q2, k2, v2 = _dit_inputs(2, 4, 4, 256, 256, 128, torch.bfloat16)
    for dst, src in zip((sq, sk, sv), (q2, k2, v2)):
        dst.copy_(src)
    static_out.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    expect = be.forward(q2, k2, v2, layout="HND", is_causal=False, sm_scale=scale, return_lse=False)
    assert torch.equal(static_out, expect)


def test_first_call_time():
    """Autotuning is limited to a few configs: a new shape class is tuned in seconds (compiles are cached)."""
    import time
    m = _k()
    q, k, v = _dit_inputs(1, 8, 8, 3000, 3000, 64, torch.float16)
    t0 = time.perf_counter()
    m.int8fp8_attention(q, k, v, is_causal=True)
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    print(f"first call (tuning {len(m._CANDIDATES[64])} configs, compiles possibly cached): {first:.2f}s")
    assert first < 30


def test_nonfinite_inputs_propagate_per_head():
    """A NaN never turns silently finite, and it stays inside its (batch, head)."""
    m = _k()
    for which in ("q", "k", "v"):
        q, k, v = _dit_inputs(1, 2, 2, 200, 200, 64, torch.bfloat16)
        t = {"q": q, "k": k, "v": v}[which]
        t[0, 0, 150, 7] = float("nan")
        o, _ = m.int8fp8_attention(q, k, v)
        assert torch.isnan(o[0, 0]).any(), which
        assert not torch.isnan(o[0, 1]).any(), which



# ------------------------------ per-sample key lengths (kv_lens) ------------------------------
KV_LENS_CASES = [
    # b, hq, hkv, sq, skv, d, causal, layout, kv_lens
    (3, 2, 2, 300, 300, 128, False, "HND", [300, 77, 129]),
    (4, 4, 2, 200, 520, 64, True, "NHD", [520, 1, 256, 0]),
    (2, 2, 1, 1, 700, 128, False, "HND", [700, 383]),
    (2, 3, 3, 130, 130, 64, False, "NHD", [128, 129]),
    (3, 2, 2, 333, 1000, 128, True, "HND", [999, 500, -3]),
]


@pytest.mark.parametrize("case", KV_LENS_CASES, ids=lambda c: "-".join(str(x) for x in c[:8]))
def test_kv_lens_matches_reference_on_each_prefix(case, kv_lens_check):
    from sage3_diffusers.backends import triton_int8fp8  # noqa: F401  (registers the op)
    b, hq, hkv, sq, skv, d, causal, layout, lens = case
    q, k, v = (_to_layout(x, layout) for x in _dit_inputs(b, hq, hkv, sq, skv, d, torch.bfloat16))
    kv_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    out, lse = torch.ops.sage3.triton_int8fp8_attn(q, k, v, layout, causal, d ** -0.5, True, "per_thread", kv_lens)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    kv_lens_check(out, lse, q, k, v, lens, layout, causal, row_sum=ROW_SUM, min_cos=0.9995, max_rel_l1=5e-3,
                  lse_rtol=1e-2)
    # full lengths are bitwise the plain call
    full = torch.full((b,), skv, dtype=torch.int32, device=DEV)
    a = torch.ops.sage3.triton_int8fp8_attn(q, k, v, layout, causal, d ** -0.5, True, "per_thread", full)
    p = torch.ops.sage3.triton_int8fp8_attn(q, k, v, layout, causal, d ** -0.5, True, "per_thread")
    assert torch.equal(a[0], p[0]) and torch.equal(a[1], p[1])


def test_kv_lens_backend_compile_and_cuda_graph():
    """Through the backend: torch.compile(fullgraph) with kv_lens, and a captured graph following new lengths
    written into the same tensor (the kernel reads them: no host sync)."""
    from sage3_diffusers.dispatch import get_backend
    be = get_backend("triton_int8_fp8")
    assert be.supports_kv_lens
    q, k, v = _dit_inputs(2, 4, 2, 256, 300, 128, torch.bfloat16)
    lens = torch.tensor([300, 100], dtype=torch.int32, device=DEV)
    scale = 128 ** -0.5

    def f(q, k, v, lens):
        return be.forward(q, k, v, layout="HND", is_causal=False, sm_scale=scale, return_lse=False, kv_lens=lens)

    eager = f(q, k, v, lens)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, fullgraph=True)(q, k, v, lens), eager)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = f(q, k, v, lens)
    for new in ([300, 100], [5, 0], [299, 128]):
        lens.copy_(torch.tensor(new, dtype=torch.int32))
        static_out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, f(q, k, v, lens)), new
