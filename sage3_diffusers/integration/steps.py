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
Calls with the same step (cond and uncond under true CFG) count as one step. Per forward it also reads
the text masks of HunyuanVideo and Mochi once (`encoder_attention_mask` -> per-sample valid lengths),
so processors need no host sync per layer. All of this runs outside `torch.compile` regions
(`torch.compiler.disable`): one host sync per transformer call.
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
        # Kernel per layer for the current step, updated in place (same dict, same keys) so compiled
        # processors guard only on the kernel string each layer reads: one graph per kernel choice.
        self.decisions: dict[str, str] = getattr(self, "decisions", {})
        self.layers: list[str] = getattr(self, "layers", [])
        self._decided_for = None
        # Calls made inside torch.compile'd code, flushed into `stats` by the eager post-forward hook.
        self._compiled_calls: dict[str, tuple | None] = getattr(self, "_compiled_calls", {})
        self.text_valid: list[int] | None = None
        self.text_prefix: bool = True

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
        """Called once per transformer forward (by the hook) with its largest timestep."""
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
        """Called after each forward: logs the summary once the last step's calls are all done."""
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

    # ------------------------------------------------------------------ decisions
    def register_layers(self, layers) -> None:
        self.layers = list(layers)
        self._compiled_calls.clear()
        self._compiled_calls.update({name: None for name in self.layers})
        self._decide_all()

    def _decide_all(self) -> None:
        if self.num_steps is not None:
            warn_steps_beyond(self.policy, self.num_steps, self._steps_warned)
        self._decided_for = (self.step, self.num_steps, self.t_norm)
        for layer in self.layers:
            kernel = self.policy.kernel_for(layer, step=self.step, num_steps=self.num_steps, t_norm=self.t_norm,
                                            family=self.family)
            if self.decisions.get(layer) != kernel:
                self.decisions[layer] = kernel

    def kernel_for(self, layer: str) -> str:
        kernel = self.decisions.get(layer)
        if kernel is None:  # a layer apply() did not see: decide without caching
            kernel = self.policy.kernel_for(layer, step=self.step, num_steps=self.num_steps, t_norm=self.t_norm,
                                            family=self.family)
        return kernel

    def block_of(self, layer: str):
        return layer_block(layer, self.family)

    def record(self, layer: str, requested: str, backend: str, reason: str | None) -> None:
        if torch.compiler.is_compiling():
            # No list appends in traced code (they would guard on the list length and recompile).
            self._compiled_calls[layer] = (requested, backend, reason)
        else:
            self.stats.record(max(self.generation, 0), self.step, layer, requested, backend, reason)

    def _flush_compiled_calls(self) -> None:
        for layer, call in self._compiled_calls.items():
            if call is not None:
                self.stats.record(max(self.generation, 0), self.step, layer, *call)
                self._compiled_calls[layer] = None

    def set_text_mask(self, valid: list[int] | None, prefix: bool = True) -> None:
        self.text_valid, self.text_prefix = valid, prefix


def _make_hook_class():
    from diffusers.hooks.hooks import BaseState, ModelHook, StateManager

    class _NoState(BaseState):
        def reset(self, *args, **kwargs):
            pass

    class Sage3StepHook(ModelHook):
        """Pre-forward hook: step and text-mask bookkeeping for `Sage3Runtime` (see module doc)."""

        # Stateful so diffusers' `cache_context(...)` hands us its CacheContext (via the StateManager).
        _is_stateful = True

        def __init__(self, runtime: Sage3Runtime, mask_kwarg: str | None = None):
            super().__init__()
            self.runtime = runtime
            self.mask_kwarg = mask_kwarg
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

        @torch.compiler.disable
        def pre_forward(self, module, *args, **kwargs):
            t = self._arg("timestep", args, kwargs)
            mask = self._arg(self.mask_kwarg, args, kwargs) if self.mask_kwarg else None
            parts = []
            if isinstance(t, torch.Tensor) and t.numel():
                # The noisiest token's: pipelines that pass one timestep per token (Wan 2.2 TI2V, LTX
                # conditioning) put 0 on the conditioning frames.
                parts.append(t.detach().reshape(-1).amax().reshape(1).double())
            elif isinstance(t, (int, float)):
                parts.append(torch.tensor([float(t)], dtype=torch.float64))
            has_t = bool(parts)
            batch = 0
            if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                m = mask.detach().bool()
                batch = m.shape[0]
                valid = m.sum(dim=1)
                ramp = torch.arange(m.shape[1], device=m.device)[None, :] < valid[:, None]
                parts = [p.to(m.device, non_blocking=True) for p in parts]  # host->device: no sync
                parts.append(torch.cat([valid, (ramp == m).all(dim=1)]).double())
            values = torch.cat(parts).tolist() if parts else []  # the one host sync per forward
            t_value = values.pop(0) if has_t else None
            if batch:
                self.runtime.set_text_mask([int(v) for v in values[:batch]], all(v > 0 for v in values[batch:]))
            else:
                self.runtime.set_text_mask(None)
            self.runtime.begin_forward(t_value, self.state_manager._context)
            return args, kwargs

        @torch.compiler.disable
        def post_forward(self, module, output):
            self.runtime.end_forward()
            return output

        def reset_state(self, module):
            self.runtime.finish_generation()
            return module

    return Sage3StepHook


_HOOK_CLS = None


def step_hook(runtime: Sage3Runtime, mask_kwarg: str | None = None):
    global _HOOK_CLS
    if _HOOK_CLS is None:
        _HOOK_CLS = _make_hook_class()
    return _HOOK_CLS(runtime, mask_kwarg)


__all__ = ["Sage3Runtime", "step_hook", "HOOK_NAME", "timestep_units", "logger"]
