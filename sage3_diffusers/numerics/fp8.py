"""FP8 E4M3 quantization of V with one scale per channel (SageAttention2's PV operand).

For each (batch, head, channel c): δ_V[c] = max_t |V[t, c]| / 448, V̂[t, c] = e4m3_round(V[t, c] / δ_V[c]);
a channel with δ_V = 0 quantizes to zeros. The output of P̂·V̂ is multiplied by δ_V[c] in the epilogue.
"""
from __future__ import annotations

import torch

from .formats import E4M3_MAX, e4m3_round


def quantize_fp8_per_channel(v: torch.Tensor, v_range: float = E4M3_MAX) -> tuple[torch.Tensor, torch.Tensor]:
    """v [..., S, D] -> (V̂ as fp32 holding E4M3 values [..., S, D], scale [..., D])."""
    vf = v.float()
    scale = vf.abs().amax(dim=-2) / torch.tensor(v_range, device=vf.device)  # true division on every device
    s = scale.unsqueeze(-2)
    vq = torch.where(s == 0, torch.zeros_like(vf), e4m3_round(vf / s))
    return vq, scale
