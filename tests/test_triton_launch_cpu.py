"""Direct launches of cached Triton kernels (kernels/triton/launch.py): when a call may skip `JITFunction.run`,
and what it passes the launcher then. Small fakes stand in for Triton's JITFunction, CompiledKernel and launcher
(no GPU, no triton needed); the tests at the end check the installed Triton itself and our launch plans' keys
where triton is importable."""
import importlib.util
import os
from types import SimpleNamespace

import pytest
import torch

from sage3_diffusers.kernels.triton import launch as L

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


class FakeHookChain:
    def __init__(self):
        self.calls = []


class FakeLauncher:
    """Triton's CudaLauncher as the fast path sees it: the C entry `launch` (recorded) and its options."""

    def __init__(self, log, tag="direct"):
        self.log, self.tag = log, tag
        self.global_scratch_size = self.profile_scratch_size = 0
        self.launch_cooperative_grid, self.launch_pdl = False, True

    def launch(self, *args):
        self.log.append((self.tag, args))

    def __call__(self, gridX, gridY, gridZ, stream, function, *args):
        raise AssertionError("the fast path calls the launcher's entry, not its wrapper")


class FakeCompiled:
    def __init__(self, spec, log, function):
        self.spec, self.function, self.packed_metadata = spec, function, (4, 1, 1024)
        self.run = FakeLauncher(log)


class FakeJIT:
    """A kernel (x_ptr, n, scale, BLOCK: constexpr, D: constexpr) whose specialization is each tensor's 16-byte
    alignment and each integer's value class, as Triton's."""

    arg_names = ["x_ptr", "n", "scale", "BLOCK", "D"]

    def __init__(self):
        self.pre_run_hooks, self.kernels, self.log = [], {}, []

    def __getitem__(self, grid):
        def run(*args, **meta):
            spec = tuple((x.data_ptr() % 16 == 0) if isinstance(x, torch.Tensor) else
                         (x == 1, x % 16 == 0) if isinstance(x, int) else type(x) for x in args)
            spec += (tuple(sorted(meta.items())), L._knobs.runtime.debug)
            self.log.append(("triton", grid, args, meta))
            if spec not in self.kernels:
                self.kernels[spec] = FakeCompiled(spec, self.log, function=1000 + len(self.kernels))
            return self.kernels[spec]
        return run


@pytest.fixture
def fake_triton(monkeypatch):
    knobs = SimpleNamespace(runtime=SimpleNamespace(launch_enter_hook=FakeHookChain(),
                                                    launch_exit_hook=FakeHookChain(), debug=False),
                            compilation=SimpleNamespace(instrumentation_mode=""))
    for name, value in dict(_knobs=knobs, _HookChain=FakeHookChain, _JITFunction=FakeJIT,
                            _CompiledKernel=FakeCompiled, _Launcher=FakeLauncher, DIRECT_LAUNCH=True,
                            _current_device=lambda: 0, _current_stream=lambda dev: 0x5000 + dev).items():
        monkeypatch.setattr(L, name, value)
    return knobs


META = dict(D=64, num_warps=4, BLOCK=32)  # constexprs in another order than the signature's, one option


def _launch(kl, x, n=64, scale=0.5):
    kl.launch((L.aligned(x),), x, n, scale)


def _kinds(fn):
    return [entry[0] for entry in fn.log]


def test_second_call_launches_directly_with_tritons_arguments(fake_triton):
    fn, x = FakeJIT(), torch.zeros(64)
    kl = L.KernelLaunch(fn, (3, 2), META)
    _launch(kl, x)
    _launch(kl, x, scale=0.25)
    assert _kinds(fn) == ["triton", "direct"]
    kernel = fn.kernels[next(iter(fn.kernels))]
    # grid (z = 1), the current stream, the function, launch options, no scratch, packed metadata, no launch
    # metadata or hooks, the arguments, then the constexprs in signature order (BLOCK, D)
    assert fn.log[1][1] == (3, 2, 1, 0x5000, kernel.function, False, True, None, None, (4, 1, 1024), None, None,
                            None, x, 64, 0.25, 32, 64)


