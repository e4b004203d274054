"""The dispatcher: choice by priority, reasons for every rejection, fallback settings, env override."""
import warnings

import pytest
import torch

from sage3_diffusers import dispatch
from sage3_diffusers.api import resolve, sage_attention
from sage3_diffusers.backends.base import AttentionBackend


class FakeFp4(AttentionBackend):
    """Stands in for a compiled FP4 kernel: runs only on bf16 with head_dim 64 and no LSE."""
    name = "fake_fp4"
    family = "fp4"
    priority = 100
    description = "test double"
    verified = "test"
    dtypes = (torch.bfloat16,)
    head_dims = (64,)
    supports_lse = False

    def forward(self, q, k, v, **kw):
        return torch.full_like(q, 7.0)


class Unbuilt(FakeFp4):
    name = "unbuilt_fp4"
    priority = 200

    def unavailable_reasons(self):
        return ["extension _C_fake not built"]


@pytest.fixture
def fakes(monkeypatch):
    dispatch._ensure_loaded()
    registry = dict(dispatch._registry)
    monkeypatch.setattr(dispatch, "_registry", registry)
    monkeypatch.setattr(dispatch, "_warned", set())
    # These doubles return constants; the self-check (tests/test_selfcheck.py) would rightly disable them.
    monkeypatch.setenv("SAGE3_SELFCHECK", "0")
    dispatch._cache.clear()
    dispatch.register_backend(FakeFp4())
    dispatch.register_backend(Unbuilt())
    yield
    dispatch._cache.clear()
    dispatch.set_fallback(None)


def bf16(d=64, n=20):
    return [torch.randn(1, 2, n, d, dtype=torch.bfloat16) for _ in range(3)]


def test_family_picks_highest_priority_runnable_and_explains(fakes):
    sel = resolve(*bf16(), "fp4")
    assert sel.backend.name == "fake_fp4" and sel.note is None
    assert ("unbuilt_fp4", ("extension _C_fake not built",)) in sel.rejected
    assert "rejected unbuilt_fp4: extension _C_fake not built" in sel.explain()
    assert torch.all(sage_attention(*bf16(), "fp4") == 7.0)
    assert resolve(*bf16()).backend.name == "fake_fp4"  # auto: fastest of any family


def test_fp4_falls_back_to_int8_fp8_then_sdpa_with_one_warning(fakes):
    q, k, v = bf16(d=128)
    with pytest.warns(RuntimeWarning, match="head_dim 128 not supported"):
        sel = resolve(q, k, v, "fp4")
    assert sel.backend.family in ("int8_fp8", "sdpa") and "fell back" in sel.note
    dispatch._cache.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same case warns only once
        resolve(q, k, v, "fp4")


def test_fallback_emulate_and_error(fakes):
    q, k, v = bf16(d=128)
    dispatch.set_fallback("emulate")
    sel = resolve(q, k, v, "fp4")
    assert sel.backend.name == "reference_fp4" and "emulated" in sel.note
    dispatch.set_fallback("error")
    with pytest.raises(ValueError, match=r"no fp4 backend can run.*fake_fp4: head_dim 128 not supported"):
        sage_attention(q, k, v, "fp4")
    sel = resolve(q, k, v, "fp4")  # resolve explains instead of raising
    assert sel.backend is None and "SAGE3_FALLBACK=error" in sel.note
    text = sel.explain()
    assert text.startswith("requested 'fp4' -> no backend (the call raises)")
    assert "rejected fake_fp4: head_dim 128 not supported" in text
    with pytest.raises(ValueError, match="unknown fallback"):
        dispatch.set_fallback("maybe")


def test_explicit_backend_that_cannot_run_raises_with_reasons(fakes):
    q, k, v = bf16()
    with pytest.raises(ValueError, match=r"'fake_fp4' cannot run this call: return_lse=True not supported"):
        sage_attention(q, k, v, "fake_fp4", return_lse=True)
    with pytest.raises(ValueError, match="extension _C_fake not built"):
        sage_attention(q, k, v, "unbuilt_fp4")
    with pytest.raises(ValueError, match=r"dtype float32 not supported \(needs bfloat16\)"):
        sage_attention(*(t.float() for t in (q, k, v)), "fake_fp4")


