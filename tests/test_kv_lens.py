"""Per-sample key lengths (`kv_lens`): the backend contract, the SDPA and reference backends against per-sample
slices, the dispatcher's reasons, and the device-side mask helpers of the processors. Fresh random inputs."""
import os

import pytest
import torch

from sage3_diffusers import dispatch, sage_attention
from sage3_diffusers.api import resolve
from sage3_diffusers.backends.base import AttentionBackend, describe_problem
from sage3_diffusers.integration.processors import (attend_key_lengths, gather_tokens, key_lengths,
                                                    valid_keys_first)


def fresh_seed():
    return int.from_bytes(os.urandom(4), "little") % (2 ** 31)


def _qkv(b, hq, sq, skv, d, hkv=None, dtype=torch.float32, layout="HND", seed=0):
    g = torch.Generator().manual_seed(seed)
    hkv = hkv or hq

    def t(h, s):
        x = torch.randn(b, h, s, d, generator=g, dtype=torch.float32).to(dtype)
        return x if layout == "HND" else x.transpose(1, 2).contiguous()
    return t(hq, sq), t(hkv, skv), t(hkv, skv)


def _seq(x, layout):
    return 2 if layout == "HND" else 1


@pytest.mark.parametrize("kernel", ["sdpa", "reference_int8_fp8", "reference_fp4"])
@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_kv_lens_equal_the_call_on_each_samples_valid_keys(kernel, layout, is_causal):
    seed = fresh_seed()
    b, skv = 4, 150  # a key tile and a partial one; lengths below, at and across the 128 boundary
    lens = [150, 1, 129, 77]
    q, k, v = _qkv(b, 4, 33, skv, 64, hkv=2, layout=layout, seed=seed)
    kv_lens = torch.tensor(lens, dtype=torch.int32)
    out, lse = sage_attention(q, k, v, kernel, tensor_layout=layout, kv_lens=kv_lens, is_causal=is_causal,
                              return_lse=True)
    sd = _seq(q, layout)
    for i, n in enumerate(lens):
        ref_out, ref_lse = sage_attention(q[i:i + 1], k[i:i + 1].narrow(sd, 0, n), v[i:i + 1].narrow(sd, 0, n),
                                          kernel, tensor_layout=layout, is_causal=is_causal, return_lse=True)
        atol = 1e-6 if kernel.startswith("reference") else 1e-5
        torch.testing.assert_close(out[i:i + 1], ref_out, atol=atol, rtol=0, msg=f"seed {seed} sample {i}")
        torch.testing.assert_close(lse[i:i + 1], ref_lse, atol=1e-4, rtol=0, msg=f"seed {seed} sample {i}")


def test_sdpa_kv_lens_equal_a_key_mask_and_inputs_stay_untouched():
    seed = fresh_seed()
    q, k, v = _qkv(3, 2, 9, 20, 16, seed=seed)
    copies = [t.clone() for t in (q, k, v)]
    kv_lens = torch.tensor([20, 3, 11], dtype=torch.int32)
    mask = (torch.arange(20)[None, :] < kv_lens[:, None])[:, None, None, :]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(sage_attention(q, k, v, "sdpa", kv_lens=kv_lens), ref, atol=1e-6, rtol=0)
    for t, c in zip((q, k, v), copies):
        assert torch.equal(t, c)


def test_reference_rejects_lengths_out_of_range():
    q, k, v = _qkv(2, 1, 4, 8, 16)
    for bad in ([0, 8], [9, 1]):
        with pytest.raises(ValueError, match=r"kv_lens values must be in \[1, 8\]"):
            sage_attention(q, k, v, "reference_int8_fp8", kv_lens=torch.tensor(bad, dtype=torch.int32))