def test_other_alignment_does_not_reuse_the_kernel(fake_triton):
    fn = FakeJIT()
    buf = torch.zeros(256, dtype=torch.uint8)
    base = (16 - buf.data_ptr() % 16) % 16
    x_al, x_un = buf[base:base + 64], buf[base + 1:base + 65]
    assert L.aligned(x_al) and not L.aligned(x_un)
    kl = L.KernelLaunch(fn, (1,), META)
    for x in (x_al, x_al, x_un, x_un, x_al, x_un):
        _launch(kl, x)
    assert _kinds(fn) == ["triton", "direct", "triton", "direct", "direct", "direct"]
    functions = [e[1][4] for e in fn.log if e[0] == "direct"]
    k_al, k_un = (fn.kernels[s].function for s in fn.kernels)
    assert k_al != k_un and functions == [k_al, k_un, k_al, k_un]


def test_key_none_and_switches_go_through_triton(fake_triton, monkeypatch):
    fn, x = FakeJIT(), torch.zeros(64)
    kl = L.KernelLaunch(fn, (1,), META)
    _launch(kl, x)
    kl.launch(None, x, 64, 0.5)                     # no key: the caller cannot vouch for its arguments
    monkeypatch.setattr(L, "DIRECT_LAUNCH", False)
    _launch(kl, x)
    monkeypatch.setattr(L, "DIRECT_LAUNCH", True)
    fake_triton.runtime.launch_enter_hook.calls.append(print)  # a launch hook: Triton calls it
    _launch(kl, x)
    fake_triton.runtime.launch_enter_hook.calls.clear()
    fake_triton.runtime.launch_exit_hook = print                # a hook set as a plain function
    _launch(kl, x)
    fake_triton.runtime.launch_exit_hook = None
    fn.pre_run_hooks.append(lambda *a, **k: None)
    _launch(kl, x)
    fn.pre_run_hooks.clear()
    _launch(kl, x)
    assert _kinds(fn) == ["triton"] * 6 + ["direct"]


def test_debug_knob_and_device_are_part_of_the_key(fake_triton, monkeypatch):
    fn, x = FakeJIT(), torch.zeros(64)
    kl = L.KernelLaunch(fn, (1,), META)
    _launch(kl, x)
    fake_triton.runtime.debug = True          # Triton compiles another kernel under debug
    _launch(kl, x)
    _launch(kl, x)
    fake_triton.runtime.debug = False
    monkeypatch.setattr(L, "_current_device", lambda: 1)
    _launch(kl, x)
    _launch(kl, x)
    assert _kinds(fn) == ["triton", "triton", "direct", "triton", "direct"]
    assert fn.log[2][1][3] == 0x5000 and fn.log[4][1][3] == 0x5001   # the stream of the current device
    debug_kernel = [k for s, k in fn.kernels.items() if s[-1]][0]
    assert fn.log[2][1][4] == debug_kernel.function


def test_declines_what_it_cannot_launch(fake_triton):
    x = torch.zeros(64)
    fn = FakeJIT()                             # a launcher that needs scratch memory
    kl = L.KernelLaunch(fn, (1,), META)
    _launch(kl, x)
    next(iter(fn.kernels.values())).run.global_scratch_size = 128
    kl.direct.clear()
    _launch(kl, x)
    _launch(kl, x)
    assert _kinds(fn) == ["triton"] * 3
    fn = FakeJIT()                             # a meta key that is neither a parameter nor a known option
    kl = L.KernelLaunch(fn, (1,), dict(META, num_ctas=2))
    _launch(kl, x)
    _launch(kl, x)
    assert _kinds(fn) == ["triton"] * 2
    fn = FakeJIT()                             # not a JITFunction (the interpreter's, an autotuner)
    kl = L.KernelLaunch(fn, (1,), META)
    kl.jit = False
    _launch(kl, x)
    _launch(kl, x)
    assert _kinds(fn) == ["triton"] * 2


