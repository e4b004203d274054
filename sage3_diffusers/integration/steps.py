"""The denoising step, learned by a transformer pre-forward hook, and the per-step kernel decisions.

`Sage3StepHook` (a diffusers `ModelHook`) sees the transformer's `timestep` before any block runs and
updates the `Sage3Runtime` that every Sage3 processor of that transformer reads. The step comes from,
in order of preference:
1. a `CacheContext` with `step_index` (pipelines that pass it through `cache_context(...)`);
2. the pipeline's scheduler (`apply(pipe)` passes it): `scheduler.step_index` (None on step 0) checked
   against `scheduler.timesteps`, or, for schedulers without a step index, the position of the timestep
   in `scheduler.timesteps`; this also gives the number of steps, so "last N steps" rules work;
3. the timestep value alone: a new value starts the next step, a value above the previous one (more
   noise) starts a new generation.
Calls with the same step (cond and uncond under true CFG) count as one step. Reading the timestep is the one
host sync per eager forward; masks are not read on the host at all (the processors turn them into per-sample key
lengths on the device).

Under torch.compile:
- Regional compile (`compile_repeated_blocks`): the transformer's forward, and so this hook, runs eagerly;
  only the blocks are compiled.
- The whole transformer compiled (`torch.compile(transformer, fullgraph=True)`, `transformer.compile()`): the
  hook is traced and does nothing there (no host reads). The step then comes from the pipeline side:
  `apply(pipe)` wraps the scheduler's `set_timesteps` (a new generation, step 0) and `step` (the next step),
  which run eagerly between transformer calls. A bare compiled transformer without a pipeline keeps the step
  it has until `runtime.set_step(step, num_steps)` is called (before each step, by the user).
- Kernel choices reach the compiled code as one string attribute per attention module (`_sage3_kernel`),
  rewritten in place when a step changes them: dynamo guards on that string, so there is one graph per kernel
  choice, shared by every block with the same choice, and no recompile when the step changes but the kernels
  do not. Calls made in compiled code fill a per-layer slot (`stats.CallSlot`), counted at the next flush.
"""
from __future__ import annotations

import inspect

import torch

from .policy import Policy, layer_block, load_policy, warn_steps_beyond
from .stats import KernelStats, logger

HOOK_NAME = "sage3_step"



def timestep_units(family: str | None) -> tuple[float | None, float | None]:
    """(timestep_scale, scheduler_units) of a registered family (see `models.ModelFamily`); (None, None),
    i.e. inferred from the first forward, for an unknown one."""
    from . import models
    fam = models.find(family) if family else None
    if fam is None:
        return None, None
    return fam.timestep_scale, fam.scheduler_units


def infer_timestep_units(t_value: float, scheduler=None) -> tuple[float, float]:
    """Units of a transformer's `timestep` from the first forward of a generation (the noisiest one):
    a value <= 1 is a sigma (t / 1000), anything above is in [0, 1000]. A scheduler counting in
    [0, 1000] then converts sigmas back with x1000."""
    scale = 1.0 if abs(t_value) <= 1.0 + 1e-6 else 1000.0
    units = 1.0
    timesteps = getattr(scheduler, "timesteps", None)
    if scale == 1.0 and timesteps is not None and len(timesteps) and float(max(timesteps)) > 1.5:
        units = 1000.0
    return scale, units


