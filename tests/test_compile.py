"""torch.compile with our processors or dispatcher backend installed, the scenarios diffusers' compile tests run,
on CPU with tiny models: fullgraph without recompiles, dynamic shapes across resolutions, regional compile
(`compile_repeated_blocks`) across resolutions and kernel switches, `torch.export` of a masked HunyuanVideo
batch, the dispatcher route compiled, a compiled pipeline whose steps come from its scheduler, and `auto` under
dynamic shapes guarding only where its choice changes. Outputs equal eager. Most use dynamo with the "eager"
backend (graph capture, guards and recompiles are dynamo's; the op-level compilers are exercised once each with
"aot_eager" and in tests/test_integration_pipelines.py with inductor), to keep the suite short."""
import contextlib
import os

import pytest
import torch

pytest.importorskip("diffusers")
import torch._dynamo  # noqa: E402

import sage3_diffusers as s3  # noqa: E402
from sage3_diffusers import dispatch  # noqa: E402
from sage3_diffusers.backends.base import AttentionBackend  # noqa: E402
from sage3_diffusers.integration import GLOBAL_STATS, apply, remove  # noqa: E402
from sage3_diffusers.integration.tiny import (pipeline_call_kwargs, tiny_pipeline, tiny_transformer,  # noqa: E402
                                              transformer_inputs)

ATOL = 1e-5


def fresh_seed():
    return int.from_bytes(os.urandom(4), "little") % (2 ** 31)


@pytest.fixture(autouse=True)
def _setup():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        s3.set_fallback("emulate")
        yield
        s3.set_fallback(None)
    torch._dynamo.reset()


def _graphs():
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@contextlib.contextmanager
def _no_recompile():
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield


@contextlib.contextmanager
def _no_duck_shapes():
    # As diffusers' test_compile_on_different_shapes: every dimension its own symbol.
    old = torch.fx.experimental._config.use_duck_shape
    torch.fx.experimental._config.use_duck_shape = False
    try:
        yield
    finally:
        torch.fx.experimental._config.use_duck_shape = old


def _inputs(family, seed, grid=None):
    lengths = {"hunyuan_video": [12, 7], "mochi": [11, 4], "qwenimage": [10, 5], "ltx": [10, 5]}.get(family)
    return transformer_inputs(family, seed=seed, text_lengths=lengths, grid=grid)


@pytest.mark.parametrize("family,kernel,backend", [("flux", "sdpa", "eager"), ("sd3", "sdpa", "eager"),
                                                   ("mochi", "sdpa", "eager"), ("qwenimage", "sdpa", "eager"),
                                                   ("ltx", "sdpa", "eager"),
                                                   ("hunyuan_video", "reference_int8_fp8", "aot_eager")])
def test_fullgraph_twice_without_recompile_equals_eager(family, kernel, backend):
    seed = fresh_seed()
    model = tiny_transformer(family, layers=1, seed=seed % 1000)
    inputs = _inputs(family, seed)
    if family == "mochi":  # a text mask with a hole: valid text first, on the device
        inputs["encoder_attention_mask"][0, 2] = False
    runtime = apply(model, kernel=kernel, log_summary=False)
    ref = model(**inputs)[0]
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out = compiled(**inputs)[0]
    with _no_recompile():
        out2 = compiled(**inputs)[0]
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0, msg=f"seed {seed}")
    torch.testing.assert_close(out2, ref, atol=ATOL, rtol=0, msg=f"seed {seed}")
    assert _graphs() == 1
    ran = {c.backend for c in runtime.stats.calls if c.reason is None}
    assert ran == {kernel}, ran
    if family == "ltx":  # its additive text mask goes to SDPA as given: nothing to explain
        assert all(c.backend == "sdpa" and c.reason is None for c in runtime.stats.calls)
    remove(model)


def test_compiled_quantized_kernel_runs_an_additive_mask_as_exact_sdpa_with_the_reason():
    from sage3_diffusers.integration.dispatcher_backend import _make_backend_fn
    from sage3_diffusers.integration.stats import GLOBAL_STATS
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, n, 2, 16, generator=g) for n in (9, 13, 13))
    bias = torch.zeros(2, 2, 1, 13)
    bias[1, :, :, 7:] = -10000.0  # LTX's additive text mask, repeated over heads
    fn = _make_backend_fn("compile_test", "reference_int8_fp8")
    GLOBAL_STATS.reset()
    out = torch.compile(fn, fullgraph=True, backend="eager")(q, k, v, attn_mask=bias)
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           attn_mask=bias).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0, msg=f"seed {seed}")
    calls = GLOBAL_STATS.calls
    assert calls and calls[-1].backend == "sdpa" and "only boolean key masks" in calls[-1].reason


