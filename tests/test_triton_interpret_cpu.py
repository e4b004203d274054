"""The Triton quantization launches (K/V statistics, then Q, K and V in one launch) run by Triton's CPU
interpreter against the torch reference quantizer (numerics/sage2pp_reference.py).

Runs only where triton is importable and TRITON_INTERPRET=1 (CI has no triton: skipped there):
    TRITON_INTERPRET=1 python -m pytest -q tests/test_triton_interpret_cpu.py
The interpreter runs the kernels with numpy on CPU tensors, so this checks the index arithmetic of the fused
grid (which program quantizes which K, V or Q tile, the partials each reads, odd lengths, GQA, NHD strides),
not the GPU's rounding; the attention kernel (TMA descriptors, tensor-core dots) is not run here. V is checked
on its FP16 path (the sm_80/86 one): the interpreter's FP8 E4M3 cast does not round to nearest even (124.36
becomes 64, the tie 100 becomes 104), so FP8 V codes are checked only for their zero padding here (the GPU
test checks them against the reference).
"""
import importlib.util
import os

import pytest
import torch

from sage3_diffusers.numerics.sage2pp_reference import sage2pp_quantize

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1"),
]


@pytest.fixture(autouse=True)
def _numpy_scalar_index(monkeypatch):
    """numpy >= 2.3 refuses int() of a one-element array, which Triton 3.6's interpreter uses for a runtime
    loop bound (`tl.range(0, CHUNK, ...)`); give its tensors an __index__ through .item()."""
    import triton.runtime.interpreter as interp
    patch = interp._patch_lang_tensor

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))
    monkeypatch.setattr(interp, "_patch_lang_tensor", patched)


def _layout(x, layout):
    return x if layout == "HND" else x.transpose(1, 2).contiguous()


CASES = [
    # b, hq, hkv, sq, skv, d, layout, dtype, gran, q_block, k_block, smooth_k
    (1, 2, 2, 1, 1, 64, "HND", torch.bfloat16, "per_thread", 128, 128, True),
    (2, 4, 2, 77, 130, 64, "NHD", torch.float16, "per_thread", 128, 128, True),      # GQA, odd lengths
    (1, 3, 1, 50, 300, 128, "HND", torch.bfloat16, "per_block", 256, 128, True),     # MQA, Q group > BM
    (1, 2, 2, 33, 200, 64, "NHD", torch.bfloat16, "per_block", 32, 64, False),       # k_block < tile
    (1, 2, 1, 129, 2100, 64, "HND", torch.float16, "per_thread", 128, 64, True),     # 33 partial chunks
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_quantize_matches_reference(case):
    from sage3_diffusers.kernels.triton import int8fp8 as m
    b, hq, hkv, sq, skv, d, layout, dtype, gran, q_block, k_block, smooth_k = case
    g = torch.Generator().manual_seed(sum(case[:6]))
    q = torch.randn(b, hq, sq, d, generator=g)
    q[..., :4] *= 8.0
    k = torch.randn(b, hkv, skv, d, generator=g) + 8.0 * torch.randn(d, generator=g)
    v = torch.randn(b, hkv, skv, d, generator=g)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    ql, kl, vl = (_layout(x, layout) for x in (q, k, v))
    snap = [x.clone() for x in (ql, kl, vl)]
    ref = sage2pp_quantize(q, k, v, qk_quant_gran=gran, q_block=q_block, k_block=k_block, smooth_k=smooth_k)
    kv, (qi, qs) = m.quantize(ql, kl, vl, layout=layout, qk_quant_gran=gran, q_block=q_block, k_block=k_block,
                              smooth_k=smooth_k, pv_fp8=False)
    for before, after in zip(snap, (ql, kl, vl)):
        assert torch.equal(before, after), "inputs were modified"
    assert torch.equal(qi.view(b, hq, sq, d).float(), ref.q_int8)
    assert torch.equal(qs.view(b, hq, sq), ref.q_scale)
    assert torch.equal(kv.v_scale.view(b, hkv, d), ref.v_scale)
    vq = kv.v_q.view(b, hkv, d, kv.seq_pad).float()
    v_div = (v.float() / ref.v_scale[:, :, None, :]).clamp(-448, 448).half().float()  # fp32 divide, RNE to fp16
    assert torch.equal(vq[..., :skv].transpose(-1, -2), v_div)
    assert (vq[..., skv:] == 0).all()
    # the K mean is summed in another order than torch's: equal to rounding, then rare off-by-one K codes
    torch.testing.assert_close(kv.k_mean.view(b, hkv, 1, d), ref.k_mean, rtol=1e-6, atol=1e-5)
    ki = kv.k_int8.view(b, hkv, skv, d).float()
    assert (ki - ref.k_int8).abs().max() <= 1 and (ki != ref.k_int8).float().mean() < 2e-3
    torch.testing.assert_close(kv.k_scale.view(b, hkv, skv), ref.k_scale, rtol=1e-5, atol=0)
    # given the kernel's own K mean, its K codes and scales are exactly the reference quantizer's
    exact = sage2pp_quantize(q, (k.float() - kv.k_mean.view(b, hkv, 1, d)), v, qk_quant_gran=gran,
                             q_block=q_block, k_block=k_block, smooth_k=False)
    assert torch.equal(ki, exact.k_int8) and torch.equal(kv.k_scale.view(b, hkv, skv), exact.k_scale)
    # FP8 V: everything else the same bits; a repeated call signature reuses its plan and gives the same bits
    for _ in range(2):
        kv8, (qi8, qs8) = m.quantize(ql, kl, vl, layout=layout, qk_quant_gran=gran, q_block=q_block,
                                     k_block=k_block, smooth_k=smooth_k, pv_fp8=True)
        assert torch.equal(qi8, qi) and torch.equal(qs8, qs) and torch.equal(kv8.k_int8, kv.k_int8)
        assert torch.equal(kv8.k_mean, kv.k_mean) and torch.equal(kv8.v_scale, kv.v_scale)
        assert kv8.v_q.dtype == torch.float8_e4m3fn
        assert (kv8.v_q.view(b, hkv, d, kv.seq_pad)[..., skv:].float() == 0).all()
    assert len([p for p in m._quant_plans if p[:6] == (ql.shape, ql.stride(), kl.shape, kl.stride(), vl.shape,
                                                         vl.stride())]) == 2  # fp8 and fp16 V
