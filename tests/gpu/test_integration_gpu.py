"""`apply` on CUDA with the real kernels, both routes: every attention layer runs the kernel the dispatcher
picks for `int8_fp8` / `fp4` (not SDPA, not an emulation), the output stays close to diffusers' default, and
HunyuanVideo's / Mochi's unequal text lengths take the quantized path. Tiny models with head_dim 64, bf16."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

pytest.importorskip("diffusers")

from sage3_diffusers.api import choose  # noqa: E402
from sage3_diffusers.integration import apply, models, remove  # noqa: E402
from sage3_diffusers.integration.tiny import tiny_transformer, transformer_inputs  # noqa: E402

TEXT_LENGTHS = {"hunyuan_video": [12, 7], "mochi": [11, 4]}
# Output cos sim floors vs the default in bf16 (the CPU emulations give >= 0.9999 / 0.998 in fp32).
COS = {"int8_fp8": 0.995, "fp4": 0.98}


def _kernel_backend(kernel: str) -> str:
    q = torch.randn(1, 256, 2, 64, device="cuda", dtype=torch.bfloat16)
    backend, note = choose(q, q, q, kernel, tensor_layout="NHD")
    if backend.name == "sdpa" or backend.name.startswith("reference"):
        pytest.skip(f"no {kernel} kernel runs here: {note}")
    return backend.name


@pytest.mark.parametrize("kernel", ["int8_fp8", "fp4"])
@pytest.mark.parametrize("family", ["flux", "hunyuan_video", "sd35", "cogvideox", "mochi"])
def test_apply_runs_the_kernel_on_every_layer_close_to_default(family, kernel):
    expected = _kernel_backend(kernel)
    torch.manual_seed(0)
    model = tiny_transformer(family, head_dim=64).to("cuda", torch.bfloat16)
    inputs = transformer_inputs(family, config=model.config, dtype=torch.bfloat16, device="cuda",
                                text_lengths=TEXT_LENGTHS.get(family))
    with torch.no_grad():
        ref = model(**inputs)[0].float()
        runtime = apply(model, kernel=kernel, log_summary=False)
        out = model(**inputs)[0].float()
    remove(model)
    quantized = [c for c in runtime.stats.calls if "refiner" not in c.layer]
    assert {c.layer for c in quantized} == {n for n in runtime.layers if "refiner" not in n}
    assert {c.backend for c in quantized} == {expected}, runtime.stats.fallbacks(runtime.stats.calls)
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
    assert COS[kernel] <= cos < 1.0, f"{family} {kernel} ({models.get(family).route} route): cos {cos}"
