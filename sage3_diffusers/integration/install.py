"""`apply(pipe_or_transformer, policy)` installs Sage3 attention and the step hook; `remove` undoes it.

What to do comes from the model registry (`integration.models`):
- dispatcher route (the family's processors call `dispatch_attention_fn`: Flux, HunyuanVideo, and any
  transformer without a family module through the generic adapter): diffusers' processors stay; each
  attention processor's own `_attention_backend` points at our policy backend and a pre-hook on its
  module names the layer (see `dispatcher_backend`). diffusers' process-wide active backend is not touched.
- processor route (SDPA called directly: SD3/SD3.5, CogVideoX, Mochi): the family's Sage3 processor
  replaces diffusers' default ones (Mochi has no `set_attn_processor`: `processor` is assigned).
Only the family's attention processors are served (IP-adapter and other custom processors are left as they
are). Processors the family keeps exact (HunyuanVideo's token refiner) stay and are counted by a pre-hook.
`remove` restores every processor, backend attribute and hook exactly.
"""
from __future__ import annotations

import functools

import torch

from ..extras import require
from . import models
from .policy import fixed_policy, load_policy, warn_unmatched_rules
from .processors import _Sage3Base
from .stats import KernelStats, logger
from .steps import HOOK_NAME, Sage3Runtime, step_hook


def detect_family(transformer) -> str:
    """The registered family name of a transformer; ValueError for one without a family module."""
    fam = models.for_transformer(transformer)
    if fam is None:
        raise ValueError(f"sage3_diffusers: no model module for {type(transformer).__name__}; known families: "
                         f"{', '.join(models.names())}")
    return fam.name


def resolve_family(transformer, *, timestep_scale: float | None = None,
                   scheduler_units: float | None = None) -> models.ModelFamily:
    """The family `apply` uses: the registered one, else the generic dispatcher adapter; a clear error for a
    transformer no adapter can reach."""
    fam = models.for_transformer(transformer)
    if fam is not None:
        return fam
    fam = models.generic_family(transformer, timestep_scale=timestep_scale, scheduler_units=scheduler_units)
    if fam is not None:
        return fam
    procs = sorted({type(m.processor).__name__ for m in transformer.modules()
                    if getattr(m, "processor", None) is not None})
    how = (f"its attention processors ({', '.join(procs)}) call SDPA directly, not diffusers' "
           "dispatch_attention_fn" if procs else "it has no attention processors")
    raise ValueError(f"sage3_diffusers.apply: cannot reach the attention of {type(transformer).__name__}: no model "
                     f"module in sage3_diffusers.integration.models and {how}. Known families: "
                     f"{', '.join(models.names())}")


def _unwrap(module):
    return getattr(module, "_orig_mod", module)


def _split_target(target):
    if isinstance(target, torch.nn.Module):
        return None, _unwrap(target)
    transformer = getattr(target, "transformer", None)
    if transformer is None:
        raise TypeError(f"apply() needs a diffusers pipeline with a .transformer or a transformer model, got "
                        f"{type(target).__name__}")
    return target, _unwrap(transformer)


def _pipeline_transformers(pipe, primary, fam) -> list[tuple[str, torch.nn.Module]]:
    """(layer-name prefix, transformer) for each of the family's pipeline transformers, primary first."""
    out = [("", primary)]
    for attr in fam.pipeline_transformers:
        t = getattr(pipe, attr, None)
        if t is not None and _unwrap(t) is not primary:
            out.append((f"{attr}.", _unwrap(t)))
    return out


def _set(module, processor):
    if hasattr(module, "set_processor"):
        module.set_processor(processor)
    else:  # MochiAttention: plain attribute
        module.processor = processor


def _context_parallel(transformer) -> bool:
    config = getattr(transformer, "_parallel_config", None)
    return config is not None and getattr(config, "context_parallel_config", None) is not None


class _Installation:
    """What `apply` changed on one transformer, for `remove`."""

    def __init__(self, route: str):
        self.route = route
        self.processors: dict[str, object] = {}   # processor route: module name -> original processor
        self.backends: list[tuple] = []           # dispatcher route: (processor, had own attribute, value)
        self.handles: list = []                   # forward pre-hooks
        self.layers: list[str] = []               # layer names in stats (with the transformer's prefix)
        self.modules: dict[str, torch.nn.Module] = {}  # attention modules whose kernel the runtime decides


def _count_exact_hook(runtime, layer, reason):
    def sage3_count_exact(module, args):
        runtime.record(layer, runtime.kernel_for(layer), "sdpa", reason)
    return sage3_count_exact