def test_env_forces_a_backend(fakes, monkeypatch):
    q, k, v = bf16()
    monkeypatch.setenv("SAGE3_BACKEND", "sdpa")
    assert resolve(q, k, v, "fp4").backend.name == "sdpa"
    monkeypatch.setenv("SAGE3_BACKEND", "nonexistent")
    with pytest.raises(ValueError, match="SAGE3_BACKEND='nonexistent' is not a backend name or kernel"):
        resolve(q, k, v, "fp4")
    with pytest.raises(ValueError, match="SAGE3_BACKEND='nonexistent'"):
        sage_attention(q, k, v)
    monkeypatch.setenv("SAGE3_BACKEND", "")
    monkeypatch.setenv("SAGE3_FALLBACK", "bogus")
    with pytest.raises(ValueError, match="SAGE3_FALLBACK='bogus'"):
        resolve(q, k, v, "fp4")


def test_env_change_reaches_a_cached_call(fakes, monkeypatch):
    """The per-signature cache keys on the settings' current values: setting or clearing SAGE3_BACKEND or
    SAGE3_FALLBACK between two identical calls changes what the second one runs."""
    q, k, v = bf16()
    monkeypatch.delenv("SAGE3_BACKEND", raising=False)
    monkeypatch.delenv("SAGE3_FALLBACK", raising=False)
    for _ in range(2):  # the second call is answered from the cache
        assert dispatch.decide(q, k, v, "fp4", "HND", False, False)[0].name == "fake_fp4"
    monkeypatch.setenv("SAGE3_BACKEND", "sdpa")
    assert dispatch.decide(q, k, v, "fp4", "HND", False, False)[0].name == "sdpa"
    monkeypatch.delenv("SAGE3_BACKEND")
    assert dispatch.decide(q, k, v, "fp4", "HND", False, False)[0].name == "fake_fp4"
    q, k, v = bf16(d=128)  # no fp4 backend takes head_dim 128: the fallback setting decides
    monkeypatch.setenv("SAGE3_FALLBACK", "error")
    with pytest.raises(ValueError, match="SAGE3_FALLBACK=error"):
        dispatch.decide(q, k, v, "fp4", "HND", False, False)
    monkeypatch.setenv("SAGE3_FALLBACK", "emulate")
    assert dispatch.decide(q, k, v, "fp4", "HND", False, False)[0].family == "fp4"
    monkeypatch.setenv("SAGE3_FALLBACK", "error")
    with pytest.raises(ValueError, match="SAGE3_FALLBACK=error"):
        dispatch.decide(q, k, v, "fp4", "HND", False, False)


def test_masks_only_reach_backends_that_take_them(fakes):
    q, k, v = bf16()
    mask = torch.ones(1, 1, 20, 20, dtype=torch.bool)
    sel = resolve(q, k, v, "fp4", attn_mask=mask)
    assert sel.backend.name == "sdpa"
    assert any("attn_mask not supported" in r for name, rs in sel.rejected for r in rs)


def test_register_rejects_unknown_family(fakes):
    class Bad(FakeFp4):
        name, family = "bad", "fp6"
    with pytest.raises(ValueError, match="unknown family 'fp6'"):
        dispatch.register_backend(Bad())


def test_every_backend_declares_itself():
    for b in dispatch.list_backends():
        assert b.name and b.family in ("fp4", "int8_fp8", "sdpa") and b.description and b.verified
        assert isinstance(b.unavailable_reasons(), list)


def test_env_cli_lists_every_backend():
    from sage3_diffusers.cli import env_report
    text = env_report()
    for b in dispatch.list_backends():
        assert b.name in text
    assert "kernel='fp4' ->" in text and "torch " in text


def _hopper_problem(make_problem, seq, head_dim=128):
    return make_problem(batch=1, heads_q=24, heads_kv=24, seq_q=seq, seq_kv=seq, head_dim=head_dim,
                        head_dim_v=head_dim, layout="HND", is_causal=False, return_lse=False)


class FastInt8(FakeFp4):
    name, family, priority, head_dims = "fake_int8_a", "int8_fp8", 100, (64, 128)

    def unavailable_reasons(self):
        return []


def _graph_table_sdpa_vs_int8(make_problem, fake_perf_table, short_tflops):
    """FastInt8 registered and a graph-mode table: exact SDPA at 600 TFLOPS, fake_int8_a at `short_tflops` on a
    4608-token call and 900 on a 65536-token one; returns those two Hopper problems (skips where SDPA cannot take
    a CUDA problem)."""
    dispatch.register_backend(FastInt8())
    fake_perf_table({"sdpa": {"graph": {128: [[4608, 600], [65536, 600]]}},
                     "fake_int8_a": {"graph": {128: [[4608, short_tflops], [65536, 900]]}}})
    short, long = _hopper_problem(make_problem, 4608), _hopper_problem(make_problem, 65536)
    if dispatch.backend_reasons(dispatch.get_backend("sdpa"), short):
        pytest.skip("sdpa cannot take a CUDA problem on this machine")
    return short, long


