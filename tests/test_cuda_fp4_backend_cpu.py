"""The NVFP4 CUDA backends' declarations, reasons and fake op, checked without a GPU (CPU CI)."""
import functools

import pytest
import torch

from sage3_diffusers import dispatch
from sage3_diffusers.backends import cuda_fp4
from sage3_diffusers.backends.cuda_fp4 import CudaFp4EmulatedBackend, CudaSm120Fp4Backend


@pytest.fixture
def problem(make_problem):
    return functools.partial(make_problem, capability=(12, 0))


class _FakeExt:
    def __init__(self, **images):
        self.images = {"sm_120a": False, "sm_121a": False, "sm_90a_emulated": False, **images}

    def build_info(self):
        return dict(self.images)


@pytest.fixture
def fake_ext(monkeypatch):
    def install(**images):
        monkeypatch.setattr(cuda_fp4.FP4_EXT, "_module", _FakeExt(**images))
        monkeypatch.setattr(cuda_fp4.FP4_EXT, "error", None)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return install


def test_registered_in_dispatcher():
    names = {b.name: b for b in dispatch.list_backends()}
    native, emulated = names["cuda_sm120_fp4"], names["cuda_fp4_emulated"]
    assert native.family == "fp4" and native.priority == 100 and native.auto_eligible
    assert emulated.family == "fp4" and not emulated.auto_eligible
    assert "test build" in emulated.description
    assert "not yet run on Blackwell hardware" in native.verified
    for b in (native, emulated):
        assert b.head_dims == (64, 128) and set(b.dtypes) == {torch.float16, torch.bfloat16}
        assert b.supports_causal and b.supports_lse and b.supports_gqa and not b.supports_mask


def test_unbuilt_extension_reason(monkeypatch):
    monkeypatch.setattr(cuda_fp4.FP4_EXT, "_module", None)
    monkeypatch.setattr(cuda_fp4.FP4_EXT, "error", "ModuleNotFoundError: No module named 'sage3_diffusers._C_fp4'")
    for backend in (CudaSm120Fp4Backend(), CudaFp4EmulatedBackend()):
        reasons = backend.unavailable_reasons()
        assert len(reasons) == 1 and reasons[0].startswith("extension _C_fp4 not built ("), reasons


def test_native_needs_sm120_image(fake_ext):
    fake_ext(sm_90a_emulated=True)
    reasons = CudaSm120Fp4Backend().unavailable_reasons()
    assert any("built without sm_120a" in r and "emulated MMA build: for numerics tests, not speed" in r
               for r in reasons), reasons
    fake_ext(sm_120a=True)
    assert CudaSm120Fp4Backend().unavailable_reasons() == []


def test_emulated_needs_its_image(fake_ext):
    fake_ext(sm_120a=True)
    assert any("without the emulated sm_90a image" in r for r in CudaFp4EmulatedBackend().unavailable_reasons())
    fake_ext(sm_90a_emulated=True)
    assert CudaFp4EmulatedBackend().unavailable_reasons() == []


@pytest.mark.parametrize("cap", [(12, 0), (12, 1)])
def test_native_takes_sm120_and_sm121(cap, problem):
    assert CudaSm120Fp4Backend().input_reasons(problem(capability=cap)) == []
    assert CudaSm120Fp4Backend().input_reasons(problem(capability=cap, head_dim=64, head_dim_v=64)) == []


@pytest.mark.parametrize("cap", [(9, 0), (10, 0), (8, 9)])
def test_native_rejects_other_archs(cap, fake_ext, problem):
    fake_ext(sm_120a=True)
    reasons = CudaSm120Fp4Backend().input_reasons(problem(capability=cap))
    assert any("needs an sm_120/121 GPU" in r and f"sm_{cap[0]}{cap[1]}" in r for r in reasons), reasons


def test_native_on_hopper_points_to_emulated_build(fake_ext, problem):
    fake_ext(sm_120a=True, sm_90a_emulated=True)
    reasons = CudaSm120Fp4Backend().input_reasons(problem(capability=(9, 0)))
    assert any("emulated MMA build: for numerics tests, not speed" in r for r in reasons), reasons


def test_emulated_runs_only_on_sm90(problem):
    assert CudaFp4EmulatedBackend().input_reasons(problem(capability=(9, 0))) == []
    reasons = CudaFp4EmulatedBackend().input_reasons(problem(capability=(12, 0)))
    assert any("sm_90" in r and "sm_120" in r for r in reasons), reasons