def test_kv_lens_argument_errors_name_the_problem():
    q, k, v = _qkv(2, 1, 4, 8, 16)
    with pytest.raises(ValueError, match="int32 tensor of shape \\(2,\\)"):
        describe_problem(q, k, v, "HND", False, False, None, torch.tensor([1, 2]))  # int64
    with pytest.raises(ValueError, match="int32 tensor of shape \\(2,\\)"):
        describe_problem(q, k, v, "HND", False, False, None, torch.tensor([1], dtype=torch.int32))
    with pytest.raises(TypeError, match="kv_lens must be an int32 tensor"):
        describe_problem(q, k, v, "HND", False, False, None, [1, 2])
    with pytest.raises(ValueError, match="not both"):
        describe_problem(q, k, v, "HND", False, False, torch.ones(2, 1, 1, 8, dtype=torch.bool),
                         torch.tensor([1, 2], dtype=torch.int32))


class NoKvLens(AttentionBackend):
    name, family, priority, description, verified = "no_kv_lens_test", "int8_fp8", 500, "test double", "test"
    dtypes, head_dims = (torch.float32,), None

    def forward(self, q, k, v, *, layout, is_causal, sm_scale, return_lse, attn_mask=None):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=sm_scale) * 1.0


@pytest.fixture
def no_kv_lens_backend(monkeypatch):
    dispatch._ensure_loaded()
    monkeypatch.setattr(dispatch, "_registry", dict(dispatch._registry))
    monkeypatch.setattr(dispatch, "_warned", set())
    dispatch.register_backend(NoKvLens())
    yield
    dispatch.set_fallback(None)  # clears the caches


def test_backend_without_kv_lens_gets_slices_eagerly_and_the_dispatcher_says_why(no_kv_lens_backend):
    seed = fresh_seed()
    q, k, v = _qkv(3, 2, 7, 12, 16, seed=seed)
    kv_lens = torch.tensor([12, 5, 5], dtype=torch.int32)
    sel = resolve(q, k, v, "no_kv_lens_test", kv_lens=None)
    assert sel.backend.name == "no_kv_lens_test"
    with pytest.raises(ValueError, match="kv_lens .* not supported"):
        resolve(q, k, v, "no_kv_lens_test", kv_lens=kv_lens)
    out, backend, note = attend_key_lengths(q, k, v, "no_kv_lens_test", "HND", 0.25, kv_lens)
    assert backend == "no_kv_lens_test" and "takes no kv_lens: per-sample key slices" in note
    ref = sage_attention(q, k, v, "sdpa", sm_scale=0.25, kv_lens=kv_lens)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0, msg=f"seed {seed}")

    # Compiled: no host read possible, so exact SDPA with the key mask, counted with the reason.
    def f(q, k, v, kv_lens):
        return attend_key_lengths(q, k, v, "no_kv_lens_test", "HND", 0.25, kv_lens)
    compiled_out, compiled_backend, compiled_note = torch.compile(f, backend="eager", fullgraph=True)(q, k, v,
                                                                                                        kv_lens)
    assert compiled_backend == "sdpa" and "under torch.compile" in compiled_note
    torch.testing.assert_close(compiled_out, ref, atol=1e-6, rtol=0)


def test_mask_helpers_work_on_the_device_for_any_key_pattern():
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(3, 10, generator=g) > 0.4
    valid[:, 0] = True
    assert key_lengths(valid[:, None, None, :], 3, 10).tolist() == valid.sum(1).tolist()
    assert key_lengths(valid.float(), 3, 10) is None  # additive masks are not key masks
    assert key_lengths(valid[:, None, :].expand(3, 10, 10), 3, 10) is None  # a [B,S,S] mask
    order, lens = valid_keys_first(valid)
    q, k, v = _qkv(3, 2, 6, 10, 8, layout="NHD", seed=seed)
    kc, vc = gather_tokens(k, order, 1), gather_tokens(v, order, 1)
    for i in range(3):
        n = int(lens[i])
        assert torch.equal(kc[i, :n], k[i, valid[i]]) and torch.equal(vc[i, :n], v[i, valid[i]])
    out, _, _ = attend_key_lengths(q, kc, vc, "sdpa", "NHD", 8 ** -0.5, lens)
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           attn_mask=valid[:, None, None, :]).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0, msg=f"seed {seed}")
