"""Calibrate a per-layer / per-step policy on the user's own model and prompts, within an error budget.

    python -m sage3_diffusers calibrate --model flux [--prompts prompts.txt] [--steps 28] [--budget cos=0.999]
        [--target H100] [--tiny | --slice] --out my_policy.yaml [--plot heat.png]

1. Exact run: the pipeline runs with exact attention (SDPA). Every attention call a policy decides is also
   measured, on a sample of it, with each candidate kernel: up to `SAMPLE_HEADS` heads of the first and last
   sample, every key, and up to `SAMPLE_Q_BLOCKS` aligned 128-row blocks of queries (quantization groups are
   128-row aligned and K/V quantization sees all keys, so the sampled rows get exactly the numerics of the full
   call). Only the metrics and the call's shape are kept, never tensors. A candidate is a family (fp4,
   int8_fp8) with a kernel on the target card; where this machine lacks that family's kernel its torch
   emulation measures it (the output says so).
2. Choice: per (layer, step bucket), the kernel with the least predicted attention time whose worst measured
   error in that cell meets the budget (exact SDPA always does). Predicted time = FLOPs / speed, the speed from
   the target card's measured table (`perf_model`) at the call's shape; a card or head dim without a table uses
   `ASSUMED_RELATIVE_SPEED` (printed). With `--tiny` the speeds are read at the real model's attention shape
   (`real_attention`): the tiny model stands in for the numerics only.
3. Verification: the pipeline runs with the chosen policy and its final latent is compared with the exact run's
   (worst over prompts). Over budget: the per-cell budget is tightened (the cells with the largest errors move to
   a more accurate kernel) and verified again, at most `--rounds` times; if it still fails, the policy is exact
   SDPA everywhere.
Outputs: the policy YAML (an ordinary policy, validated by `load_policy`, with a header saying what it was
calibrated on), the predicted attention speed-up, the measured final-latent error, and a heat map PNG.
`--slice` runs a real-shape, random-weight transformer slice on a GPU through a flow-matching Euler loop instead
of a pipeline (no download), and with `--measure-speed` times attention exact vs calibrated on it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch

from ..backends.base import AttentionBackend, AttentionProblem, describe_problem, to_hnd
from ..extras import headless_pyplot
from ..numerics import accuracy_metrics

CANDIDATES = ("fp4", "int8_fp8")   # quantized families, exact "sdpa" is always allowed
SAMPLE_HEADS = 2
SAMPLE_Q_BLOCKS = 4
Q_BLOCK = 128
RECORDER = "calibration_recorder"

# GPU cards by name (as in torch.cuda.get_device_name) -> compute capability.
CARDS = {"H100": (9, 0), "H200": (9, 0), "H20": (9, 0), "RTX5090": (12, 0), "RTXPRO6000": (12, 0),
         "RTX4090": (8, 9), "L40S": (8, 9), "L20": (8, 9), "A100": (8, 0), "A10": (8, 6)}
# Per family, the backends that run it on a card, by compute capability (the dispatcher chooses among them).
_FAMILY_BACKENDS = {
    "sdpa": lambda cap: ("sdpa",),
    "int8_fp8": lambda cap: (("cuda_sm90_int8_fp8", "triton_int8_fp8") if cap == (9, 0) else
                             ("triton_int8_fp8",) if cap >= (8, 0) else ()),
    "fp4": lambda cap: ("cuda_sm120_fp4",) if cap in ((12, 0), (12, 1)) else (),
}
# Speed relative to exact attention where no measured table covers a call: the published SageAttention
# figures on an RTX 5090, head dim 128, long sequences, kernels only (FlashAttention2 214, SageAttention2++ 643,
# SageAttention3 FP4 1038 TOPS). An assumption, printed as such wherever it is used.
ASSUMED_RELATIVE_SPEED = {"sdpa": 1.0, "int8_fp8": 3.0, "fp4": 4.8}
ASSUMPTION_SOURCE = ("assumed relative speed sdpa 1 : int8_fp8 3.0 : fp4 4.8 (published SageAttention kernel "
                     "figures, RTX 5090, hd128)")
def real_attention(family: str) -> tuple[int, int, int, int]:
    """(batch, heads, sequence, head dim) of the family's real self-attention at its default resolution: the
    kernel benchmark's shape (sage3_diffusers/bench.py DIT_SHAPES) its model module names; the shape the
    speeds are read at for --tiny."""
    from ..bench import DIT_SHAPES
    from . import models
    name = models.get(family).attention_shape
    if name is None:
        raise ValueError(f"calibrate: model family {family!r} declares no attention_shape")
    shape = {s.name: s for s in DIT_SHAPES}[name]
    return shape.batch, shape.heads, shape.seq, shape.head_dim


def _calibratable() -> list[str]:
    """Families with a hub id and a kernel-benchmark attention shape (from the model registry)."""
    from . import models
    return sorted(f.name for f in models.families() if f.hub_id and f.attention_shape)


DEFAULT_PROMPTS = ("a cat sitting on a red mat in the sun",)


# ---------------------------------------------------------------------------------------------- budget

@dataclass(frozen=True)
class Budget:
    metric: str   # "cos" (cos sim >= value) or "rel_l1" (relative L1 <= value)
    value: float

    @classmethod
    def parse(cls, text: str) -> "Budget":
        name, sep, val = text.partition("=")
        if not sep or name not in ("cos", "rel_l1"):
            raise ValueError(f"--budget {text!r}: expected cos=<min cos sim> or rel_l1=<max relative L1>")
        try:
            value = float(val)
        except ValueError:
            raise ValueError(f"--budget {text!r}: {val!r} is not a number") from None
        if name == "cos" and not 0.0 < value < 1.0 or name == "rel_l1" and not value > 0.0:
            raise ValueError(f"--budget {text!r}: cos must lie in (0, 1), rel_l1 must be > 0")
        return cls(name, value)

    def error(self, metrics: dict) -> float:
        """The budget's error measure: 1 - cos sim, or rel L1 (NaN counts as infinite)."""
        e = 1.0 - metrics["cos_sim"] if self.metric == "cos" else metrics["rel_l1"]
        return math.inf if e != e else e

    @property
    def allowed(self) -> float:
        return 1.0 - self.value if self.metric == "cos" else self.value

    def __str__(self) -> str:
        return f"{self.metric}={self.value:g}"