def test_other_input_reasons(problem):
    b = CudaSm120Fp4Backend()
    assert any("cpu" in r for r in b.input_reasons(problem(device_type="cpu", capability=None)))
    assert any("head_dim 96" in r for r in b.input_reasons(problem(head_dim=96, head_dim_v=96)))
    assert any("float32" in r for r in b.input_reasons(problem(dtype=torch.float32)))
    assert any("attn_mask" in r for r in b.input_reasons(problem(has_mask=True)))
    assert any("empty sequence" in r for r in b.input_reasons(problem(seq_kv=0)))


def test_not_selected_on_cpu():
    from sage3_diffusers.api import resolve

    q = torch.randn(1, 2, 16, 64, dtype=torch.bfloat16)
    sel = resolve(q, q, q, kernel="fp4")
    assert sel.backend.name not in ("cuda_sm120_fp4", "cuda_fp4_emulated")
    assert sel.backend.name != "cuda_fp4_emulated"
    with pytest.raises(ValueError, match="cuda_fp4_emulated"):
        resolve(q, q, q, kernel="cuda_fp4_emulated")


@pytest.mark.parametrize("layout,return_lse", [("HND", True), ("NHD", True), ("HND", False)])
def test_fake_impl_shapes(layout, return_lse):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        shape = (2, 4, 77, 64) if layout == "HND" else (2, 77, 4, 64)
        q = torch.empty(shape, dtype=torch.bfloat16)
        out, lse = torch.ops.sage3.fp4_attn(q, q, q, layout, True, 0.125, return_lse)
        assert out.shape == q.shape and out.dtype == torch.bfloat16
        assert lse.dtype == torch.float32
        assert tuple(lse.shape) == ((2, 4, 77) if return_lse else (0,))


def test_smoothing_terms_match_reference():
    """The means and ΔS the backend feeds its kernels are the specification's own (bit-identical)."""
    from sage3_diffusers.numerics.sage3_reference import sage3_quantize

    q = torch.randn(2, 4, 200, 64)
    k = torch.randn(2, 2, 150, 64) + 3.0
    v = torch.randn(2, 2, 150, 64)
    q_mean, k_mean, delta_s = cuda_fp4.smoothing_terms(q, k)
    ref = sage3_quantize(q, k, v)
    assert torch.equal(q_mean, ref.q_mean) and torch.equal(k_mean, ref.k_mean)
    assert torch.equal(delta_s, ref.delta_s)


def test_bad_inputs_raise_in_python(fake_ext):
    """Bad inputs to the op are rejected with a ValueError naming the problem before any C++ is reached (the fake
    extension would fail the test if the op got that far)."""
    fake_ext(sm_90a_emulated=True)

    def call(q, k, v):
        return torch.ops.sage3.fp4_attn(q, k, v, "HND", False, 0.125, False)

    x = lambda *s, dt=torch.bfloat16: torch.zeros(*s, dtype=dt)  # noqa: E731
    ok = x(1, 4, 16, 64)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        call(ok, x(1, 2, 16, 64), x(1, 2, 16, 64))
    with pytest.raises(ValueError, match="head_dim 96 not supported"):
        call(x(1, 2, 16, 96), x(1, 2, 16, 96), x(1, 2, 16, 96))
    with pytest.raises(ValueError, match="dtype float32 not supported"):
        y = x(1, 2, 16, 64, dt=torch.float32)
        call(y, y, y)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        call(x(1, 3, 16, 64), x(1, 2, 16, 64), x(1, 2, 16, 64))
    with pytest.raises(ValueError, match="sequence length is 0"):
        call(ok, x(1, 2, 0, 64), x(1, 2, 0, 64))
    with pytest.raises(ValueError, match="same heads and sequence length"):
        call(ok, x(1, 2, 16, 64), x(1, 2, 17, 64))
    with pytest.raises(ValueError, match="tensor_layout"):
        torch.ops.sage3.fp4_attn(ok, ok, ok, "BHSD", False, 0.125, False)


def test_kv_lens_refused_with_a_reason():
    from sage3_diffusers.backends.cuda_fp4 import CudaFp4EmulatedBackend
    q = torch.randn(1, 2, 8, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="does not take kv_lens"):
        CudaFp4EmulatedBackend().forward(q, q, q, layout="HND", is_causal=False, sm_scale=0.1, return_lse=False,
                                         kv_lens=torch.tensor([8], dtype=torch.int32))
