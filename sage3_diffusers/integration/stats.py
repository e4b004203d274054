"""Which attention kernel ran, per layer and denoising step, and why (fallback reasons).

Every processor call records one entry: (generation, step, layer, requested kernel, backend that ran,
reason when the backend is not what was requested or the call went to exact SDPA on purpose).
`KernelStats.summary_line()` is the one log line per generation.

Inside torch.compile'd code nothing is appended: a list append makes dynamo guard on the list's length (a new
graph every call), and so would a dict keyed by layer name (a guard on the name: one graph per block under
regional compile). Each layer instead has a `CallSlot` (`KernelStats.slot(layer)`, made eagerly: `apply` puts it
on the attention module); compiled code sets the slot's `call` to constants (no guard), and
`flush_compiled(generation, step)` turns the filled slots into calls: the runtime flushes after each eager
forward and each scheduler step; reading `calls` flushes what is left. A compiled layer therefore counts once
per flush, not once per call.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import NamedTuple

logger = logging.getLogger("sage3_diffusers")


class CallSlot:
    """The last call of one layer made inside compiled code: (requested, backend, reason), or None."""

    __slots__ = ("layer", "call")

    def __init__(self, layer: str):
        self.layer = layer
        self.call: tuple | None = None


class AttentionCall(NamedTuple):
    generation: int
    step: int | None         # denoising step within the generation (None: unknown)
    layer: str               # module name, e.g. "transformer_blocks.3.attn"
    requested: str           # kernel the policy asked for ("fp4", "int8_fp8", "sdpa" or a backend name)
    backend: str             # backend that ran (e.g. "sdpa", "reference_fp4", "cuda_sm90_int8_fp8")
    reason: str | None       # why the backend differs from the request / why exact SDPA was used


class KernelStats:
    """Collected calls. `calls` is the raw list; helpers aggregate it."""

    def __init__(self, max_calls: int = 200_000):
        self._calls: list[AttentionCall] = []
        self._slots: dict[str, CallSlot] = {}
        # (generation, step) that calls still in slots belong to: the runtime sets its own.
        self.position_of = lambda: (0, None)
        self.max_calls = max_calls  # bound memory in long-running processes: the oldest half is dropped

    @property
    def calls(self) -> list[AttentionCall]:
        if any(slot.call is not None for slot in self._slots.values()):
            self.flush_compiled(*self.position_of())
        return self._calls

    def record(self, generation, step, layer, requested, backend, reason=None) -> None:
        """One eager call (in compiled code, set the layer's slot instead)."""
        calls = self._calls
        if len(calls) >= self.max_calls:
            del calls[: len(calls) // 2]
        calls.append(AttentionCall(generation, step, layer, requested, backend, reason))

    def slot(self, layer: str) -> CallSlot:
        """The layer's slot for calls made in compiled code (made here, eagerly, on first request)."""
        slot = self._slots.get(layer)
        if slot is None:
            slot = self._slots[layer] = CallSlot(layer)
        return slot

    def flush_compiled(self, generation, step) -> None:
        """The filled slots as calls of (generation, step), one per layer; the slots are emptied."""
        for slot in self._slots.values():
            if slot.call is not None:
                call, slot.call = slot.call, None
                self.record(generation, step, slot.layer, *call)

    def reset(self) -> None:
        self._calls.clear()
        for slot in self._slots.values():
            slot.call = None

    def generation(self, gen: int | None = None) -> list[AttentionCall]:
        """Calls of one generation (default: the latest one recorded)."""
        if not self.calls:
            return []
        gen = self.calls[-1].generation if gen is None else gen
        return [c for c in self.calls if c.generation == gen]

    def backends_by_step(self, calls=None) -> dict:
        """{step: {backend: count}} for `calls` (default: the latest generation)."""
        out: dict = {}
        for c in self.generation() if calls is None else calls:
            out.setdefault(c.step, Counter())[c.backend] += 1
        return {k: dict(v) for k, v in out.items()}

    def requested_by_step(self, calls=None) -> dict:
        """{step: {requested kernel: count}} for `calls` (default: the latest generation)."""
        out: dict = {}
        for c in self.generation() if calls is None else calls:
            out.setdefault(c.step, Counter())[c.requested] += 1
        return {k: dict(v) for k, v in out.items()}

    def fallbacks(self, calls=None) -> dict:
        """{(requested, backend, reason): count} for the calls (default: the latest generation) with a reason."""
        return dict(Counter((c.requested, c.backend, c.reason) for c in (self.generation() if calls is None
                                                                        else calls) if c.reason))

    def table(self, gen: int | None = None) -> list[dict]:
        """Per (step, layer): the backends that ran and the reasons (JSON-friendly)."""
        rows: dict = {}
        for c in self.generation(gen):
            r = rows.setdefault((c.step, c.layer), {"step": c.step, "layer": c.layer, "requested": c.requested,
                                                   "backends": Counter(), "reasons": set()})
            r["backends"][c.backend] += 1
            if c.reason:
                r["reasons"].add(c.reason)
        return [dict(r, backends=dict(r["backends"]), reasons=sorted(r["reasons"])) for r in rows.values()]

    def summary_line(self, gen: int | None = None) -> str:
        calls = self.generation(gen)
        if not calls:
            return "sage3: no attention calls recorded"
        steps = sorted({c.step for c in calls if c.step is not None})
        total = len(calls)
        per_backend = Counter(c.backend for c in calls)
        parts = ", ".join(f"{b} {n} ({100.0 * n / total:.0f}%)" for b, n in per_backend.most_common())
        by_step = self.requested_by_step(calls)
        schedule = " ".join(
            f"{s}:{'+'.join(sorted(by_step[s]))}" for s in steps) if len(steps) <= 12 else f"{len(steps)} steps"
        fb = self.fallbacks(calls)
        fb_text = "; ".join(f"{req}->{be} x{n}: {why}" for (req, be, why), n in sorted(fb.items(), key=str))
        return (f"sage3: generation {calls[0].generation}, {len(steps)} steps, {total} attention calls: {parts}"
                f" | kernels by step {schedule}" + (f" | exact/fallback: {fb_text}" if fb_text else ""))

    def log_summary(self, gen: int | None = None) -> str:
        line = self.summary_line(gen)
        logger.info(line)
        return line


# Calls made by processors that are not attached to a runtime (plain `set_attn_processor`).
GLOBAL_STATS = KernelStats()
