"""Public API: input validation, layouts, bad input, and the documented edge cases."""
import pytest
import torch

import sage3_diffusers as s3
from sage3_diffusers.numerics import accuracy_metrics
from sage3_diffusers.testing import dit_like_qkv, sdpa_fp64

EMULATIONS = ["reference_int8_fp8", "reference_fp4"]


def qkv(b=2, h=2, s=40, d=64, hkv=None, skv=None, dtype=torch.float32):
    return dit_like_qkv(b, h, s, d, hkv=hkv, skv=skv, dtype=dtype)


@pytest.mark.parametrize("kernel", ["sdpa", *EMULATIONS])
def test_nhd_equals_hnd(kernel):
    q, k, v = qkv(hkv=1, skv=33)
    hnd = s3.sage_attention(q, k, v, kernel)
    nhd = s3.sage_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), kernel, tensor_layout="NHD")
    assert nhd.shape == (2, 40, 2, 64)
    assert torch.allclose(nhd.transpose(1, 2), hnd, atol=1e-6)


@pytest.mark.parametrize("kernel", ["sdpa", *EMULATIONS])
def test_inputs_not_mutated_and_non_contiguous_ok(kernel):
    base = torch.randn(2, 50, 3, 64)
    q = base[:, :, :2]           # non-contiguous NHD view
    k = torch.randn(2, 2, 64, 50).transpose(-1, -2).permute(0, 2, 1, 3)  # NHD view with D not contiguous
    v = torch.randn(2, 50, 2, 64)
    assert not q.is_contiguous() and not k.is_contiguous()
    saved = [t.clone() for t in (q, k, v)]
    out = s3.sage_attention(q, k, v, kernel, tensor_layout="NHD")
    ref = s3.sage_attention(q.contiguous(), k.contiguous(), v, kernel, tensor_layout="NHD")
    assert torch.allclose(out, ref, atol=1e-5)  # strides may change fp32 summation order, nothing more
    for t, t0 in zip((q, k, v), saved):
        assert torch.equal(t, t0)


@pytest.mark.parametrize("kernel", ["sdpa", *EMULATIONS])
def test_lse(kernel):
    q, k, v = qkv(skv=70)
    out, lse = s3.sage_attention(q, k, v, kernel, return_lse=True)
    s = (q.double() @ k.double().transpose(-1, -2)) * 64 ** -0.5
    ref = torch.logsumexp(s, dim=-1)
    assert lse.shape == (2, 2, 40) and lse.dtype == torch.float32
    assert (lse - ref).abs().mean() < (1e-5 if kernel == "sdpa" else 0.2)


def test_sdpa_backend_exact_with_causal_gqa_mask():
    q, k, v = qkv(h=4, hkv=2, s=30)
    out = s3.sage_attention(q, k, v, "sdpa", is_causal=True)
    assert accuracy_metrics(out, sdpa_fp64(q, k, v, is_causal=True))["max_abs"] < 1e-4
    mask = torch.rand(2, 1, 30, 30) > 0.3
    mask[..., 0] = True
    out, lse = s3.sage_attention(q, k, v, "sdpa", attn_mask=mask, return_lse=True)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    ref = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
    assert torch.allclose(out, ref, atol=1e-6)
    sc = (q @ kk.transpose(-1, -2) / 8).masked_fill(~mask, float("-inf"))
    assert torch.allclose(lse, torch.logsumexp(sc, -1), atol=1e-4)


def test_sm_scale_is_used():
    q, k, v = torch.randn(3, 2, 2, 40, 64).unbind(0)
    a = s3.sage_attention(q, k, v, "sdpa", sm_scale=0.3)
    assert torch.allclose(a, sdpa_fp64(q, k, v, scale=0.3).float(), atol=1e-5)


@pytest.mark.parametrize("kernel", ["sdpa", *EMULATIONS])
def test_s_equals_one_and_empty_queries(kernel):
    q, k, v = qkv(s=1)
    out = s3.sage_attention(q, k, v, kernel)
    assert torch.allclose(out, v, atol=0.2 if kernel != "sdpa" else 1e-6)  # one key: output is that value
    q0 = torch.randn(2, 2, 0, 64)
    out, lse = s3.sage_attention(q0, k, v, kernel, return_lse=True)
    assert out.shape == (2, 2, 0, 64) and lse.shape == (2, 2, 0)


@pytest.mark.parametrize("bad, match", [
    (lambda q, k, v: (q[0], k, v), "q must be 4-D"),
    (lambda q, k, v: (q, k[:, :, :5], v), "same heads and sequence length"),
    (lambda q, k, v: (q, k[..., :32], v), "head dims differ"),
    (lambda q, k, v: (q, k.half(), v), "share a dtype"),
    (lambda q, k, v: (q, k[:1], v[:1]), "batch sizes differ"),
    (lambda q, k, v: (q[:, :3].repeat(1, 1, 1, 1), k[:, :2], v[:, :2]), "multiple of key/value heads"),
    (lambda q, k, v: (q, k[:, :, :0], v[:, :, :0]), "sequence length is 0"),
    (lambda q, k, v: (q.int(), k.int(), v.int()), "floating-point"),
])
def test_bad_input_errors_name_the_problem(bad, match):
    q, k, v = qkv(h=4)
    q, k, v = bad(q, k, v)
    with pytest.raises(ValueError, match=match):
        s3.sage_attention(q, k, v, "sdpa")


