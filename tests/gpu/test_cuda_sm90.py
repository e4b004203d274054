"""sm_90a INT8-QK / FP8-PV CUDA kernels against the SageAttention2++ reference (needs an H100/H200 and a build).

Build: SAGE3_EXTENSIONS=sm90 TORCH_CUDA_ARCH_LIST=9.0a python setup.py build_ext --inplace
"""
import math

import pytest
import torch

from sage3_diffusers.numerics import accuracy_metrics
from sage3_diffusers.numerics.sage2pp_reference import sage2pp_attention_reference, sage2pp_quantize
from sage3_diffusers.testing import dit_like_qkv

_cap = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
try:
    from sage3_diffusers import _C_sm90 as ext
except ImportError:  # not built
    ext = None

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(_cap is not None and _cap != (9, 0), reason="needs sm_90"),
    pytest.mark.skipif(ext is None, reason="_C_sm90 not built"),
]

PERM16 = [0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15]


def make_qkv(b, hq, hkv, sq, skv, d, dtype=torch.bfloat16, scale=1.0, k_offset=8.0, layout="HND"):
    q, k, v = dit_like_qkv(b, hq, sq, d, hkv=hkv, skv=skv, device="cuda", k_offset=k_offset)
    q, k, v = (x * scale for x in (q, k, v))
    q, k, v = (x.to(dtype) for x in (q, k, v))
    if layout == "NHD":
        q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    return q, k, v


def to_hnd(x, layout):
    return x if layout == "HND" else x.transpose(1, 2)


def run_kernel(q, k, v, layout, causal, return_lse, sm_scale=None):
    """Calls the extension with NaN-poisoned out / lse buffers and checks every element was written."""
    d = q.shape[-1]
    scale = d ** -0.5 if sm_scale is None else sm_scale
    out = torch.full_like(q, float("nan"), memory_format=torch.contiguous_format)
    hnd = to_hnd(q, layout)
    lse = torch.full(hnd.shape[:3], float("nan"), device=q.device) if return_lse else None
    res = ext.forward(q, k, v, layout == "NHD", causal, scale, return_lse, out=out, lse=lse)
    assert not isinstance(res, str), res
    o, l = res
    assert o.data_ptr() == out.data_ptr()
    assert torch.isfinite(o).all(), "output has unwritten (NaN) or non-finite elements"
    if return_lse:
        assert torch.isfinite(l).all(), "lse has unwritten (NaN) or non-finite elements"
    return o, (l if return_lse else None)


def check_against_reference(q, k, v, layout="HND", causal=False, return_lse=True, sm_scale=None):
    qh, kh, vh = (to_hnd(x, layout) for x in (q, k, v))
    q_in, k_in, v_in = q.clone(), k.clone(), v.clone()
    o, lse = run_kernel(q, k, v, layout, causal, return_lse, sm_scale)
    assert torch.equal(q, q_in) and torch.equal(k, k_in) and torch.equal(v, v_in), "inputs were modified"
    ref = sage2pp_attention_reference(qh.float(), kh.float(), vh.float(), is_causal=causal, sm_scale=sm_scale,
                                      return_lse=return_lse)
    ref_o, ref_lse = (ref if return_lse else (ref, None))
    m = accuracy_metrics(to_hnd(o, layout).float(), ref_o.float())
    # Same numerics definition: differences come from exp2.approx, fp32 summation order inside wgmma,
    # rare E4M3 rounding flips of P and the bf16/fp16 output rounding.
    assert m["cos_sim"] > 0.9999, m
    assert m["rel_l1"] < 1e-2, m
    if return_lse:
        err = (lse - ref_lse).abs().max().item()
        assert err < 2e-3 * max(1.0, ref_lse.abs().max().item()), err
    return m


SHAPES = [
    # b, hq, hkv, sq, skv, d, causal, layout
    (1, 2, 2, 1, 1, 128, False, "HND"),
    (1, 2, 2, 1, 1, 64, True, "HND"),
    (1, 2, 2, 77, 77, 64, False, "HND"),
    (1, 3, 3, 77, 77, 128, True, "NHD"),
    (2, 3, 3, 77, 300, 128, False, "HND"),
    (3, 4, 2, 300, 300, 128, True, "HND"),
    (3, 4, 2, 300, 300, 64, False, "NHD"),
    (1, 4, 1, 1000, 513, 64, False, "HND"),
    (2, 2, 2, 129, 1000, 128, True, "NHD"),
    (1, 2, 2, 1000, 129, 64, True, "HND"),
    (1, 2, 1, 256, 256, 128, True, "HND"),
    (2, 8, 8, 1024, 1024, 128, False, "NHD"),
]


