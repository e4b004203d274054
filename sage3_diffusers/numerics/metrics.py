"""Accuracy metrics between an output and its reference (computed in fp64)."""
from __future__ import annotations

import torch


def accuracy_metrics(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """cos_sim (flattened), rel_l1 = Σ|out-ref| / Σ|ref|, rmse, max_abs. NaN anywhere gives NaN metrics."""
    a = out.detach().double().flatten()
    b = ref.detach().double().flatten()
    diff = a - b
    denom = a.norm() * b.norm()
    cos = (a @ b / denom).item() if denom > 0 else float(torch.equal(a, b))
    ref_l1 = b.abs().sum()
    return {
        "cos_sim": cos,
        "rel_l1": (diff.abs().sum() / ref_l1).item() if ref_l1 > 0 else diff.abs().sum().item(),
        "rmse": diff.pow(2).mean().sqrt().item() if a.numel() else 0.0,
        "max_abs": diff.abs().max().item() if a.numel() else 0.0,
    }
