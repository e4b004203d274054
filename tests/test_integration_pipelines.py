"""Tiny offline pipelines of the five families with the hybrid policy; torch.compile; examples; report CLI."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from sage3_diffusers.integration import apply, remove  # noqa: E402
from sage3_diffusers.integration.tiny import (pipeline_call_kwargs, tiny_pipeline, tiny_transformer,  # noqa: E402
                                              transformer_inputs)

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["a cat riding a horse on the moon at night", "a dog"]  # unequal text lengths
STEPS = 4


pytestmark = pytest.mark.usefixtures("emulate_fallback")


# (family, true CFG: transformer called twice per step)
CASES = [("flux", True), ("sd35", False), ("cogvideox", False), ("hunyuan_video", True), ("mochi", False)]


@pytest.mark.parametrize("family,true_cfg", CASES)
def test_hybrid_policy_picks_int8_fp8_on_first_and_last_step_only(family, true_cfg):
    pipe = tiny_pipeline(family)
    pipe.set_progress_bar_config(disable=True)
    forwards = []
    pipe.transformer.register_forward_pre_hook(lambda *a: forwards.append(1))
    runtime = apply(pipe, REPO / "sage3_diffusers" / "configs" / f"{family}.yaml", log_summary=False)
    for gen in range(2):  # the second call must start a new generation at step 0
        forwards.clear()
        out = pipe(**pipeline_call_kwargs(family, prompt=PROMPTS, steps=STEPS, true_cfg=true_cfg, output_type="pt"))
        images = out.images if hasattr(out, "images") else out.frames
        assert torch.isfinite(images).all()
        calls = runtime.stats.generation(gen)
        assert calls and {c.generation for c in calls} == {gen}
        assert len(forwards) == STEPS * (2 if true_cfg else 1)
        quantized = [c for c in calls if "refiner" not in c.layer]
        by_step = runtime.stats.requested_by_step(quantized)
        assert sorted(by_step) == list(range(STEPS)), by_step  # CFG calls share their step
        assert {s: set(k) for s, k in by_step.items()} == {0: {"int8_fp8"}, 1: {"fp4"}, 2: {"fp4"},
                                                           3: {"int8_fp8"}}, by_step
        layers = len(runtime.layers) - sum("refiner" in n for n in runtime.layers)
        per_step = {s: sum(v.values()) for s, v in by_step.items()}
        assert set(per_step.values()) == {layers * (2 if true_cfg else 1)}, per_step
        # What actually ran (CPU: the torch emulations of each family).
        backends = runtime.stats.backends_by_step(quantized)
        assert backends[0] == {"reference_int8_fp8": per_step[0]} and backends[1] == {"reference_fp4": per_step[1]}
        assert runtime.step_source in ("scheduler", None)  # None: diffusers reset the hook at the end
    remove(pipe)


@pytest.mark.slow
def test_torch_compile_bare_transformer_steps_from_set_step_match_eager():
    """torch.compile(transformer, fullgraph=True) with inductor on CPU, no pipeline: the traced step hook reads
    nothing, `runtime.set_step` sets the step; same outputs as eager at every step, the policy's kernel switches
    (int8_fp8 -> fp4 -> int8_fp8) work, and a second generation does not recompile."""
    import torch._dynamo
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = tiny_transformer("flux", layers=1)
    runtime = apply(model, num_inference_steps=3, log_summary=False)
    ts = [1.0, 0.5, 0.25]
    with torch.no_grad():
        eager = [model(**transformer_inputs("flux", timestep=t, seed=i))[0] for i, t in enumerate(ts)]
        compiled = torch.compile(model, fullgraph=True)
        for gen in range(2):
            for i, (t, ref) in enumerate(zip(ts, eager)):
                if gen == 1 and i == 0:
                    frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
                runtime.set_step(i, len(ts))
                with torch._dynamo.config.patch(error_on_recompile=gen == 1):
                    out = compiled(**transformer_inputs("flux", timestep=t, seed=i))[0]
                torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        assert frames_before == 2, "one graph per kernel choice (int8_fp8, fp4)"
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames_before, "recompiled in generation 2"
    assert runtime.generation == 2  # eager generation 0, compiled generations 1 and 2
    by_step = runtime.stats.requested_by_step(runtime.stats.generation())
    assert {s: set(k) for s, k in by_step.items()} == {0: {"int8_fp8"}, 1: {"fp4"}, 2: {"int8_fp8"}}
    assert len(runtime.stats.generation()) == 3 * 2  # compiled calls counted, once per layer and step
    remove(model)


def _run(args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


_VIDEO_EXT = "mp4" if importlib.util.find_spec("imageio_ffmpeg") else "gif"  # the `video` extra gives MP4


@pytest.mark.slow
@pytest.mark.parametrize("family,ext", [("flux", "png"), ("mochi", _VIDEO_EXT)])
def test_example_runs_offline_and_saves(tmp_path, family, ext):
    r = _run([f"examples/{family}.py", "--tiny", "--out", str(tmp_path)])
    assert r.returncode == 0, r.stderr[-3000:]
    files = list(tmp_path.glob(f"{family}_tiny_policy.{ext}"))
    assert files and files[0].stat().st_size > 0
    assert "wall time" in r.stdout and "sage3: generation 0, 4 steps" in r.stdout
    assert "0:int8_fp8 1:fp4 2:fp4 3:int8_fp8" in r.stdout


def test_report_main_writes_per_layer_metrics(tmp_path):
    from sage3_diffusers.integration.report import main
    out = tmp_path / "r.json"
    assert main(["--model", "sd35", "--tiny", "--kernel", "int8_fp8", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    layers = data["kernels"]["int8_fp8"]["layers"]
    assert [r["layer"] for r in layers] == ["transformer_blocks.0.attn", "transformer_blocks.0.attn2",
                                           "transformer_blocks.1.attn"]
    for row in layers:
        assert set(row["isolated"]) >= {"cos_sim", "rel_l1", "rmse"}
        assert 0.999 < row["isolated"]["cos_sim"] < 1.0
    assert data["kernels"]["int8_fp8"]["backends"] == ["reference_int8_fp8"]