def test_env_switch(monkeypatch):
    for value, on in (("0", False), ("off", False), ("1", True), ("", True), ("yes", True)):
        monkeypatch.setenv("SAGE3_TRITON_DIRECT_LAUNCH", value)
        assert L.env_enabled() is on
    monkeypatch.delenv("SAGE3_TRITON_DIRECT_LAUNCH")
    assert L.env_enabled()
    monkeypatch.setenv("SAGE3_TRITON_DIRECT_LAUNCH", "fast")
    with pytest.raises(ValueError, match="SAGE3_TRITON_DIRECT_LAUNCH"):
        L.env_enabled()


# Sources of a Triton runtime as the fast path expects it (the fragments it checks), to vary one piece at a time.
class GoodJIT:
    def run(self, *args, grid, warmup, **kwargs):
        kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug  # noqa: F821
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode  # noqa: F821
        device = driver.active.get_current_device()  # noqa: F821
        stream = driver.active.get_current_stream(device)
        for hook in self.pre_run_hooks:
            hook(*args, **kwargs)
        kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata,  # noqa: F821
                   launch_metadata, knobs.runtime.launch_enter_hook,  # noqa: F821
                   knobs.runtime.launch_exit_hook, *bound_args.values())  # noqa: F821


class GoodDriver:
    def __init__(self):
        from torch._C import _cuda_getCurrentRawStream
        self.get_current_stream = _cuda_getCurrentRawStream
        self.get_current_device = torch.cuda.current_device


class GoodCompiled:
    run = property(lambda self: None)


class GoodLauncher:
    def __call__(self, gridX, gridY, gridZ, stream, function, *args):
        def allocate_scratch(size):
            if size > 0:
                return size
        self.launch(gridX, gridY, gridZ, stream, function, self.launch_cooperative_grid, self.launch_pdl,
                    global_scratch, profile_scratch, *args)  # noqa: F821


class OtherLauncher:  # the grid as one argument
    def __call__(self, grid, stream, function, *args):
        self.launch(grid, stream, function, *args)


class OtherJIT:  # launch metadata built into the launcher call
    def run(self, *args, grid, warmup, **kwargs):
        kernel.run(grid, stream, kernel.function, *bound_args.values())  # noqa: F821


GOOD_KNOBS = SimpleNamespace(runtime=SimpleNamespace(launch_enter_hook=None, launch_exit_hook=None, debug=False,
                                                     interpret=False),
                             compilation=SimpleNamespace(instrumentation_mode=""))


def test_runtime_check_accepts_the_expected_shape_and_names_each_difference():
    good = (GoodJIT, GoodCompiled, GoodLauncher, GoodDriver, "iiiKKppOOOOOO", GOOD_KNOBS)
    assert L.runtime_problem(*good) is None

    def problem(i, value):
        args = list(good)
        args[i] = value
        return L.runtime_problem(*args)
    assert "launcher's signature is (self, grid, stream, function, args)" in problem(2, OtherLauncher)
    assert "JITFunction.run" in problem(0, OtherJIT)
    assert "device and stream" in problem(3, object)
    assert "CompiledKernel.run" in problem(1, SimpleNamespace(run=lambda self: None))
    assert "base arguments" in problem(4, "iiiKKpOOOOOO")
    interp = SimpleNamespace(runtime=SimpleNamespace(**vars(GOOD_KNOBS.runtime)), compilation=GOOD_KNOBS.compilation)
    interp.runtime.interpret = True
    assert "interpreter" in problem(5, interp)
    no_hooks = SimpleNamespace(runtime=SimpleNamespace(debug=False, interpret=False),
                               compilation=GOOD_KNOBS.compilation)
    assert "launch hooks" in problem(5, no_hooks)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_installed_triton_is_recognised_or_refused_with_a_reason():
    if INTERPRET:
        assert L.UNSUPPORTED and "interpreter" in L.UNSUPPORTED and not L.DIRECT_LAUNCH
    else:
        import triton
        if triton.__version__.startswith("3.6."):
            assert L.UNSUPPORTED is None, L.UNSUPPORTED   # the Triton this fast path was written against
        assert isinstance(L.UNSUPPORTED, (str, type(None)))


