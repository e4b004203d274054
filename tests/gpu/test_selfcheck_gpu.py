"""GPU: every compiled kernel that can run here passes its self-check; during CUDA-graph capture the check is
deferred (no selection cached) and runs on the first call after capture."""
import warnings

import pytest
import torch

from sage3_diffusers import dispatch, selfcheck
from sage3_diffusers.api import resolve, sage_attention
from sage3_diffusers.backends.base import AttentionProblem, device_capability

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def fresh():
    selfcheck.reset()
    yield
    selfcheck.reset()


def _problem(backend_head_dim, layout="HND", causal=False):
    dev = torch.device("cuda", torch.cuda.current_device())
    return AttentionProblem(1, 2, 2, 200, 333, backend_head_dim, backend_head_dim, torch.bfloat16, "cuda",
                            device_capability(dev), layout, causal, False, False)


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_every_runnable_compiled_kernel_passes(head_dim, layout, causal):
    p = _problem(head_dim, layout, causal)
    runnable = [b for b in dispatch.list_backends() if selfcheck.needs_check(b) and not dispatch.backend_reasons(b, p)]
    if not runnable:
        pytest.skip("no compiled kernel can run on this GPU")
    for b in runnable:
        r = selfcheck.run_check(b, p)
        print(r.line())
        assert r.passed, r.line()


def test_deferred_during_cuda_graph_capture():
    q, k, v = (torch.randn(1, 8, 4096, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    sel = resolve(q, k, v, "int8_fp8")
    if sel.backend.name == "sdpa":
        pytest.skip("no int8_fp8 kernel runs here")
    selfcheck.reset()  # forget the check (and the cached selection) made by resolve()
    sage_attention(q, k, v, "sdpa")  # warm-up outside capture
    g = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), warnings.catch_warnings():
        warnings.simplefilter("error")
        sage_attention(q, k, v, "int8_fp8")  # warm-up of the kernel: the check runs here, eagerly
        selfcheck.reset()
        with torch.cuda.graph(g):
            out = sage_attention(q, k, v, "int8_fp8")
    torch.cuda.current_stream().wait_stream(side)
    [deferred] = selfcheck.results()
    assert deferred.passed is None and "CUDA graph capture" in deferred.detail
    g.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    resolve(q, k, v, "int8_fp8")  # first selection after capture: checked now
    assert any(r.passed for r in selfcheck.results())