class Sage3Runtime:
    """Shared, mutable state of one transformer: policy, current step, per-forward mask info, stats.

    Processors stay stateless; they look this object up on the attention module (`_sage3_runtime`)."""

    def __init__(self, policy: Policy | None = None, family: str | None = None, stats: KernelStats | None = None,
                 scheduler=None, num_inference_steps: int | None = None, log_summary: bool = True,
                 timestep_scale: float | None = None, scheduler_units: float | None = None):
        self.policy = load_policy(policy)
        self.family = family
        # What the transformer receives as `timestep`, divided by `timestep_scale`, gives t in [0, 1]
        # (1 = pure noise); multiplied by `scheduler_units`, the scheduler's units. None: inferred.
        known_scale, known_units = timestep_units(family)
        self.timestep_scale = timestep_scale if timestep_scale is not None else known_scale
        self.scheduler_units = scheduler_units if scheduler_units is not None else known_units
        self.stats = stats if stats is not None else KernelStats()
        self.scheduler = scheduler
        self.num_inference_steps = num_inference_steps  # user override when no scheduler tells us
        self.log_summary = log_summary
        self.stats.position_of = lambda: (max(self.generation, 0), self.step)
        self._steps_warned: set = set()  # (rule index, step count) already warned about (policy.warn_steps_beyond)
        self.reset()

    # ------------------------------------------------------------------ step tracking
    def reset(self) -> None:
        """Forget the step (the next call starts a new generation)."""
        self.generation = getattr(self, "generation", -1)
        self.step: int | None = None
        self.num_steps: int | None = None
        self.t_norm: float | None = None
        self.step_source: str | None = None
        self._last_t: float | None = None
        self._raw_index: int | None = None
        self._timesteps_ref = None
        self._start_index = 0
        self._calls_this_step = 0
        self._calls_per_step: int | None = None
        self._summary_done = True
        # Kernel per layer for the current step; each attention module also carries its own as `_sage3_kernel`
        # (what compiled processors read, see the module doc).
        self.decisions: dict[str, str] = getattr(self, "decisions", {})
        self.layers: list[str] = getattr(self, "layers", [])
        self._modules: dict = getattr(self, "_modules", {})
        self._decided_for = None
        self._eager_forward_since_scheduler_step = False
        self._scheduler_step: int | None = None  # step counted from scheduler events (compiled transformers)

    def finish_generation(self) -> None:
        """End of a pipeline call (diffusers resets stateful hooks then): log the summary if not yet done,
        forget the step."""
        if not self._summary_done and self.log_summary:
            self.stats.log_summary(self.generation)
        self._summary_done = True
        self.reset()

    def _new_generation(self) -> None:
        if not self._summary_done and self.log_summary:
            self.stats.log_summary(self.generation)
        self.generation += 1
        self._summary_done = False
        self._calls_per_step = None

    def begin_forward(self, t_value: float | None, context=None) -> None:
        """Called once per eager transformer forward (by the hook) with its largest timestep."""
        self._eager_forward_since_scheduler_step = True
        prev_step, prev_gen = self.step, self.generation
        if t_value is not None and (self.timestep_scale is None or self.scheduler_units is None):
            scale, units = infer_timestep_units(t_value, self.scheduler)
            self.timestep_scale = scale if self.timestep_scale is None else self.timestep_scale
            self.scheduler_units = units if self.scheduler_units is None else self.scheduler_units
        index = num = None
        source = None
        if context is not None and getattr(context, "step_index", None) is not None:
            index, num, source = int(context.step_index), context.num_inference_steps, "cache_context"
        elif self.scheduler is not None and t_value is not None:
            found = self._scheduler_position(t_value)
            if found is not None:
                (index, num), source = found, "scheduler"
        if source is not None:
            new_gen = self.step is None or self._raw_index is None or index < self._raw_index or \
                self.step_source != source
            if source == "scheduler":
                # set_timesteps() makes a new tensor per pipeline call; holding the old one keeps ids unique.
                new_gen = new_gen or self.scheduler.timesteps is not self._timesteps_ref
                self._timesteps_ref = self.scheduler.timesteps
            if new_gen:
                self._new_generation()
                self._start_index = index
            self._raw_index = index
            self.step = index - self._start_index
            self.num_steps = (num - self._start_index) if num is not None else None
        elif t_value is not None:
            source = "timestep"
            if self._last_t is None or self.step is None or t_value > self._last_t + 1e-6 or \
                    self.step_source not in (None, "timestep"):
                self._new_generation()
                self.step = 0
            elif t_value != self._last_t:
                self.step += 1
            self.num_steps = self.num_inference_steps
            self._raw_index = None
        else:
            source, self.step, self.num_steps = None, None, self.num_inference_steps
        if self.num_inference_steps is not None and self.num_steps is None:
            self.num_steps = self.num_inference_steps
        self.step_source = source
        self._last_t = t_value
        if t_value is not None:
            self.t_norm = t_value / self.timestep_scale
        if (self.step, self.num_steps, self.t_norm) != self._decided_for:
            self._decide_all()
        if self.step != prev_step or self.generation != prev_gen:
            if self.generation == prev_gen and prev_step == 0 and self._calls_per_step is None:
                self._calls_per_step = self._calls_this_step
            self._calls_this_step = 0
        self._calls_this_step += 1

    def end_forward(self) -> None:
        """Called after each eager forward: logs the summary once the last step's calls are all done."""
        self._flush_compiled_calls()
        if self._summary_done or self.num_steps is None or self.step is None:
            return
        if self.step == self.num_steps - 1 and self._calls_per_step is not None and \
                self._calls_this_step >= self._calls_per_step:
            self._summary_done = True
            if self.log_summary:
                self.stats.log_summary(self.generation)

    def _scheduler_position(self, t_value: float):
        sched = self.scheduler
        timesteps = getattr(sched, "timesteps", None)
        if timesteps is None or len(timesteps) == 0:
            return None
        t_sched = t_value * self.scheduler_units
        values = timesteps.detach().double().cpu() if isinstance(timesteps, torch.Tensor) else \
            torch.tensor(list(timesteps), dtype=torch.float64)
        tol = max(1e-3, 8e-3 * abs(t_sched))  # bf16/fp16 rounding of the timestep passed to the model
        index = None
        if hasattr(type(sched), "step_index") or hasattr(sched, "_step_index"):
            si = getattr(sched, "step_index", None)
            if si is None:
                si = getattr(sched, "begin_index", None) or 0
            if 0 <= si < len(values) and abs(float(values[si]) - t_sched) <= tol:
                index = int(si)
        if index is None:  # no step index (e.g. DDIM): the position of this timestep in the schedule
            d = (values - t_sched).abs()
            i = int(d.argmin())
            if float(d[i]) <= tol:
                index = i
        if index is None:
            return None
        return index, len(values)

    # ------------------------------------------------------------------ steps from outside the forward
    def set_step(self, step: int | None, num_steps: int | None = None, t_norm: float | None = None) -> None:
        """Set the step (and step count, normalized timestep t in [0, 1]) for the next transformer calls: what
        a bare compiled transformer needs (its traced hook cannot read the timestep). Calls of the previous step
        made in compiled code are counted first; step 0 after another step starts a new generation."""
        self._flush_compiled_calls()
        if step is not None and (self.step is None or step < self.step or (step == 0 and self.step != 0)):
            self._new_generation()
        self.step, self.step_source = step, "set_step"
        self.num_steps = num_steps if num_steps is not None else self.num_inference_steps
        self.t_norm = t_norm
        if (self.step, self.num_steps, self.t_norm) != self._decided_for:
            self._decide_all()

    def _scheduler_t_norm(self, index: int) -> float | None:
        """t in [0, 1] of schedule position `index`, read only when a policy rule uses timesteps (a host read of
        the schedule, once per step)."""
        if not any(getattr(rule, "timesteps", None) for rule in getattr(self.policy, "rules", ())):
            return None
        timesteps = getattr(self.scheduler, "timesteps", None)
        if timesteps is None or not 0 <= index < len(timesteps):
            return None
        if self.timestep_scale is None or self.scheduler_units is None:  # units not known yet
            return None
        return float(timesteps[index]) / (self.timestep_scale * self.scheduler_units)

    def on_set_timesteps(self) -> None:
        """The pipeline's scheduler got a new schedule (wrapped by `apply(pipe)`): the kernels of step 0 are
        decided now, before any transformer call, so a compiled transformer starts right."""
        timesteps = getattr(self.scheduler, "timesteps", None)
        num = len(timesteps) if timesteps is not None else self.num_inference_steps
        self._scheduler_step = 0
        self._eager_forward_since_scheduler_step = False
        if self.step_source in (None, "scheduler_events", "set_step"):
            self._flush_compiled_calls()
            if not self._summary_done and self.log_summary:
                self.stats.log_summary(self.generation)
            self._summary_done = True
            self.step, self.num_steps, self.t_norm = 0, num, self._scheduler_t_norm(0)
            self._decide_all()

    def on_scheduler_step(self) -> None:
        """The scheduler finished a step (wrapped by `apply(pipe)`). When no eager forward ran since the last
        scheduler event, the transformer is compiled as a whole (its hook is traced and does nothing): count this
        step's compiled calls and move to the next step here."""
        eager = self._eager_forward_since_scheduler_step
        self._eager_forward_since_scheduler_step = False
        if eager or self._scheduler_step is None:
            return
        timesteps = getattr(self.scheduler, "timesteps", None)
        num = len(timesteps) if timesteps is not None else self.num_inference_steps
        begin = getattr(self.scheduler, "begin_index", None) or 0
        if self.step_source != "scheduler_events" or self._scheduler_step == 0:
            if self._scheduler_step == 0:
                self._new_generation()
        self.step_source = "scheduler_events"
        self.step = self._scheduler_step
        self.num_steps = None if num is None else num - begin
        self._flush_compiled_calls()
        self._scheduler_step += 1
        if self.num_steps is not None and self._scheduler_step >= self.num_steps:
            self._summary_done = True
            if self.log_summary:
                self.stats.log_summary(self.generation)
            return
        self.step = self._scheduler_step
        self.t_norm = self._scheduler_t_norm(begin + self._scheduler_step)
        if (self.step, self.num_steps, self.t_norm) != self._decided_for:
            self._decide_all()

    # ------------------------------------------------------------------ decisions
    def register_layers(self, layers, modules: dict | None = None) -> None:
        """The layers whose kernel this runtime decides; `modules` (layer -> attention module) also get their
        kernel string and call slot (what compiled code reads)."""
        self._modules = dict(modules or {})
        self.layers = list(layers)
        for name, module in self._modules.items():
            if isinstance(module, torch.nn.Module):
                module._sage3_slot = self.stats.slot(name)
        self._decide_all()

    def kernel_for(self, layer: str) -> str:
        kernel = self.decisions.get(layer)
        if kernel is None:  # a layer apply() did not see: decide without caching
            kernel = self.policy.kernel_for(layer, step=self.step, num_steps=self.num_steps, t_norm=self.t_norm,
                                            family=self.family)
        return kernel

    def block_of(self, layer: str):
        return layer_block(layer, self.family)

    def record(self, layer: str, requested: str, backend: str, reason: str | None) -> None:
        """One call of `layer`. In compiled code it goes to the layer's slot (see the module doc); callers that
        hold the module set `module._sage3_slot.call` themselves, which spares dynamo a guard on the name."""
        if torch.compiler.is_compiling():
            slot = self.stats._slots.get(layer)
            if slot is not None:
                slot.call = (requested, backend, reason)
            return
        self.stats.record(max(self.generation, 0), self.step, layer, requested, backend, reason)

    def _flush_compiled_calls(self) -> None:
        self.stats.flush_compiled(max(self.generation, 0), self.step)

    def _decide_all(self) -> None:
        if self.num_steps is not None:
            warn_steps_beyond(self.policy, self.num_steps, self._steps_warned)
        self._decided_for = (self.step, self.num_steps, self.t_norm)
        for layer in self.layers:
            kernel = self.policy.kernel_for(layer, step=self.step, num_steps=self.num_steps, t_norm=self.t_norm,
                                            family=self.family)
            if self.decisions.get(layer) != kernel:
                self.decisions[layer] = kernel
            module = self._modules.get(layer)
            if isinstance(module, torch.nn.Module) and module.__dict__.get("_sage3_kernel") != kernel:
                module._sage3_kernel = kernel


