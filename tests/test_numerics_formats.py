"""The number formats and quantizers on hand-computed values."""
import pytest
import torch

from sage3_diffusers.numerics import (
    e2m1_decode, e2m1_encode, e2m1_round, e4m3_round, fake_quantize_nvfp4, int8_round, nvfp4_tensor_scale, pack_fp4,
    quantize_fp8_per_channel, quantize_int8_grouped, quantize_nvfp4, unpack_fp4,
)
from sage3_diffusers.numerics.int8 import k_token_groups, q_token_groups


def t(*xs):
    return torch.tensor(xs, dtype=torch.float32)


def test_e2m1_grid_values_are_fixed_points():
    grid = t(0, 0.5, 1, 1.5, 2, 3, 4, 6)
    assert torch.equal(e2m1_round(grid), grid)
    assert torch.equal(e2m1_round(-grid), -grid)
    assert e2m1_encode(grid).tolist() == list(range(8))
    assert e2m1_encode(-grid[1:]).tolist() == list(range(9, 16))


def test_e2m1_round_to_nearest_even_at_ties():
    # Each midpoint goes to the neighbour with the even code (0, 1.0, 2.0, 4.0 have even codes 0, 2, 4, 6).
    ties = t(0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
    assert e2m1_round(ties).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert e2m1_round(-ties).tolist() == [-0.0, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0]


def test_e2m1_round_off_ties_and_saturation():
    x = t(0.1, 0.26, 0.74, 1.3, 1.74, 2.49, 2.51, 3.49, 3.51, 4.99, 5.01, 6.0, 6.5, 1e6, float("inf"))
    assert e2m1_round(x).tolist() == [0, 0.5, 0.5, 1.5, 1.5, 2, 3, 3, 4, 4, 6, 6, 6, 6, 6]
    assert e2m1_round(t(-1e6, float("-inf"))).tolist() == [-6, -6]


def test_fp4_pack_two_per_byte_low_nibble_first():
    codes = torch.tensor([1, 2, 15, 8, 7, 0], dtype=torch.uint8)
    packed = pack_fp4(codes)
    assert packed.tolist() == [0x21, 0x8F, 0x07]
    assert torch.equal(unpack_fp4(packed), codes)
    with pytest.raises(ValueError, match="even"):
        pack_fp4(codes[:5])


def test_e4m3_round_normals_subnormals_ties_saturation():
    # 1/6 -> 0.171875 (1.375 * 2^-3); 232 is a tie between 224 (even mantissa) and 240; 248 ties to 256.
    x = t(1 / 6, 232, 248, 2 ** -9, 2 ** -10, 1.5 * 2 ** -10, 448, 449, 500, 1e9, -1e9)
    assert e4m3_round(x).tolist() == [0.171875, 224, 256, 2 ** -9, 0, 2 ** -9, 448, 448, 448, 448, -448]


def test_nvfp4_scale_rounded_to_e4m3_before_dividing():
    # Block max 1.0 -> scale 1/6 rounds to 0.171875; 1.0 / 0.171875 = 5.818 -> 6 (saturating RNE) -> 1.03125.
    x = torch.zeros(16)
    x[0], x[1], x[2] = 1.0, -0.5, 0.3
    q = quantize_nvfp4(x)
    assert q.scales.tolist() == [0.171875]
    # 0.5/0.171875 = 2.909 -> 3; 0.3/0.171875 = 1.745 -> 1.5
    assert e2m1_decode(q.codes[:3]).tolist() == [6.0, -3.0, 1.5]
    assert q.dequantize()[:3].tolist() == [6 * 0.171875, -3 * 0.171875, 1.5 * 0.171875]


def test_nvfp4_blocks_pad_and_zero_blocks():
    x = torch.randn(3, 40)
    x[1, 16:32] = 0
    q = quantize_nvfp4(x)
    assert q.codes.shape == (3, 48) and q.scales.shape == (3, 3)
    assert q.scales[1, 1] == 0 and torch.all(q.dequantize()[1, 16:32] == 0)
    assert q.dequantize().shape == x.shape
    assert q.packed().shape == (3, 24)


def test_nvfp4_quantizes_along_any_dim_and_tensor_scale():
    x = torch.randn(2, 33, 8) * 1000
    q = quantize_nvfp4(x, dim=1)
    assert q.dequantize().shape == x.shape
    g = nvfp4_tensor_scale(x, reduce_dims=(1,))
    err_plain = (fake_quantize_nvfp4(x, dim=1) - x).norm() / x.norm()
    err_scaled = (fake_quantize_nvfp4(x, dim=1, tensor_scale=g) - x).norm() / x.norm()
    # Both well under FP4's worst case; measured ~0.09 for Gaussian data.
    assert err_plain < 0.12 and err_scaled < 0.12


def test_nvfp4_round_trip_error_bound():
    # Per element |x - x̂| <= half the E2M1 step at that magnitude times the scale, which is at most
    # 1.0 * s (between 4 and 6) and the scale error of E4M3 rounding (<= 1/16 relative) on saturated values.
    x = torch.randn(256, 64)
    q = quantize_nvfp4(x)
    s = q.scales.repeat_interleave(16, dim=-1)
    err = (q.dequantize() - x).abs()
    assert torch.all(err <= s * 1.0 + 1e-6)
    rel = (err.norm() / x.norm()).item()
    assert 0.05 < rel < 0.12  # measured 0.095 (Gaussian); FP4 cannot be better than ~0.05


def test_nvfp4_nan_propagates():
    x = torch.randn(32)
    x[3] = float("nan")
    d = fake_quantize_nvfp4(x)
    assert torch.isnan(d[:16]).all() and torch.isfinite(d[16:]).all()


def test_int8_rounding_and_groups():
    assert int8_round(t(0.5, 1.5, 2.5, -0.5, 126.6, 300)).tolist() == [0, 2, 2, -0.0, 127, 127]
    x = torch.tensor([[1.0, -2.0], [0.5, 0.25], [0.0, 0.0]])
    xq, s = quantize_int8_grouped(x, torch.tensor([0, 0, 1]))
    assert torch.allclose(s, t(2 / 127, 2 / 127, 0))
    assert xq.tolist() == [[64, -127], [32, 16], [0, 0]]  # 63.5 -> 64 (RNE), 15.875 -> 16


def test_int8_group_layouts():
    assert q_token_groups(40, "per_thread").tolist()[:18] == [0, 1, 2, 3, 4, 5, 6, 7] * 2 + [8, 9]
    kg = k_token_groups(260, "per_thread")
    assert kg[:10].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 0, 0] and kg[128].item() == 4 and kg[259].item() == 9
    assert q_token_groups(300, "per_block", 128).max().item() == 2
    with pytest.raises(ValueError, match="per_thread"):
        q_token_groups(8, "per_warp")


def test_fp8_per_channel():
    v = torch.zeros(5, 3)
    v[:, 0] = torch.tensor([1.0, -448.0, 3.0, 0.0, 2.0])
    v[:, 1] = torch.tensor([0.001, 0.002, 0.0, 0.0, 0.0])
    vq, s = quantize_fp8_per_channel(v)
    assert s.tolist() == [1.0, pytest.approx(0.002 / 448), 0.0]
    assert vq[:, 0].tolist() == [1.0, -448.0, 3.0, 0.0, 2.0]
    assert vq[1, 1].item() == 448.0 and torch.all(vq[:, 2] == 0)