class SlowInt8(FastInt8):
    name, priority = "fake_int8_b", 50


def test_measured_speed_beats_static_priority_on_hopper(fakes, make_problem, fake_perf_table):
    from sage3_diffusers import perf_model
    dispatch.register_backend(FastInt8())
    dispatch.register_backend(SlowInt8())
    fake_perf_table({"fake_int8_a": {"graph": {128: [[1024, 200], [16384, 700]]}},
                     "fake_int8_b": {"graph": {128: [[1024, 300], [16384, 600]]}}})
    short, long = _hopper_problem(make_problem, 1024), _hopper_problem(make_problem, 16384)
    assert dispatch.select_backend(short, "int8_fp8", "graph").backend.name == "fake_int8_b"  # faster at 1k
    sel = dispatch.select_backend(long, "int8_fp8", "graph")
    assert sel.backend.name == "fake_int8_a"
    assert any(n == "fake_int8_b" and "slower for this call in graph calls: ~600 vs ~700" in r[0]
               for n, r in sel.rejected)
    # Interpolation in log(S) between the measured points; clamped outside them.
    assert perf_model.estimated_tflops("fake_int8_a", _hopper_problem(make_problem, 4096)) == pytest.approx(450)
    assert perf_model.estimated_tflops("fake_int8_a", _hopper_problem(make_problem, 100000)) == 700
    # A table never speaks for a device of another compute capability: static priority decides.
    from dataclasses import replace
    other = replace(_hopper_problem(make_problem, 16384), capability=(12, 0))
    assert perf_model.estimated_tflops("fake_int8_a", other) is None
    assert dispatch.select_backend(other, "int8_fp8", "graph").backend.name == "fake_int8_a"


def test_auto_never_takes_a_kernel_that_loses_in_either_eager_mode(fakes, make_problem, fake_perf_table):
    from sage3_diffusers import perf_model
    dispatch.register_backend(FastInt8())
    # Faster back to back (1.10x) but slower as a single call (0.90x), and 1.3x in graph replays.
    fake_perf_table({"sdpa": {"eager_single": {128: [[4608, 600]]}, "eager_stream": {128: [[4608, 620]]},
                              "graph": {128: [[4608, 630]]}},
                     "fake_int8_a": {"eager_single": {128: [[4608, 540]]}, "eager_stream": {128: [[4608, 682]]},
                                     "graph": {128: [[4608, 820]]}}})
    p = _hopper_problem(make_problem, 4608)
    est = perf_model.expected_speed("fake_int8_a", p)
    assert est.tflops == pytest.approx(620 * 0.9) and "eager_single: 0.90x" in est.measured_as
    assert perf_model.estimated_tflops("sdpa", p) == pytest.approx(620)
    assert perf_model.estimated_tflops("fake_int8_a", p, mode="graph") == pytest.approx(820)
    if dispatch.backend_reasons(dispatch.get_backend("sdpa"), p):
        pytest.skip("sdpa cannot take a CUDA problem on this machine")
    assert dispatch.select_backend(p, "auto").backend.name == "sdpa"


def test_auto_keeps_exact_sdpa_unless_a_kernel_beats_it_by_the_margin(fakes, make_problem, fake_perf_table):
    """A quantized kernel measured only a few percent faster (within the tables' run-to-run noise) does not make
    "auto" give up exact attention; a clear win does. A family asked for by name is not held to the margin."""
    short, long = _graph_table_sdpa_vs_int8(make_problem, fake_perf_table, short_tflops=618)
    sel = dispatch.select_backend(short, "auto", "graph")
    assert sel.backend.name == "sdpa"
    assert any(n == "fake_int8_a" and "1.03x exact sdpa in graph calls is within the margin (1.05x)" in r[0]
               for n, r in sel.rejected), sel.rejected
    assert dispatch.select_backend(long, "auto", "graph").backend.name == "fake_int8_a"
    assert dispatch.select_backend(short, "int8_fp8", "graph").backend.name == "fake_int8_a"


# One table where each mode says something else at 4608 tokens: fake_int8_a loses to sdpa as a single eager call
# (0.90x) and under torch.compile (0.94x), wins in CUDA-graph replays (1.30x).
_EVERY_MODE = {"sdpa": {"eager_single": {128: [[4608, 600]]}, "eager_stream": {128: [[4608, 620]]},
                        "graph": {128: [[4608, 630]]}, "compile": {128: [[4608, 640]]}},
               "fake_int8_a": {"eager_single": {128: [[4608, 540]]}, "eager_stream": {128: [[4608, 682]]},
                               "graph": {128: [[4608, 820]]}, "compile": {128: [[4608, 600]]}}}


