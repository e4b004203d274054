"""torch.compile with our kernels on CUDA (bf16, tiny transformers): fullgraph, no recompile on repeated calls,
the masked HunyuanVideo batch with its per-sample key lengths read by the int8_fp8 kernel inside the graph,
dynamic shapes over three resolutions, and compiled outputs equal to eager ones with the same kernel."""
import contextlib

import pytest
import torch

pytest.importorskip("diffusers")
import torch._dynamo  # noqa: E402

from sage3_diffusers.dispatch import select_backend  # noqa: E402
from sage3_diffusers.backends.base import describe_problem  # noqa: E402
from sage3_diffusers.integration import apply, remove  # noqa: E402
from sage3_diffusers.integration.tiny import tiny_transformer, transformer_inputs  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        yield
    torch._dynamo.reset()


def _int8_fp8_backend():
    q = torch.zeros(1, 2, 128, 64, device="cuda", dtype=torch.bfloat16)
    return select_backend(describe_problem(q, q, q, "HND", False, False, None), "int8_fp8").backend


def _model(family):
    return tiny_transformer(family, layers=1, head_dim=64).to("cuda", torch.bfloat16)


def _inputs(family, seed, grid=None):
    lengths = {"hunyuan_video": [12, 7]}.get(family)
    return transformer_inputs(family, seed=seed, text_lengths=lengths, grid=grid, dtype=torch.bfloat16,
                              device="cuda")


@pytest.mark.parametrize("family", ["flux", "hunyuan_video"])
def test_fullgraph_inductor_equals_eager_with_the_int8_fp8_kernel(family):
    backend = _int8_fp8_backend()
    if backend.family != "int8_fp8" or backend.name.startswith("reference"):
        pytest.skip(f"no int8_fp8 kernel here (chose {backend.name})")
    model = _model(family)
    runtime = apply(model, kernel="int8_fp8", log_summary=False)
    inputs = _inputs(family, 1)
    eager = model(**inputs)[0]
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(**inputs)[0]
    with torch._dynamo.config.patch(error_on_recompile=True):
        out2 = compiled(**inputs)[0]
    for o in (out, out2):
        cos = torch.nn.functional.cosine_similarity(o.float().flatten(), eager.float().flatten(), dim=0).item()
        assert cos > 0.9999, cos  # same kernel; inductor may fuse the rest in another order (bf16)
    ran = {c.backend for c in runtime.stats.calls if c.reason is None}
    assert ran == {backend.name}, runtime.stats.fallbacks(runtime.stats.calls)
    remove(model)


def test_dynamic_shapes_three_resolutions_one_graph_on_cuda():
    backend = _int8_fp8_backend()
    if backend.name.startswith("reference"):
        pytest.skip("no int8_fp8 kernel here")
    model = _model("hunyuan_video")
    apply(model, kernel="int8_fp8", log_summary=False)
    # Inductor's matmul padding pass guards on 2*F*H*W < 128 by itself (seen on an H100: a recompile between
    # grids of 64 and 144); grids on one side of it, and the pass off, keep the test about our code.
    grids = [(2, 6, 6), (2, 6, 8), (3, 6, 6)]
    refs = [model(**_inputs("hunyuan_video", i, g))[0] for i, g in enumerate(grids)]
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    old = torch.fx.experimental._config.use_duck_shape
    torch.fx.experimental._config.use_duck_shape = False
    try:
        with torch._dynamo.config.patch(error_on_recompile=True), torch._inductor.config.patch(shape_padding=False):
            for i, g in enumerate(grids):
                out = compiled(**_inputs("hunyuan_video", i, g))[0]
                cos = torch.nn.functional.cosine_similarity(out.float().flatten(), refs[i].float().flatten(),
                                                            dim=0).item()
                assert cos > 0.9999, (g, cos)
    finally:
        torch.fx.experimental._config.use_duck_shape = old
    remove(model)