@pytest.mark.parametrize("b,hq,hkv,sq,skv,d,causal,layout", SHAPES)
def test_matches_reference_odd_shapes(b, hq, hkv, sq, skv, d, causal, layout):
    q, k, v = make_qkv(b, hq, hkv, sq, skv, d, layout=layout)
    check_against_reference(q, k, v, layout, causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
def test_dtypes_no_lse(dtype, d):
    q, k, v = make_qkv(2, 2, 2, 200, 333, d, dtype=dtype)
    check_against_reference(q, k, v, return_lse=False)


def test_large_magnitude_and_k_offset():
    q, k, v = make_qkv(1, 2, 2, 400, 400, 128, scale=1e3, dtype=torch.bfloat16)
    check_against_reference(q, k, v, sm_scale=1e-6)  # scores stay O(1) while |x| ~ 1e3
    q, k, v = make_qkv(1, 2, 2, 400, 400, 64, k_offset=300.0, dtype=torch.float16)
    check_against_reference(q, k, v, causal=True)


def test_non_contiguous_inputs():
    base = torch.randn(2, 333, 6, 128, device="cuda", dtype=torch.bfloat16)
    q = base[:, :, 0:4]  # NHD view, head stride 128, token stride 768
    k = base[:, :, 4:6]
    v = torch.randn(2, 6, 333, 128, device="cuda", dtype=torch.bfloat16)[:, 1:3].transpose(1, 2)  # NHD view
    check_against_reference(q, k, v, layout="NHD", causal=True)


def test_custom_sm_scale_and_backend_path():
    import sage3_diffusers as s3
    from sage3_diffusers.api import resolve
    # The int8_fp8 family takes the faster of this kernel and Triton by the card's eager measurements (perf_model)
    # where it has them, by priority (this kernel first) where not: this kernel at long hd128 sequences either way.
    long_q = torch.empty(1, 24, 44776, 128, device="cuda", dtype=torch.bfloat16)
    sel = resolve(long_q, long_q, long_q, kernel="int8_fp8")
    assert sel.backend.name == "cuda_sm90_int8_fp8", sel.explain()
    q, k, v = make_qkv(1, 4, 2, 500, 500, 128)
    out, lse = s3.sage_attention(q, k, v, "cuda_sm90_int8_fp8", sm_scale=0.05, return_lse=True)
    ref, ref_lse = sage2pp_attention_reference(q.float(), k.float(), v.float(), sm_scale=0.05, return_lse=True)
    assert accuracy_metrics(out.float(), ref)["cos_sim"] > 0.9999
    assert (lse - ref_lse).abs().max().item() < 2e-3 * ref_lse.abs().max().item()


def test_long_sequence_128k():
    q, k, v = make_qkv(1, 1, 1, 131072, 131072, 128)
    check_against_reference(q, k, v, return_lse=True)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_quantization_kernels_match_reference(d, layout):
    b, hq, hkv, sq, skv = 2, 4, 2, 300, 333
    q, k, v = make_qkv(b, hq, hkv, sq, skv, d, layout=layout)
    q_i8, q_scale, k_i8, k_scale, k_mean, v_t, v_scale, q_kmean = ext.quantize(q, k, v, layout == "NHD")
    qh, kh, vh = (to_hnd(x, layout).float() for x in (q, k, v))
    ref = sage2pp_quantize(qh, kh, vh)
    t = torch.arange(sq, device="cuda")
    assert torch.equal(q_scale[..., (t // 16) * 8 + t % 8], ref.q_scale)
    assert torch.equal(q_i8.float(), ref.q_int8)
    assert torch.allclose(k_mean, ref.k_mean.squeeze(-2), rtol=1e-5, atol=1e-5)
    tk = torch.arange(skv, device="cuda")
    assert torch.allclose(k_scale[..., (tk // 128) * 4 + (tk % 8) // 2], ref.k_scale, rtol=1e-5)
    diff = (k_i8.float() - ref.k_int8).abs()
    assert diff.max().item() <= 1 and (diff > 0).float().mean().item() < 1e-3  # mean summation order
    assert torch.equal(v_scale, ref.v_scale)
    # Undo the transpose and the 16-token permutation: position p of a group holds token PERM16[p].
    pad = v_t.shape[-1]
    assert pad % 128 == 0 and pad >= skv
    perm = torch.tensor(PERM16, device="cuda")
    tok = (torch.arange(pad, device="cuda") // 16) * 16 + perm.repeat(pad // 16)
    v_vals = v_t.view(torch.float8_e4m3fn).float()  # [b, hkv, d, pad] in permuted token order
    unperm = torch.empty_like(v_vals)
    unperm[..., tok] = v_vals
    assert torch.equal(unperm[..., :skv].transpose(-1, -2), ref.v_fp8)
    assert (unperm[..., skv:] == 0).all()
    qkm = qh @ ref.k_mean.repeat_interleave(hq // hkv, dim=1).transpose(-1, -2)
    assert torch.allclose(q_kmean, qkm.squeeze(-1), rtol=1e-4, atol=1e-3)


def test_custom_op_opcheck():
    from sage3_diffusers.backends import cuda_sm90  # registers the op
    q, k, v = make_qkv(1, 2, 2, 130, 130, 64)
    torch.library.opcheck(torch.ops.sage3.sm90_int8fp8_attn.default, (q, k, v, "HND", False, 0.125, True),
                          test_utils=("test_schema", "test_faketensor"))


def test_bad_input_errors():
    op = torch.ops.sage3.sm90_int8fp8_attn
    q, k, v = make_qkv(1, 3, 2, 64, 64, 128)  # 3 query heads, 2 kv heads
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        op(q, k, v, "HND", False, 0.1, False)
    q, k, v = make_qkv(1, 2, 2, 64, 64, 128)
    with pytest.raises(ValueError, match="dtype float32 not supported"):
        op(q.float(), k.float(), v.float(), "HND", False, 0.1, False)
    with pytest.raises(ValueError, match="head_dim"):
        op(q[..., :96], k[..., :96], v[..., :96], "HND", False, 0.1, False)


def test_extension_checks_report_errors():
    """C++ argument checks come back as an error message (the Python wrapper raises it)."""
    q = torch.randn(1, 3, 64, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, 64, 128, device="cuda", dtype=torch.bfloat16)
    res = ext.forward(q, k, k, False, False, 0.1, False)
    assert isinstance(res, str) and "multiple of kv heads" in res, res
    res = ext.forward(q.float(), k.float(), k.float(), False, False, 0.1, False)
    assert isinstance(res, str) and "float16 or bfloat16" in res, res


@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_inputs_propagate_like_reference(where):
    """A NaN makes exactly the outputs NaN that the reference makes NaN (its Q group's rows, its K head,
    its V channel); everything else stays finite and matches."""
    q, k, v = make_qkv(1, 4, 2, 200, 200, 128)
    x = {"q": q, "k": k, "v": v}[where]
    x[0, 1, 37, 5] = float("nan")
    res = ext.forward(q, k, v, False, False, 128 ** -0.5, False)
    assert not isinstance(res, str), res
    out = res[0].float()
    ref = sage2pp_attention_reference(q.float(), k.float(), v.float())
    nan_ref = torch.isnan(ref)
    assert nan_ref.any() and not nan_ref.all()
    assert torch.equal(torch.isnan(out), nan_ref)
    m = accuracy_metrics(out[~nan_ref], ref[~nan_ref].float())
    assert m["cos_sim"] > 0.9999, m


def test_cuda_graph_capture_replays_op():
    from sage3_diffusers.backends import cuda_sm90  # noqa: F401  (registers the op)
    op = torch.ops.sage3.sm90_int8fp8_attn
    q, k, v = make_qkv(1, 4, 2, 333, 333, 128, layout="NHD")
    eager, _ = op(q, k, v, "NHD", True, 0.1, False)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        op(q, k, v, "NHD", True, 0.1, False)  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, _ = op(q, k, v, "NHD", True, 0.1, False)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


def test_deterministic():
    q, k, v = make_qkv(1, 2, 2, 700, 700, 128)
    a, _ = run_kernel(q, k, v, "HND", True, False)
    b, _ = run_kernel(q, k, v, "HND", True, False)
    assert torch.equal(a, b)


# ------------------------------ per-sample key lengths (kv_lens) ------------------------------
KV_LENS_CASES = [
    # b, hq, hkv, sq, skv, d, causal, layout, kv_lens
    (3, 2, 2, 300, 300, 128, False, "HND", [300, 77, 129]),
    (4, 4, 2, 200, 520, 64, True, "NHD", [520, 1, 256, 0]),
    (2, 2, 1, 1, 700, 128, False, "HND", [700, 383]),
    (2, 3, 3, 130, 130, 64, False, "NHD", [128, 129]),
    (2, 2, 2, 333, 1000, 128, True, "HND", [999, 500]),
]


def check_kv_lens(check, out, lse, q, k, v, lens, layout, causal, sm_scale=None):
    # Same-quantization reference: as tight as the plain-call tests (check_against_reference).
    check(out, lse, q, k, v, lens, layout, causal, sm_scale=sm_scale, row_sum="quantized_p", min_cos=0.9999,
          max_rel_l1=1e-2, lse_rtol=2e-3)


@pytest.mark.parametrize("case", KV_LENS_CASES, ids=lambda c: "-".join(str(x) for x in c[:8]))
def test_kv_lens_matches_reference_on_each_prefix(case, kv_lens_check):
    b, hq, hkv, sq, skv, d, causal, layout, lens = case
    q, k, v = make_qkv(b, hq, hkv, sq, skv, d, layout=layout)
    kv_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    out = torch.full_like(q, float("nan"), memory_format=torch.contiguous_format)
    lse = torch.full(to_hnd(q, layout).shape[:3], float("nan"), device="cuda")
    res = ext.forward(q, k, v, layout == "NHD", causal, d ** -0.5, True, kv_lens=kv_lens, out=out, lse=lse)
    assert not isinstance(res, str), res
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "unwritten output elements"
    check_kv_lens(kv_lens_check, out, lse, q, k, v, lens, layout, causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128])
def test_kv_lens_full_length_is_bitwise_the_plain_call(causal, d):
    q, k, v = make_qkv(2, 2, 2, 300, 333, d)
    plain = ext.forward(q, k, v, False, causal, d ** -0.5, True)
    full = ext.forward(q, k, v, False, causal, d ** -0.5, True,
                       kv_lens=torch.full((2,), 333, dtype=torch.int32, device="cuda"))
    assert torch.equal(plain[0], full[0]) and torch.equal(plain[1], full[1])


def test_kv_lens_out_of_range_values_are_clamped(kv_lens_check):
    q, k, v = make_qkv(3, 2, 2, 100, 200, 64)
    lens = [-5, 10 ** 6, 150]
    o, l = ext.forward(q, k, v, False, False, 0.125, True, kv_lens=torch.tensor(lens, dtype=torch.int32,
                                                                                device="cuda"))
    check_kv_lens(kv_lens_check, o, l, q, k, v, lens, "HND", False, sm_scale=0.125)


def test_kv_lens_through_the_backend_and_bad_kv_lens():
    from sage3_diffusers.backends.cuda_sm90 import CudaSm90Int8Fp8Backend
    be = CudaSm90Int8Fp8Backend()
    assert be.supports_kv_lens
    q, k, v = make_qkv(2, 2, 2, 150, 150, 128, layout="NHD")
    lens64 = torch.tensor([150, 40], device="cuda")  # int64 is converted on the device
    out = be.forward(q, k, v, layout="NHD", is_causal=False, sm_scale=0.1, return_lse=False, kv_lens=lens64)
    ref = ext.forward(q, k, v, True, False, 0.1, False, kv_lens=lens64.int())[0]
    assert torch.equal(out, ref)
    op = torch.ops.sage3.sm90_int8fp8_attn
    with pytest.raises(ValueError, match=r"kv_lens must have shape \[2\]"):
        op(q, k, v, "NHD", False, 0.1, False, torch.tensor([1, 2, 3], dtype=torch.int32, device="cuda"))
    with pytest.raises(ValueError, match="kv_lens must be an int32"):
        op(q, k, v, "NHD", False, 0.1, False, torch.tensor([1.0, 2.0], device="cuda"))
    with pytest.raises(ValueError, match="kv_lens must be on q's device"):
        op(q, k, v, "NHD", False, 0.1, False, torch.tensor([1, 2], dtype=torch.int32))
    res = ext.forward(q, k, v, True, False, 0.1, False, kv_lens=torch.tensor([1, 2], dtype=torch.int64,
                                                                             device="cuda"))
    assert isinstance(res, str) and "kv_lens must be int32" in res, res


def test_kv_lens_cuda_graph_reads_lengths_on_device():
    """The lengths are read by the kernel: a captured graph follows new values written into the same tensor."""
    from sage3_diffusers.backends import cuda_sm90  # noqa: F401  (registers the op)
    op = torch.ops.sage3.sm90_int8fp8_attn
    q, k, v = make_qkv(2, 4, 2, 257, 400, 128)
    lens = torch.tensor([400, 100], dtype=torch.int32, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        op(q, k, v, "HND", False, 0.1, False, lens)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, _ = op(q, k, v, "HND", False, 0.1, False, lens)
    for new in ([400, 100], [3, 0], [250, 399]):
        lens.copy_(torch.tensor(new, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        eager, _ = op(q, k, v, "HND", False, 0.1, False, lens)
        assert torch.equal(out, eager), new


def test_kv_lens_opcheck():
    from sage3_diffusers.backends import cuda_sm90  # noqa: F401  (registers the op)
    q, k, v = make_qkv(2, 2, 2, 130, 130, 64)
    lens = torch.tensor([130, 7], dtype=torch.int32, device="cuda")
    torch.library.opcheck(torch.ops.sage3.sm90_int8fp8_attn.default, (q, k, v, "HND", False, 0.125, True, lens),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_head_chunks_are_bit_identical_to_one_call(monkeypatch, layout, head_chunk_case):
    """A call whose quantized copies would exceed the workspace bound runs over chunks of key/value heads; every
    quantization statistic is per head, so output and LSE equal the one-piece call's bit for bit, and the
    caller's tensors are untouched."""
    b, hq, hkv, causal, lens = head_chunk_case
    from sage3_diffusers.backends import cuda_sm90, head_chunks
    q, k, v = make_qkv(b, hq, hkv, 333, 300, 128, layout=layout)
    before = [t.clone() for t in (q, k, v)]
    kv_lens = None if lens is None else torch.tensor(lens, dtype=torch.int32, device="cuda")
    whole = cuda_sm90._sm90_forward(q, k, v, layout, causal, 0.09, True, kv_lens)
    monkeypatch.setattr(head_chunks, "WORKSPACE_CHUNK_BYTES", 0)
    monkeypatch.setattr(head_chunks, "CHUNK_KV_HEADS", 4 if hkv > 4 else 2)
    monkeypatch.setattr(cuda_sm90, "_plans", {})  # the one-piece call above cached its (unchunked) plan
    assert head_chunks.kv_heads_per_chunk(q, k, layout == "NHD") is not None
    chunked = cuda_sm90._sm90_forward(q, k, v, layout, causal, 0.09, True, kv_lens)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
    assert chunked[0].is_contiguous() and chunked[0].shape == q.shape
    assert all(torch.equal(a, c) for a, c in zip(before, (q, k, v)))


def test_head_chunks_bound_the_extra_memory():
    """At a video-sized call the chunked run's peak extra memory stays near SDPA's (its output), not 2.5x it."""
    from sage3_diffusers.backends import cuda_sm90, head_chunks
    q, k, v = make_qkv(1, 24, 24, 32768, 32768, 128)  # quantized copies: 288 MiB, over WORKSPACE_CHUNK_BYTES
    assert head_chunks.kv_heads_per_chunk(q, k, False) == head_chunks.CHUNK_KV_HEADS
    out_bytes = q.numel() * q.element_size()
    cuda_sm90._sm90_forward(q, k, v, "HND", False, 0.09, False)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out, _ = cuda_sm90._sm90_forward(q, k, v, "HND", False, 0.09, False)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    one_piece = out_bytes * 2.5
    assert extra <= out_bytes * (1 + 1.6 * head_chunks.CHUNK_KV_HEADS / 24) + (8 << 20), (extra, out_bytes, one_piece)
