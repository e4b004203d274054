"""The fail-closed self-check: a compiled backend that returns wrong results is disabled, warned about and
fallen back from; a correct one passes; SAGE3_SELFCHECK=0 skips the check."""
import warnings

import pytest
import torch

from sage3_diffusers import dispatch, selfcheck
from sage3_diffusers.api import resolve, sage_attention
from sage3_diffusers.backends.base import AttentionBackend
from sage3_diffusers.testing import dit_like_qkv, sdpa_fp64


class GoodInt8(AttentionBackend):
    """Stands in for a correct compiled INT8/FP8 kernel on CPU: the SageAttention2++ numerics themselves."""
    name = "fake_good_int8"
    family = "int8_fp8"
    priority = 1000
    description = "test double"
    verified = "test"
    dtypes = (torch.float32, torch.bfloat16)
    head_dims = None
    calls = 0

    def forward(self, q, k, v, **kw):
        type(self).calls += 1
        return self._reference(q, k, v, **kw)

    @staticmethod
    def _reference(q, k, v, **kw):
        return dispatch.get_backend("reference_int8_fp8").forward(q, k, v, **kw)


class CorruptInt8(GoodInt8):
    """A registration-bug style failure: plausible-looking values, wrong answer (heads swapped)."""
    name = "fake_corrupt_int8"

    def forward(self, q, k, v, **kw):
        type(self).calls += 1
        return self._reference(q, k, v, **kw).flip(1)


class NanFp4(GoodInt8):
    name, family = "fake_nan_fp4", "fp4"

    def forward(self, q, k, v, **kw):
        out = super().forward(q, k, v, **kw)
        out[0, 0, 0, 0] = float("nan")
        return out


class WrongShape(GoodInt8):
    name = "fake_wrong_shape"

    def forward(self, q, k, v, **kw):
        return super().forward(q, k, v, **kw)[:, :, :-1]


class Raises(GoodInt8):
    name = "fake_raises"

    def forward(self, q, k, v, **kw):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")


@pytest.fixture
def registry(monkeypatch):
    dispatch._ensure_loaded()
    monkeypatch.setattr(dispatch, "_registry", dict(dispatch._registry))
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.delenv("SAGE3_SELFCHECK", raising=False)
    monkeypatch.delenv("SAGE3_BACKEND", raising=False)
    dispatch._cache.clear()
    selfcheck.reset()
    GoodInt8.calls = CorruptInt8.calls = 0
    yield dispatch.register_backend
    dispatch._cache.clear()
    selfcheck.reset()


def qkv(dtype=torch.float32, d=64):
    return dit_like_qkv(1, 2, 48, d, dtype=dtype, generator=torch.Generator().manual_seed(1))


def test_corrupt_backend_is_disabled_with_warning_and_family_falls_back(registry):
    registry(CorruptInt8())
    q, k, v = qkv()
    with pytest.warns(RuntimeWarning, match=r"fake_corrupt_int8.*failed its self-check.*cos sim .* below 0\.995"):
        sel = resolve(q, k, v, "int8_fp8")
    assert sel.backend.name == "sdpa" and "fell back to sdpa" in sel.note
    reasons = dict(sel.rejected)["fake_corrupt_int8"]
    assert reasons[0].startswith("failed self-check: cos sim")
    out = sage_attention(q, k, v, "int8_fp8")
    assert torch.allclose(out.double(), sdpa_fp64(q, k, v), atol=1e-5)  # exact, not the corrupted kernel
    # auto falls back too, and naming the backend fails with the cause instead of running it.
    assert resolve(q, k, v, "auto").backend.name == "sdpa"
    with pytest.raises(ValueError, match="fake_corrupt_int8.*failed self-check"):
        sage_attention(q, k, v, "fake_corrupt_int8")
    # One check per process: the corrupted kernel ran once (the check), never for a user's call.
    assert CorruptInt8.calls == 1
    [result] = selfcheck.results()
    assert result.passed is False and result.cos_sim < 0.9
    assert "FAILED" in "\n".join(selfcheck.report_lines())


def test_failure_disables_the_backend_for_cached_problems_too(registry):
    registry(CorruptInt8())
    selfcheck_off = pytest.MonkeyPatch()
    selfcheck_off.setenv("SAGE3_SELFCHECK", "0")
    q, k, v = qkv()
    assert resolve(q, k, v, "int8_fp8").backend.name == "fake_corrupt_int8"  # cached while checks are off
    selfcheck_off.undo()
    with pytest.warns(RuntimeWarning, match="failed its self-check"):
        assert resolve(*qkv(d=128), "int8_fp8").backend.name == "sdpa"
    assert resolve(q, k, v, "int8_fp8").backend.name == "sdpa"  # the earlier cached choice is dropped


