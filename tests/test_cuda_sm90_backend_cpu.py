"""The sm90 CUDA backend's declarations and reasons, checked without a GPU (CPU CI)."""
import functools

import pytest
import torch

from sage3_diffusers import dispatch
from sage3_diffusers.backends import cuda_sm90, head_chunks
from sage3_diffusers.backends.cuda_sm90 import CudaSm90Int8Fp8Backend


@pytest.fixture
def problem(make_problem):
    return functools.partial(make_problem, capability=(9, 0))


def test_registered_in_dispatcher_as_int8_fp8_priority_100():
    names = {b.name: b for b in dispatch.list_backends()}
    b = names["cuda_sm90_int8_fp8"]
    assert b.family == "int8_fp8" and b.priority == 100
    assert b.head_dims == (64, 128) and set(b.dtypes) == {torch.float16, torch.bfloat16}
    assert b.supports_causal and b.supports_lse and b.supports_gqa and not b.supports_mask


def test_supported_problem_has_no_input_reasons(problem):
    assert CudaSm90Int8Fp8Backend().input_reasons(problem()) == []
    assert CudaSm90Int8Fp8Backend().input_reasons(problem(head_dim=64, head_dim_v=64, layout="HND")) == []


@pytest.mark.parametrize("cap,text", [((8, 9), "this GPU is sm_89"), ((12, 0), "this GPU is sm_120"),
                                      ((10, 0), "this GPU is sm_100")])
def test_wrong_arch_reason(cap, text, problem):
    reasons = CudaSm90Int8Fp8Backend().input_reasons(problem(capability=cap))
    assert any("needs sm_90" in r and text in r for r in reasons), reasons


def test_other_input_reasons(problem):
    b = CudaSm90Int8Fp8Backend()
    assert any("cpu" in r for r in b.input_reasons(problem(device_type="cpu", capability=None)))
    assert any("head_dim 96" in r for r in b.input_reasons(problem(head_dim=96, head_dim_v=96)))
    assert any("float32" in r for r in b.input_reasons(problem(dtype=torch.float32)))
    assert any("attn_mask" in r for r in b.input_reasons(problem(has_mask=True)))
    assert any("value head_dim" in r for r in b.input_reasons(problem(head_dim_v=64)))


def test_unbuilt_extension_reason(monkeypatch):
    monkeypatch.setattr(cuda_sm90.SM90_EXT, "_module", None)
    monkeypatch.setattr(cuda_sm90.SM90_EXT, "error", "ModuleNotFoundError: No module named 'sage3_diffusers._C_sm90'")
    reasons = CudaSm90Int8Fp8Backend().unavailable_reasons()
    assert len(reasons) == 1 and reasons[0].startswith("extension _C_sm90 not built (")


def test_not_selected_on_cpu():
    q = torch.randn(1, 2, 16, 64)
    from sage3_diffusers.api import resolve
    sel = resolve(q, q, q, kernel="int8_fp8")
    assert sel.backend.name != "cuda_sm90_int8_fp8"
    assert any(name == "cuda_sm90_int8_fp8" for name, _ in sel.rejected) or sel.backend.family != "int8_fp8"


def test_custom_op_registered_with_fake_impl():
    from torch._subclasses.fake_tensor import FakeTensorMode
    op = torch.ops.sage3.sm90_int8fp8_attn
    with FakeTensorMode():
        q = torch.empty(2, 77, 4, 128, dtype=torch.bfloat16)  # NHD
        k = torch.empty(2, 300, 2, 128, dtype=torch.bfloat16)
        out, lse = op(q, k, k, "NHD", True, 0.1, True)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert lse.shape == (2, 4, 77) and lse.dtype == torch.float32
        out, lse = op(q, k, k, "NHD", False, 0.1, False)
        assert lse.numel() == 0


def test_op_without_extension_raises_clearly(monkeypatch):
    monkeypatch.setattr(cuda_sm90.SM90_EXT, "_module", None)
    monkeypatch.setattr(cuda_sm90.SM90_EXT, "error", "not built for test")
    q = torch.randn(1, 2, 8, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="not built"):
        torch.ops.sage3.sm90_int8fp8_attn(q, q, q, "HND", False, 0.1, False)