def test_each_execution_mode_picks_by_its_own_measurement(fakes, make_problem, fake_perf_table, monkeypatch):
    dispatch.register_backend(FastInt8())
    fake_perf_table(_EVERY_MODE)
    p = _hopper_problem(make_problem, 4608)
    eager = dispatch.select_backend(p, "auto")  # outside capture and tracing: the current mode is eager
    assert eager.backend.name == "sdpa" and eager.mode == "eager"
    assert "chosen for eager calls" in eager.explain()
    assert any(n == "fake_int8_a" and "slower for this call in eager calls: ~558 vs ~620" in r[0]
               for n, r in eager.rejected), eager.rejected
    graph = dispatch.select_backend(p, "auto", "graph")
    assert graph.backend.name == "fake_int8_a" and "chosen for graph calls" in graph.explain()
    assert any(n == "sdpa" and "in graph calls: ~630 vs ~820" in r[0] for n, r in graph.rejected)
    assert dispatch.select_backend(p, "auto", "compile").backend.name == "sdpa"
    # The mode the dispatcher sees is perf_model.current_mode(): CUDA-graph capture reads the graph column, and
    # the eager choice cached above is not reused for it (nor the other way round).
    monkeypatch.setattr(dispatch, "current_mode", lambda: "graph")
    assert dispatch.select_backend(p, "auto").backend.name == "fake_int8_a"
    monkeypatch.setattr(dispatch, "current_mode", lambda: "eager")
    assert dispatch.select_backend(p, "auto").backend.name == "sdpa"
    with pytest.raises(ValueError, match="unknown execution mode 'fast'"):
        dispatch.select_backend(p, "auto", "fast")


def test_compiled_length_segments_are_per_mode(fakes, make_problem, fake_perf_table):
    dispatch.register_backend(FastInt8())
    fake_perf_table({b: {m: {128: [[1024, tf * 0.5], [4608, tf]]} for m, per_d in per_mode.items()
                         for tf in [per_d[128][0][1]]} for b, per_mode in _EVERY_MODE.items()})
    p = _hopper_problem(make_problem, 4608)
    fields = (1, p.heads_q, p.heads_kv, 1, 1, p.head_dim, p.head_dim_v, p.dtype, p.device_type, p.capability,
              p.layout, p.is_causal, p.return_lse, p.has_mask, p.has_kv_lens)
    assert {name for _, name, _ in dispatch._length_segments(fields, "auto", "graph")} == {"fake_int8_a"}
    assert {name for _, name, _ in dispatch._length_segments(fields, "auto", "compile")} == {"sdpa"}


def test_a_table_without_the_mode_never_guesses(fakes, make_problem, fake_perf_table):
    from sage3_diffusers import perf_model
    dispatch.register_backend(FastInt8())
    dispatch.register_backend(SlowInt8())
    # Only CUDA-graph replays measured (as the older shipped tables): the quantized kernels win there.
    fake_perf_table({"sdpa": {"graph": {128: [[4608, 600]]}},
                     "fake_int8_a": {"graph": {128: [[4608, 800]]}},
                     "fake_int8_b": {"graph": {128: [[4608, 900]]}}})
    p = _hopper_problem(make_problem, 4608)
    for mode in ("eager", "compile"):
        sel = dispatch.select_backend(p, "auto", mode)
        assert sel.backend.name == "sdpa", sel.explain()
        for name in ("fake_int8_a", "fake_int8_b"):
            (reason,) = dict(sel.rejected)[name]
            assert f"no {mode} measurement on this card" in reason and "exact sdpa runs" in reason
        # A family asked for by name still runs, its kernels taken by priority, not by the graph column.
        fam = dispatch.select_backend(p, "int8_fp8", mode)
        assert fam.backend.name == "fake_int8_a" and fam.note is None
        (reason,) = dict(fam.rejected)["fake_int8_b"]
        assert reason.startswith("lower priority than fake_int8_a") and f"no {mode} measurement" in reason
    assert dispatch.select_backend(p, "auto", "graph").backend.name == "fake_int8_b"
    assert dispatch.select_backend(p, "int8_fp8", "graph").backend.name == "fake_int8_b"
    # For people the graph column can still stand in, saying so; the dispatcher never asks for that.
    assert "standing in for eager" in perf_model.expected_speed("fake_int8_b", p).measured_as
    assert perf_model.expected_speed("fake_int8_b", p, stand_in=False) is None
    assert "in eager, compile calls kernel='auto' runs exact sdpa" in perf_model.describe(p)


