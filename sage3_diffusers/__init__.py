"""sage3-diffusers: quantized attention (SageAttention3 NVFP4, SageAttention2++ INT8/FP8) for Diffusers."""
from .api import resolve, sage_attention, sageattn2pp, sageattn3, sageattn3_blackwell
from .dispatch import get_backend, list_backends, set_fallback

__version__ = "0.1.0"

# The Diffusers layer imports diffusers; load it only when one of its names is used.
_INTEGRATION = {"Sage3Processor", "apply", "remove", "load_policy"}


def __getattr__(name):
    if name in _INTEGRATION:
        from . import integration
        return getattr(integration, name)
    raise AttributeError(f"module 'sage3_diffusers' has no attribute {name!r}")


__all__ = ["sage_attention", "sageattn3", "sageattn3_blackwell", "sageattn2pp", "resolve", "list_backends",
           "get_backend", "set_fallback", *sorted(_INTEGRATION)]