def test_kv_lens_declared_and_in_the_op_schema():
    from torch._subclasses.fake_tensor import FakeTensorMode
    assert CudaSm90Int8Fp8Backend.supports_kv_lens
    op = torch.ops.sage3.sm90_int8fp8_attn
    assert "Tensor? kv_lens=None" in str(op.default._schema)
    with FakeTensorMode():
        q = torch.empty(3, 4, 77, 64, dtype=torch.float16)
        lens = torch.empty(3, dtype=torch.int32)
        out, lse = op(q, q, q, "HND", False, 0.1, True, lens)
        assert out.shape == q.shape and lse.shape == (3, 4, 77)


@pytest.mark.parametrize("lens,error,match", [
    ([1, 2, 3], ValueError, r"kv_lens must have shape \[2\]"),
    ([1.0, 2.0], ValueError, "must be an int32"),
    ("lens", TypeError, "kv_lens must be a tensor"),
])
def test_kv_lens_checked_before_the_extension(lens, error, match):
    from sage3_diffusers.kernels import kv_lens_for_kernel
    if isinstance(lens, list):
        lens = torch.tensor(lens)
    with pytest.raises(error, match=match):
        kv_lens_for_kernel(lens, 2, torch.device("cpu"))
    ok = kv_lens_for_kernel(torch.tensor([5, 0]), 2, torch.device("cpu"))
    assert ok.dtype == torch.int32 and ok.tolist() == [5, 0]
    assert kv_lens_for_kernel(None, 2, torch.device("cpu")) is None
    with pytest.raises(ValueError, match="kv_lens must be on q's device"):
        kv_lens_for_kernel(torch.tensor([5, 0], device="meta"), 2, torch.device("cpu"))


