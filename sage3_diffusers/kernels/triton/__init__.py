"""Triton kernels. Nothing here imports triton at package import; import the submodules (which do) lazily:
`int8fp8` (SageAttention2++ INT8-QK/FP8-PV host API) with its kernels `int8fp8_quant` and `int8fp8_attn`. The
custom op and the backend around them live in `sage3_diffusers/backends/triton_int8fp8.py`."""
import importlib.util


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None
