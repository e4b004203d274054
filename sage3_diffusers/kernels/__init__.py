"""GPU kernels. Subpackages import their compilers (triton, CUDA extensions) lazily.

`kv_lens_for_kernel` is the one check of the per-sample key lengths every kernel takes (`kv_lens`)."""
from __future__ import annotations

import torch


def kv_lens_for_kernel(kv_lens: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor | None:
    """`kv_lens` as the kernels read it: int32 [B], contiguous, on the device of q (an int64 tensor is converted
    on the device, no host sync). Batch entry b attends to keys [0, kv_lens[b]); values are clamped to
    [0, Skv] by the kernels, and kv_lens[b] == 0 gives zero output rows with LSE -inf."""
    if kv_lens is None:
        return None
    if not isinstance(kv_lens, torch.Tensor):
        raise TypeError(f"kv_lens must be a tensor (int32 [B] on q's device) or None, got {type(kv_lens).__name__}")
    if kv_lens.dim() != 1 or kv_lens.shape[0] != batch:
        raise ValueError(f"kv_lens must have shape [{batch}] (one key length per batch entry), got "
                         f"{tuple(kv_lens.shape)}")
    if kv_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"kv_lens must be an int32 (or int64) tensor, got {kv_lens.dtype}")
    if kv_lens.device != device:
        raise ValueError(f"kv_lens must be on q's device {device}, got {kv_lens.device}")
    return kv_lens.to(torch.int32).contiguous()