def _make_hook_class():
    from diffusers.hooks.hooks import BaseState, ModelHook, StateManager

    class _NoState(BaseState):
        def reset(self, *args, **kwargs):
            pass

    class Sage3StepHook(ModelHook):
        """Pre-forward hook: step bookkeeping for `Sage3Runtime` (see module doc)."""

        # Stateful so diffusers' `cache_context(...)` hands us its CacheContext (via the StateManager).
        _is_stateful = True

        def __init__(self, runtime: Sage3Runtime):
            super().__init__()
            self.runtime = runtime
            self.state_manager = StateManager(_NoState)
            self._positions: dict[str, int] = {}

        def initialize_hook(self, module):
            try:
                params = list(inspect.signature(module.forward).parameters)
            except (TypeError, ValueError):
                params = []
            self._positions = {name: i for i, name in enumerate(params)}
            return module

        def _arg(self, name, args, kwargs):
            if name in kwargs:
                return kwargs[name]
            i = self._positions.get(name)
            return args[i] if i is not None and i < len(args) else None

        def pre_forward(self, module, *args, **kwargs):
            if torch.compiler.is_compiling():  # traced: no host reads (the step comes from outside, see module doc)
                return args, kwargs
            t = self._arg("timestep", args, kwargs)
            t_value = None
            if isinstance(t, torch.Tensor) and t.numel():
                # The noisiest token's: pipelines that pass one timestep per token (Wan 2.2 TI2V, LTX
                # conditioning) put 0 on the conditioning frames. The one host sync per eager forward.
                t_value = float(t.detach().reshape(-1).amax())
            elif isinstance(t, (int, float)):
                t_value = float(t)
            self.runtime.begin_forward(t_value, self.state_manager._context)
            return args, kwargs

        def post_forward(self, module, output):
            if not torch.compiler.is_compiling():
                self.runtime.end_forward()
            return output

        def reset_state(self, module):
            self.runtime.finish_generation()
            return module

    return Sage3StepHook


_HOOK_CLS = None


def step_hook(runtime: Sage3Runtime):
    global _HOOK_CLS
    if _HOOK_CLS is None:
        _HOOK_CLS = _make_hook_class()
    return _HOOK_CLS(runtime)


__all__ = ["Sage3Runtime", "step_hook", "HOOK_NAME", "timestep_units", "logger"]
