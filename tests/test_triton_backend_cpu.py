"""CPU-side tests of the Triton INT8/FP8 backend: registration, reasons, custom-op fake, bench CLI."""
import json

import pytest
import torch

from sage3_diffusers import bench, resolve
from sage3_diffusers.backends.base import AttentionProblem
from sage3_diffusers.backends.triton_int8fp8 import TritonInt8Fp8Backend
from sage3_diffusers.dispatch import get_backend, list_backends


def _problem(**kw):
    base = dict(batch=1, heads_q=4, heads_kv=4, seq_q=128, seq_kv=128, head_dim=128, head_dim_v=128,
                dtype=torch.bfloat16, device_type="cuda", capability=(9, 0), layout="HND", is_causal=False,
                return_lse=False, has_mask=False)
    base.update(kw)
    return AttentionProblem(**base)


@pytest.fixture
def fresh_backend(monkeypatch):
    monkeypatch.setattr(TritonInt8Fp8Backend, "_unavailable", None)
    yield TritonInt8Fp8Backend()
    TritonInt8Fp8Backend._unavailable = None


def test_registered():
    be = get_backend("triton_int8_fp8")
    assert isinstance(be, TritonInt8Fp8Backend)
    assert (be.family, be.priority, be.head_dims) == ("int8_fp8", 50, (64, 128))
    assert be.supports_causal and be.supports_lse and be.supports_gqa and not be.supports_mask
    assert be in list_backends()
    assert "FP16" in be.description and "sm_80/86" in be.description


