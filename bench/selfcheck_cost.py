"""Cost of the fail-closed self-check (sage3_diffusers/selfcheck.py), per check, printed as a table.

    python bench/selfcheck_cost.py [--json out.json]

A check runs once per (backend, device, dtype, head dim, layout, causal) per process. On a GPU this times every
compiled backend that can run here; on CPU (no compiled kernel can run) it times the same check with the torch
emulations of the two families in the compiled kernel's place, which is what a CPU-only test of the check costs.
Each row: the first check (includes one-time work: extension import, Triton JIT, allocator warm-up) and the median
of the following ones.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from sage3_diffusers import dispatch, selfcheck
from sage3_diffusers.backends.base import AttentionProblem, device_capability


def problem(head_dim: int, dtype, device: torch.device) -> AttentionProblem:
    return AttentionProblem(batch=1, heads_q=selfcheck.HEADS, heads_kv=selfcheck.HEADS, seq_q=selfcheck.SEQ_Q,
                            seq_kv=selfcheck.SEQ_KV, head_dim=head_dim, head_dim_v=head_dim, dtype=dtype,
                            device_type=device.type, capability=device_capability(device), layout="HND",
                            is_causal=False, return_lse=False, has_mask=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    on_cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
    card = torch.cuda.get_device_name() if on_cuda else "CPU"
    rows = []
    for hd in (64, 128):
        p = problem(hd, torch.bfloat16, device)
        if on_cuda:
            backends = [b for b in dispatch.list_backends()
                        if selfcheck.needs_check(b) and not dispatch.backend_reasons(b, p)]
        else:
            backends = [dispatch.get_backend("reference_int8_fp8"), dispatch.get_backend("reference_fp4")]
        for b in backends:
            times, result = [], None
            for _ in range(1 + args.repeats):
                result = selfcheck.run_check(b, p)
                times.append(result.seconds)
            rows.append({"backend": b.name, "head_dim": hd, "dtype": "bfloat16", "device": str(device),
                         "first_ms": times[0] * 1e3, "median_ms": statistics.median(times[1:]) * 1e3,
                         "passed": result.passed, "cos_sim": result.cos_sim, "detail": result.detail})
    print(f"self-check cost on {card} (problem: 1 x {selfcheck.HEADS} heads, Sq {selfcheck.SEQ_Q}, "
          f"Skv {selfcheck.SEQ_KV}, bf16, HND; once per backend/device/dtype/head dim/layout/causal per process)")
    print(f"{'backend':<22} {'hd':>4} {'first ms':>9} {'median ms':>10} {'cos sim':>9}  result")
    for r in rows:
        cos = f"{r['cos_sim']:.5f}" if r["cos_sim"] is not None else "-"
        print(f"{r['backend']:<22} {r['head_dim']:>4} {r['first_ms']:>9.2f} {r['median_ms']:>10.3f} {cos:>9}  "
              f"{'passed' if r['passed'] else 'FAILED: ' + r['detail']}")
    if not rows:
        print("no compiled backend can run here")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": card, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "rows": rows},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
