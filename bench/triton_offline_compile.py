"""Compile the Triton INT8/FP8 kernels for sm_90 without a GPU and report what the compiler made of them:
registers, spills, shared memory, and instruction counts of the attention kernel's main loop (PTX and SASS).

python bench/triton_offline_compile.py [--dump DIR] [--only attn|quant]
Uses triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32)) and the ptxas/nvdisasm that ship with
Triton; nothing here needs CUDA. The SASS loop statistics are for the steady-state (unmasked) key-tile loop:
the largest backward-branch body in the SASS.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from sage3_diffusers.kernels.triton import int8fp8 as I  # noqa: E402
from sage3_diffusers.kernels.triton import int8fp8_attn as A  # noqa: E402
from sage3_diffusers.kernels.triton import int8fp8_quant as Q  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def _sig(fn, types: dict, consts: dict):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        else:
            sig[name] = types.get(name, "i32")
    return sig


def compile_kernel(fn, types, consts, num_warps=4, num_stages=3):
    """As the launcher would specialize it for contiguous inputs: unit last-dim strides are constexpr 1, other
    strides and every pointer divisible by 16."""
    consts = dict(consts)
    for n in fn.arg_names:
        if re.fullmatch(r"stride_\w*d", n) and n not in consts:
            consts[n] = 1
    sig = _sig(fn, types, consts)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n].startswith("*") or (n.startswith("stride_") and sig[n] == "i32")}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs=attrs)
    return triton.compile(src, target=TARGET, options=dict(num_warps=num_warps, num_stages=num_stages))


def _nvdisasm():
    from triton.backends.nvidia import compiler as nvc
    path = os.path.join(os.path.dirname(nvc.__file__), "bin", "nvdisasm")
    return path if os.path.exists(path) else None


def sass_text(k):
    exe = _nvdisasm()
    if exe is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
        name = f.name
    try:
        return subprocess.run([exe, "-c", name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(name)


def resource_usage(k):
    """(registers, spill stores bytes, stack bytes) from cuobjdump -res-usage of the cubin."""
    from triton.backends.nvidia import compiler as nvc
    exe = os.path.join(os.path.dirname(nvc.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
        name = f.name
    try:
        txt = subprocess.run([exe, "-res-usage", name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(name)
    reg = re.search(r"REG:(\d+)", txt)
    stack = re.search(r"STACK:(\d+)", txt)
    return (int(reg.group(1)) if reg else -1, int(stack.group(1)) if stack else -1)


def _loops(sass: str):
    """(start_label_line, end_line, body) of each backward branch in nvdisasm output."""
    lines = sass.splitlines()
    label_at = {}
    for i, ln in enumerate(lines):
        m = re.match(r"^\s*\.?(L_x_\d+):", ln)
        if m:
            label_at[m.group(1)] = i
    loops = []
    for i, ln in enumerate(lines):
        # loop back-edges are predicated; the unconditional backward BRAs return from out-of-line mbarrier waits
        m = re.search(r"@!?P\d\s+BRA\b.*?\.(L_x_\d+)", ln)
        if m and m.group(1) in label_at and label_at[m.group(1)] < i:
            body = [x for x in lines[label_at[m.group(1)]:i + 1] if re.search(r"/\*[0-9a-f]{4}\*/", x)]
            loops.append(body)
    return loops


def _opcode(line):
    m = re.search(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
    return m.group(1).split(".")[0] if m else None


def report(name, k, want_loop=True):
    md = k.metadata
    ptx = k.asm["ptx"]
    n_mbar = len(re.findall(r"mbarrier\.", ptx))
    n_cpa = len(re.findall(r"cp\.async\.(?:ca|cg)", ptx))
    regs, stack = resource_usage(k)
    line = (f"{name}: regs {regs}, stack {stack} B, shared {md.shared} B, "
            f"setmaxnreg {ptx.count('setmaxnreg')}, mbarrier ops {n_mbar}, "
            f"cp.async.bulk {ptx.count('cp.async.bulk')}, cp.async {n_cpa}, "
            f"wgmma {ptx.count('wgmma.mma_async')}, wgmma.wait {ptx.count('wgmma.wait_group')}")
    print(line)
    if not want_loop:
        return
    sass = sass_text(k)
    if sass is None:
        print("  (no nvdisasm)")
        return
    loops = sorted(_loops(sass), key=len, reverse=True)
    if not loops:
        print("  (no loop found)")
        return
    # the two largest loops: the masked (last tiles) and the unmasked (steady-state) key-tile loops
    for body in loops[:2]:
        ops = Counter(filter(None, (_opcode(x) for x in body)))
        top = ", ".join(f"{o} {c}" for o, c in ops.most_common(14))
        print(f"  loop: {len(body)} SASS instr per key tile ({top})")


def attn_types(d, use_tma=True):
    t = {n: "*fp32" for n in ("qsc_ptr", "ks_ptr", "vs_ptr", "kmean_ptr", "lse_ptr")}
    t.update(q_ptr="*bf16", o_ptr="*bf16", qi_ptr="*i8", k_ptr="*i8", v_ptr="*fp8e4nv", kv_lens_ptr="*i32",
             qk_scale="fp32", sm_scale="fp32")
    for n in ("stride_qb", "stride_qh", "stride_qs", "stride_qd", "stride_ob", "stride_oh", "stride_os", "stride_od"):
        t[n] = "i32"
    if use_tma:
        t["qi_desc"] = f"tensordesc<i8[64, {d}]>"
        t["k_desc"] = f"tensordesc<i8[128, {d}]>"
        t["v_desc"] = f"tensordesc<fp8e4nv[{d}, 128]>"
    return t


def attn_consts(d, bm=64, stages=3, use_tma=True, **extra):
    c = dict(D=d, BM=bm, BN=128, IS_CAUSAL=False, RETURN_LSE=False, PV_FP8=True, USE_TMA=use_tma, STAGES=stages,
             KG=0, HAS_KV_LENS=False, kv_lens_ptr=None)
    if not use_tma:
        c.update(qi_desc=None, k_desc=None, v_desc=None)
    c.update(extra)
    if c["HAS_KV_LENS"]:
        del c["kv_lens_ptr"]  # a real pointer argument
    return {k: v for k, v in c.items() if k in A._int8fp8_attn_kernel.arg_names}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump", help="write .ptx/.sass of each kernel into this folder")
    ap.add_argument("--only", choices=("attn", "quant"))
    ap.add_argument("--variants", default="", help="comma-separated attention variant names (default: all)")
    a = ap.parse_args(argv)
    print("triton", triton.__version__, "target", TARGET)
    out = []
    if a.only in (None, "quant"):
        out += quant_kernels()
    if a.only in (None, "attn"):
        out += attn_kernels(a.variants.split(",") if a.variants else None)
    for name, k, loop in out:
        report(name, k, loop)
        if a.dump:
            os.makedirs(a.dump, exist_ok=True)
            fn = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
            with open(os.path.join(a.dump, fn + ".ptx"), "w") as f:
                f.write(k.asm["ptx"])
            s = sass_text(k)
            if s:
                with open(os.path.join(a.dump, fn + ".sass"), "w") as f:
                    f.write(s)


def _strides(prefix, names="bhsd"):
    return {f"stride_{prefix}{c}": "i32" for c in names}


def quant_kernels():
    res = []
    ptrs = dict(k_ptr="*bf16", v_ptr="*bf16", q_ptr="*bf16", ksum_ptr="*fp32", vmax_ptr="*fp32", qi_ptr="*i8",
                qs_ptr="*fp32", kq_ptr="*i8", kscale_ptr="*fp32", kmean_ptr="*fp32", vq_ptr="*fp8e4nv",
                vscale_ptr="*fp32")
    for d in (128, 64):
        t = dict(ptrs, **_strides("k"), **_strides("v"), **_strides("q"))
        # the launch parameters of `int8fp8.quantize` (per_thread, k_block = q_block = 128)
        k = compile_kernel(Q._kv_stats_kernel, t, dict(D=d, BLOCK_S=I._STATS_BLOCK_S), num_warps=4)
        res.append((f"kv stats hd{d}", k, False))
        k = compile_kernel(Q._qkv_quant_kernel, t, dict(D=d, K_BLOCK=128, SUB=I._QUANT_SUB, K_PER_THREAD=True,
                                                        V_FP8=True, UNROLL=I._QUANT_UNROLL, SMOOTH_K=True,
                                                        CHUNKS_P2=64, BM=I._Q_QUANT_BM, Q_PER_THREAD=True,
                                                        Q_BLOCK=128),
                           num_warps=I._QUANT_WARPS)
        res.append((f"qkv quant hd{d}", k, False))
    return res


# K's three groupings: 4 K scales per key tile (per_thread, k_block 128: the default), 1 (per_block, k_block a
# multiple of 128), 0 (the others: per-score K scale); and the default with per-sample key lengths.
ATTN_VARIANTS = {
    "kg4": dict(KG=4),
    "kg1": dict(KG=1),
    "kg0": dict(KG=0),
    "kg4_kv_lens": dict(KG=4, HAS_KV_LENS=True),
}


def attn_kernels(names=None):
    res = []
    for d in (128, 64):
        for name, extra in ATTN_VARIANTS.items():
            if names and name not in names:
                continue
            k = compile_kernel(A._int8fp8_attn_kernel, attn_types(d), attn_consts(d, **extra), num_warps=4,
                               num_stages=3)
            res.append((f"attn hd{d} {name}", k, True))
    return res


if __name__ == "__main__":
    main()
