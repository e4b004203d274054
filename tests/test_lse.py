"""The LSE every CPU backend returns is that of the unsmoothed scores, natural log of sum exp(scale·q·kᵀ).

Ring attention merges partial results by their LSE: a backend that smooths K (subtracts the key mean before
quantizing) must add scale·q·k̄ᵀ back, per call, i.e. per key chunk. A large K offset (±50) makes a missing or
wrong correction obvious (it shifts the LSE by ~50·scale·Σq). The CUDA and Triton backends get the same checks
on a GPU: tests/gpu/test_context_parallel_gpu.py.
"""
import pytest
import torch

from sage3_diffusers import get_backend
from sage3_diffusers.numerics import accuracy_metrics, sage2pp_attention_reference
from sage3_diffusers.testing import lse_fp64, sdpa_fp64

# backend: (max |lse err| mean, max |lse err| anywhere, min cos sim of the merged output to fp64)
LEVELS = {
    "sdpa": (1e-5, 1e-4, 0.999999),
    "reference_int8_fp8": (0.02, 0.2, 0.998),
    "reference_fp4": (0.16, 1.0, 0.94),
}


def _inputs(b, hq, hkv, sq, skv, d, offset, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g)
    k = torch.randn(b, hkv, skv, d, generator=g) + offset  # every key shifted by the same large constant
    v = torch.randn(b, hkv, skv, d, generator=g)
    return q, k, v


def merge(out_a, lse_a, out_b, lse_b):
    """Two partial attentions over disjoint key sets combined by their LSE, as diffusers' ring attention does
    (HND layout, lse [B, H, S])."""
    la, lb = lse_a.unsqueeze(-1), lse_b.unsqueeze(-1)
    out = out_a - torch.sigmoid(lb - la) * (out_a - out_b)
    lse = lse_a - torch.nn.functional.logsigmoid(lse_a - lse_b)
    return out, lse


def _fresh_seed():
    return int(torch.randint(0, 2**31 - 1, ()).item())


@pytest.mark.parametrize("name", list(LEVELS))
@pytest.mark.parametrize("offset", [50.0, -50.0])
@pytest.mark.parametrize("shape", [
    # (B, Hq, Hkv, Sq, Skv, D)
    (2, 2, 2, 37, 150, 64),   # odd lengths, more than one key tile
    (1, 4, 2, 1, 77, 32),     # S_q = 1, GQA
    (1, 2, 2, 129, 300, 128),
])
def test_lse_is_of_unsmoothed_scores(name, offset, shape):
    mean_tol, max_tol, _ = LEVELS[name]
    seed = _fresh_seed()
    q, k, v = _inputs(*shape, offset=offset, seed=seed)
    scale = shape[-1] ** -0.5
    _, lse = get_backend(name).forward(q, k, v, layout="HND", is_causal=False, sm_scale=scale, return_lse=True)
    assert lse.dtype == torch.float32 and lse.shape == shape[:2] + (shape[3],)
    err = (lse.double() - lse_fp64(q, k)).abs()
    assert err.mean() <= mean_tol and err.max() <= max_tol, (seed, err.mean().item(), err.max().item())


@pytest.mark.parametrize("name", list(LEVELS))
def test_lse_causal_and_custom_scale(name):
    mean_tol, max_tol, _ = LEVELS[name]
    seed = _fresh_seed()
    q, k, v = _inputs(1, 2, 2, 70, 70, 64, offset=-50.0, seed=seed)
    _, lse = get_backend(name).forward(q, k, v, layout="HND", is_causal=True, sm_scale=0.07, return_lse=True)
    err = (lse.double() - lse_fp64(q, k, is_causal=True, scale=0.07)).abs()
    assert err.mean() <= mean_tol and err.max() <= max_tol, (seed, err.mean().item(), err.max().item())