# ---------------------------------------------------------------------------------------------- speed model

def detect_card() -> str | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name().upper().replace(" ", "")
    return next((c for c in sorted(CARDS, key=len, reverse=True) if c in name), name)


@dataclass
class SpeedModel:
    """Predicted attention time per family on a target card (see module doc, step 2)."""
    card: str | None
    sources: set = field(default_factory=set)

    @property
    def capability(self):
        """The card's compute capability: from `CARDS`, or from the GPU present when the card is this one."""
        if not self.card:
            return None
        if self.card in CARDS:
            return CARDS[self.card]
        return torch.cuda.get_device_capability() if self.card == detect_card() else None

    def families(self) -> tuple[str, ...]:
        """Candidate families with a kernel on the target card (all of them for an unknown card)."""
        cap = self.capability
        if cap is None:
            return CANDIDATES
        return tuple(f for f in CANDIDATES if _FAMILY_BACKENDS[f](cap))

    def tflops(self, family: str, problem: AttentionProblem) -> float | None:
        """Measured TFLOPS of the family's fastest backend on the card, or None without a measurement."""
        from .. import perf_model
        cap = self.capability
        if cap is None:
            return None
        slug = perf_model.resolve_card(self.card)
        if slug is None:
            return None
        p = replace(problem, device_type="cuda", capability=cap)
        vals = [perf_model.estimated_tflops(b, p, card=slug) for b in _FAMILY_BACKENDS[family](cap)]
        vals = [v for v in vals if v is not None]
        if vals:
            self.sources.add(f"measured table: {perf_model.load_table(slug).describe_source}")
        return max(vals) if vals else None

    def seconds(self, family: str, problem: AttentionProblem) -> float:
        flops = 4.0 * problem.batch * problem.heads_q * problem.seq_q * problem.seq_kv * problem.head_dim
        measured = {f: self.tflops(f, problem) for f in (family, "sdpa")}
        if all(v is not None for v in measured.values()):
            return flops / (measured[family] * 1e12)
        self.sources.add(ASSUMPTION_SOURCE + (f", where no measured table for {self.card} covers head dim "
                                              f"{problem.head_dim}" if self.capability else ""))
        # Relative to exact: exact's measured speed where known, else an arbitrary unit (ratios are what count).
        base = measured["sdpa"] or 100.0
        return flops / (base * ASSUMED_RELATIVE_SPEED[family] * 1e12)


# ---------------------------------------------------------------------------------------------- recording

