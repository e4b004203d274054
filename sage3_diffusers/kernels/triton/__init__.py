"""Triton kernels. Nothing here imports triton at package import; use the submodules (which do) lazily:
`int8fp8` (SageAttention2++ INT8-QK/FP8-PV host API), `op` (torch.library custom op, importable without triton)."""
import importlib.util


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None
