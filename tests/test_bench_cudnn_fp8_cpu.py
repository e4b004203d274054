"""CPU tests of the optional cuDNN FP8 column (bench/cudnn_fp8.py and its wiring in sage3_diffusers.bench)."""
import builtins
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from sage3_diffusers import bench

ROOT = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location("cudnn_fp8_under_test", ROOT / "bench" / "cudnn_fp8.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def no_cudnn(monkeypatch):
    real_import = builtins.__import__

    def fake(name, *a, **k):
        if name == "cudnn" or name.startswith("cudnn."):
            raise ImportError("No module named 'cudnn'")
        return real_import(name, *a, **k)
    monkeypatch.delitem(sys.modules, "cudnn", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake)


def test_column_skipped_with_reason_when_cudnn_missing(no_cudnn):
    mod, reason = bench._cudnn_fp8_module()
    assert mod is None
    assert "cudnn-frontend unavailable" in reason and "No module named 'cudnn'" in reason and "\n" not in reason


def test_make_fn_returns_reason_not_exception(no_cudnn):
    m = _load()
    q = torch.zeros(1, 2, 8, 64, dtype=torch.bfloat16)
    fn, err = m.make_cudnn_fp8_fn(q, q, q)
    assert fn is None and err.startswith("cudnn-frontend unavailable") and "\n" not in err


def test_make_fn_rejects_cpu_tensors(monkeypatch):
    m = _load()
    monkeypatch.setattr(m, "import_cudnn", lambda: (object(), None))
    q = torch.zeros(1, 2, 8, 64, dtype=torch.bfloat16)
    assert m.make_cudnn_fp8_fn(q, q, q) == (None, "cuDNN FP8 needs CUDA tensors")


def test_graph_falls_back_to_fp8_output_and_caches(monkeypatch):
    m = _load()
    calls = []

    def fake_build(cudnn, handle, qs, ks, scale, kind):
        calls.append(kind)
        if kind == "bf16":
            raise RuntimeError("bf16 O\n  not supported\n on this arch")
        return "graph", {"t": 1}, "cuDNN backend eng0"
    monkeypatch.setattr(m, "_build", fake_build)
    dev = torch.device("cpu")
    hit = m._graph_for(None, None, (1, 2, 64, 64), (1, 2, 64, 64), 0.125, dev, ("bf16", "fp8"))
    assert hit[0] == "graph" and hit[2] == "fp8" and hit[3]["plan"] == "cuDNN backend eng0"
    assert hit[3]["refused"] == "bf16 O: RuntimeError: bf16 O not supported on this arch"
    assert m._graph_for(None, None, (1, 2, 64, 64), (1, 2, 64, 64), 0.125, dev, ("bf16", "fp8")) is hit
    assert calls == ["bf16", "fp8"]

    monkeypatch.setattr(m, "_build", lambda *a: (_ for _ in ()).throw(ValueError("nope")))
    err = m._graph_for(None, None, (1, 2, 32, 64), (1, 2, 32, 64), 0.125, dev, ("bf16", "fp8"))
    assert err == ("error", "cuDNN FP8 graph not built: bf16 O: ValueError: nope; fp8 O: ValueError: nope")


def test_quantize_e4m3_per_tensor():
    m = _load()
    x = torch.tensor([[-3.0, 0.5], [1.0, 2.0]]).reshape(1, 1, 2, 2).to(torch.bfloat16)
    xq, descale = m.quantize_e4m3(x)
    assert xq.dtype == torch.float8_e4m3fn and descale.shape == (1, 1, 1, 1)
    assert descale.item() == pytest.approx(3.0 / 448)
    assert (xq.float() * descale).flatten().tolist() == pytest.approx([-3.0, 0.5, 1.0, 2.0], rel=0.07)
    z, dz = m.quantize_e4m3(torch.zeros(1, 1, 2, 2))
    assert dz.item() == 1.0 and not z.float().any()
    assert m.one_line(RuntimeError("a\n b" + "x" * 400), limit=40).endswith("...")


def test_table_has_cudnn_fp8_columns_only_when_measured():
    graph = {"sdpa_flash": {"ms": 2.0, "tflops": 300.0, "vs_baseline": 0.5},
             "sdpa_cudnn": {"ms": 1.0, "tflops": 600.0, "vs_baseline": 1.0},
             "triton_int8_fp8": {"ms": 0.8, "tflops": 720.0, "vs_baseline": 1.25}}
    row = {"shape": "Flux-1024", "B": 1, "H": 24, "S": 4608, "D": 128, "modes": {"graph": graph},
           "host_us": {}, "peak_mem_mib": {}, "errors": {"cudnn_fp8": "cudnn-frontend unavailable (ImportError: x)"},
           "accuracy": {"triton_int8_fp8": {"cos_sim": 0.9995, "rel_l1": 0.03},
                        "sdpa_cudnn": {"cos_sim": 1.0, "rel_l1": 0.004}}}
    meta = {"card": "FakeGPU", "date": "d", "flops": "f", "baseline": "sdpa_cudnn", "modes": {"graph": "g"},
            "host_us": "h", "peak_mem_mib": "m"}
    result = {"meta": meta, "columns": list(graph), "rows": [row]}
    assert "cudnn_fp8" not in bench.format_table(result)
    row2 = json.loads(json.dumps(row))
    row2["modes"]["graph"]["cudnn_fp8"] = {"ms": 0.63, "tflops": 950.0, "vs_baseline": 1.58}
    row2["accuracy"]["cudnn_fp8"] = {"cos_sim": 0.998, "rel_l1": 0.05}
    table = bench.format_table({**result, "columns": [*graph, "cudnn_fp8"], "rows": [row2]})
    assert "| Flux-1024 (1,24,4608,128) | 300 (0.50x) | 600 | 720 (1.25x) | 950 (1.58x) |" in table
    assert "| Flux-1024 | 1.00000 / 0.0040 | 0.99950 / 0.0300 | 0.99800 / 0.0500 |" in table
