"""Which attention kernel ran, per layer and denoising step, and why (fallback reasons).

Every processor call records one entry: (generation, step, layer, requested kernel, backend that ran,
reason when the backend is not what was requested or the call went to exact SDPA on purpose).
`KernelStats.summary_line()` is the one log line per generation.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

logger = logging.getLogger("sage3_diffusers")


@dataclass(frozen=True)
class AttentionCall:
    generation: int
    step: int | None         # denoising step within the generation (None: unknown)
    layer: str               # module name, e.g. "transformer_blocks.3.attn"
    requested: str           # kernel the policy asked for ("fp4", "int8_fp8", "sdpa" or a backend name)
    backend: str             # backend that ran (e.g. "sdpa", "reference_fp4", "cuda_sm90_int8_fp8")
    reason: str | None       # why the backend differs from the request / why exact SDPA was used


class KernelStats:
    """Collected calls. `calls` is the raw list; helpers aggregate it."""

    def __init__(self, max_calls: int = 200_000):
        self.calls: list[AttentionCall] = []
        self.max_calls = max_calls  # bound memory in long-running processes: the oldest half is dropped

    def record(self, generation, step, layer, requested, backend, reason=None) -> None:
        if len(self.calls) >= self.max_calls:
            del self.calls[: len(self.calls) // 2]
        self.calls.append(AttentionCall(generation, step, layer, requested, backend, reason))

    def reset(self) -> None:
        self.calls.clear()

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
