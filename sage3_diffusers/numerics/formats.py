"""Low-precision number formats, defined in plain torch (the specification every kernel follows).

FP8 E4M3 ("e4m3fn": no infinities, max 448), FP4 E2M1 (values {0, 0.5, 1, 1.5, 2, 3, 4, 6} and their
negatives) and INT8. All rounding is round-to-nearest-even; FP formats saturate at their largest finite
value (the `.satfinite` behaviour of the PTX `cvt` instructions).
"""
from __future__ import annotations

import torch

E4M3_MAX = 448.0
E2M1_MAX = 6.0
INT8_MAX = 127.0

# Magnitudes of the 8 E2M1 codes; code bit 3 is the sign.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

# Rounding thresholds between consecutive E2M1 magnitudes. At a tie (the threshold itself) the value
# goes to the even code (codes 0, 2, 4, 6: mantissa bit 0), which is what the list of `right` flags says.
_E2M1_THRESHOLDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_E2M1_TIE_GOES_UP = (False, True, False, True, False, True, False)


def e4m3_round(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values to the nearest FP8 E4M3 value (RNE, saturating at +-448); returns fp32."""
    x = x.float()
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """FP32 -> E2M1 4-bit codes (uint8 in [0, 15]); RNE with saturation at +-6. NaN encodes as +6."""
    x = x.float()
    mag = x.abs()
    code = torch.zeros_like(mag, dtype=torch.uint8)
    for thr, tie_up in zip(_E2M1_THRESHOLDS, _E2M1_TIE_GOES_UP):
        above = (mag >= thr) if tie_up else (mag > thr)
        code += above.to(torch.uint8)
    code = torch.where(torch.isnan(x), torch.full_like(code, 7), code)
    sign = (torch.signbit(x) & ~torch.isnan(x)).to(torch.uint8) << 3
    return code | sign


def e2m1_decode(code: torch.Tensor) -> torch.Tensor:
    """E2M1 4-bit codes -> fp32 values."""
    table = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=torch.float32, device=code.device)
    return table[code.long() & 0xF]


def e2m1_round(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values onto the E2M1 grid (RNE, saturating); returns fp32."""
    return e2m1_decode(e2m1_encode(x))


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Pack E2M1 codes two per byte along the last dim: element 2i in the low nibble, 2i+1 in the high one."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_fp4 needs an even last dimension, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return (c[..., 0::2] & 0xF) | ((c[..., 1::2] & 0xF) << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_fp4`."""
    lo = packed & 0xF
    hi = (packed >> 4) & 0xF
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def int8_round(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer (ties to even), clamp to [-127, 127]; returns fp32 holding integers."""
    return torch.round(x.float()).clamp(-INT8_MAX, INT8_MAX)
