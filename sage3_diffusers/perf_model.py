"""Measured speed of each backend per card and per execution mode, so kernel="auto" (and a family with several
kernels) picks the fastest backend for a call instead of a fixed order.

Tables: `sage3_diffusers/data/perf/<card>.json`, one per card, keyed by the card's name as CUDA reports it
(`card_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"`; an H100 and an H200 are different cards). Each is
written by `python -m sage3_diffusers bench table <kernels.json>` from a `bench kernels --json` run and names
that run (file, date, command, versions). It holds TFLOPS of the whole call (quantization included) per backend,
per mode, per head dim, as (sequence length, TFLOPS) points; estimates interpolate linearly in log(sequence
length) (sqrt(Sq·Skv)) and hold the end values outside the measured range. Points of several shapes at the same
head dim and length are averaged.

Modes (how the call is run, see `bench kernels`):
  eager_single  one call between CUDA events (host launch cost exposed)
  eager_stream  calls back to back (the GPU-bound steady state inside a model)
  graph         CUDA-graph replays (no host cost)
  compile       a torch.compile'd function around the call, back to back
`current_mode()` says which mode a call runs in: "eager", "graph" (CUDA-graph capture) or "compile" (torch.compile
tracing); the dispatcher asks for the estimate of that mode (`DISPATCH_MODES`). "eager" is the conservative
choice: each backend's speed is the cuDNN-SDPA speed times the *smaller* of its eager ratios to SDPA, so a kernel
that loses to SDPA in either eager mode never wins the comparison. "graph" and "compile" read their own columns.
A table that lacks the requested mode has no estimate of it: the dispatcher asks with `stand_in=False` and never
decides from another mode's column (see `dispatch`). For people, `expected_speed` (by default) still answers from
the graph column (the only mode older tables have), and then says that it is standing in. A card with no table (or a
problem off CUDA) has no estimate at all: the dispatcher then uses the backends' static priorities.
"""
from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from importlib import resources

import torch

from .backends.base import AttentionProblem

MODES = ("eager_single", "eager_stream", "graph", "compile")
EAGER_MODES = ("eager_single", "eager_stream")
REQUEST_MODES = ("eager", *MODES)
DISPATCH_MODES = ("eager", "graph", "compile")  # what `current_mode()` returns
BASELINE = "sdpa"  # the backend every ratio is taken against (exact SDPA, cuDNN pinned first)
DATA_PACKAGE = "sage3_diffusers.data.perf"


def card_slug(name: str) -> str:
    """File key of a card: CUDA's device name lower-cased, the vendor prefix dropped, runs of other characters
    turned into '-': "NVIDIA H100 80GB HBM3" -> "h100-80gb-hbm3", "NVIDIA H200" -> "h200"."""
    s = name.strip().lower()
    s = re.sub(r"^nvidia\s+", "", s)
    return re.sub(r"[^a-z0-9]+", "-", s).strip("-")


@dataclass(frozen=True)
class PerfTable:
    card: str
    capability: tuple[int, int] | None
    source: dict
    modes: dict  # mode -> how it was timed
    tflops: dict  # backend -> mode -> head_dim (int) -> ((seq, tflops), ...)

    @property
    def describe_source(self) -> str:
        src = self.source
        return f"{self.card} table from {src.get('json', '?')} ({src.get('date', '?')})"

    @classmethod
    def from_dict(cls, d: dict) -> "PerfTable":
        tflops = {b: {m: {int(hd): tuple((int(s), float(t)) for s, t in pts) for hd, pts in per_d.items()}
                      for m, per_d in per_mode.items()}
                  for b, per_mode in d["tflops"].items()}
        cap = tuple(d["capability"]) if d.get("capability") else None
        return cls(card=d["card"], capability=cap, source=dict(d.get("source", {})), modes=dict(d["modes"]),
                   tflops=tflops)

    def points(self, backend: str, mode: str, head_dim: int):
        return self.tflops.get(backend, {}).get(mode, {}).get(head_dim)


