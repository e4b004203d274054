"""`apply(pipe_or_transformer, policy)` installs Sage3 processors and the step hook; `remove` undoes it.

Only diffusers' default processors are replaced (IP-adapter and other custom processors are left as they
are); HunyuanVideo's token refiner gets a counting wrapper around diffusers' own `AttnProcessor2_0`.
Mochi has no `set_attn_processor`: its `attn1.processor` attributes are assigned directly.
"""
from __future__ import annotations

import torch

from ..extras import require
from .policy import fixed_policy, load_policy, warn_unmatched_rules
from .processors import _Sage3Base, processor_for
from .stats import KernelStats
from .steps import HOOK_NAME, Sage3Runtime, step_hook

TRANSFORMER_FAMILIES = {
    "FluxTransformer2DModel": "flux",
    "SD3Transformer2DModel": "sd3",
    "CogVideoXTransformer3DModel": "cogvideox",
    "HunyuanVideoTransformer3DModel": "hunyuan_video",
    "MochiTransformer3DModel": "mochi",
}

# Default processors (by class name) that each family's Sage3 processor replaces.
_REPLACED = {
    "flux": {"FluxAttnProcessor"},
    "sd3": {"JointAttnProcessor2_0", "FusedJointAttnProcessor2_0"},
    "cogvideox": {"CogVideoXAttnProcessor2_0", "FusedCogVideoXAttnProcessor2_0"},
    "hunyuan_video": {"HunyuanVideoAttnProcessor2_0"},
    "mochi": {"MochiAttnProcessor2_0"},
}
# Processors kept exact but wrapped so their calls are counted.
_COUNTED_EXACT = {"hunyuan_video": {"AttnProcessor2_0"}}
_MASK_KWARG = {"hunyuan_video": "encoder_attention_mask", "mochi": "encoder_attention_mask"}


def detect_family(transformer) -> str:
    name = type(transformer).__name__
    if name not in TRANSFORMER_FAMILIES:
        # Subclasses (e.g. user wrappers) of a known transformer.
        for cls in type(transformer).__mro__:
            if cls.__name__ in TRANSFORMER_FAMILIES:
                return TRANSFORMER_FAMILIES[cls.__name__]
        raise ValueError(f"sage3_diffusers.apply: unsupported transformer {name}; supported: "
                         f"{', '.join(TRANSFORMER_FAMILIES)}")
    return TRANSFORMER_FAMILIES[name]


def _split_target(target):
    if isinstance(target, torch.nn.Module):
        return None, getattr(target, "_orig_mod", target)
    transformer = getattr(target, "transformer", None)
    if transformer is None:
        raise TypeError(f"apply() needs a diffusers pipeline with a .transformer or a transformer model, got "
                        f"{type(target).__name__}")
    return target, getattr(transformer, "_orig_mod", transformer)


def _set(module, processor):
    if hasattr(module, "set_processor"):
        module.set_processor(processor)
    else:  # MochiAttention: plain attribute
        module.processor = processor


def apply(target, policy=None, *, kernel: str | None = None, stats: KernelStats | None = None,
          num_inference_steps: int | None = None, log_summary: bool = True) -> Sage3Runtime:
    """Install Sage3 attention on a pipeline (its `.transformer`) or a transformer.

    policy: a bundled policy name ("flux", ...; `bundled_policies()`), YAML path, dict, Policy, a kernel
    name, or None (default: int8_fp8 on the first and last steps, fp4 elsewhere). kernel: shortcut for
    one kernel everywhere ("auto": the dispatcher's choice per call). Rules that can never match this
    model are warned about, naming the rule. num_inference_steps: the step
    count when no pipeline scheduler tells it (for "last N steps" rules on a bare transformer).
    Returns the runtime (`.stats`, `.policy`, `.step`); also at `transformer._sage3_runtime`.
    Applying again replaces the previous installation."""
    require("diffusers", "sage3_diffusers.apply")
    pipe, transformer = _split_target(target)
    if getattr(transformer, "_sage3_installed", None) is not None:
        remove(transformer)
    family = detect_family(transformer)
    pol = fixed_policy(kernel) if kernel is not None else load_policy(policy)
    if pol.model and pol.model.replace("sd35", "sd3") != family:
        import warnings
        warnings.warn(f"sage3_diffusers.apply: policy {pol.source} is written for model {pol.model!r} but the "
                      f"transformer is {family!r}; layer names or block types may not match", UserWarning,
                      stacklevel=2)
    runtime = Sage3Runtime(pol, family, stats, scheduler=getattr(pipe, "scheduler", None),
                           num_inference_steps=num_inference_steps, log_summary=log_summary)
    proc = processor_for(family)  # one stateless instance for every layer
    originals = {}
    for name, module in transformer.named_modules():
        current = getattr(module, "processor", None)
        if current is None or isinstance(current, _Sage3Base):
            continue
        cls = type(current).__name__
        if cls in _REPLACED[family]:
            module._sage3_family = family
        elif cls in _COUNTED_EXACT.get(family, ()):
            module._sage3_family = "exact"
        else:
            continue  # IP-adapter or user processors: left alone
        module._sage3_layer = name
        module._sage3_runtime = runtime
        originals[name] = current
        _set(module, proc)
    if not originals:
        raise ValueError(f"sage3_diffusers.apply: no default attention processor found in {type(transformer).__name__}"
                         " (already replaced by another plugin?)")
    runtime.register_layers(originals)
    warn_unmatched_rules(pol, originals, family)
    from diffusers.hooks import HookRegistry
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(
        step_hook(runtime, _MASK_KWARG.get(family)), HOOK_NAME)
    transformer._sage3_installed = originals
    transformer._sage3_runtime = runtime
    return runtime


def remove(target) -> None:
    """Restore the original processors (the same objects) and drop the step hook."""
    _, transformer = _split_target(target)
    originals = getattr(transformer, "_sage3_installed", None)
    if originals is None:
        return
    for name, processor in originals.items():
        module = transformer.get_submodule(name)
        _set(module, processor)
        for attr in ("_sage3_family", "_sage3_layer", "_sage3_runtime"):
            module.__dict__.pop(attr, None)
    registry = getattr(transformer, "_diffusers_hook", None)
    if registry is not None:
        registry.remove_hook(HOOK_NAME, recurse=False)
    del transformer._sage3_installed
    del transformer._sage3_runtime


def get_runtime(target) -> Sage3Runtime | None:
    _, transformer = _split_target(target)
    return getattr(transformer, "_sage3_runtime", None)