@pytest.mark.skipif(not HAS_TRITON or INTERPRET, reason="needs triton (compiled mode: JITFunction kernels)")
def test_plan_keys_follow_caller_alignment(fake_triton, monkeypatch):
    """The quantization and attention plans of int8fp8.py: a repeated call launches directly, a caller tensor at
    another 16-byte alignment (or another dtype of q, which the attention plan does not fix) goes through Triton
    and compiles its own kernel."""
    from sage3_diffusers.kernels.triton import int8fp8 as m
    monkeypatch.setattr(L, "_JITFunction", type(m._kv_stats_kernel))
    monkeypatch.setattr(m, "_quant_plans", {})
    monkeypatch.setattr(m, "_attn_plans", {})
    log, compiled = [], {}

    def through_triton(name):
        def run(*args, **meta):
            spec = tuple((x.data_ptr() % 16 == 0, x.dtype) if isinstance(x, torch.Tensor) else type(x)
                         for x in args)
            log.append(name)
            if (name, spec) not in compiled:
                compiled[name, spec] = FakeCompiled(spec, log, function=len(compiled))
                compiled[name, spec].run.tag = name + " direct"
            return compiled[name, spec]
        return run

    b, h, s, d = 1, 2, 40, 64
    n = b * h * s * d
    buf = torch.zeros(n + 16, dtype=torch.float16)
    off = (16 - buf.data_ptr() % 16) % 16 // 2
    q, q_un = buf[off:off + n].view(b, h, s, d), buf[off + 1:off + 1 + n].view(b, h, s, d)  # 2 bytes apart
    assert L.aligned(q) and not L.aligned(q_un) and q.stride() == q_un.stride()
    k, v = torch.randn(b, h, s, d).half(), torch.randn(b, h, s, d).half()
    plan = m._quant_plan(q, k, v, "HND", "per_thread", 128, 128, True, True)
    assert m._quant_plan(q_un, k, v, "HND", "per_thread", 128, 128, True, True) is plan
    plan.stats_launch.through_triton = through_triton("stats")
    plan.quant_launch.through_triton = through_triton("quant")
    for x in (q, q, q_un, q_un, q):
        kv, q_quant, ws_al = plan.run(x, k, v)
    sd, qd = "stats direct", "quant direct"
    assert [e if isinstance(e, str) else e[0] for e in log] == \
        ["stats", "quant", sd, qd, sd, "quant", sd, qd, sd, qd]

    log.clear()
    attn = m._attn_plan(q, "HND", kv, False, False, False, m.AttnConfig(64, 4, 3), False)
    attn.launch.through_triton = through_triton("attn")
    for x in (q, q, q_un, q, q.float(), q.float()):
        attn.run(x, kv, q_quant, torch.empty_like(x), attn.out_strides, q_quant[1], None, 0.125, ws_al)
    assert [e if isinstance(e, str) else e[0] for e in log] == \
        ["attn", "attn direct", "attn", "attn direct", "attn", "attn direct"]