@functools.lru_cache(maxsize=None)
def available_cards() -> tuple[str, ...]:
    """Slugs of the cards that have a table in this install."""
    try:
        files = resources.files(DATA_PACKAGE).iterdir()
    except (ModuleNotFoundError, FileNotFoundError):
        return ()
    return tuple(sorted(f.name[: -len(".json")] for f in files if f.name.endswith(".json")))


@functools.lru_cache(maxsize=None)
def load_table(slug: str) -> PerfTable | None:
    if slug not in available_cards():
        return None
    text = resources.files(DATA_PACKAGE).joinpath(f"{slug}.json").read_text()
    return PerfTable.from_dict(json.loads(text))


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def current_card() -> str | None:
    """CUDA's name for the current device, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return _device_name(torch.cuda.current_device())


def resolve_card(name: str) -> str | None:
    """The slug of the shipped table a user's card name means: a slug, a CUDA device name, or a unique prefix
    of one ("H100" -> "h100-80gb-hbm3"); None when no table matches or the prefix is ambiguous."""
    slug = card_slug(name)
    cards = available_cards()
    if slug in cards:
        return slug
    matches = [c for c in cards if c.startswith(slug)]
    return matches[0] if len(matches) == 1 else None


def table_for(problem: AttentionProblem, card: str | None = None) -> PerfTable | None:
    """The table of `card` (a slug, see `resolve_card`), by default the current card's, for a CUDA problem;
    None off CUDA, for a card without a table, or when the table's compute capability differs from the
    problem's (a table never speaks for another GPU)."""
    if problem.device_type != "cuda":
        return None
    if card is None:
        card = current_card()
        if card is None:
            return None
    table = load_table(card_slug(card))
    if table is None or (table.capability is not None and problem.capability is not None
                         and tuple(problem.capability) != table.capability):
        return None
    return table


_CUDA_BUILT = torch.backends.cuda.is_built()


def current_mode() -> str:
    """How the calling code runs right now: "compile" while torch.compile traces (also inside a
    torch._dynamo.assume_constant_result function called from traced code: what is traced is what later runs),
    "graph" while a CUDA graph is being captured on the current stream, else "eager". Cheap (a flag and, with a
    CUDA build, one query that never initializes CUDA): the dispatcher's hot path calls it on every call."""
    if torch.compiler.is_compiling():
        return "compile"
    # Capture needs an initialized CUDA context; asking without one would fail where no GPU is visible.
    if _CUDA_BUILT and torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
        return "graph"
    return "eager"


def _interp(points, seq: float) -> float:
    x = math.log(max(seq, 1.0))
    xs = [math.log(s) for s, _ in points]
    if x <= xs[0]:
        return points[0][1]
    for (x0, (_, y0)), (x1, (_, y1)) in zip(zip(xs, points), zip(xs[1:], points[1:])):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return points[-1][1]


@dataclass(frozen=True)
class Estimate:
    tflops: float
    mode: str  # the requested mode ("eager", "graph", ...)
    measured_as: str  # the table column(s) it came from, e.g. "min(eager_single, eager_stream) ratio to sdpa"
    source: str  # card, file and date of the measurement

    def __str__(self) -> str:
        return f"~{self.tflops:.0f} TFLOPS ({self.mode}: {self.measured_as}; {self.source})"


def _column(table: PerfTable, backend: str, mode: str, head_dim: int, seq: float) -> float | None:
    pts = table.points(backend, mode, head_dim)
    return None if not pts else _interp(pts, seq)


def _eager_estimate(table: PerfTable, backend: str, hd: int, seq: float) -> Estimate | None:
    ratios = {}
    for m in EAGER_MODES:
        ours, base = _column(table, backend, m, hd, seq), _column(table, BASELINE, m, hd, seq)
        if ours is not None and base:
            ratios[m] = ours / base
    if not ratios:
        return None
    ref_mode = "eager_stream" if "eager_stream" in ratios else next(iter(ratios))
    worst = min(ratios, key=ratios.get)
    tf = _column(table, BASELINE, ref_mode, hd, seq) * ratios[worst]
    how = (f"{BASELINE} {ref_mode} x the smaller ratio to {BASELINE} over "
           f"{', '.join(ratios)} ({worst}: {ratios[worst]:.2f}x)")
    return Estimate(tf, "eager", how, table.describe_source)


