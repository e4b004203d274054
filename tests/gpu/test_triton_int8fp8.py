"""GPU tests of the Triton SageAttention2++ kernels against the torch reference (numerics/sage2pp_reference.py).

Kernel vs reference should agree to fp32 rounding (same quantization, same 128-token key tiles, same FP8
rounding of P); kernel vs fp32 SDPA should be as accurate as the reference itself. Outputs are poisoned with
NaN before each run and must be fully written.
"""
import importlib.util
from types import SimpleNamespace

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


# ------------------------------ direct launches (kernels/triton/launch.py) ------------------------------
def _launch_mod():
    from sage3_diffusers.kernels.triton import launch
    return launch


@pytest.fixture
def direct_launches(monkeypatch):
    """Counts the direct launches (`KernelLaunch.run_direct`); `set(on)` switches the fast path."""
    L = _launch_mod()
    if L.UNSUPPORTED is not None:
        import triton
        if triton.__version__.startswith("3.6."):
            pytest.fail(f"the fast path should support triton {triton.__version__}: {L.UNSUPPORTED}")
        pytest.skip(L.UNSUPPORTED)
    count = [0]
    run_direct = L.KernelLaunch.run_direct

    def counting(self, entry, stream, *args):
        count[0] += 1
        return run_direct(self, entry, stream, *args)
    monkeypatch.setattr(L.KernelLaunch, "run_direct", counting)
    return SimpleNamespace(count=count, set=lambda on: monkeypatch.setattr(L, "DIRECT_LAUNCH", on))


def _unaligned_inputs(b, hq, hkv, s, d, dtype, layout):
    """(aligned, unaligned) q/k/v of the same shape and strides: views at element 0 and 1 of wider rows, so the
    second's addresses are 2 bytes past a 16-byte boundary (same launch plan, other alignment)."""
    out = ([], [])
    for h in (hq, hkv, hkv):
        shape = (b, h, s, d + 8) if layout == "HND" else (b, s, h, d + 8)
        wide = torch.randn(shape, device=DEV).to(dtype)
        out[0].append(wide[..., :d])
        out[1].append(wide[..., 1:d + 1])
    assert all(x.data_ptr() % 16 == 0 for x in out[0]) and all(x.data_ptr() % 16 for x in out[1])
    return out


def _signatures():
    """(name, q, k, v, kwargs) call signatures: HND, NHD GQA causal with LSE, key lengths, MQA with a caller's
    out, and the same plan with aligned and unaligned caller tensors."""
    q, k, v = _dit_inputs(1, 4, 4, 300, 300, 128, torch.bfloat16, seed=1)
    g = [_to_layout(x, "NHD") for x in _dit_inputs(2, 8, 2, 200, 520, 64, torch.float16, seed=2)]
    kl = _dit_inputs(3, 2, 2, 300, 300, 128, torch.bfloat16, seed=3)
    lens = torch.tensor([300, 77, 129], dtype=torch.int32, device=DEV)
    mq = _dit_inputs(1, 4, 1, 129, 1000, 64, torch.float16, seed=4)
    al, un = _unaligned_inputs(2, 4, 2, 150, 128, torch.bfloat16, "NHD")
    return [
        ("hnd", q, k, v, {}),
        ("nhd_gqa_causal_lse", *g, dict(layout="NHD", is_causal=True, return_lse=True)),
        ("kv_lens", *kl, dict(kv_lens=lens, return_lse=True)),
        ("mqa_out", *mq, dict(out=torch.empty_like(mq[0]))),
        ("aligned", *al, dict(layout="NHD", return_lse=True)),
        ("unaligned", *un, dict(layout="NHD", return_lse=True)),
    ]


def _outputs(m, sig):
    _, q, k, v, kw = sig
    if "out" in kw:
        kw = dict(kw, out=torch.full_like(kw["out"], float("nan")))
    o, lse = m.int8fp8_attention(q, k, v, **kw)
    return o.clone(), None if lse is None else lse.clone()