@pytest.mark.skipif(not HAS_TRITON or INTERPRET, reason="needs triton (compiled mode: JITFunction kernels)")
def test_direct_launch_passes_what_tritons_own_run_passes(monkeypatch):
    """The installed Triton's `JITFunction.run` (its binder, native specialization, cache key, launch metadata and
    the real CudaLauncher wrapper) against the direct launch, on our K/V statistics kernel with CPU tensors: the
    compiler and the C launch entry are replaced by recorders. The direct launch must hand the entry the same
    arguments, except no launch metadata and no hooks (none is set); and it must come back to Triton exactly when
    Triton's own specialization (tensor alignment) asks for another compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaLauncher
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime.driver import driver

    from sage3_diffusers.kernels.triton import int8fp8 as m
    from sage3_diffusers.kernels.triton.int8fp8_quant import _kv_stats_kernel as fn

    entry_log, compiles = [], []
    fake_driver = SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda dev: 0x5000,
                                  get_current_target=lambda: GPUTarget("cuda", 90, 32))
    monkeypatch.setattr(driver, "_active", fake_driver)
    monkeypatch.setattr(L, "_current_device", lambda: 0)
    monkeypatch.setattr(L, "_current_stream", lambda dev: 0x5000)
    monkeypatch.setattr(fn, "device_caches", type(fn.device_caches)(fn.create_binder))

    def compile_(key, signature, device, constexprs, options, attrs, warmup):
        launcher = object.__new__(CudaLauncher)
        launcher.__dict__.update(num_ctas=1, launch=lambda *a: entry_log.append(a), global_scratch_size=0,
                                 profile_scratch_size=0, global_scratch_align=1, profile_scratch_align=1,
                                 launch_cooperative_grid=False, launch_pdl=False)
        kernel = object.__new__(CompiledKernel)
        kernel.__dict__.update(_run=launcher, module=object(), function=7000 + len(compiles), name="k", src=None,
                               packed_metadata=(4, 1, 0))
        compiles.append(attrs)
        fn.device_caches[device][0][key] = kernel
        return kernel
    monkeypatch.setattr(fn, "_do_compile", compile_)

    b, h, s, d = 1, 2, 40, 64
    n = b * h * s * d
    buf = torch.zeros(n + 16, dtype=torch.float16)
    off = (16 - buf.data_ptr() % 16) % 16 // 2
    k_al, k_un = buf[off:off + n].view(b, h, s, d), buf[off + 1:off + 1 + n].view(b, h, s, d)
    v = torch.randn(b, h, s, d).half()
    monkeypatch.setattr(m, "_quant_plans", {})
    plan = m._quant_plan(k_al, k_al, v, "HND", "per_thread", 128, 128, True, True)
    kl = plan.stats_launch
    ws = torch.empty(plan.ws_bytes, dtype=torch.uint8)
    ksum, vmax = plan.views(ws)[:2]
    ks_, vs_, ints = plan.stats_args

    def call(k):
        kl.launch((L.aligned(k), L.aligned(v), L.aligned(ws)), k, *ks_, v, *vs_, ksum, vmax, *ints)

    for k in (k_al, k_al, k_un, k_un, k_al):
        call(k)
    assert len(compiles) == 2                      # Triton specialized on k's alignment: two kernels
    assert len(entry_log) == 5
    by_triton, direct = entry_log[0], entry_log[1]
    assert len(by_triton) == len(direct) == 13 + len(fn.arg_names)
    assert direct[:10] == by_triton[:10] and direct[13:] == by_triton[13:]
    assert direct[10:13] == (None, None, None)
    assert type(by_triton[11]) is triton.knobs.HookChain and not by_triton[11].calls
    assert by_triton[3] == 0x5000 and by_triton[4] == 7000
    assert entry_log[2][4] == 7001 and entry_log[3][4] == 7001 and entry_log[4][4] == 7000
    assert entry_log[2][10] is not None and entry_log[3][10] is None   # the unaligned k: Triton first, then direct
    # a launch hook set: the launch goes through Triton again, which hands the entry its hook chain
    seen = []
    triton.knobs.runtime.launch_enter_hook.add(seen.append)
    try:
        call(k_al)
    finally:
        triton.knobs.runtime.launch_enter_hook.remove(seen.append)
    assert len(entry_log) == 6 and entry_log[-1][11] is triton.knobs.runtime.launch_enter_hook


@pytest.mark.skipif(not HAS_TRITON or INTERPRET, reason="needs triton (compiled mode: JITFunction kernels)")
@pytest.mark.parametrize("use_tma,return_lse,layout", [(False, True, "NHD"), (True, False, "HND"),
                                                       (True, True, "NHD")])
def test_int8fp8_attention_direct_arguments_match_tritons(fake_triton, monkeypatch, use_tma, return_lse, layout):
    """`int8fp8_attention` end to end on CPU tensors with recording kernels: the second call launches the three
    kernels directly, with the workspace's buffers as addresses; each argument must be what the first call gave
    Triton (the same caller tensor, the same offset into the workspace, the same descriptor, the same number)."""
    from sage3_diffusers.kernels.triton import int8fp8 as m
    from triton.tools.tensor_descriptor import TensorDescriptor

    class RecordingJIT(FakeJIT):
        def __init__(self, name, real):
            super().__init__()
            self.name, self.arg_names, self.log = name, real.arg_names, log

        def __getitem__(self, grid):
            def run(*args, **meta):
                log.append(("triton", self.name, args))
                kernel = FakeCompiled(None, log, function=self.name)
                kernel.run.tag = "direct"
                return kernel
            return run

    log = []
    monkeypatch.setattr(L, "_JITFunction", RecordingJIT)
    for name in ("_kv_stats_kernel", "_qkv_quant_kernel", "_int8fp8_attn_kernel"):
        monkeypatch.setattr(m, name, RecordingJIT(name, getattr(m, name)))
    for cache in ("_calls", "_quant_plans", "_attn_plans"):
        monkeypatch.setattr(m, cache, {})
    b, h, hkv, s, d = 2, 4, 2, 70, 64
    shape = (lambda hh: (b, hh, s, d)) if layout == "HND" else (lambda hh: (b, s, hh, d))
    q, k, v = torch.randn(shape(h)).half(), torch.randn(shape(hkv)).half(), torch.randn(shape(hkv)).half()
    kw = dict(layout=layout, pv_fp8=True, use_tma=use_tma, config=m.AttnConfig(64, 4, 3), return_lse=return_lse,
              sm_scale=1)
    out1, lse1 = m.int8fp8_attention(q, k, v, **kw)
    assert [e[:2] for e in log] == [("triton", "_kv_stats_kernel"), ("triton", "_qkv_quant_kernel"),
                                    ("triton", "_int8fp8_attn_kernel")]
    out2, lse2 = m.int8fp8_attention(q, k, v, **kw)
    assert [e[0] for e in log[3:]] == ["direct"] * 3
    assert (lse1 is None) == (lse2 is None) == (not return_lse) and out2.shape == q.shape
    ws_base = {"triton": log[0][2][10].data_ptr(), "direct": log[3][1][13 + 10]}  # ksum: offset 0
    for (_, name, by_triton), (_, entry_args) in zip(log[:3], log[3:]):
        assert entry_args[4] == name                       # the function handle of that kernel
        direct, tail = entry_args[13:13 + len(by_triton)], entry_args[13 + len(by_triton):]
        kernel = getattr(m, name)
        assert len(by_triton) + len(tail) == len(kernel.arg_names)
        for i, (t, dd) in enumerate(zip(by_triton, direct)):
            where = f"{name} argument {kernel.arg_names[i]}"
            if isinstance(dd, int) and isinstance(t, torch.Tensor):    # a workspace buffer by its address
                assert dd - ws_base["direct"] == t.data_ptr() - ws_base["triton"], where
            elif isinstance(t, torch.Tensor):
                assert t is dd or (t.shape, t.stride(), t.dtype) == (dd.shape, dd.stride(), dd.dtype), where
                assert t is dd or not any(t is x for x in (q, k, v)), where  # caller tensors: the same
            elif isinstance(t, TensorDescriptor):
                assert (dd.base.data_ptr() - ws_base["direct"] == t.base.data_ptr() - ws_base["triton"]), where
                assert (t.shape, t.strides, t.block_shape, t.padding) == \
                    (dd.shape, dd.strides, dd.block_shape, dd.padding), where
            else:
                assert type(t) is type(dd) and t == dd, where
        assert any(isinstance(x, int) and not isinstance(x, bool) and x > 1 << 20 for x in direct)
    # sm_scale=1 arrives as a float in both (an int 1 would specialize the kernel)
    assert log[2][2][-1] == 1.0 and type(log[2][2][-1]) is float
    if return_lse:  # a caller's LSE buffer 4 bytes off a 16-byte boundary: the attention kernel's own key
        del log[:]
        buf = torch.empty(b * h * s + 8)
        off = (16 - buf.data_ptr() % 16) % 16 // 4
        lse_un = buf[off + 1:off + 1 + b * h * s].view(b, h, s)
        for _ in range(2):
            assert m.int8fp8_attention(q, k, v, **kw, lse=lse_un)[1] is lse_un
        assert [e[0] if e[0] == "direct" else e[1] for e in log] == ["direct", "direct", "_int8fp8_attn_kernel"] + \
            ["direct"] * 3
