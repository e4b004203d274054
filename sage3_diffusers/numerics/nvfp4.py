"""NVFP4 microscaling: FP4 E2M1 values with one FP8 E4M3 scale per 1x16 block.

For a block b of 16 consecutive elements along the quantized dimension, with optional per-tensor FP32
scale g (default 1):

    s_b  = e4m3_round(max|x_b| / (6 * g))         # the scale is rounded to E4M3 *before* it is used
    x̂_i  = e2m1_round(x_i / (s_b * g))            # IEEE fp32 division by the rounded scale
    deq  = x̂_i * s_b * g

A block whose rounded scale is 0 (all |x| tiny or zero) quantizes to all zeros. The dimension is padded
with zeros to a multiple of 16 (zeros never change a block maximum).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import E2M1_MAX, E4M3_MAX, e2m1_decode, e2m1_encode, e4m3_round, pack_fp4

NVFP4_BLOCK = 16


@dataclass
class NVFP4Tensor:
    """A quantized tensor: `codes` (uint8 E2M1 codes, quantized dim moved last and padded to a multiple of
    16), `scales` (fp32 holding E4M3 values, one per block), `tensor_scale` (fp32 scalar or broadcastable
    tensor), and the original length of the quantized dim."""

    codes: torch.Tensor
    scales: torch.Tensor
    tensor_scale: torch.Tensor
    length: int
    dim: int

    def packed(self) -> torch.Tensor:
        return pack_fp4(self.codes)

    def dequantize(self) -> torch.Tensor:
        vals = e2m1_decode(self.codes)
        vals = vals.unflatten(-1, (-1, NVFP4_BLOCK)) * self.scales.unsqueeze(-1)
        vals = vals.flatten(-2)[..., : self.length] * self.tensor_scale
        return vals.movedim(-1, self.dim)


def nvfp4_tensor_scale(x: torch.Tensor, reduce_dims: tuple[int, ...] | None = None) -> torch.Tensor:
    """The optional second-level FP32 scale g = amax / (6 * 448) so the block scales use the whole E4M3
    range. `reduce_dims=None` reduces over everything (one scale per tensor)."""
    amax = x.float().abs().amax() if reduce_dims is None else x.float().abs().amax(dim=reduce_dims, keepdim=True)
    return torch.where(amax == 0, torch.ones_like(amax), amax / (E2M1_MAX * E4M3_MAX))


def quantize_nvfp4(x: torch.Tensor, dim: int = -1, tensor_scale: torch.Tensor | None = None) -> NVFP4Tensor:
    """Quantize `x` to NVFP4 with 1x16 blocks along `dim`. `tensor_scale` is a scalar or a tensor that
    broadcasts against `x` with size 1 along `dim` (e.g. from `nvfp4_tensor_scale(x, reduce_dims)`)."""
    dim = dim % x.dim()
    xf = x.float().movedim(dim, -1)
    if tensor_scale is None:
        g = torch.ones((), dtype=torch.float32, device=x.device)
    else:
        g = tensor_scale.float()
        if g.dim() == x.dim():
            g = g.movedim(dim, -1)  # [..., 1]: broadcasts against the per-block scales [..., n_blocks]
    length = xf.shape[-1]
    pad = (-length) % NVFP4_BLOCK
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))
    blocks = xf.unflatten(-1, (-1, NVFP4_BLOCK))
    scales = e4m3_round(blocks.abs().amax(dim=-1) / (E2M1_MAX * g))
    denom = (scales * g).unsqueeze(-1)
    # A zero scale means an all-(near-)zero block: it quantizes to zeros. A NaN scale (NaN input) stays NaN.
    scaled = torch.where(denom == 0, torch.zeros_like(blocks), blocks / denom)
    codes = e2m1_encode(scaled).flatten(-2)
    return NVFP4Tensor(codes=codes, scales=scales, tensor_scale=g, length=length, dim=dim)


def fake_quantize_nvfp4(x: torch.Tensor, dim: int = -1, tensor_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize then dequantize (fp32 result): the value an FP4 tensor core sees."""
    return quantize_nvfp4(x, dim=dim, tensor_scale=tensor_scale).dequantize()
