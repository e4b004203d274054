"""GPU tests of the NVFP4 (SageAttention3) CUDA kernels, extension _C_fp4 (and its test hooks, the test-only
extension _C_fp4_testing: build with SAGE3_BUILD_TEST_EXT=1 or SAGE3_FP4_EMULATED=1).

On Hopper these run the sm_90a image built with SAGE3_FP4_EMULATED=1: the same kernel source with the
block-scaled FP4 MMA emulated in software. They check (1) the emulated MMA against a torch
dequantize-then-matmul on random fragments, (2) the fused quantization kernels bit-exactly against
`sage3_quantize`, (3) the attention output against `sage3_attention_reference` (cos sim >= 0.9999) on odd
shapes, with the output buffer poisoned with NaN first. On an sm_120 GPU the same tests check the hardware path.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from sage3_diffusers.backends import cuda_fp4  # noqa: E402
from sage3_diffusers.numerics.formats import e2m1_decode, e4m3_round, pack_fp4, unpack_fp4  # noqa: E402
from sage3_diffusers.numerics.metrics import accuracy_metrics  # noqa: E402
from sage3_diffusers.numerics.sage3_reference import sage3_attention_reference, sage3_quantize  # noqa: E402


@pytest.fixture(scope="module")
def ext():
    mod = cuda_fp4.FP4_EXT.module()
    if mod is None:
        pytest.skip(f"_C_fp4 not built: {cuda_fp4.FP4_EXT.error}")
    cap = torch.cuda.get_device_capability()
    info = cuda_fp4.build_info()
    if cap == (9, 0) and not info.get("sm_90a_emulated"):
        pytest.skip("_C_fp4 has no sm_90a (emulated) image")
    if cap not in ((9, 0), (12, 0), (12, 1)):
        pytest.skip(f"_C_fp4 has no image for sm_{cap[0]}{cap[1]}")
    return mod


@pytest.fixture(scope="module")
def testing_ext(ext):
    try:
        from sage3_diffusers import _C_fp4_testing
    except ImportError as e:
        pytest.skip(f"_C_fp4_testing not built (SAGE3_BUILD_TEST_EXT=1): {e}")
    return _C_fp4_testing


def _checked(res):
    if isinstance(res, str):
        raise RuntimeError(res)
    return res


def mma_probe(testing_ext, a, b, sfa, sfb, c, tid_a=0, tid_b=0):
    """The block-scaled FP4 MMA device function run once (operand layout: csrc/fp4/testing/mma_probe.h)."""
    (d,) = _checked(testing_ext.mma_probe(a, b, sfa, sfb, c, tid_a, tid_b))
    return d


def quantize_in_spec_order(q, k, v):
    """The kernels' quantized Q', K', V in the specification's plain order (HND inputs), for bit-exact tests:
    packed codes (`pack_fp4` of `sage3_quantize(...).x.codes`), scales as fp32 E4M3 values, tile scales."""
    ext = cuda_fp4.FP4_EXT.require()
    q_mean, k_mean, delta_s = cuda_fp4.smoothing_terms(q, k)
    qc, qs, qg, kc, ks, kg, vc, vs, vg = _checked(ext.quantize(q, k, v, q_mean, k_mean))
    b, hkv, skv, d = k.shape
    sq = q.shape[2]
    n_kt = vg.shape[2]
    e4m3 = lambda x: x.view(torch.float8_e4m3fn).float()  # noqa: E731
    # V: kernel [B, Hkv, D, n_kt*128] -> spec [B, Hkv, n_kt, D, 128] (tiles of tokens, quantized dim last).
    v_codes = vc.view(b, hkv, d, n_kt, 64).permute(0, 1, 3, 2, 4)
    v_scales = vs.view(b, hkv, d, n_kt, 8).permute(0, 1, 3, 2, 4)
    return {
        "q_codes": qc[:, :, :sq], "q_scales": e4m3(qs[:, :, :sq]), "q_tile_scale": qg,
        "k_codes": kc[:, :, :skv], "k_scales": e4m3(ks[:, :, :skv]), "k_tile_scale": kg,
        "v_codes": v_codes, "v_scales": e4m3(v_scales), "v_tile_scale": vg,
        "q_mean": q_mean, "k_mean": k_mean, "delta_s": delta_s,
    }


def test_mma_implementation_matches_device(testing_ext):
    (impl,) = _checked(testing_ext.mma_impl())
    arch, hardware = (int(x) for x in impl.tolist())
    cap = torch.cuda.get_device_capability()
    assert arch == cap[0] * 100 + cap[1] * 10
    assert hardware == (cap[0] == 12), "sm_90a must use the emulation, sm_120/121 the hardware MMA"


def _random_e4m3_bytes(shape, gen, lo_exp=-6, hi_exp=6):
    """E4M3 scale bytes for values 2^lo..2^hi (random mantissa), ~10% exact zeros."""
    exps = torch.randint(lo_exp, hi_exp + 1, shape, generator=gen)
    mant = 1.0 + torch.randint(0, 8, shape, generator=gen).float() / 8
    vals = mant * torch.pow(2.0, exps.float())
    vals = torch.where(torch.rand(shape, generator=gen) < 0.1, torch.zeros_like(vals), vals)
    return e4m3_round(vals).to(torch.float8_e4m3fn).view(torch.uint8)


@pytest.mark.parametrize("tid_a", [0, 1])
@pytest.mark.parametrize("tid_b", [0, 1, 2, 3])
def test_mma_matches_dequantized_matmul(testing_ext, tid_a, tid_b):
    gen = torch.Generator().manual_seed(torch.seed() % (2**31))
    for _ in range(4):
        a_codes = torch.randint(0, 16, (16, 64), generator=gen, dtype=torch.uint8)
        b_codes = torch.randint(0, 16, (8, 64), generator=gen, dtype=torch.uint8)  # column n: its 64 k
        sfa = _random_e4m3_bytes((16, 4), gen)
        sfb = _random_e4m3_bytes((8, 4), gen)
        c = torch.randn(16, 8, generator=gen)
        a_deq = e2m1_decode(a_codes).double() * sfa.view(torch.float8_e4m3fn).double().repeat_interleave(16, dim=1)
        b_deq = e2m1_decode(b_codes).double() * sfb.view(torch.float8_e4m3fn).double().repeat_interleave(16, dim=1)
        ref = (a_deq @ b_deq.T + c.double()).float()
        dev = "cuda"
        d = mma_probe(testing_ext, pack_fp4(a_codes).to(dev), pack_fp4(b_codes).to(dev), sfa.contiguous().to(dev),
                      sfb.contiguous().to(dev), c.to(dev), tid_a, tid_b).cpu()
        assert torch.isfinite(d).all(), "a lane the selectors do not name was read (poisoned scales)"
        # Products and 16-element block sums are exact; the emulation rounds the final sum once, like the fp64
        # reference rounded to fp32.
        assert torch.equal(d, ref), f"max diff {(d - ref).abs().max().item()}"


def test_mma_fragment_layout_single_elements(testing_ext):
    """One nonzero A element and one nonzero B element: D must have exactly one nonzero entry, where the
    documented layout puts it (catches transposed or permuted fragments even when sums would agree)."""
    dev = "cuda"
    ones = torch.full((16, 4), 0x38, dtype=torch.uint8)  # E4M3 1.0
    onesb = torch.full((8, 4), 0x38, dtype=torch.uint8)
    for (row, col, kk) in [(0, 0, 0), (3, 5, 17), (9, 2, 40), (15, 7, 63), (8, 1, 31)]:
        a = torch.zeros(16, 64, dtype=torch.uint8)
        b = torch.zeros(8, 64, dtype=torch.uint8)
        a[row, kk] = 2  # 1.0
        b[col, kk] = 5  # 3.0
        sfa = ones.clone()
        sfa[row, kk // 16] = 0x40  # 2.0
        d = mma_probe(testing_ext, pack_fp4(a).to(dev), pack_fp4(b).to(dev), sfa.to(dev), onesb.to(dev),
                      torch.zeros(16, 8, device=dev), 0, 0).cpu()
        expect = torch.zeros(16, 8)
        expect[row, col] = 6.0
        assert torch.equal(d, expect), f"(row {row}, col {col}, k {kk}): nonzeros at {d.nonzero().tolist()}"


# (B, Hq, Hkv, Sq, Skv, D): the odd-shape list.
SHAPES = [
    (1, 2, 2, 1, 1, 64),        # S = 1
    (1, 2, 2, 77, 77, 128),     # S = 77
    (2, 3, 3, 200, 333, 64),    # not tile multiples, Sq != Skv
    (1, 4, 4, 130, 257, 128),   # Sq != Skv, just past tile edges
    (1, 2, 2, 300, 40, 64),     # Sq > Skv
    (3, 2, 2, 129, 129, 128),   # B = 3
    (1, 8, 2, 256, 256, 64),    # GQA 4:1, exact tiles
    (2, 6, 3, 90, 517, 128),    # GQA 2:1, ragged
]


def _inputs(shape, dtype, *, magnitude=1.0, k_offset=0.0, seed=None):
    b, hq, hkv, sq, skv, d = shape
    gen = torch.Generator(device="cuda").manual_seed(seed if seed is not None else torch.seed() % (2**31))
    q = torch.randn(b, hq, sq, d, device="cuda", generator=gen) * magnitude
    k = torch.randn(b, hkv, skv, d, device="cuda", generator=gen) * magnitude
    v = torch.randn(b, hkv, skv, d, device="cuda", generator=gen) * magnitude
    if k_offset:
        k = k + k_offset * torch.randn(1, hkv, 1, d, device="cuda", generator=gen)  # large per-channel K offset
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantization_bit_exact(ext, shape, dtype):
    q, k, v = _inputs(shape, dtype)
    ref = sage3_quantize(q, k, v)
    got = quantize_in_spec_order(q, k, v)
    checks = {
        "q_codes": pack_fp4(ref.q.codes), "q_scales": ref.q.scales, "q_tile_scale": ref.q_tile_scale,
        "k_codes": pack_fp4(ref.k.codes), "k_scales": ref.k.scales, "k_tile_scale": ref.k_tile_scale,
        "v_codes": pack_fp4(ref.v.codes), "v_scales": ref.v.scales, "v_tile_scale": ref.v_tile_scale,
    }
    for name, want in checks.items():
        have = got[name]
        assert have.shape == want.shape, f"{name}: shape {tuple(have.shape)} vs {tuple(want.shape)}"
        if not torch.equal(have, want):
            bad = (have != want).nonzero()
            raise AssertionError(f"{name}: {bad.shape[0]} of {want.numel()} differ, first at {bad[0].tolist()}: "
                                 f"{have[tuple(bad[0])].item()} vs {want[tuple(bad[0])].item()}")
    # Not a vacuous comparison (a single query/key token smooths to exactly zero: Q' = Q - mean(Q) = 0).
    assert unpack_fp4(got["v_codes"]).ne(0).any()
    if shape[3] > 1:
        assert unpack_fp4(got["q_codes"]).ne(0).any()
    if shape[4] > 1:
        assert unpack_fp4(got["k_codes"]).ne(0).any()


@pytest.mark.parametrize("kind", ["large_magnitude", "k_offset"])
def test_quantization_bit_exact_extreme(ext, kind):
    shape = (1, 2, 2, 150, 200, 128)
    q, k, v = _inputs(shape, torch.bfloat16, magnitude=1e3 if kind == "large_magnitude" else 1.0,
                      k_offset=50.0 if kind == "k_offset" else 0.0)
    ref = sage3_quantize(q, k, v)
    got = quantize_in_spec_order(q, k, v)
    assert torch.equal(got["q_codes"], pack_fp4(ref.q.codes)) and torch.equal(got["q_scales"], ref.q.scales)
    assert torch.equal(got["k_codes"], pack_fp4(ref.k.codes)) and torch.equal(got["k_scales"], ref.k.scales)
    assert torch.equal(got["v_codes"], pack_fp4(ref.v.codes)) and torch.equal(got["v_scales"], ref.v.scales)


def _run_kernel_poisoned(q, k, v, *, is_causal, sm_scale, return_lse):
    """The attention kernel writing into a NaN-filled output (HND inputs)."""
    ext = cuda_fp4.FP4_EXT.require()
    q_mean, k_mean, delta_s = cuda_fp4.smoothing_terms(q, k)
    quantized = ext.quantize(q, k, v, q_mean, k_mean)
    assert not isinstance(quantized, str), quantized
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)
    lse2 = torch.full(q.shape[:3] if return_lse else (0,), float("nan"), device=q.device)
    err = ext.attention(quantized, delta_s, out, lse2, k.shape[2], is_causal, sm_scale, 0)
    assert err is None, err
    return out, lse2


def test_extension_checks_report_errors(ext):
    """C++ argument checks come back as an error message (never a C++ exception: csrc/common/binding_errors.h says
    why); the Python wrappers raise them."""
    q, k, v = _inputs((1, 2, 2, 64, 64, 128), torch.bfloat16)
    q_mean, k_mean, delta_s = cuda_fp4.smoothing_terms(q, k)
    res = ext.quantize(q.float(), k.float(), v.float(), q_mean, k_mean)
    assert isinstance(res, str) and "not supported" in res, res
    res = ext.quantize(q, k[:, :1].expand(1, 3, 64, 128), v, q_mean, k_mean)
    assert isinstance(res, str) and "differ" in res, res
    quantized = ext.quantize(q, k, v, q_mean, k_mean)
    bad_out = torch.empty(1, 2, 64, 64, dtype=q.dtype, device=q.device)
    res = ext.attention(quantized, delta_s, bad_out, torch.empty(0, device=q.device), 64, False, 0.1, 0)
    assert isinstance(res, str) and "out shape" in res, res
    with pytest.raises(RuntimeError, match="not supported"):
        quantize_in_spec_order(q.float(), k.float(), v.float())


def _check_attention(q, k, v, *, is_causal, min_cos=0.9999):
    sm_scale = q.shape[-1] ** -0.5
    qc, kc, vc = q.clone(), k.clone(), v.clone()
    out, lse2 = _run_kernel_poisoned(q, k, v, is_causal=is_causal, sm_scale=sm_scale, return_lse=True)
    assert torch.equal(q, qc) and torch.equal(k, kc) and torch.equal(v, vc), "inputs were modified"
    assert torch.isfinite(out).all(), f"{(~torch.isfinite(out)).sum().item()} output elements not written/finite"
    assert torch.isfinite(lse2).all(), "lse rows not written"
    ref, ref_lse = sage3_attention_reference(q.float(), k.float(), v.float(), is_causal=is_causal, sm_scale=sm_scale,
                                             return_lse=True)
    m = accuracy_metrics(out.float(), ref)
    assert m["cos_sim"] >= min_cos, f"cos_sim {m['cos_sim']:.6f} rel_l1 {m['rel_l1']:.2e} max_abs {m['max_abs']:.2e}"
    return out, lse2, ref_lse, m


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("is_causal", [False, True])
def test_attention_matches_reference(ext, shape, is_causal):
    q, k, v = _inputs(shape, torch.bfloat16)
    _check_attention(q, k, v, is_causal=is_causal)


@pytest.mark.parametrize("kind", ["large_magnitude", "k_offset", "fp16"])
def test_attention_extreme_inputs(ext, kind):
    shape = (2, 4, 2, 190, 300, 128)
    dtype = torch.float16 if kind == "fp16" else torch.bfloat16
    q, k, v = _inputs(shape, dtype, magnitude=1e3 if kind == "large_magnitude" else 1.0,
                      k_offset=50.0 if kind == "k_offset" else 0.0)
    _check_attention(q, k, v, is_causal=kind == "fp16")


def test_lse_matches_reference(ext):
    q, k, v = _inputs((1, 3, 3, 150, 260, 64), torch.bfloat16)
    sm_scale = 64 ** -0.5
    out, lse = cuda_fp4.fp4_attn(q, k, v, "HND", True, sm_scale, True)
    _, ref_lse = sage3_attention_reference(q.float(), k.float(), v.float(), is_causal=True, sm_scale=sm_scale,
                                           return_lse=True)
    torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=1e-4)


def test_public_api_nhd_noncontiguous(ext):
    """NHD layout through sage_attention with a non-contiguous slice; same numbers as the HND kernel call."""
    from sage3_diffusers.api import sage_attention

    name = "cuda_sm120_fp4" if torch.cuda.get_device_capability()[0] == 12 else "cuda_fp4_emulated"
    b, s, h, d = 2, 140, 4, 64
    big = torch.randn(b, s, h, 2 * d, device="cuda", dtype=torch.bfloat16)
    q = big[..., :d]  # non-contiguous NHD view
    k = torch.randn(b, 210, h, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, 210, h, d, device="cuda", dtype=torch.bfloat16)
    out = sage_attention(q, k, v, kernel=name, tensor_layout="NHD")
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = sage3_attention_reference(q.transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float())
    assert accuracy_metrics(out.transpose(1, 2).float(), ref)["cos_sim"] >= 0.9999


def test_dispatch_on_this_gpu(ext):
    from sage3_diffusers.api import resolve

    q = torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.bfloat16)
    cap = torch.cuda.get_device_capability()
    if cap == (9, 0):
        with pytest.raises(ValueError, match="emulated MMA build: for numerics tests, not speed"):
            resolve(q, q, q, kernel="cuda_sm120_fp4")
        assert resolve(q, q, q, kernel="cuda_fp4_emulated").backend.name == "cuda_fp4_emulated"
        assert resolve(q, q, q, kernel="auto").backend.name != "cuda_fp4_emulated"
    else:
        assert resolve(q, q, q, kernel="fp4").backend.name == "cuda_sm120_fp4"


def test_custom_op_opcheck(ext):
    q, k, v = _inputs((1, 2, 2, 70, 90, 64), torch.bfloat16)
    torch.library.opcheck(torch.ops.sage3.fp4_attn.default, (q, k, v, "HND", False, 0.125, True),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("is_causal", [False, True])
def test_query_tile_chunks(ext, monkeypatch, is_causal):
    """Long sequences run the kernel over chunks of query tiles (bounded ΔS); forcing 1-3 tiles per chunk must
    give the same result as one launch, and match the reference."""
    q, k, v = _inputs((2, 4, 2, 700, 450, 64), torch.bfloat16)
    sm_scale = 64 ** -0.5
    whole, whole_lse = cuda_fp4.fp4_attn(q, k, v, "HND", is_causal, sm_scale, True)
    per_tile = 4 * 2 * 4 * 450
    for tiles in (1, 3):
        monkeypatch.setattr(cuda_fp4, "DELTA_S_CHUNK_BYTES", tiles * per_tile)
        out, lse = cuda_fp4.fp4_attn(q, k, v, "HND", is_causal, sm_scale, True)
        assert accuracy_metrics(out.float(), whole.float())["cos_sim"] > 0.999999
        torch.testing.assert_close(lse, whole_lse, atol=1e-4, rtol=1e-5)
    ref = sage3_attention_reference(q.float(), k.float(), v.float(), is_causal=is_causal, sm_scale=sm_scale)
    assert accuracy_metrics(out.float(), ref)["cos_sim"] >= 0.9999