def test_auto_takes_exact_sdpa_unless_every_candidate_is_measured_in_the_mode(fakes, make_problem,
                                                                               fake_perf_table):
    dispatch.register_backend(FastInt8())
    dispatch.register_backend(SlowInt8())
    table = {b: dict(per_mode) for b, per_mode in _EVERY_MODE.items()}
    table["fake_int8_a"]["eager_single"] = {128: [[4608, 900]]}  # faster than sdpa in both eager modes
    table["fake_int8_b"] = {"graph": {128: [[4608, 900]]}}  # but fake_int8_b has no eager measurement
    fake_perf_table(table)
    p = _hopper_problem(make_problem, 4608)
    sel = dispatch.select_backend(p, "auto", "eager")
    assert sel.backend.name == "sdpa"
    (reason,) = dict(sel.rejected)["fake_int8_a"]
    assert "~682 TFLOPS in eager calls, but fake_int8_b has no eager measurement on this card" in reason
    assert "no eager measurement on this card" in dict(sel.rejected)["fake_int8_b"][0]
    assert dispatch.select_backend(p, "int8_fp8", "eager").backend.name == "fake_int8_a"  # by priority


class _Doubler(AttentionBackend):
    name, family, priority, description, verified = "mode_test_doubler", "int8_fp8", 10, "test double", "test"
    dtypes, head_dims = (torch.float32,), None

    def forward(self, q, k, v, *, layout, is_causal, sm_scale, return_lse, attn_mask=None):
        return q * 2.0


class _Tripler(_Doubler):
    name = "mode_test_tripler"

    def forward(self, q, k, v, *, layout, is_causal, sm_scale, return_lse, attn_mask=None):
        return q * 3.0


def test_call_signature_cache_does_not_leak_between_modes(fakes, monkeypatch):
    """The repeated-call fast path (`decide`) keys on the execution mode: a call first made eagerly and then under
    CUDA-graph capture (or the other way round) is decided for each mode."""
    from sage3_diffusers import perf_model
    for b in (_Doubler(), _Tripler()):
        dispatch.register_backend(b)
    winner = {"eager": _Doubler.name, "graph": _Tripler.name}

    def estimated(name, p, mode, stand_in):
        assert not stand_in
        return perf_model.Estimate(2.0 if winner[mode] == name else 1.0, mode, mode, "test")
    monkeypatch.setattr(dispatch, "expected_speed", estimated)
    q = torch.ones(1, 1, 8, 4)
    for mode in ("eager", "graph", "eager", "graph"):
        monkeypatch.setattr(dispatch, "current_mode", lambda: mode)
        assert sage_attention(q, q, q, "int8_fp8")[0, 0, 0, 0].item() == (2.0 if mode == "eager" else 3.0), mode


def test_a_family_that_cannot_run_falls_back_to_the_faster_of_the_rest(fakes, make_problem, fake_perf_table):
    """fp4 asked for where no fp4 kernel runs (Hopper): where the card's table measures every candidate in the
    call's mode, the fastest of int8_fp8 and exact SDPA (held to auto's margin), so the fallback never runs a
    quantized kernel that loses to exact attention; where the mode is unmeasured, int8_fp8 by priority."""
    short, long = _graph_table_sdpa_vs_int8(make_problem, fake_perf_table, short_tflops=590)
    with pytest.warns(RuntimeWarning, match="fell back to sdpa"):
        sel = dispatch.select_backend(short, "fp4", "graph")  # fake_fp4 takes head_dim 64 only
    assert sel.backend.name == "sdpa" and sel.note == "no fp4 kernel can run this call; fell back to sdpa"
    assert any(n == "fake_fp4" for n, _ in sel.rejected)
    assert any(n == "fake_int8_a" and "slower for this call in graph calls: ~590 vs ~600" in r[0]
               for n, r in sel.rejected), sel.rejected
    with pytest.warns(RuntimeWarning, match="fell back to int8_fp8"):
        assert dispatch.select_backend(long, "fp4", "graph").backend.name == "fake_int8_a"
    with pytest.warns(RuntimeWarning, match="fell back to int8_fp8"):
        sel = dispatch.select_backend(short, "fp4", "compile")  # no compile measurement: by priority
    assert sel.backend.name == "fake_int8_a"
    assert any(n == "sdpa" and "lower priority than fake_int8_a; no compile measurement" in r[0]
               for n, r in sel.rejected), sel.rejected
    assert dispatch.select_backend(short, "int8_fp8", "graph").backend.name == "fake_int8_a"  # asked for by name