class _Recorder(AttentionBackend):
    """Exact SDPA for the pipeline, plus each candidate's error on a sample of the call (module doc, step 1)."""

    name = RECORDER
    family = "sdpa"
    priority = -100
    auto_eligible = False
    description = "calibration: exact SDPA that measures the candidate kernels on a sample of each call"
    verified = "tests/test_calibrate.py"
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    head_dims = None
    supports_mask = True

    def __init__(self, families, budget: Budget, bucket_of):
        self.families = families
        self.budget = budget
        self.bucket_of = bucket_of
        self.current = None            # (layer, step) of the call being made
        self.errors: dict = {}         # (layer, bucket) -> {family: worst error}
        self.metrics: dict = {}        # (layer, bucket) -> {family: metrics of the worst call}
        self.problems: dict = {}       # (layer, bucket) -> [AttentionProblem of each call]
        self.measured_with: dict = {}  # family -> backend names that measured it
        self.calls = 0

    def tap(self, runtime) -> None:
        """Learn (layer, step) of each call from the runtime's kernel lookup, which precedes the call."""
        lookup = runtime.kernel_for

        def kernel_for(layer):
            self.current = (layer, runtime.step)
            return lookup(layer)
        runtime.kernel_for = kernel_for

    def forward(self, q, k, v, *, layout, is_causal, sm_scale, return_lse, attn_mask=None):
        from ..dispatch import get_backend
        out = get_backend("sdpa").forward(q, k, v, layout=layout, is_causal=is_causal, sm_scale=sm_scale,
                                          return_lse=return_lse, attn_mask=attn_mask)
        if attn_mask is None and self.current is not None and self.current[1] is not None:
            self._measure(q, k, v, layout, is_causal, sm_scale)
        return out

    @torch.no_grad()
    def _measure(self, q, k, v, layout, is_causal, sm_scale):
        from ..dispatch import select_backend
        self.calls += 1
        layer, step = self.current
        cell = (layer, self.bucket_of(step))
        self.problems.setdefault(cell, []).append(describe_problem(q, k, v, layout, is_causal, False, None))
        qs, ks, vs = _sample(*(to_hnd(t, layout) for t in (q, k, v)), is_causal)
        ref = torch.nn.functional.scaled_dot_product_attention(
            qs.float(), ks.float(), vs.float(), is_causal=is_causal, scale=sm_scale,
            enable_gqa=qs.shape[1] != ks.shape[1])
        problem = describe_problem(qs, ks, vs, "HND", is_causal, False, None)
        for family in self.families:
            backend = select_backend(problem, family).backend
            self.measured_with.setdefault(family, set()).add(backend.name)
            out = backend.forward(qs, ks, vs, layout="HND", is_causal=is_causal, sm_scale=sm_scale,
                                  return_lse=False)
            m = accuracy_metrics(out, ref)
            e = self.budget.error(m)
            worst = self.errors.setdefault(cell, {})
            if e >= worst.get(family, -1.0):
                worst[family] = e
                self.metrics.setdefault(cell, {})[family] = m