def _install(transformer, fam: models.ModelFamily, runtime, prefix: str) -> _Installation:
    from .dispatcher_backend import backend_member, enter_layer_hook
    inst = _Installation(fam.route)
    processor = fam.processor() if fam.route == "processor" else None  # one stateless instance for all layers
    if processor is not None and _context_parallel(transformer):
        # enable_parallelism came first and configured the processors it found; ours replace them
        processor._parallel_config = transformer._parallel_config
    member = backend_member() if fam.route == "dispatcher" else None
    saved_backends: set[int] = set()
    for name, module in transformer.named_modules():
        current = getattr(module, "processor", None)
        if current is None or isinstance(current, _Sage3Base):
            continue
        cls = type(current).__name__
        layer = prefix + name
        if cls in fam.exact_processors:
            inst.handles.append(module.register_forward_pre_hook(_count_exact_hook(runtime, layer, fam.exact_reason)))
        elif cls not in fam.attention_processors:
            continue  # IP-adapter or user processors: left alone
        elif fam.route == "processor":
            module._sage3_family = fam.transformer_family
            module._sage3_layer = layer
            module._sage3_runtime = runtime
            inst.processors[name] = current
            inst.modules[layer] = module
            _set(module, processor)
        else:
            if id(current) not in saved_backends:
                saved_backends.add(id(current))
                inst.backends.append((current, "_attention_backend" in vars(current),
                                      vars(current).get("_attention_backend")))
            current._attention_backend = member
            inst.modules[layer] = module
            inst.handles.append(module.register_forward_pre_hook(enter_layer_hook(runtime, layer)))
        inst.layers.append(layer)
    return inst


def _uninstall(transformer, inst: _Installation) -> None:
    for handle in inst.handles:
        handle.remove()
    for processor, had_own, value in inst.backends:
        if had_own:
            processor._attention_backend = value
        else:
            processor.__dict__.pop("_attention_backend", None)
    for name, processor in inst.processors.items():
        module = transformer.get_submodule(name)
        _set(module, processor)
        for attr in ("_sage3_family", "_sage3_layer", "_sage3_runtime"):
            module.__dict__.pop(attr, None)
    for module in inst.modules.values():
        for attr in ("_sage3_kernel", "_sage3_slot"):
            module.__dict__.pop(attr, None)
    registry = getattr(transformer, "_diffusers_hook", None)
    if registry is not None:
        registry.remove_hook(HOOK_NAME, recurse=False)


def apply(target, policy=None, *, kernel: str | None = None, stats: KernelStats | None = None,
          num_inference_steps: int | None = None, log_summary: bool = True, timestep_scale: float | None = None,
          scheduler_units: float | None = None) -> Sage3Runtime:
    """Install Sage3 attention on a pipeline (its transformer(s)) or a transformer.

    policy: a bundled policy name ("flux", ...; `bundled_policies()`), YAML path, dict, Policy, a kernel
    name, or None (default: int8_fp8 on the first and last steps, fp4 elsewhere). kernel: shortcut for one
    kernel everywhere ("auto": the dispatcher's choice per call). Rules that can never match this model's
    attention layers (of every transformer it installs on) are warned about, naming the rule.
    num_inference_steps: the step count when no pipeline scheduler tells it (for "last N steps" rules on a
    bare transformer). timestep_scale / scheduler_units: the timestep units of a transformer without a
    family module (see `models.ModelFamily`; inferred from the first forward when not given).
    Returns the runtime (`.stats`, `.policy`, `.step`); also at `transformer._sage3_runtime`.
    Applying again replaces the previous installation. Logs one line naming the adapter and route."""
    require("diffusers", "sage3_diffusers.apply")
    pipe, primary = _split_target(target)
    fam = resolve_family(primary, timestep_scale=timestep_scale, scheduler_units=scheduler_units)
    targets = _pipeline_transformers(pipe, primary, fam) if pipe is not None else [("", primary)]
    for _, transformer in targets:
        if (fam.route == "processor" and not fam.processor.supports_context_parallel
                and _context_parallel(transformer)):
            raise NotImplementedError(
                f"sage3_diffusers.apply: {type(transformer).__name__} has context parallelism enabled; the "
                f"{fam.name} processors do not support it (they would attend within each rank's shard only)")
    for _, transformer in targets:
        if getattr(transformer, "_sage3_installed", None) is not None:
            _remove_one(transformer)  # replaced right below, also under context parallelism
    pol = fixed_policy(kernel) if kernel is not None else load_policy(policy)
    declared = models.find(pol.model) if pol.model else None
    if declared is not None and declared.transformer_family != fam.transformer_family:
        import warnings
        warnings.warn(f"sage3_diffusers.apply: policy {pol.source} is written for model {pol.model!r} but the "
                      f"transformer is {fam.name!r}; layer names or block types may not match", UserWarning,
                      stacklevel=2)
    runtime = Sage3Runtime(pol, fam.name, stats, scheduler=getattr(pipe, "scheduler", None),
                           num_inference_steps=num_inference_steps, log_summary=log_summary,
                           timestep_scale=timestep_scale, scheduler_units=scheduler_units)
    installed = []
    for prefix, transformer in targets:
        inst = _install(transformer, fam, runtime, prefix)
        installed.append((transformer, inst))
        transformer._sage3_installed = inst
        transformer._sage3_runtime = runtime
    layers = [layer for _, inst in installed for layer in inst.layers]
    if not layers:
        for transformer, inst in installed:
            _uninstall(transformer, inst)
            del transformer._sage3_installed, transformer._sage3_runtime
        raise ValueError(f"sage3_diffusers.apply: no default attention processor of {fam.name} "
                         f"({', '.join(fam.attention_processors)}) found in {type(primary).__name__} "
                         "(already replaced by another plugin?)")
    if fam.cp_plan is not None:  # the sequence plan enable_parallelism needs (diffusers ships none)
        from .context_parallel import prepare_context_parallel
        for transformer, _ in installed:
            prepare_context_parallel(transformer)
    runtime.register_layers(layers, {layer: m for _, inst in installed for layer, m in inst.modules.items()})
    warn_unmatched_rules(pol, layers, fam.name)
    from diffusers.hooks import HookRegistry
    for transformer, _ in installed:
        HookRegistry.check_if_exists_or_initialize(transformer).register_hook(step_hook(runtime),
                                                                              HOOK_NAME)
    adapter = fam.description if fam.name.startswith("generic:") else f"model module '{fam.name}'"
    served = set(fam.attention_processors) | set(fam.exact_processors)
    unreached = sorted({type(m.processor).__name__ for t, _ in installed for m in t.modules()
                        if getattr(m, "processor", None) is not None and not isinstance(m.processor, _Sage3Base)
                        and type(m.processor).__name__ not in served})
    if unreached:  # e.g. IP-adapter processors, or SDPA-direct ones beside the generic adapter's
        adapter += f" (left as they are, not counted: {', '.join(unreached)})"
    units = (f"timestep units: /{runtime.timestep_scale:g}" if runtime.timestep_scale is not None
             else "timestep units: inferred from the first forward")
    if pipe is not None:
        _wrap_scheduler(pipe, runtime)
    logger.info(f"sage3: {type(primary).__name__} via {adapter}, {fam.route} route, {len(layers)} attention layers"
                f"{f' in {len(installed)} transformers' if len(installed) > 1 else ''}, policy {pol.source}, {units}")
    return runtime