def test_bad_layout_and_kernel_names():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="tensor_layout"):
        s3.sage_attention(q, k, v, tensor_layout="BHSD")
    with pytest.raises(ValueError, match="unknown kernel 'fp5'"):
        s3.sage_attention(q, k, v, "fp5")
    with pytest.raises(TypeError, match="torch.Tensor"):
        s3.sage_attention(q.numpy(), k, v)


@pytest.mark.parametrize("kernel", ["sdpa", *EMULATIONS])
def test_nan_inputs_give_nan_outputs_never_silent(kernel):
    q, k, v = qkv(b=1, h=1, s=300)
    q[0, 0, 5, 3] = float("nan")
    out = s3.sage_attention(q, k, v, kernel)
    assert torch.isnan(out[0, 0, 5]).all()  # the poisoned row is NaN, as in SDPA
    # A NaN spreads exactly through its Q quantization group and no further.
    group = {"sdpa": [5], "reference_int8_fp8": [5, 13],  # per_thread: rows with equal t % 8 in a 16-row slice
             "reference_fp4": list(range(128))}[kernel]     # the 128-token block shares the NaN block mean
    poisoned = torch.zeros(300, dtype=torch.bool)
    poisoned[group] = True
    assert torch.isnan(out[0, 0, poisoned]).all() and torch.isfinite(out[0, 0, ~poisoned]).all()
    q, k, v = qkv(b=1, h=1, s=50)
    k[0, 0, 7, 0] = float("inf")
    out = s3.sage_attention(q, k, v, kernel)
    assert not torch.isfinite(out).all()  # an infinite key poisons the head (SDPA: every row that sees it)


def test_fp32_documented_routing():
    # fp32 runs in SDPA and the emulations; the quantized kernels take fp16/bf16 only and say so.
    q, k, v = qkv()
    from sage3_diffusers.backends.base import describe_problem
    p = describe_problem(q, k, v, "HND", False, False, None)
    assert s3.resolve(q, k, v).backend.name == "sdpa"
    assert s3.resolve(q, k, v, "reference_fp4").backend.name == "reference_fp4"
    for b in s3.list_backends():
        if b.family != "sdpa" and b.auto_eligible:
            assert any("dtype float32 not supported" in r for r in b.input_reasons(p)), b.name


def test_public_names():
    assert s3.sageattn3_blackwell is s3.sageattn3
    q, k, v = qkv(dtype=torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="fell back"):
        s3.dispatch._warned.clear()
        out = s3.sageattn3(q, k, v)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert s3.sageattn2pp(q, k, v, tensor_layout="HND").shape == q.shape


def test_torch_compile_fullgraph_through_the_dispatcher():
    # The backend choice is made while tracing; the compiled graph holds only the chosen backend's ops.
    q, k, v = torch.randn(3, 1, 2, 40, 64).unbind(0)

    def f(q, k, v):
        return s3.sage_attention(q, k, v, "reference_int8_fp8", tensor_layout="NHD") * 2

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    assert torch.allclose(compiled(q, k, v), f(q, k, v), atol=1e-6)


@pytest.mark.parametrize("module, op, extra", [
    ("sage3_diffusers.backends.cuda_sm90", "sm90_int8fp8_attn", ()),
    ("sage3_diffusers.backends.cuda_fp4", "fp4_attn", ()),
    ("sage3_diffusers.backends.triton_int8fp8", "triton_int8fp8_attn", ("per_thread",)),
])
@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_custom_op_fake_shapes_on_meta(module, op, extra, layout):
    # The ops' fake implementations (torch.compile / CUDA graphs) run on the meta device without a GPU.
    import importlib
    importlib.import_module(module)
    q = torch.empty(2, 3, 50, 64, device="meta", dtype=torch.bfloat16)  # (B, H, S, D) or (B, S, H, D)
    for return_lse in (False, True):
        out, lse = getattr(torch.ops.sage3, op)(q, q, q, layout, False, 0.125, return_lse, *extra)
        assert out.shape == q.shape and out.dtype == q.dtype
        b, h, s = (2, 50, 3) if layout == "NHD" else (2, 3, 50)
        assert lse.shape == ((b, h, s) if return_lse else (0,)) and lse.dtype == torch.float32


def test_sdpa_backend_tries_cudnn_first_and_restores_the_callers_order():
    """The exact backend moves cuDNN to the front of SDPA's priority order for its call only (no enable/disable
    of backends: the caller's choices stand), and restores the order afterwards, also when the call raises."""
    from torch.nn.attention import SDPBackend

    from sage3_diffusers.backends import sdpa
    before = torch._C._get_sdp_priority_order()
    order = sdpa.cudnn_first(before)
    assert order[0] == int(SDPBackend.CUDNN_ATTENTION) and sorted(order) == sorted(int(b) for b in before)
    assert [b for b in order[1:]] == [int(b) for b in before if int(b) != int(SDPBackend.CUDNN_ATTENTION)]
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    out = sdpa.sdpa_cudnn_first(q, k, v, None, False, 0.3, False)
    assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3))
    assert torch._C._get_sdp_priority_order() == before
    with pytest.raises(RuntimeError):
        sdpa.sdpa_cudnn_first(q, k[..., :4], v, None, False, 0.3, False)
    assert torch._C._get_sdp_priority_order() == before