def _sample(q, k, v, is_causal):
    """(q, k, v) HND restricted to a few heads of the first and last sample, every key, and a few 128-aligned
    query blocks (all queries for causal calls, whose rows depend on their absolute position)."""
    b, hq, sq, _ = q.shape
    hkv = k.shape[1]
    heads = sorted({round(i * (hq - 1) / max(SAMPLE_HEADS - 1, 1)) for i in range(min(SAMPLE_HEADS, hq))})
    group = hq // hkv
    kv_heads = [h // group for h in heads]
    batches = sorted({0, b - 1})
    qs = q[batches][:, heads]
    ks, vs = k[batches][:, kv_heads], v[batches][:, kv_heads]
    n_blocks = math.ceil(sq / Q_BLOCK)
    if not is_causal and n_blocks > SAMPLE_Q_BLOCKS:
        picks = sorted({round(i * (n_blocks - 1) / (SAMPLE_Q_BLOCKS - 1)) for i in range(SAMPLE_Q_BLOCKS)})
        qs = torch.cat([qs[:, :, i * Q_BLOCK:(i + 1) * Q_BLOCK] for i in picks], dim=2)
        # Every picked block starts at a multiple of Q_BLOCK in the concatenation as in the call (a partial last
        # block stays last), so its quantization groups are the call's.
    return qs.contiguous(), ks.contiguous(), vs.contiguous()


# ---------------------------------------------------------------------------------------------- runners

class _Runner:
    """Runs the model once per prompt with attention installed by `apply(target, policy)`; returns the final
    latents. Subclasses: a diffusers pipeline (tiny or with weights) or a transformer slice."""

    family: str
    target: object
    description: str = ""

    def run(self, policy, prompts, steps, seed, tap=None):
        """(final latents per prompt, runtime); `tap(runtime)` is called right after `apply`."""
        raise NotImplementedError


class _PipelineRunner(_Runner):
    def __init__(self, family, tiny, device, dtype):
        from . import models
        hub_id = models.get(family).hub_id
        self.family = family
        if tiny:
            from .tiny import tiny_pipeline
            self.target = tiny_pipeline(family)
            self.description = f"tiny random {family} pipeline (CPU, fp32)"
        else:
            import diffusers
            self.target = diffusers.DiffusionPipeline.from_pretrained(hub_id, torch_dtype=dtype).to(device)
            self.description = f"{hub_id} ({str(dtype).replace('torch.', '')}, {device})"
        self.tiny = tiny
        self.target.set_progress_bar_config(disable=True)

    def run(self, policy, prompts, steps, seed, tap=None):
        from .install import apply, remove
        from .tiny import pipeline_call_kwargs
        runtime = apply(self.target, policy, log_summary=False)
        if tap is not None:
            tap(runtime)
        outs = []
        try:
            with torch.no_grad():
                for i, prompt in enumerate(prompts):
                    if self.tiny:
                        kw = pipeline_call_kwargs(self.family, prompt=prompt, steps=steps, seed=seed + i,
                                                  output_type="latent")
                    else:
                        kw = dict(prompt=prompt, num_inference_steps=steps, output_type="latent",
                                  generator=torch.Generator(self.target.device).manual_seed(seed + i))
                    outs.append(self.target(**kw)[0].detach().float().cpu())
        finally:
            remove(self.target)
        return outs, runtime


class _SliceRunner(_Runner):
    """A real-shape transformer with random weights and fewer blocks, denoised by a flow-matching Euler loop
    (x <- x + (sigma_next - sigma) * v) from the same random latent per prompt; prompts only vary the seed."""

    def __init__(self, family, layers, device, dtype, height=None, width=None, frames=None):
        from ..bench_e2e import DEFAULT_SIZES, build_transformer
        self.family = family
        h, w, f, b = DEFAULT_SIZES[family]
        self.size = (height or h, width or w, frames or f, b)
        self.device, self.dtype = device, dtype
        self.target = build_transformer(family, layers, device, dtype)
        self.layers = layers
        self.description = (f"{family} transformer slice (random weights, real shapes, blocks {layers or 'all'}) "
                            f"at {self.size[0]}x{self.size[1]}x{self.size[2]}, batch {b}, "
                            f"{str(dtype).replace('torch.', '')} on {device}")

    def inputs(self, seed):
        from ..bench_e2e import make_inputs
        h, w, f, b = self.size
        return make_inputs(self.family, b, self.device, self.dtype, height=h, width=w, frames=f,
                           gen=torch.Generator(device=self.device).manual_seed(seed))

    def timestep(self, sigma, like):
        t = sigma if self.family == "flux" else sigma * 1000.0
        dtype = torch.long if self.family == "cogvideox" else like.dtype
        return torch.full_like(like, t, dtype=dtype)

    def denoise(self, inputs, steps):
        x = inputs["hidden_states"]
        sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            kw = dict(inputs, hidden_states=x, timestep=self.timestep(s, inputs["timestep"]), return_dict=False)
            x = x + (s_next - s) * self.target(**kw)[0]
        return x

    def run(self, policy, prompts, steps, seed, tap=None):
        from .install import apply, remove
        runtime = apply(self.target, policy, num_inference_steps=steps, log_summary=False)
        if tap is not None:
            tap(runtime)
        outs = []
        try:
            with torch.no_grad():
                for i, _ in enumerate(prompts):
                    outs.append(self.denoise(self.inputs(seed + i), steps).float().cpu())
        finally:
            remove(self.target)
        return outs, runtime


# ---------------------------------------------------------------------------------------------- calibration

@dataclass
class Calibration:
    model: str
    description: str
    prompts: list
    steps: int
    buckets: list                 # [(first step, last step)]
    budget: Budget
    card: str | None
    present: str
    layers: list
    families: tuple
    errors: dict                  # (layer, bucket index) -> {family: error}
    problems: dict = field(default_factory=dict)      # (layer, bucket index) -> [AttentionProblem] for speeds
    choice: dict = field(default_factory=dict)        # (layer, bucket index) -> kernel
    predicted: dict = field(default_factory=dict)     # kernel/"policy" -> predicted attention seconds
    final_error: float | None = None
    final_metrics: list = field(default_factory=list)
    rounds: list = field(default_factory=list)
    measured_with: dict = field(default_factory=dict)
    speed_sources: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    @property
    def predicted_speedup(self) -> float:
        return self.predicted["sdpa"] / self.predicted["policy"] if self.predicted.get("policy") else 1.0


def step_buckets(steps: int, n: int | None) -> list[tuple[int, int]]:
    n = max(1, min(steps, n or steps))
    edges = [round(i * steps / n) for i in range(n + 1)]
    return [(edges[i], edges[i + 1] - 1) for i in range(n)]


def choose(cal: Calibration, problems: dict, speed: SpeedModel, allowed: float) -> dict:
    """Per cell, the candidate with the least predicted time whose error is within `allowed`."""
    choice, total = {}, {"policy": 0.0, "sdpa": 0.0}
    for cell, calls in problems.items():
        times = {f: sum(speed.seconds(f, p) for p in calls) for f in ("sdpa",) + cal.families}
        total["sdpa"] += times["sdpa"]
        ok = [f for f in cal.families if cal.errors.get(cell, {}).get(f, math.inf) <= allowed]
        best = min(["sdpa"] + ok, key=lambda f: (times[f], f != "sdpa"))
        choice[cell] = best
        total["policy"] += times[best]
    cal.predicted = total
    return choice


def to_policy(cal: Calibration) -> dict:
    """An ordinary policy dict: default = the most used kernel; per run of step buckets with the same per-layer
    choice, one rule per other kernel (its layers, omitted when it takes them all)."""
    from collections import Counter
    counts = Counter(cal.choice.values())
    default = counts.most_common(1)[0][0] if counts else "sdpa"
    per_bucket = [tuple(cal.choice.get((layer, b), default) for layer in cal.layers) for b in range(len(cal.buckets))]
    groups = []
    for b, assign in enumerate(per_bucket):
        if groups and groups[-1][1] == assign:
            groups[-1][0].append(b)
        else:
            groups.append(([b], assign))
    rules = []
    for bs, assign in groups:
        lo, hi = cal.buckets[bs[0]][0], cal.buckets[bs[-1]][1]
        for kernel in sorted(set(assign) - {default}):
            layers = [layer for layer, k in zip(cal.layers, assign) if k == kernel]
            rule = {"name": f"{kernel}-steps-{lo}-{hi}", "kernel": kernel}
            if (lo, hi) != (0, cal.steps - 1):
                rule["steps"] = {"range": [lo, hi]}
            if len(layers) < len(cal.layers):
                rule["layers"] = layers
            rules.append(rule)
    policy = {"model": cal.model, "default": default, "rules": rules}
    return policy


def policy_yaml(cal: Calibration, policy: dict) -> str:
    import yaml
    prompts = "; ".join(p[:60] for p in cal.prompts[:5]) + (f" (+{len(cal.prompts) - 5} more)"
                                                            if len(cal.prompts) > 5 else "")
    header = [
        f"Calibrated by `python -m sage3_diffusers calibrate` on {datetime.date.today().isoformat()}.",
        f"model: {cal.model} -- {cal.description}",
        f"prompts ({len(cal.prompts)}): {prompts}",
        f"steps: {cal.steps} (step ranges below assume this count), buckets: {cal.buckets}",
        f"budget: {cal.budget} per layer and step bucket and on the final latent",
        f"target card: {cal.card or 'unknown'} (calibrated on: {cal.present})",
        f"speed: {'; '.join(cal.speed_sources)}",
        "errors measured with: " + "; ".join(f"{f}: {', '.join(sorted(b))}" for f, b in cal.measured_with.items()),
        f"predicted attention speed-up vs exact: {cal.predicted_speedup:.2f}x; measured final-latent error "
        f"vs exact: {_fmt_err(cal.budget, cal.final_error)}",
    ]
    body = yaml.safe_dump(policy, sort_keys=False, default_flow_style=None, width=110)
    return "".join(f"# {line}\n" for line in header) + body


def _fmt_err(budget: Budget, e):
    if e is None:
        return "not measured"
    if budget.metric == "cos":
        return f"cos {1 - e:.6f}" if e >= 1e-5 else f"cos 1-{e:.1e}"
    return f"rel_l1 {e:.3g}"


def final_error(budget: Budget, outs, exact) -> tuple[float, list]:
    metrics = [accuracy_metrics(o, e) for o, e in zip(outs, exact)]
    return max(budget.error(m) for m in metrics), metrics


@contextmanager
def _recording(recorder: _Recorder):
    from .. import dispatch
    dispatch._ensure_loaded()
    dispatch.register_backend(recorder)
    try:
        yield
    finally:
        dispatch._registry.pop(recorder.name, None)
        dispatch._cache.clear()


def calibrate(runner: _Runner, *, prompts, steps: int, budget: Budget, card: str | None, n_buckets=None,
              rounds: int = 4, seed: int = 0, speed_shape=None, log=print) -> Calibration:
    from .. import dispatch
    speed = SpeedModel(card)
    families = speed.families()
    buckets = step_buckets(steps, n_buckets)
    bucket_of = {s: i for i, (lo, hi) in enumerate(buckets) for s in range(lo, hi + 1)}.get
    present = detect_card() or "CPU"
    cal = Calibration(runner.family, runner.description, list(prompts), steps, buckets, budget, card, present,
                      [], families, {})
    if card is not None and card not in CARDS:
        cal.notes.append(f"card {card!r} is unknown (known: {', '.join(CARDS)}): {ASSUMPTION_SOURCE}")
    skipped = [f for f in CANDIDATES if f not in families]
    if skipped:
        cal.notes.append(f"{', '.join(skipped)}: no kernel on {card}, not a candidate")
    recorder = _Recorder(families, budget, bucket_of)
    previous_fallback = dispatch._fallback_override
    dispatch.set_fallback("emulate")  # a family without a kernel here runs its emulation, never another family
    try:
        # 1. exact run, measuring the candidates on each call
        t0 = time.perf_counter()
        with _recording(recorder):
            exact, runtime = runner.run(RECORDER, prompts, steps, seed, tap=recorder.tap)
        bad = [i for i, o in enumerate(exact) if not bool(torch.isfinite(o).all())]
        if bad:
            raise RuntimeError(f"calibrate: the exact run's final latent is not finite for prompt(s) {bad}: "
                               "nothing to calibrate against (random weights or a dtype that overflows?)")
        cal.errors = recorder.errors
        cal.measured_with = recorder.measured_with
        cal.layers = [layer for layer in runtime.layers if any(c[0] == layer for c in recorder.problems)]
        log(f"exact run + candidate measurements: {recorder.calls} attention calls, "
            f"{time.perf_counter() - t0:.1f} s")
        problems = recorder.problems
        if speed_shape is not None:
            problems = {cell: [replace(p, batch=speed_shape[0], heads_q=speed_shape[1], heads_kv=speed_shape[1],
                                       seq_q=speed_shape[2], seq_kv=speed_shape[2], head_dim=speed_shape[3],
                                       head_dim_v=speed_shape[3]) for p in calls]
                        for cell, calls in problems.items()}
        cal.problems = problems
        # 2-3. choose, verify, tighten
        allowed = budget.allowed
        for r in range(rounds + 1):
            choice = choose(cal, problems, speed, allowed)
            cal.choice = {(layer, b): k for (layer, b), k in choice.items()}
            policy = to_policy(cal)
            if all(k == "sdpa" for k in choice.values()):
                cal.final_error, cal.final_metrics = 0.0, []
                cal.rounds.append({"allowed_per_cell": allowed, "final_error": 0.0,
                                   "note": "exact everywhere: no verification needed"})
                break
            outs, run_rt = runner.run(policy, prompts, steps, seed)
            err, metrics = final_error(budget, outs, exact)
            backends = sorted({c.backend for c in run_rt.stats.calls})
            cal.rounds.append({"allowed_per_cell": allowed, "final_error": err, "backends": backends,
                               "kernels": dict(sorted(_count(choice).items()))})
            log(f"round {r}: per-cell budget {_fmt_err(budget, allowed)} -> {dict(_count(choice))}, final latent "
                f"{_fmt_err(budget, err)} ({'meets' if err <= budget.allowed else 'over'} budget {budget}); "
                f"backends {', '.join(backends)}")
            cal.final_error, cal.final_metrics = err, metrics
            if err <= budget.allowed:
                break
            quantized = sorted((cal.errors[c][k] for c, k in choice.items() if k != "sdpa"), reverse=True)
            # Halve the per-cell budget, and at least drop the worst cell, so every round changes the policy.
            allowed = min(allowed / 2, quantized[0] * (1 - 1e-9)) if quantized else 0.0
        else:
            cal.choice = {cell: "sdpa" for cell in cal.choice}
            choose(cal, problems, speed, -1.0)
            cal.final_error, cal.final_metrics = 0.0, []
            cal.notes.append(f"still over budget after {rounds} tightening rounds: exact SDPA everywhere")
        cal.speed_sources = sorted(speed.sources) or [ASSUMPTION_SOURCE]
        if speed_shape is not None:
            cal.speed_sources.append(f"speeds read at {runner.family}'s real attention shape "
                                     f"(batch, heads, seq, head dim) = {speed_shape}, not the tiny model's")
        for family, names in cal.measured_with.items():
            emulated = [n for n in names if n.startswith("reference_") or "emulated" in n]
            if emulated:
                cal.notes.append(f"{family} errors measured with the torch/emulated numerics ({', '.join(emulated)}): "
                                 f"this machine ({present}) has no {family} kernel")
    finally:
        dispatch.set_fallback(previous_fallback)
    return cal


def _count(choice):
    from collections import Counter
    return Counter(choice.values())


# ---------------------------------------------------------------------------------------------- outputs

def format_summary(cal: Calibration) -> str:
    lines = [f"calibrated {cal.model}: {cal.description}",
             f"  {len(cal.prompts)} prompt(s), {cal.steps} steps in {len(cal.buckets)} bucket(s), budget {cal.budget}, "
             f"target {cal.card or 'unknown card'} (running on {cal.present})"]
    lines += [f"  note: {n}" for n in cal.notes]
    lines += [f"  speed: {s}" for s in cal.speed_sources]
    lines.append(f"kernel per layer and step bucket, with its measured {cal.budget.metric} on the sampled calls:")
    lines.append(f"{'layer':44s} " + " ".join(f"{f'steps {lo}-{hi}':>26s}" for lo, hi in cal.buckets))
    for layer in cal.layers:
        cells = []
        for b in range(len(cal.buckets)):
            k = cal.choice.get((layer, b))
            errs = cal.errors.get((layer, b), {})
            if k is None:
                cells.append("-")
            elif k == "sdpa":  # exact; the most accurate candidate's error says by how much it missed
                alt = min(errs, key=errs.get, default=None)
                cells.append("sdpa" + (f" ({alt} {_fmt_err(cal.budget, errs[alt]).split()[-1]})" if alt else ""))
            else:
                cells.append(f"{k} {_fmt_err(cal.budget, errs[k]).split()[-1]}")
        lines.append(f"{layer:44s} " + " ".join(f"{c:>26s}" for c in cells))
    lines.append(f"predicted attention speed-up vs exact SDPA on {cal.card or 'the assumed card'}: "
                 f"{cal.predicted_speedup:.2f}x")
    if all(k == "sdpa" for k in cal.choice.values()):
        lines.append("final latent: identical to the exact run (exact SDPA everywhere, nothing to verify)")
    else:
        lines.append(f"measured final-latent error vs exact: {_fmt_err(cal.budget, cal.final_error)} "
                     f"(budget {cal.budget}, {len(cal.rounds)} verification round(s))")
    return "\n".join(lines)


def heat_map(cal: Calibration, path: str) -> bool:
    """Writes the PNG; False (nothing written) without matplotlib."""
    plt = headless_pyplot()
    if plt is None:
        return False
    from matplotlib.colors import ListedColormap
    kernels = ["sdpa", "int8_fp8", "fp4"]
    grid = [[kernels.index(cal.choice.get((layer, b), "sdpa")) for b in range(len(cal.buckets))]
            for layer in cal.layers]
    fig, ax = plt.subplots(figsize=(max(7.0, 2.5 + 1.3 * len(cal.buckets)), 1.5 + 0.35 * len(cal.layers)))
    ax.imshow(grid, cmap=ListedColormap(["#bbbbbb", "#4c72b0", "#dd8452"]), vmin=0, vmax=2, aspect="auto")
    for i, layer in enumerate(cal.layers):
        for b in range(len(cal.buckets)):
            k = cal.choice.get((layer, b), "sdpa")
            errs = cal.errors.get((layer, b), {})
            text = "exact" if k == "sdpa" else f"{k}\n{_fmt_err(cal.budget, errs.get(k)).split()[-1]}"
            alt = [f for f in cal.families if f != k and f in errs]
            if k == "sdpa" and alt:
                text += "\n" + "\n".join(f"({f} {_fmt_err(cal.budget, errs[f]).split()[-1]})" for f in alt)
            ax.text(b, i, text, ha="center", va="center", fontsize=6)
    ax.set_yticks(range(len(cal.layers)), cal.layers, fontsize=6)
    ax.set_xticks(range(len(cal.buckets)), [f"steps {lo}-{hi}" for lo, hi in cal.buckets], fontsize=7)
    ax.set_title(f"{cal.model}: kernel per layer x step bucket ({cal.budget.metric} of the chosen kernel)\n"
                 f"budget {cal.budget}, target {cal.card or 'unknown card'}\npredicted attention speed-up "
                 f"{cal.predicted_speedup:.2f}x, final latent {_fmt_err(cal.budget, cal.final_error)}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------- speed check

def _stamp(cuda: bool):
    if not cuda:
        return time.perf_counter()
    e = torch.cuda.Event(enable_timing=True)
    e.record()
    return e


def _elapsed_ms(start, end) -> float:
    return start.elapsed_time(end) if isinstance(start, torch.cuda.Event) else (end - start) * 1e3


@contextmanager
def _timed_attention(cuda: bool):
    """Time of every backend call (the attention op, quantization included), as (backend, start, end) stamps:
    CUDA events on a GPU (no sync per call), wall-clock on CPU."""
    from .. import dispatch
    dispatch._ensure_loaded()
    stamps: list = []
    patched = []
    for b in dispatch._registry.values():
        def timed(*a, _fwd=b.forward, _name=b.name, **kw):
            start = _stamp(cuda)
            out = _fwd(*a, **kw)
            stamps.append((_name, start, _stamp(cuda)))
            return out
        b.forward = timed  # instance attribute over the class method; deleted below
        patched.append(b)
    try:
        yield stamps
    finally:
        for b in patched:
            del b.forward


def measure_speed(runner: _SliceRunner, policy, steps: int, repeats: int = 3) -> dict:
    """Median over `repeats` of the whole denoising loop and of its attention ops, exact vs `policy`."""
    from .install import apply, remove
    cuda = next(runner.target.parameters()).device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    res = {}
    inputs = runner.inputs(0)
    for label, pol in (("exact", "sdpa"), ("policy", policy)):
        apply(runner.target, pol, num_inference_steps=steps, log_summary=False)
        totals, attn = [], []
        try:
            with torch.no_grad():
                runner.denoise(inputs, steps)  # warm-up (self-checks, Triton JIT, allocator)
                sync()
                for _ in range(repeats):
                    with _timed_attention(cuda) as stamps:
                        start = _stamp(cuda)
                        runner.denoise(inputs, steps)
                        end = _stamp(cuda)
                        sync()
                    totals.append(_elapsed_ms(start, end))
                    attn.append(sum(_elapsed_ms(a, b) for _, a, b in stamps))
                    backends = sorted({name for name, _, _ in stamps})
        finally:
            remove(runner.target)
        res[label] = {"loop_ms": statistics.median(totals), "attention_ms": statistics.median(attn),
                      "backends": backends}
    res["measured_attention_speedup"] = res["exact"]["attention_ms"] / res["policy"]["attention_ms"]
    res["measured_loop_speedup"] = res["exact"]["loop_ms"] / res["policy"]["loop_ms"]
    return res


# ---------------------------------------------------------------------------------------------- CLI

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="sage3-diffusers calibrate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", required=True, choices=_calibratable(), help="model family")
    ap.add_argument("--prompts", help="text file, one prompt per line (default: one built-in prompt)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default 28; 3 with --tiny)")
    ap.add_argument("--buckets", type=int, default=4, help="step buckets (policy step ranges); default 4")
    ap.add_argument("--budget", default="cos=0.999", help="cos=<min cos sim> or rel_l1=<max relative L1>, per "
                    "layer and step bucket and on the final latent (default cos=0.999)")
    ap.add_argument("--target", default=None, help=f"card the policy is for (default: this GPU); known: "
                    f"{', '.join(CARDS)}")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--tiny", action="store_true", help="tiny random pipeline, CPU, no download")
    mode.add_argument("--slice", default=None, metavar="BLOCKS", help="real-shape random-weight transformer "
                      "slice with these blocks per kind (e.g. 2,4 for Flux), on the GPU, no download")
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--frames", type=int)
    ap.add_argument("--rounds", type=int, default=4, help="max tightening rounds after the first verification")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--measure-speed", action="store_true", help="with --slice: time attention exact vs the "
                    "calibrated policy and compare with the predicted speed-up")
    ap.add_argument("--out", required=True, help="policy YAML to write")
    ap.add_argument("--plot", help="heat map PNG to write (layer x step bucket: kernel and its error)")
    ap.add_argument("--json", help="also write the calibration details as JSON")
    args = ap.parse_args(argv)
    try:
        budget = Budget.parse(args.budget)
    except ValueError as e:
        ap.error(str(e))
    prompts = list(DEFAULT_PROMPTS)
    if args.prompts:
        with open(args.prompts) as f:
            prompts = [line.strip() for line in f if line.strip()]
        if not prompts:
            ap.error(f"--prompts {args.prompts}: no prompts in the file")
    steps = args.steps or (3 if args.tiny else 28)
    if steps < 1:
        ap.error("--steps must be >= 1")
    card = args.target or detect_card()
    if card is not None and args.target and args.target not in CARDS:
        print(f"warning: --target {args.target!r} is not a known card ({', '.join(CARDS)}); {ASSUMPTION_SOURCE}")
    if args.slice:
        from ..bench_e2e import MODEL_CONFIGS
        if args.model not in MODEL_CONFIGS:
            ap.error(f"--slice: no real-shape config for {args.model!r}; available: {', '.join(sorted(MODEL_CONFIGS))}")
    if args.measure_speed and not args.slice:
        ap.error("--measure-speed needs --slice (a GPU run)")
    if (args.slice or not args.tiny) and not torch.cuda.is_available():
        ap.error("--slice and real weights need a CUDA GPU; use --tiny on CPU")
    if args.tiny:
        runner = _PipelineRunner(args.model, True, "cpu", torch.float32)
        speed_shape = real_attention(args.model)
    elif args.slice:
        layers = tuple(int(x) for x in args.slice.split(","))
        runner = _SliceRunner(args.model, layers, torch.device("cuda"), torch.bfloat16, args.height, args.width,
                              args.frames)
        speed_shape = None
    else:
        runner = _PipelineRunner(args.model, False, "cuda", torch.bfloat16)
        speed_shape = None
    cal = calibrate(runner, prompts=prompts, steps=steps, budget=budget, card=card, n_buckets=args.buckets,
                    rounds=args.rounds, seed=args.seed, speed_shape=speed_shape)
    policy = to_policy(cal)
    from .policy import load_policy
    text = policy_yaml(cal, policy)
    with open(args.out, "w") as f:
        f.write(text)
    load_policy(args.out)  # what we wrote loads as an ordinary policy
    print(format_summary(cal))
    print(f"wrote {args.out}")
    if args.plot:
        print(f"wrote {args.plot}" if heat_map(cal, args.plot) else "matplotlib not installed: no heat map")
    result = {"model": cal.model, "description": cal.description, "steps": cal.steps, "buckets": cal.buckets,
              "budget": str(cal.budget), "card": cal.card, "present": cal.present,
              "predicted_attention_speedup": cal.predicted_speedup, "final_error": cal.final_error,
              "final_metrics": cal.final_metrics, "rounds": cal.rounds, "notes": cal.notes,
              "speed_sources": cal.speed_sources, "policy": policy,
              "cells": [{"layer": layer, "bucket": b, "kernel": k, "errors": cal.errors.get((layer, b), {})}
                        for (layer, b), k in sorted(cal.choice.items())]}
    if args.measure_speed:
        speed = measure_speed(runner, policy, steps)
        result["speed"] = speed
        pred = cal.predicted_speedup
        meas = speed["measured_attention_speedup"]
        print(f"measured on {detect_card() or 'CPU'}, {steps} steps, median of 3 loops; backends exact "
              f"{', '.join(speed['exact']['backends'])}, policy {', '.join(speed['policy']['backends'])}")
        print(f"attention time, exact {speed['exact']['attention_ms']:.1f} ms vs policy "
              f"{speed['policy']['attention_ms']:.1f} ms: measured {meas:.2f}x, predicted {pred:.2f}x "
              f"(off by {100 * (pred / meas - 1):+.0f}%); whole loop {speed['exact']['loop_ms']:.1f} -> "
              f"{speed['policy']['loop_ms']:.1f} ms ({speed['measured_loop_speedup']:.2f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