@pytest.mark.parametrize("family,grids", [("flux", [(1, 4, 4), (1, 4, 8), (1, 8, 6)]),
                                          ("hunyuan_video", [(2, 4, 4), (2, 4, 6), (3, 6, 4)])])
def test_dynamic_shapes_three_resolutions_one_graph(family, grids):
    seed = fresh_seed()
    model = tiny_transformer(family, layers=1, seed=seed % 1000)
    apply(model, kernel="sdpa", log_summary=False)
    refs = [model(**_inputs(family, seed + i, g))[0] for i, g in enumerate(grids)]
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="eager")
    with _no_duck_shapes(), _no_recompile():
        for i, g in enumerate(grids):
            out = compiled(**_inputs(family, seed + i, g))[0]
            torch.testing.assert_close(out, refs[i], atol=ATOL, rtol=0, msg=f"seed {seed} grid {g}")
    assert _graphs() == 1
    remove(model)


def test_regional_compile_three_resolutions_and_kernel_switches():
    """compile_repeated_blocks(fullgraph=True): the step hook runs eagerly around the compiled blocks. With two
    kernels in play (the hybrid policy) there are at most twice the graphs diffusers' default processors need
    over the same resolutions (each kernel choice its own graph, shared by the blocks), and a second generation
    recompiles nothing."""
    seed = fresh_seed()
    grids = [(1, 4, 4), (1, 4, 8), (1, 8, 6)]
    ts = [1.0, 0.5, 0.25]
    default = tiny_transformer("flux", layers=1, seed=seed % 1000)
    default.compile_repeated_blocks(fullgraph=True, backend="eager")
    for i, g in enumerate(grids):
        default(**transformer_inputs("flux", seed=seed + i, grid=g))
    baseline = _graphs()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()

    model = tiny_transformer("flux", layers=1, seed=seed % 1000)
    runtime = apply(model, num_inference_steps=3, log_summary=False)  # int8_fp8, fp4, int8_fp8
    refs = [[model(**transformer_inputs("flux", seed=seed + i, grid=g, timestep=t))[0] for t in ts]
            for i, g in enumerate(grids)]
    model.compile_repeated_blocks(fullgraph=True, backend="eager")
    for gen in range(2):
        with _no_recompile() if gen else contextlib.nullcontext():
            for i, g in enumerate(grids):
                for j, t in enumerate(ts):
                    out = model(**transformer_inputs("flux", seed=seed + i, grid=g, timestep=t))[0]
                    torch.testing.assert_close(out, refs[i][j], atol=ATOL, rtol=0, msg=f"seed {seed} grid {g} t {t}")
        if gen == 0:
            assert _graphs() <= 2 * baseline, (_graphs(), baseline)
    by_step = runtime.stats.requested_by_step(runtime.stats.generation())
    assert {s: set(k) for s, k in by_step.items()} == {0: {"int8_fp8"}, 1: {"fp4"}, 2: {"int8_fp8"}}
    remove(model)


def test_export_masked_hunyuan_video_batch_without_host_reads():
    seed = fresh_seed()
    model = tiny_transformer("hunyuan_video", layers=1, seed=seed % 1000)
    inputs = _inputs("hunyuan_video", seed)  # text lengths 12 and 7: unequal, padded
    ref = model(**inputs)[0]
    apply(model, kernel="sdpa", log_summary=False)
    program = torch.export.export(model, args=(), kwargs=inputs)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any(t.startswith(("aten._local_scalar_dense", "aten.item")) for t in targets), targets  # no sync
    torch.testing.assert_close(program.module()(**inputs)[0], ref, atol=ATOL, rtol=0, msg=f"seed {seed}")
    other = _inputs("hunyuan_video", seed + 1)  # other values and text lengths, same shapes: same program
    other["encoder_attention_mask"] = (torch.arange(12)[None, :] < torch.tensor([[5], [12]])).long()
    eager_other = model(**other)[0]
    remove(model)
    torch.testing.assert_close(program.module()(**other)[0], eager_other, atol=ATOL, rtol=0, msg=f"seed {seed}")


