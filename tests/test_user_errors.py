"""Errors a user meets first: they name the argument or the environment variable."""
import math

import pytest
import torch

from sage3_diffusers import dispatch
from sage3_diffusers.api import sage_attention
from sage3_diffusers.integration.stats import KernelStats


@pytest.mark.parametrize("bad", [-1.0, 0, 0.0, math.inf, math.nan, "x", True])
def test_sm_scale_must_be_finite_and_positive(bad):
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match=r"sm_scale must be a finite number > 0"):
        sage_attention(q, q, q, "sdpa", sm_scale=bad)


def test_sm_scale_accepts_positive_numbers():
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    out = sage_attention(q, k, v, "sdpa", sm_scale=0.5)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.5)
    torch.testing.assert_close(out, ref)


def test_bad_fallback_variable_is_named_by_calls(monkeypatch):
    monkeypatch.setenv("SAGE3_FALLBACK", "garbage")
    dispatch._cache.clear()
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match=r"SAGE3_FALLBACK='garbage' is not one of"):
        sage_attention(q, q, q, "fp4")


def test_stats_helpers_are_instance_methods_as_documented():
    stats = KernelStats()
    stats.record(0, 0, "a", "fp4", "reference_fp4", "emulated")
    stats.record(0, 1, "a", "int8_fp8", "sdpa")
    stats.record(1, 0, "a", "fp4", "sdpa", "fell back")
    assert stats.backends_by_step() == {0: {"sdpa": 1}}  # latest generation by default
    assert stats.backends_by_step(stats.calls) == {0: {"reference_fp4": 1, "sdpa": 1}, 1: {"sdpa": 1}}
    assert stats.requested_by_step(stats.generation(0)) == {0: {"fp4": 1}, 1: {"int8_fp8": 1}}
    assert stats.fallbacks() == {("fp4", "sdpa", "fell back"): 1}


@pytest.mark.parametrize("family,no_op", [("sd3", True), ("cogvideox", True), ("mochi", True), ("flux", False),
                                         ("hunyuan_video", False), ("wan", False), ("qwenimage", False),
                                         ("ltx", False), ("ltx2", False), ("flux2", False),
                                         ("hunyuan_video15", False)])
def test_set_attention_backend_warns_where_it_is_a_no_op(family, no_op):
    pytest.importorskip("diffusers")
    import warnings

    import sage3_diffusers.integration  # noqa: F401  (registers the backends)
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
    from sage3_diffusers.integration.tiny import tiny_transformer
    model = tiny_transformer(family)
    initial = _AttentionBackendRegistry.get_active_backend()[0]
    try:
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            model.set_attention_backend("sage3")
            model.set_attention_backend("native")  # other names: never our warning
        ours = [str(w.message) for w in rec if "sage3_diffusers" in str(w.message)]
        if no_op:
            assert len(ours) == 1, ours
            assert f"set_attention_backend('sage3') has no effect on {type(model).__name__}" in ours[0]
            assert "sage3_diffusers.apply(model, kernel='fp4')" in ours[0]
        else:
            assert ours == []
    finally:
        model.reset_attention_backend()
        _AttentionBackendRegistry.set_active_backend(initial)