def test_good_backend_passes_and_is_used(registry):
    registry(GoodInt8())
    q, k, v = qkv(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = sage_attention(q, k, v, "int8_fp8")
    assert resolve(q, k, v, "int8_fp8").backend.name == "fake_good_int8"
    assert torch.equal(out, dispatch.get_backend("reference_int8_fp8").forward(
        q, k, v, layout="HND", is_causal=False, sm_scale=64 ** -0.5, return_lse=False))
    [result] = selfcheck.results()
    assert result.passed and result.cos_sim > 0.999
    assert result.key == ("cpu", torch.bfloat16, 64, "HND", False)
    # A different (dtype, head dim, layout, causal) is checked again; the same one is not.
    sage_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), "int8_fp8", tensor_layout="NHD")
    sage_attention(q, k, v, "int8_fp8", is_causal=True)
    sage_attention(*qkv(torch.bfloat16), "int8_fp8")
    assert len(selfcheck.results()) == 3 and all(r.passed for r in selfcheck.results())


@pytest.mark.parametrize("cls, cause", [
    (NanFp4, r"non-finite output \(1 of"),
    (WrongShape, r"returned shape \(1, 2, 199, 64\)"),
    (Raises, r"raised RuntimeError: CUDA error: no kernel image"),
])
def test_each_failure_kind_names_its_cause(registry, cls, cause):
    registry(cls())
    family = cls.family
    with pytest.warns(RuntimeWarning, match=cause):
        sel = resolve(*qkv(), family)
    assert sel.backend.name != cls.name
    assert any(name == cls.name and r[0].startswith("failed self-check: ") for name, r in sel.rejected)


def test_selfcheck_off_skips_the_check(registry, monkeypatch):
    monkeypatch.setenv("SAGE3_SELFCHECK", "0")
    registry(CorruptInt8())
    q, k, v = qkv()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve(q, k, v, "int8_fp8").backend.name == "fake_corrupt_int8"
    assert selfcheck.results() == [] and CorruptInt8.calls == 0
    assert "off (SAGE3_SELFCHECK=0)" in selfcheck.report_lines()[0]
    monkeypatch.setenv("SAGE3_SELFCHECK", "maybe")
    dispatch._cache.clear()
    with pytest.raises(ValueError, match="SAGE3_SELFCHECK='maybe'"):
        resolve(q, k, v, "int8_fp8")


def test_skipped_during_cuda_graph_capture_and_checked_after(registry, monkeypatch):
    registry(CorruptInt8())
    monkeypatch.setattr(selfcheck, "_capturing", lambda problem: True)
    q, k, v = qkv()
    assert resolve(q, k, v, "int8_fp8").backend.name == "fake_corrupt_int8"  # cannot check while capturing
    assert "CUDA graph capture" in selfcheck.results()[0].detail and CorruptInt8.calls == 0
    monkeypatch.setattr(selfcheck, "_capturing", lambda problem: False)
    with pytest.warns(RuntimeWarning, match="failed its self-check"):
        assert resolve(q, k, v, "int8_fp8").backend.name == "sdpa"  # the choice was not cached


def test_check_runs_eagerly_inside_torch_compile(registry):
    registry(CorruptInt8())
    q, k, v = qkv()
    fn = torch.compile(lambda q, k, v: sage_attention(q, k, v, "int8_fp8"), backend="eager", fullgraph=True)
    with pytest.warns(RuntimeWarning, match="failed its self-check"):
        out = fn(q, k, v)
    assert torch.allclose(out.double(), sdpa_fp64(q, k, v), atol=1e-5)
    torch.compiler.reset()


def test_env_shows_results(registry):
    from sage3_diffusers.cli import env_report
    registry(GoodInt8())
    sage_attention(*qkv(), "int8_fp8")
    text = env_report()
    assert "self-check of compiled kernels: on" in text
    assert "fake_good_int8 on cpu, float32, head_dim 64, HND: passed cos sim" in text


def test_exact_and_reference_backends_are_not_checked(registry):
    q, k, v = qkv()
    for kernel in ("sdpa", "reference_fp4", "reference_int8_fp8"):
        sage_attention(q, k, v, kernel)
    assert selfcheck.results() == []


def test_check_ignores_the_callers_pinned_sdpa_backend(registry):
    """A caller inside `sdpa_kernel([CUDNN_ATTENTION])` (the fastest exact kernel on Hopper) has no SDPA kernel
    for the check's fp32 reference enabled; the check computes it on the math backend anyway instead of failing
    and disabling a correct kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    registry(GoodInt8())
    q, k, v = qkv(torch.bfloat16)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        with pytest.raises(RuntimeError):  # what the check's reference used to run into
            torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
        sage_attention(q, k, v, "int8_fp8")
    [result] = selfcheck.results()
    assert result.passed, result
    assert resolve(q, k, v, "int8_fp8").backend.name == "fake_good_int8"
