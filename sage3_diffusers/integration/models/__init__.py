"""The model registry: everything the plugin knows about one model family, in one module per family.

`apply`, the step hook, policy validation (`model:` and `block_types:` keys), the accuracy report, the
tiny models of the tests and examples, and `bench e2e` read this registry and nothing else. Adding a
family is adding one module here (plus `sage3_diffusers/configs/<family>.yaml` and `examples/<family>.py`):
every module in this package that defines `FAMILIES` (a tuple of `ModelFamily`) is registered on import.

What a family module declares (`ModelFamily`; only `name` and `transformer_classes` are required):

- `transformer_classes`: diffusers class names of its transformer(s); `apply` matches them against the
  transformer's class and its bases. A variant that shares another family's transformer class (SD3.5 uses
  SD3's) leaves this empty and names that family in `variant_of`.
- `route`: how attention is reached.
  * "dispatcher": diffusers' processors call `dispatch_attention_fn`; `apply` keeps them and points their
    `_attention_backend` at our per-layer policy backend (no process-wide setting is touched).
  * "processor": diffusers' processors call SDPA directly; `apply` installs `processor` (one of
    `integration.processors`) on every module whose processor class is in `attention_processors`.
- `attention_processors`: class names of diffusers' default processors that do the family's attention
  (the layers we serve). Modules with other processors (IP-adapter, user processors) are left alone.
- `exact_processors`: class names of processors kept exact (SDPA) but counted in the stats, with
  `exact_reason` (HunyuanVideo's token refiner: its mask is arbitrary).
- `processor`: our processor class for this family (installed by the processor route; on the dispatcher
  route it stays available for users who install processors by hand).
- `block_types`: block list name -> block type for policies (`{"transformer_blocks": "double"}`);
  `attr_block_types`: attention attribute name -> block type, overriding the list's (SD3.5 `attn2`).
  Layer names look like `<list>.<index>.<attr>`; the policy's `blocks:` range is the index.
- `timestep_scale`: the transformer's `timestep` argument divided by this is t in [0, 1] (1 = pure noise);
  `scheduler_units`: the `timestep` argument times this is in the scheduler's units (Flux pipelines pass
  `t / 1000`, so 1000 there). None: inferred from the first forward (generic adapter).
- `mask_kwarg`: the forward kwarg that carries the text mask (bool/int [B, S_text], right padding),
  read once per forward by the step hook; None when the model takes none.
- `pipeline_transformers`: pipeline attributes that hold this family's transformers, in denoising order
  (`("transformer", "transformer_2")` for a two-expert model); `apply(pipe)` installs on each one that
  is not None, with one runtime, so one step count runs across them. Layers of a transformer after the
  first are named `<attribute>.<module name>` in stats and policies.
- `hub_id`, `pipeline_class`, `example`: the real model for examples and reports (`Example`).
- `tiny_transformer(*, seed, layers, head_dim)`: a tiny random transformer (fp32), built from config;
  `tiny_inputs(config, t, *, grid, text_len)`: its forward kwargs, with `t` a `tiny.TinyInputs` (random
  tensors, the requested timestep `t.t(default)`, right-padded text masks with the requested lengths);
  `tiny_pipeline(transformer)` -> a complete offline pipeline, and `tiny_call_kwargs(*, true_cfg)` -> the
  pipeline-specific arguments of a small, fast call.
- `bench`: real config and real input shapes for `bench e2e` (`BenchSpec`); `report_shape`: latent
  (frames, height, width) and text length for the accuracy report on hub weights; `attention_shape`: the
  name of its real self-attention in the kernel benchmark's shape list (`sage3_diffusers/bench.py`
  `DIT_SHAPES`), where `calibrate` reads kernel speeds.
- `cp_plan()`: a diffusers context-parallel plan (what a transformer's `_cp_plan` holds) for a model diffusers
  ships without one; `context_parallel.prepare_context_parallel` attaches it (`apply` does, for these
  families), after `prepare_cp(transformer)`, which checks the model variant and installs the hooks the plan
  needs (undone by `unprepare_cp(transformer)`). On the processor route only our processors (with
  `supports_context_parallel`) run the plan.

Transformers without a family module still work when their processors call `dispatch_attention_fn`: `apply`
uses the generic dispatcher adapter (`generic_family`); those that call SDPA directly get a clear error.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

ROUTES = ("dispatcher", "processor")
DEFAULT_BLOCK_TYPES = ("double", "single", "self", "refiner")


@dataclass(frozen=True)
class Example:
    """What `examples/<family>.py` runs on hub weights: call kwargs (the model card's usual values), a
    prompt, and whether the output is a video."""
    call_kwargs: dict = field(default_factory=dict)
    prompt: str = "a cat riding a horse on the moon, cinematic"
    video: bool = False


@dataclass(frozen=True)
class BenchSpec:
    """`bench e2e` at real size: config overrides of the class defaults, the names of the block-count
    arguments (`--layers`), the pipeline's default (height, width, frames, batch), and
    `make_inputs(batch, device, dtype, *, height, width, frames, gen)` -> forward kwargs."""
    config: dict
    layer_args: tuple[str, ...]
    default_size: tuple[int, int, int, int]
    make_inputs: Callable[..., dict]
    transformer_class: str | None = None  # default: the family's first transformer class


@dataclass(frozen=True)
class ModelFamily:
    name: str
    transformer_classes: tuple[str, ...]
    route: str = "dispatcher"
    attention_processors: tuple[str, ...] = ()
    exact_processors: tuple[str, ...] = ()
    exact_reason: str = "kept exact (SDPA) on purpose"
    processor: type | None = None
    variant_of: str | None = None
    block_types: dict[str, str] = field(default_factory=dict)
    attr_block_types: dict[str, str] = field(default_factory=dict)
    timestep_scale: float | None = 1000.0
    scheduler_units: float | None = 1.0
    mask_kwarg: str | None = None
    pipeline_transformers: tuple[str, ...] = ("transformer",)
    hub_id: str | None = None
    pipeline_class: str | None = None
    example: Example | None = None
    tiny_transformer: Callable[..., Any] | None = None
    tiny_inputs: Callable[..., dict] | None = None
    tiny_pipeline: Callable[..., Any] | None = None
    tiny_call_kwargs: Callable[..., dict] | None = None
    bench: BenchSpec | None = None
    report_shape: tuple[tuple[int, int, int], int] | None = None
    attention_shape: str | None = None
    description: str = ""
    cp_plan: Callable[[], dict] | None = None
    prepare_cp: Callable[[Any], None] | None = None
    unprepare_cp: Callable[[Any], None] | None = None

    def __post_init__(self):
        if self.route not in ROUTES:
            raise ValueError(f"model family {self.name!r}: route must be one of {ROUTES}, got {self.route!r}")
        if self.route == "processor" and self.processor is None:
            raise ValueError(f"model family {self.name!r}: the processor route needs `processor`")

    @property
    def transformer_family(self) -> str:
        """The family whose transformer class this one uses (itself unless a variant)."""
        return self.variant_of or self.name

    def block_of(self, layer: str) -> tuple[int | None, str | None]:
        """(block index, block type) of an attention module name, e.g. `transformer_blocks.3.attn`."""
        return _block_of(layer, self.block_types, self.attr_block_types)


def _block_of(layer, block_types, attr_block_types):
    parts = layer.split(".")
    for i in range(len(parts) - 2, 0, -1):
        if parts[i].isdigit():
            lst, idx = parts[i - 1], int(parts[i])
            attr = parts[i + 1] if i + 1 < len(parts) else ""
            kind = attr_block_types.get(attr, block_types.get(lst))
            return idx, kind
    return None, None


# Block types of layer names when no family is known (a policy without `model:` on a bare name).
_FALLBACK_BLOCK_TYPES = {"transformer_blocks": "double", "single_transformer_blocks": "single",
                         "refiner_blocks": "refiner"}
_FALLBACK_ATTR_TYPES = {"attn2": "self"}

_REGISTRY: dict[str, ModelFamily] = {}
_LOADED = False


def _load() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for fam in getattr(module, "FAMILIES", ()):
            register(fam)


def register(family: ModelFamily) -> ModelFamily:
    """Add a family (what the modules of this package do on import; also for user code)."""
    if not isinstance(family, ModelFamily):
        raise TypeError(f"register() takes a ModelFamily, got {type(family).__name__}")
    existing = _REGISTRY.get(family.name)
    if existing is not None and existing is not family:
        raise ValueError(f"model family {family.name!r} is registered twice")
    _REGISTRY[family.name] = family
    return family


def names() -> tuple[str, ...]:
    """Registered family names, sorted."""
    _load()
    return tuple(sorted(_REGISTRY))


def families() -> tuple[ModelFamily, ...]:
    _load()
    return tuple(_REGISTRY[n] for n in sorted(_REGISTRY))


def get(name: str) -> ModelFamily:
    """The family named `name`; a clear error naming the known ones otherwise."""
    _load()
    fam = _REGISTRY.get(name)
    if fam is None:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return fam


def find(name: str) -> ModelFamily | None:
    _load()
    return _REGISTRY.get(name)


def for_transformer(transformer) -> ModelFamily | None:
    """The family of a transformer instance (by its class or a base class), or None."""
    _load()
    by_class = {c: f for f in _REGISTRY.values() if f.variant_of is None for c in f.transformer_classes}
    for cls in type(transformer).__mro__:
        if cls.__name__ in by_class:
            return by_class[cls.__name__]
    return None


def block_types() -> tuple[str, ...]:
    """Every block type a policy may name: the defaults plus those the families declare."""
    _load()
    seen = dict.fromkeys(DEFAULT_BLOCK_TYPES)
    for f in _REGISTRY.values():
        seen.update(dict.fromkeys(f.block_types.values()))
        seen.update(dict.fromkeys(f.attr_block_types.values()))
    return tuple(k for k in seen if k)


def layer_block(layer: str, family: str | None = None) -> tuple[int | None, str | None]:
    """(block index, block type) of a layer name under `family` (its declared block types; without a
    known family, the names diffusers' DiTs commonly use)."""
    fam = find(family) if family else None
    if fam is not None:
        return fam.block_of(layer)
    return _block_of(layer, _FALLBACK_BLOCK_TYPES, _FALLBACK_ATTR_TYPES)


# ------------------------------------------------------------------------------------ generic adapter

def calls_dispatcher(processor) -> bool:
    """Whether a processor routes attention through diffusers' `dispatch_attention_fn` (it carries the
    `_attention_backend` slot that `set_attention_backend` writes, or its `__call__` names the function)."""
    if processor is None:
        return False
    if hasattr(processor, "_attention_backend"):
        return True
    try:
        source = inspect.getsource(type(processor).__call__)
    except (OSError, TypeError):
        return False
    return "dispatch_attention_fn" in source


def generic_family(transformer, *, timestep_scale: float | None = None,
                   scheduler_units: float | None = None) -> ModelFamily | None:
    """A family for a transformer without a module of ours whose processors call `dispatch_attention_fn`:
    every such processor class is an attention layer; timestep units are stated or inferred by the step
    runtime from the first forward. None when no processor reaches the dispatcher."""
    classes = []
    for _, module in transformer.named_modules():
        proc = getattr(module, "processor", None)
        if proc is not None and calls_dispatcher(proc) and type(proc).__name__ not in classes:
            classes.append(type(proc).__name__)
    if not classes:
        return None
    return ModelFamily(name=f"generic:{type(transformer).__name__}", transformer_classes=(type(transformer).__name__,),
                       route="dispatcher", attention_processors=tuple(classes),
                       timestep_scale=timestep_scale, scheduler_units=scheduler_units,
                       description="generic dispatcher adapter")


__all__ = ["ModelFamily", "BenchSpec", "Example", "register", "names", "families", "get", "find", "for_transformer",
           "block_types", "layer_block", "calls_dispatcher", "generic_family", "ROUTES"]