@pytest.mark.parametrize("family", ["flux", "hunyuan_video"])
def test_dispatcher_route_compiles_fullgraph(family):
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
    initial = _AttentionBackendRegistry._active_backend
    seed = fresh_seed()
    model = tiny_transformer(family, layers=1, seed=seed % 1000)
    inputs = _inputs(family, seed)
    try:
        model.set_attention_backend("sage2pp")
        ref = model(**inputs)[0]  # eager, the emulated int8_fp8 kernel
        GLOBAL_STATS.reset()
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        out = compiled(**inputs)[0]
        with _no_recompile():
            out2 = compiled(**inputs)[0]
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0, msg=f"seed {seed}")
        torch.testing.assert_close(out2, ref, atol=ATOL, rtol=0, msg=f"seed {seed}")
        calls = [c for c in GLOBAL_STATS.calls if c.layer == "<dispatcher:sage2pp>"]
        assert calls and {c.backend for c in calls} == {"reference_int8_fp8"}
    finally:
        model.reset_attention_backend()
        _AttentionBackendRegistry.set_active_backend(initial if initial is not None else AttentionBackendName.NATIVE)


def test_compiled_pipeline_takes_its_steps_from_the_scheduler():
    """The whole transformer compiled (its step hook traced, reading nothing): the scheduler wrapper of
    `apply(pipe)` advances the step, so the hybrid policy still runs int8_fp8 on the first and last steps."""
    steps = 4
    pipe = tiny_pipeline("flux", layers=1)
    pipe.set_progress_bar_config(disable=True)
    runtime = apply(pipe, "flux", log_summary=False)
    kwargs = dict(prompt=["a cat riding a horse", "a dog"], steps=steps, output_type="pt")
    eager = pipe(**pipeline_call_kwargs("flux", **kwargs)).images
    pipe.transformer.compile(fullgraph=True, backend="eager")
    for gen in range(2):
        with _no_recompile() if gen else contextlib.nullcontext():
            out = pipe(**pipeline_call_kwargs("flux", **kwargs)).images
        torch.testing.assert_close(out, eager, atol=ATOL, rtol=0)
        by_step = runtime.stats.requested_by_step(runtime.stats.generation())
        assert {s: set(k) for s, k in by_step.items()} == {0: {"int8_fp8"}, 1: {"fp4"}, 2: {"fp4"},
                                                           3: {"int8_fp8"}}, by_step
    assert _graphs() == 2  # one graph per kernel choice
    remove(pipe)


class _ShortWins(AttentionBackend):
    name, family, priority, description, verified = "short_wins_test", "int8_fp8", 10, "test double", "test"
    dtypes, head_dims = (torch.float32,), None

    def forward(self, q, k, v, *, layout, is_causal, sm_scale, return_lse, attn_mask=None):
        return q * 1.0


class _LongWins(_ShortWins):
    name = "long_wins_test"

    def forward(self, q, k, v, *, layout, is_causal, sm_scale, return_lse, attn_mask=None):
        return q * 2.0


def test_auto_under_dynamic_shapes_guards_only_where_the_choice_changes(monkeypatch):
    from sage3_diffusers import perf_model, selfcheck
    monkeypatch.setenv("SAGE3_SELFCHECK", "0")  # the test doubles are not attention: no self-check for them
    selfcheck.reset()
    dispatch._ensure_loaded()
    monkeypatch.setattr(dispatch, "_registry", dict(dispatch._registry))
    for b in (_ShortWins(), _LongWins()):
        dispatch.register_backend(b)
    crossover = 1000  # a measured table where the "long" kernel wins from ~1000 tokens on

    def estimated(name, p, mode, stand_in):
        assert mode == "compile" and not stand_in  # traced: the compile column, never a stand-in
        if name not in (_ShortWins.name, _LongWins.name):
            return perf_model.Estimate(0.0, mode, mode, "test")
        long = (p.seq_q * p.seq_kv) ** 0.5 >= crossover
        return perf_model.Estimate(2.0 if (name == _LongWins.name) == long else 1.0, mode, mode, "test")
    monkeypatch.setattr(dispatch, "expected_speed", estimated)
    try:
        fn = torch.compile(lambda q: s3.sage_attention(q, q, q, "int8_fp8"), fullgraph=True, dynamic=True,
                           backend="eager")
        expect = {}
        for seq in (16, 40, 700, 2000, 5000, 60):
            q = torch.ones(1, 1, seq, 4)
            expect[seq] = fn(q)[0, 0, 0, 0].item()
        assert expect == {16: 1.0, 40: 1.0, 700: 1.0, 2000: 2.0, 5000: 2.0, 60: 1.0}
        assert _graphs() == 2  # one graph per side of the crossover, nothing per length
    finally:
        dispatch.set_fallback(None)
        selfcheck.reset()