def _wrap_scheduler(pipe, runtime) -> None:
    """The scheduler's `set_timesteps` and `step` also tell the runtime (eagerly, between transformer calls), so
    the step advances when the transformer is compiled as a whole (see `steps`). Instance attributes over the
    class's methods; `remove` deletes them."""
    sched = getattr(pipe, "scheduler", None)
    if sched is None or getattr(sched, "_sage3_wrapped", None) is not None:
        return
    set_timesteps, step = sched.set_timesteps, sched.step

    # functools.wraps: pipelines inspect set_timesteps' signature (e.g. whether it takes `sigmas`).
    @functools.wraps(set_timesteps)
    def sage3_set_timesteps(*args, **kwargs):
        out = set_timesteps(*args, **kwargs)
        runtime.on_set_timesteps()
        return out

    @functools.wraps(step)
    def sage3_step(*args, **kwargs):
        out = step(*args, **kwargs)
        runtime.on_scheduler_step()
        return out

    sched.set_timesteps, sched.step = sage3_set_timesteps, sage3_step
    sched._sage3_wrapped = runtime


def _unwrap_scheduler(runtime) -> None:
    sched = runtime.scheduler
    if sched is not None and sched.__dict__.get("_sage3_wrapped") is runtime:
        for attr in ("set_timesteps", "step", "_sage3_wrapped"):
            sched.__dict__.pop(attr, None)


def _installed_transformers(target) -> list:
    if isinstance(target, torch.nn.Module):
        return [_unwrap(target)]
    found = []
    components = getattr(target, "components", None) or {}
    attrs = dict.fromkeys(a for f in models.families() for a in ("transformer", *f.pipeline_transformers))
    for value in [*(getattr(target, a, None) for a in attrs), *components.values()]:
        if isinstance(value, torch.nn.Module) and _unwrap(value) not in found:
            found.append(_unwrap(value))
    if not found:
        raise TypeError(f"remove() needs a diffusers pipeline or a transformer model, got {type(target).__name__}")
    return found


def remove(target) -> None:
    """Restore the original processors (the same objects), backend attributes, hooks and the scheduler's
    methods, and drop the context-parallel plan `apply` attached. Refuses while context parallelism is enabled
    (diffusers' processors would then attend within each rank's shard, or have no plan)."""
    installed = [t for t in _installed_transformers(target) if getattr(t, "_sage3_installed", None) is not None]
    for transformer in installed:
        if _context_parallel(transformer):
            raise RuntimeError(f"sage3_diffusers.remove: context parallelism is enabled on "
                               f"{type(transformer).__name__}; remove the plugin before enable_parallelism or "
                               "in a process without it")
    for transformer in installed:
        _remove_one(transformer)


def _remove_one(transformer) -> None:
    from .context_parallel import unprepare_context_parallel
    inst = transformer._sage3_installed
    unprepare_context_parallel(transformer)
    _uninstall(transformer, inst)
    _unwrap_scheduler(transformer._sage3_runtime)
    del transformer._sage3_installed
    del transformer._sage3_runtime


def get_runtime(target) -> Sage3Runtime | None:
    _, transformer = _split_target(target)
    return getattr(transformer, "_sage3_runtime", None)