@pytest.mark.parametrize("name", list(LEVELS))
@pytest.mark.parametrize("offset", [50.0, -50.0])
def test_per_chunk_lse_merges_to_full_attention(name, offset):
    """Keys in three unequal chunks, each attended separately (each chunk smoothed by its own mean), merged by
    LSE: the result is full attention, as ring attention needs."""
    mean_tol, max_tol, min_cos = LEVELS[name]
    seed = _fresh_seed()
    q, k, v = _inputs(2, 2, 2, 45, 230, 64, offset=offset, seed=seed)
    # Chunks with different offsets too, so each chunk's mean differs.
    k = k + torch.tensor([0.0, 7.0, -7.0]).repeat_interleave(torch.tensor([100, 80, 50]))[None, None, :, None]
    backend = get_backend(name)
    out = lse = None
    for ks, vs in zip(k.split([100, 80, 50], dim=2), v.split([100, 80, 50], dim=2)):
        o, l = backend.forward(q, ks, vs, layout="HND", is_causal=False, sm_scale=0.125, return_lse=True)
        out, lse = (o.float(), l) if out is None else merge(out, lse, o.float(), l)
    err = (lse.double() - lse_fp64(q, k, scale=0.125)).abs()
    assert err.mean() <= mean_tol and err.max() <= max_tol, (seed, err.mean().item(), err.max().item())
    cos = accuracy_metrics(out, sdpa_fp64(q, k, v, scale=0.125))["cos_sim"]
    assert cos >= min_cos, (seed, cos)
    if name == "sdpa":  # exact: as close to fp64 as one fp32 SDPA call over all keys (scores reach ~60 here)
        ref = sdpa_fp64(q, k, v, scale=0.125)
        one_call = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.125)
        assert (out.double() - ref).abs().max() <= 2 * (one_call.double() - ref).abs().max() + 1e-6


@pytest.mark.parametrize("row_sum", ["quantized_p", "p_tilde"])
def test_quantized_p_paths_lse(row_sum):
    """Both row sums of the INT8/FP8 numerics (sum of the e4m3 P: the sm90 kernel; of fp32 P̃: Triton) give the
    LSE of the unsmoothed scores."""
    seed = _fresh_seed()
    q, k, v = _inputs(1, 2, 2, 64, 260, 64, offset=50.0, seed=seed)
    _, lse = sage2pp_attention_reference(q, k, v, return_lse=True, row_sum=row_sum)
    err = (lse.double() - lse_fp64(q, k)).abs()
    assert err.mean() <= 0.02 and err.max() <= 0.2, (seed, row_sum, err.mean().item(), err.max().item())


@pytest.mark.parametrize("name", list(LEVELS))
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_key_value_views_with_storage_offsets(name, layout):
    """Ring attention hands key and value as views of one flat all-gathered buffer (value starts at a non-zero
    storage offset, neither is a tensor of its own): the result equals that of standalone contiguous copies."""
    seed = _fresh_seed()
    q, k, v = _inputs(1, 2, 2, 40, 90, 64, offset=50.0, seed=seed)
    if layout == "NHD":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    buffer = torch.cat([torch.randn(17), k.flatten(), v.flatten()])  # a leading chunk of another rank
    k_view = buffer[17:17 + k.numel()].reshape_as(k)
    v_view = buffer[17 + k.numel():].reshape_as(v)
    assert k_view.storage_offset() == 17 and v_view.storage_offset() == 17 + k.numel()
    backend = get_backend(name)
    kw = dict(layout=layout, is_causal=False, sm_scale=0.125, return_lse=True)
    out_view, lse_view = backend.forward(q, k_view, v_view, **kw)
    out_copy, lse_copy = backend.forward(q, k.clone(), v.clone(), **kw)
    assert torch.equal(out_view, out_copy) and torch.equal(lse_view, lse_copy)
    assert torch.equal(buffer[17:17 + k.numel()], k.flatten())  # the shared buffer is not modified
