"""The Diffusers layer: the model registry (`models`), processors, dispatcher backends, the step-aware
policy, apply/remove, stats."""
from .dispatcher_backend import register_dispatcher_backends
from .install import apply, detect_family, get_runtime, remove
from .policy import Policy, PolicyError, Rule, default_policy, fixed_policy, load_policy
from .processors import (CogVideoXSage3Processor, FluxSage3Processor, HunyuanVideoSage3Processor, MochiSage3Processor,
                         SD3Sage3Processor, Sage3Processor)
from .stats import GLOBAL_STATS, KernelStats
from .steps import Sage3Runtime

from .backend_warning import warn_on_unreached_backend
from ..extras import available as _available

# Without diffusers nothing is registered and nothing is said here: `apply` and the processors raise
# MissingExtraError with the install command when used.
if _available("diffusers"):
    try:  # registering needs diffusers' private dispatcher internals; never block the processors on it
        register_dispatcher_backends()
        warn_on_unreached_backend()
    except Exception as _e:  # pragma: no cover - depends on the diffusers version
        import warnings
        warnings.warn(f"sage3_diffusers: could not register the 'sage3'/'sage2pp' dispatcher backends: {_e}",
                      RuntimeWarning, stacklevel=2)

__all__ = ["Sage3Processor", "apply", "remove", "load_policy", "get_runtime", "detect_family", "Policy", "Rule",
           "PolicyError", "default_policy", "fixed_policy", "KernelStats", "GLOBAL_STATS", "Sage3Runtime",
           "FluxSage3Processor", "SD3Sage3Processor", "CogVideoXSage3Processor", "HunyuanVideoSage3Processor",
           "MochiSage3Processor", "register_dispatcher_backends"]