def _estimate(table: PerfTable, backend: str, p: AttentionProblem, mode: str, stand_in: bool) -> Estimate | None:
    """The estimate of `mode` from its own column(s); with `stand_in`, the graph column where those are missing."""
    seq = math.sqrt(p.seq_q * p.seq_kv)
    hd = p.head_dim
    if mode == "eager":
        est = _eager_estimate(table, backend, hd, seq)
    else:
        tf = _column(table, backend, mode, hd, seq)
        est = None if tf is None else Estimate(tf, mode, mode, table.describe_source)
    if est is not None or not stand_in or mode == "graph":
        return est
    tf = _column(table, backend, "graph", hd, seq)
    why = "no eager measurement" if mode == "eager" else f"no {mode} measurement"
    return None if tf is None else Estimate(tf, mode, f"graph column, standing in for {mode}: this card's table "
                                                     f"has {why} for this call", table.describe_source)


def expected_speed(backend_name: str, problem: AttentionProblem, mode: str = "eager",
                   card: str | None = None, stand_in: bool = True) -> Estimate | None:
    """The estimate for this call in `mode` ("eager", "graph", "compile" or one table column), with where it came
    from; None off CUDA, for a card without a table, or a backend / head dim never measured. `stand_in`: where the
    table lacks `mode` for this call, answer from its graph column (and say so) instead of None; for people
    only, the dispatcher never does. `card`: a table slug (`resolve_card`) to ask about another card than the
    one present."""
    if mode not in REQUEST_MODES:
        raise ValueError(f"unknown mode {mode!r}; allowed: {REQUEST_MODES}")
    table = table_for(problem, card)
    return None if table is None else _estimate(table, backend_name, problem, mode, stand_in)


def estimated_tflops(backend_name: str, problem: AttentionProblem, mode: str = "eager",
                     card: str | None = None) -> float | None:
    """`expected_speed(...).tflops` (stand-ins included), or None. The default mode is the conservative eager
    estimate."""
    est = expected_speed(backend_name, problem, mode, card)
    return None if est is None else est.tflops


def describe(problem: AttentionProblem | None = None) -> str:
    """One line on what decides "fastest" here: the current card's table (and its source), or why there is none
    and static priorities decide."""
    if problem is not None and problem.device_type != "cuda":
        return f"no speed table off CUDA ({problem.device_type}): static priorities decide"
    card = current_card()
    if card is None:
        return "no CUDA device: no speed table, static priorities decide"
    table = load_table(card_slug(card))
    if table is None:
        known = ", ".join(available_cards()) or "none"
        return f"no speed table for {card!r} (tables: {known}): static priorities decide"
    if problem is not None and table.capability is not None and tuple(problem.capability or ()) != table.capability:
        return (f"the {card} table is for sm_{table.capability[0]}{table.capability[1]}, this call's device is "
                f"{problem.capability}: static priorities decide")
    eager = [m for m in EAGER_MODES if m in table.modes]
    how, missing = [], []
    for mode in DISPATCH_MODES:
        cols = eager if mode == "eager" else [mode] if mode in table.modes else []
        if not cols:
            missing.append(mode)
            how.append(f"{mode} calls: no {mode} measurement on this card")
        elif mode == "eager":
            how.append(f"eager calls by the smaller ratio to {BASELINE} over {', '.join(cols)}")
        else:
            how.append(f"{mode} calls by the {mode} column")
    if missing:
        how.append(f"in {', '.join(missing)} calls kernel='auto' runs exact {BASELINE} and a family its kernels by "
                   f"priority")
    return f"{table.describe_source}; modes {', '.join(table.modes)}; {'; '.join(how)}"