def test_unavailable_reasons(fresh_backend, monkeypatch):
    import sage3_diffusers.backends.triton_int8fp8 as mod
    monkeypatch.setattr(mod, "triton_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fresh_backend.unavailable_reasons() == ["triton not installed", "no CUDA device"]


def test_unavailable_old_gpu(fresh_backend, monkeypatch):
    import sage3_diffusers.backends.triton_int8fp8 as mod
    monkeypatch.setattr(mod, "triton_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (7, 5))
    assert fresh_backend.unavailable_reasons() == ["needs sm_80+ (found sm_75)"]


def test_available_when_all_present(fresh_backend, monkeypatch):
    import sage3_diffusers.backends.triton_int8fp8 as mod
    monkeypatch.setattr(mod, "triton_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: [(7, 0), (8, 6)][i])
    assert fresh_backend.unavailable_reasons() == []


def test_input_reasons():
    be = TritonInt8Fp8Backend()
    assert be.input_reasons(_problem()) == []
    assert be.input_reasons(_problem(heads_kv=1, is_causal=True, return_lse=True, seq_q=1, seq_kv=77)) == []
    assert be.input_reasons(_problem(layout="NHD", head_dim=64, head_dim_v=64, dtype=torch.float16)) == []
    assert any("CUDA" in r for r in be.input_reasons(_problem(device_type="cpu", capability=None)))
    assert be.input_reasons(_problem(capability=(7, 5))) == ["needs sm_80+ (this device is sm_75)"]
    assert any("head_dim 96" in r for r in be.input_reasons(_problem(head_dim=96, head_dim_v=96)))
    assert any("float32" in r for r in be.input_reasons(_problem(dtype=torch.float32)))
    assert any("attn_mask" in r for r in be.input_reasons(_problem(has_mask=True)))


def test_cpu_resolution_explains_rejection():
    q = torch.randn(1, 2, 16, 64, dtype=torch.bfloat16)
    sel = resolve(q, q, q, "int8_fp8")
    assert sel.backend.name != "triton_int8_fp8"
    reasons = dict(sel.rejected)
    assert "triton_int8_fp8" in reasons and reasons["triton_int8_fp8"]
    with pytest.raises(ValueError, match="triton_int8_fp8"):
        resolve(q, q, q, "triton_int8_fp8")


@pytest.mark.parametrize("layout,return_lse", [("HND", True), ("NHD", False)])
def test_custom_op_fake_shapes(layout, return_lse):
    from sage3_diffusers.backends import triton_int8fp8  # noqa: F401
    b, h, s, d = 2, 4, 33, 64
    shape = (b, h, s, d) if layout == "HND" else (b, s, h, d)
    q = torch.empty(shape, dtype=torch.bfloat16, device="meta")
    kv = torch.empty((b, 2, 50, d) if layout == "HND" else (b, 50, 2, d), dtype=torch.bfloat16, device="meta")
    out, lse = torch.ops.sage3.triton_int8fp8_attn(q, kv, kv, layout, False, 0.125, return_lse, "per_thread")
    assert out.shape == shape and out.dtype == torch.bfloat16
    assert lse.shape == ((b, h, s) if return_lse else (0,)) and lse.dtype == torch.float32


def test_custom_op_rejects_cpu_tensors():
    from sage3_diffusers.backends import triton_int8fp8  # noqa: F401
    q = torch.randn(1, 1, 4, 64, dtype=torch.bfloat16)
    with pytest.raises(Exception):
        torch.ops.sage3.triton_int8fp8_attn(q, q, q, "HND", False, 0.125, False, "per_thread")


def test_bench_args_and_shapes():
    a = bench.parse_args(["kernels", "--quick", "--json", "o.json", "--plot", "o.png"])
    assert (a.command, a.quick, a.json_path, a.plot_path, a.no_accuracy) == ("kernels", True, "o.json", "o.png",
                                                                             False)
    quick = bench.shapes_for(True)
    assert [s.name for s in quick] == list(bench.QUICK_NAMES) or set(s.name for s in quick) == set(bench.QUICK_NAMES)
    full = bench.shapes_for(False)
    names = {s.name: s for s in full}
    assert (names["Flux-1024"].batch, names["Flux-1024"].heads, names["Flux-1024"].seq,
            names["Flux-1024"].head_dim) == (1, 24, 4608, 128)
    assert (names["HunyuanVideo-720p"].seq, names["CogVideoX-2B-480p"].batch) == (119056, 2)
    grid = [s for s in full if s.name.startswith("grid")]
    assert len(grid) == 6 and all(s.batch * s.seq == 16384 and s.heads * s.head_dim == 2048 for s in grid)
    assert bench.shapes_for(True, "Mochi")[0].seq == 44776
    with pytest.raises(SystemExit):
        bench.shapes_for(False, "nope")
    with pytest.raises(SystemExit):
        bench.parse_args([])
    assert names["Flux-1024"].flops == 4.0 * 24 * 4608 * 4608 * 128


def test_bench_table_and_plot(tmp_path, monkeypatch):
    graph = {"sdpa_cudnn": {"ms": 1.0, "tflops": 600.0, "vs_baseline": 1.0},
             "triton_int8_fp8": {"ms": 0.83, "tflops": 720.0, "vs_baseline": 1.2},
             "cuda_sm90_int8_fp8": {"ms": 0.67, "tflops": 900.0, "vs_baseline": 1.5}}
    meta = {"card": "FakeGPU", "date": "2026-11-27", "flops": "f", "baseline": "sdpa_cudnn", "modes": {"graph": "g"},
            "host_us": "h", "peak_mem_mib": "m"}
    result = {"meta": meta, "columns": list(graph),
              "rows": [{"shape": "Flux-1024", "B": 1, "H": 24, "S": 4608, "D": 128, "modes": {"graph": graph},
                        "host_us": {"sdpa_cudnn": 20.0, "triton_int8_fp8": 300.0}, "peak_mem_mib": {},
                        "accuracy": {"triton_int8_fp8": {"cos_sim": 0.9995, "rel_l1": 0.03},
                                     "sdpa_cudnn": {"cos_sim": 1.0, "rel_l1": 0.004}}}]}
    table = bench.format_table(result)
    assert "FakeGPU" in table and "| 600 | 720 (1.20x) | 900 (1.50x) |" in table and "| Flux-1024 | 20 | 300 |" in table
    json.dumps(result)
    import builtins
    real_import = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_mpl)
    assert bench.plot(result, str(tmp_path / "x.png")) is False
    assert not (tmp_path / "x.png").exists()


def test_bench_needs_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="CUDA"):
        bench.main(["kernels", "--quick"])


def test_bench_plot_subcommand_args():
    a = bench.parse_args(["plot", "r.json", "r.png"])
    assert (a.command, a.json_in, a.png_out) == ("plot", "r.json", "r.png")


def test_launch_config_and_kgroup_fallback():
    """The attention kernel's launch config is block size, warps and stages only (no switches), and where the
    K-group fold applies by itself."""
    pytest.importorskip("triton")
    from sage3_diffusers.kernels.triton import int8fp8 as m
    assert m._CANDIDATES[128][0] == m.AttnConfig(64, 4, 3)
    assert not hasattr(m, "last_config") and not hasattr(m, "_forced_config")
    assert not hasattr(m, "quantize_qkv") and not hasattr(m, "quant_mode")
    t = torch.empty(0)

    def groups(gran, k_block):
        return m.QuantizedKV(t, t, t, t, t, 1, 1, 1, 16, 64, True, k_block, gran).k_groups_per_tile()
    assert [groups("per_thread", 128), groups("per_block", 128), groups("per_block", 512)] == [4, 1, 1]
    assert [groups("per_thread", 64), groups("per_thread", 256), groups("per_block", 64)] == [0, 0, 0]


def test_kv_lens_declared_and_in_the_op_schema():
    from sage3_diffusers.backends.triton_int8fp8 import TritonInt8Fp8Backend
    assert TritonInt8Fp8Backend.supports_kv_lens
    op = torch.ops.sage3.triton_int8fp8_attn
    assert "Tensor? kv_lens=None" in str(op.default._schema)
    q = torch.empty(3, 4, 50, 64, device="meta", dtype=torch.bfloat16)
    out, lse = op(q, q, q, "HND", False, 0.125, True, "per_thread", torch.empty(3, dtype=torch.int32, device="meta"))
    assert out.shape == q.shape and lse.shape == (3, 4, 50)


def test_forward_compiles_in_one_graph_and_runs_direct_when_eager(monkeypatch):
    """Eagerly the backend calls its implementation directly; compiled with fullgraph, its whole call traces into
    one graph (no query in the call path breaks it) holding the custom op (CUDA-only: the graph is captured here,
    not run)."""
    from sage3_diffusers.backends import triton_int8fp8
    calls = []

    def impl(q, k, v, layout, is_causal, sm_scale, return_lse, qk_quant_gran, kv_lens=None):
        calls.append(layout)
        return q * 3, q.new_empty((0,), dtype=torch.float32)
    monkeypatch.setattr(triton_int8fp8, "_triton_forward", impl)
    be = TritonInt8Fp8Backend()
    q = torch.randn(1, 2, 8, 64, dtype=torch.bfloat16)
    assert torch.equal(be.forward(q, q, q, layout="HND", is_causal=False, sm_scale=0.1, return_lse=False), q * 3)
    assert calls == ["HND"]
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return lambda *args: (args[0],)

    @torch.compile(backend=capture, fullgraph=True)
    def compiled(x):
        return be.forward(x, x, x, layout="HND", is_causal=False, sm_scale=0.1, return_lse=False)
    compiled(q)
    assert len(graphs) == 1 and calls == ["HND"]
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert torch.ops.sage3.triton_int8fp8_attn in targets, targets