def _same(a, b):
    return torch.equal(a[0], b[0]) and (a[1] is None) == (b[1] is None) and (a[1] is None or torch.equal(a[1], b[1]))


def test_direct_launch_bit_identical_to_triton_launch(direct_launches):
    """Every signature's output and LSE through direct launches equal Triton's own launches bit for bit, also
    with calls alternating between signatures (and between the aligned and unaligned views of one plan)."""
    m = _k()
    sigs = _signatures()
    direct_launches.set(False)
    expect = [_outputs(m, s) for s in sigs]            # also tunes each shape class
    assert direct_launches.count[0] == 0
    direct_launches.set(True)
    for rnd in range(3):
        for sig, ref in zip(sigs, expect):
            assert _same(_outputs(m, sig), ref), (sig[0], rnd)
    # round 0 launched each new key through Triton; the aligned and unaligned signatures share one plan
    assert direct_launches.count[0] >= 2 * 3 * len(sigs), direct_launches.count[0]
    order = [0, 4, 5, 4, 1, 5, 2, 3, 0, 5]              # alternating signatures, alignments back and forth
    for i in order:
        assert _same(_outputs(m, sigs[i]), expect[i]), sigs[i][0]


def test_direct_launch_off_with_a_launch_hook(direct_launches):
    """A Triton launch hook sees every launch (three per call): the fast path steps aside while one is set."""
    import triton
    m = _k()
    q, k, v = _dit_inputs(1, 2, 2, 200, 200, 64, torch.bfloat16, seed=5)
    ref = m.int8fp8_attention(q, k, v)[0].clone()
    m.int8fp8_attention(q, k, v)
    seen = []
    hook = lambda metadata: seen.append(metadata.get()["name"])  # noqa: E731
    triton.knobs.runtime.launch_enter_hook.add(hook)
    try:
        before = direct_launches.count[0]
        for _ in range(2):
            assert torch.equal(m.int8fp8_attention(q, k, v)[0], ref)
        assert direct_launches.count[0] == before
    finally:
        triton.knobs.runtime.launch_enter_hook.remove(hook)
    assert len(seen) == 6 and any("attn" in n for n in seen), seen
    assert torch.equal(m.int8fp8_attention(q, k, v)[0], ref)
    assert direct_launches.count[0] > before


@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_head_chunks_are_bit_identical_to_one_call(monkeypatch, layout, head_chunk_case):
    """Large calls run over chunks of key/value heads (backends/head_chunks.py); every quantization statistic is
    per head, so output and LSE equal the one-piece call's bit for bit, and the caller's tensors are untouched."""
    b, hq, hkv, causal, lens = head_chunk_case
    from sage3_diffusers.backends import head_chunks, triton_int8fp8
    m = _k()
    # one launch config for both calls (a chunk is another shape class and would be tuned on its own)
    monkeypatch.setattr(m, "_CANDIDATES", {d: cands[:1] for d, cands in m._CANDIDATES.items()})
    monkeypatch.setattr(m, "_calls", {})
    monkeypatch.setattr(m, "_tuned", {})
    q, k, v = (_to_layout(x, layout) for x in _dit_inputs(b, hq, hkv, 333, 300, 128, torch.bfloat16, seed=7))
    before = [t.clone() for t in (q, k, v)]
    kv_lens = None if lens is None else torch.tensor(lens, dtype=torch.int32, device=DEV)
    whole = triton_int8fp8._triton_forward(q, k, v, layout, causal, 0.09, True, "per_thread", kv_lens)
    monkeypatch.setattr(head_chunks, "WORKSPACE_CHUNK_BYTES", 0)
    monkeypatch.setattr(head_chunks, "CHUNK_KV_HEADS", 4 if hkv > 4 else 2)
    assert head_chunks.kv_heads_per_chunk(q, k, layout == "NHD") is not None
    chunked = triton_int8fp8._triton_forward(q, k, v, layout, causal, 0.09, True, "per_thread", kv_lens)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
    assert chunked[0].is_contiguous() and chunked[0].shape == q.shape
    assert all(torch.equal(a, c) for a, c in zip(before, (q, k, v)))
