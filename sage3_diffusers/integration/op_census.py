"""What a transformer's attention layers execute besides attention: the aten ops inside every attention module's
forward, diffusers' default processors against ours (`apply(kernel="sdpa")`, so both compute the same attention
and only the surrounding work differs). CPU, tiny models of the registry.

Extra ops around attention cost on the GPU twice: each is a launch the host pays on every call, and each op that
writes a q/k/v-sized tensor (a copy, a layout change, a cast, a gather) is memory traffic the default does not
have. `census(family)` counts both per forward; `python -m sage3_diffusers.integration.op_census [FAMILY ...]`
prints what ours runs that the default does not (op, input shapes, count).

Views (outputs aliasing an input: view, transpose, slice, ...) write nothing and are listed but not counted as
bytes; every other op's outputs are counted as bytes written.
"""
from __future__ import annotations

import argparse
import math
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import models


def _is_view(func) -> bool:
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def _shapes(args) -> tuple:
    """Input shapes, those of tensor lists (cat, stack) included, in order."""
    shapes = []
    for a in args:
        if isinstance(a, torch.Tensor):
            shapes.append(tuple(a.shape))
        elif isinstance(a, (list, tuple)):
            shapes.extend(tuple(t.shape) for t in a if isinstance(t, torch.Tensor))
    return tuple(shapes)


def _out_bytes(out) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    if isinstance(out, (tuple, list)):
        return sum(_out_bytes(o) for o in out)
    return 0


# Ops that only move or re-lay data (no arithmetic): what a processor adds when it copies, changes layouts,
# casts, joins or gathers tokens.
COPY_OPS = frozenset({"copy_", "clone", "contiguous", "_to_copy", "cat", "stack", "index", "index_select", "gather",
                      "_unsafe_view", "constant_pad_nd", "repeat_interleave", "repeat", "expand_copy",
                      "index_put_", "index_copy_", "new_zeros", "zeros", "where"})


def _work_items(ops: Counter):
    for (op, shapes, view), n in ops.items():
        if not view:
            yield from [(op, tuple(math.prod(s) for s in shapes))] * n


@dataclass
class Census:
    """The ops run inside attention modules during one forward: `ops[(op, input shapes)] = count`, the bytes
    their non-view outputs hold, and how many attention-module calls there were."""
    ops: Counter = field(default_factory=Counter)
    bytes_written: int = 0
    calls: int = 0

    @property
    def op_count(self) -> int:
        return sum(self.ops.values())

    @property
    def compute_ops(self) -> Counter:
        """Ops that are not views: the ones that launch a kernel on a GPU."""
        return Counter({k: n for k, n in self.ops.items() if not k[2]})

    @property
    def work(self) -> Counter:
        """Non-view ops by (op, input element counts): the same work in another layout (B, S, H, D against
        B, H, S, D) is the same entry."""
        return Counter(_work_items(self.ops))

    def extra_over(self, other: Census) -> Counter:
        """Non-view work (see `work`) this census runs more often than `other`, with how many more."""
        return self.work - other.work

    def copy_ops(self) -> int:
        """How many copy-making ops ran (`COPY_OPS`)."""
        return sum(n for (op, _, view), n in self.ops.items() if op in COPY_OPS and not view)


class _Counter(TorchDispatchMode):
    def __init__(self, census: Census):
        super().__init__()
        self.census = census
        self.depth = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.depth:
            view = _is_view(func)
            self.census.ops[(str(func.overloadpacket.__name__), _shapes(args), view)] += 1
            if not view:
                self.census.bytes_written += _out_bytes(out)
        return out


def _attention_modules(model, spec: models.ModelFamily):
    """The modules holding a processor of the family (the default's or ours): the attention layers."""
    served = set(spec.attention_processors) | set(spec.exact_processors)
    ours = spec.processor
    return [m for m in model.modules()
            if type(getattr(m, "processor", None)).__name__ in served
            or (ours is not None and isinstance(getattr(m, "processor", None), ours))]


def count_forward(model, inputs: dict, spec: models.ModelFamily) -> Census:
    """The census of one forward of `model` on `inputs` (no grad)."""
    census = Census()
    counter = _Counter(census)
    handles = []

    def enter(module, args, kwargs=None):
        counter.depth += 1
        census.calls += 1

    def leave(module, args, *rest):
        counter.depth -= 1

    for m in _attention_modules(model, spec):
        handles.append(m.register_forward_pre_hook(enter))
        handles.append(m.register_forward_hook(leave))
    try:
        with torch.no_grad(), counter:
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return census


def census(family: str, *, layers: int = 2, kernel: str = "sdpa") -> tuple[Census, Census]:
    """(default processors, ours with `kernel`) for one forward of the family's tiny transformer (batch 2, unequal
    text lengths where the family takes a text mask)."""
    from .install import apply, remove
    from .tiny import tiny_transformer, transformer_inputs

    spec = models.get(family)
    model = tiny_transformer(family, layers=layers)
    lengths = [9, 5] if spec.mask_kwarg else None
    inputs = transformer_inputs(family, seed=0, text_lengths=lengths)
    default = count_forward(model, inputs, spec)
    apply(model, kernel=kernel, log_summary=False)
    try:
        ours = count_forward(model, inputs, spec)
    finally:
        remove(model)
    return default, ours


def _report(family: str) -> str:
    default, ours = census(family)
    lines = [f"{family} ({models.get(family).route} route): {default.calls} attention calls; "
             f"ops default {default.op_count} (non-view {sum(default.compute_ops.values())}), "
             f"ours {ours.op_count} (non-view {sum(ours.compute_ops.values())}); bytes written default "
             f"{default.bytes_written}, ours {ours.bytes_written}; copy-making ops default {default.copy_ops()}, "
             f"ours {ours.copy_ops()}"]
    for label, extra in (("ours only", ours.extra_over(default)), ("default only", default.extra_over(ours))):
        for (op, numels), n in sorted(extra.items()):
            lines.append(f"  {label}: {n} x {op} (input elements {list(numels)})")
    return "\n".join(lines)


def main(argv=None):
    names = [f.name for f in models.families() if f.tiny_transformer is not None]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("families", nargs="*", default=names, help=f"default: all ({', '.join(names)})")
    args = parser.parse_args(argv)
    for family in args.families:
        print(_report(family), flush=True)


if __name__ == "__main__":
    main()