def test_eager_calls_skip_the_custom_op_traced_calls_use_it(monkeypatch):
    """Eagerly on plain tensors the backend calls the op's implementation directly (no dispatcher round trip);
    under a dispatch mode (FakeTensorMode), with autograd recording, or while torch.compile traces, it goes
    through `torch.ops.sage3.sm90_int8fp8_attn`, which the tracers see as one op."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sage3_diffusers.backends.base import through_custom_op
    calls = []

    def impl(q, k, v, layout, is_causal, sm_scale, return_lse, kv_lens=None):
        calls.append(layout)
        return q.clone(), q.new_empty((0,), dtype=torch.float32)
    monkeypatch.setattr(cuda_sm90, "_sm90_forward", impl)
    be = CudaSm90Int8Fp8Backend()
    q = torch.randn(1, 2, 8, 64, dtype=torch.bfloat16)
    assert not through_custom_op(q)
    out = be.forward(q, q, q, layout="HND", is_causal=False, sm_scale=0.1, return_lse=False)
    assert calls == ["HND"] and torch.equal(out, q)
    with FakeTensorMode():
        fq = torch.empty(1, 2, 8, 64, dtype=torch.bfloat16)
        assert through_custom_op(fq)
        out = be.forward(fq, fq, fq, layout="HND", is_causal=False, sm_scale=0.1, return_lse=False)
        assert out.shape == fq.shape
    assert calls == ["HND"]  # the fake implementation ran, not the kernel's
    assert through_custom_op(q.clone().requires_grad_())
    with torch.no_grad():
        assert not through_custom_op(q.clone().requires_grad_())
    # Every input counts: K/V that need gradients (q frozen), or a K/V subclass (ring attention's all-gathered
    # K/V before their wait) take the op, whose dispatch handles them.
    assert through_custom_op(q, q.clone().requires_grad_(), q)

    class Wrapped(torch.Tensor):
        pass
    assert through_custom_op(q, q.as_subclass(Wrapped), q)
    assert not through_custom_op(q, q, q, None)
    # Transforms and tracers: functorch (vmap), forward-mode AD, torch.jit tracing.
    seen = []
    torch.func.vmap(lambda x: seen.append(through_custom_op(x)) or x)(q)
    import torch.autograd.forward_ad as fwad
    with fwad.dual_level():
        seen.append(through_custom_op(q))
    torch.jit.trace(lambda x: seen.append(through_custom_op(x)) or x * 1, (q,), check_trace=False)
    assert seen == [True, True, True], seen

    @torch.compile(backend="eager", fullgraph=True)
    def traced(x):
        return x + 1 if through_custom_op(x) else x - 1
    assert torch.equal(traced(torch.zeros(2)), torch.ones(2))
    # Under a recording profiler the call goes through the op (which links its GPU kernels to it in traces).
    with torch.profiler.profile() as prof:
        be.forward(q, q, q, layout="HND", is_causal=False, sm_scale=0.1, return_lse=False)
    assert calls == ["HND", "HND"]
    assert any(e.name == "sage3::sm90_int8fp8_attn" for e in prof.events())

    # The backend's whole call traces into one graph (fullgraph: nothing in it breaks the graph); the graph
    # holds the op, which the eager compiler backend then runs (its implementation, once).
    @torch.compile(backend="eager", fullgraph=True)
    def compiled(x):
        return be.forward(x, x, x, layout="HND", is_causal=False, sm_scale=0.1, return_lse=False) * 2
    assert torch.equal(compiled(q), q * 2) and calls == ["HND"] * 3


def test_large_calls_run_in_chunks_of_kv_heads():
    """Chunks only where the quantized copies would be large and there are heads to split."""
    small = torch.empty(1, 24, 4608, 128, device="meta")
    video = torch.empty(1, 24, 119056, 128, device="meta")
    assert head_chunks.kv_heads_per_chunk(small, small, False) is None  # Flux: 42 MiB of copies
    assert head_chunks.kv_heads_per_chunk(video, video, False) == head_chunks.CHUNK_KV_HEADS
    nhd = video.transpose(1, 2)
    assert head_chunks.kv_heads_per_chunk(nhd, nhd, True) == head_chunks.CHUNK_KV_HEADS
    few = torch.empty(1, 4, 500000, 128, device="meta")
    assert head_chunks.kv_heads_per_chunk(few, few, False) is None  # nothing to split


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("b,hq,hkv,step", [(1, 12, 12, 4), (2, 8, 4, 2), (2, 6, 6, 4), (1, 6, 3, 2)])
def test_head_chunks_assemble_the_one_piece_result(layout, b, hq, hkv, step, fresh_seed):
    """forward_in_head_chunks with exact SDPA per chunk equals one exact call (output and LSE), whatever the
    layout, GQA group or a last chunk narrower than the others; each chunk writes into its slice of one output."""
    from sage3_diffusers.backends.sdpa import SdpaBackend
    torch.manual_seed(fresh_seed)
    sq, skv, d = 37, 29, 16
    shape = (lambda h, s: (b, s, h, d)) if layout == "NHD" else (lambda h, s: (b, h, s, d))
    q, k, v = torch.randn(shape(hq, sq)), torch.randn(shape(hkv, skv)), torch.randn(shape(hkv, skv))
    sdpa = SdpaBackend()

    def call(qc, kc, vc, oc):
        out, lse = sdpa.forward(qc, kc, vc, layout=layout, is_causal=False, sm_scale=0.25, return_lse=True)
        oc.copy_(out)
        return oc, lse
    whole, whole_lse = sdpa.forward(q, k, v, layout=layout, is_causal=False, sm_scale=0.25, return_lse=True)
    out, lse = head_chunks.forward_in_head_chunks(call, q, k, v, layout == "NHD", True, step)
    assert out.shape == q.shape and torch.allclose(out, whole, atol=1e-6), fresh_seed
    assert torch.allclose(lse, whole_lse, atol=1e-6), fresh_seed
    out, lse = head_chunks.forward_in_head_chunks(call, q, k, v, layout == "NHD", False, step)
    assert lse is None and torch.allclose(out, whole, atol=1e-6)