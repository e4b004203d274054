"""Calls a compiled extension's quantize entry point with bad arguments and reports what came back. Run in a
child process: a crash (signal) shows as the exit status instead of taking the caller down. Sessions saw C++
error paths crash the process on the GPU machine; this records whether they still do."""
import importlib
import sys

import torch

name = sys.argv[1]
ext = importlib.import_module(f"sage3_diffusers.{name}")
bad = torch.zeros(3, device="cuda")  # wrong rank and dtype
args = {"_C_sm90": (bad, bad, bad, False), "_C_fp4": (bad, bad, bad, bad, bad)}[name]
try:
    res = ext.quantize(*args)
    print(f"{name}.quantize(bad) returned {str(res)[:200]!r}")
except Exception as e:
    print(f"{name}.quantize(bad) raised {type(e).__name__}: {str(e)[:200]}")
print("ok: answered without crashing")
