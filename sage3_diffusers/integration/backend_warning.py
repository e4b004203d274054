"""A warning when `model.set_attention_backend("sage3")` (or "sage2pp") reaches no attention layer.

diffusers' `set_attention_backend` only re-targets processors that call its attention dispatcher. SD3/SD3.5,
CogVideoX and Mochi processors call torch SDPA directly, so for them our dispatcher backends would be a silent
no-op. `warn_on_unreached_backend()` (called once when the backends are registered) wraps
`ModelMixin.set_attention_backend`: after diffusers' own method has run, a sage backend name that reached none
of the model's attention processors gets a UserWarning pointing to `sage3_diffusers.apply`. Other backend names,
and models whose processors use the dispatcher, pass through untouched. The wrapper stays installed (as the
registered backend names do); it adds nothing but this check.
"""
from __future__ import annotations

import functools
import warnings

from .dispatcher_backend import DISPATCHER_BACKENDS


def unreached_backend_message(model, backend) -> str | None:
    """The warning text when `backend` is one of ours and no attention processor of `model` takes a dispatcher
    backend; else None."""
    name = str(getattr(backend, "value", backend)).lower()
    if name not in DISPATCHER_BACKENDS:
        return None
    processors = [m.processor for m in model.modules() if getattr(m, "processor", None) is not None]
    if not processors or any(hasattr(p, "_attention_backend") for p in processors):
        return None
    kinds = ", ".join(sorted({type(p).__name__ for p in processors}))
    return (f"set_attention_backend({name!r}) has no effect on {type(model).__name__}: its attention processors "
            f"({kinds}) call torch SDPA directly, not diffusers' attention dispatcher. Use "
            f"sage3_diffusers.apply(model, kernel={DISPATCHER_BACKENDS[name]!r}) (or a policy) instead.")


def warn_on_unreached_backend() -> None:
    """Wrap `ModelMixin.set_attention_backend` once (idempotent) with the check above."""
    from diffusers.models.modeling_utils import ModelMixin

    original = ModelMixin.set_attention_backend
    if getattr(original, "_sage3_checked", False):
        return

    @functools.wraps(original)
    def set_attention_backend(self, backend, *args, **kwargs):
        result = original(self, backend, *args, **kwargs)
        msg = unreached_backend_message(self, backend)
        if msg:
            warnings.warn(f"sage3_diffusers: {msg}", UserWarning, stacklevel=2)
        return result

    set_attention_backend._sage3_checked = True
    ModelMixin.set_attention_backend = set_attention_backend
