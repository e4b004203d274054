"""The step hook: step from CacheContext / scheduler / timestep values, CFG counted once, generations."""
import pytest
import torch

pytest.importorskip("diffusers")

from sage3_diffusers.integration import apply, remove  # noqa: E402
from sage3_diffusers.integration.steps import Sage3Runtime  # noqa: E402
from sage3_diffusers.integration.tiny import tiny_transformer, transformer_inputs  # noqa: E402


pytestmark = pytest.mark.usefixtures("no_grad", "emulate_fallback")


def _steps_of(runtime):
    return {c.step: sorted({x.requested for x in runtime.stats.calls if x.step == c.step})
            for c in runtime.stats.calls}


def test_without_pipeline_timestep_values_drive_steps_and_cfg_counts_once():
    model = tiny_transformer("flux", layers=1)
    runtime = apply(model, num_inference_steps=3, log_summary=False)
    for t in (1.0, 1.0, 0.6, 0.6, 0.3, 0.3):  # cond + uncond per step
        model(**transformer_inputs("flux", timestep=t))
    assert runtime.step_source == "timestep"
    assert _steps_of(runtime) == {0: ["int8_fp8"], 1: ["fp4"], 2: ["int8_fp8"]}
    assert len(runtime.stats.calls) == 6 * 2  # 6 forwards x 2 attention layers
    # A noisier timestep starts a new generation.
    model(**transformer_inputs("flux", timestep=1.0))
    assert runtime.generation == 1 and runtime.step == 0
    remove(model)


def test_without_total_steps_last_rule_cannot_match():
    model = tiny_transformer("sd3", layers=1)
    runtime = apply(model, log_summary=False)
    for t in (1000.0, 500.0, 1.0):
        model(**transformer_inputs("sd3", timestep=t))
    assert _steps_of(runtime) == {0: ["int8_fp8"], 1: ["fp4"], 2: ["fp4"]}
    remove(model)


def test_cache_context_step_index_is_preferred():
    model = tiny_transformer("flux", layers=1)
    runtime = apply(model, log_summary=False)
    for i in range(4):
        for name in ("cond", "uncond"):
            with model.cache_context(name, step_index=i, num_inference_steps=4):
                model(**transformer_inputs("flux", timestep=0.5))  # same t every step: only the context tells
    assert runtime.step_source == "cache_context"
    assert _steps_of(runtime) == {0: ["int8_fp8"], 1: ["fp4"], 2: ["fp4"], 3: ["int8_fp8"]}
    remove(model)


def test_timestep_range_rule_uses_normalised_timestep():
    model = tiny_transformer("hunyuan_video", layers=1)
    runtime = apply(model, {"default": "fp4", "rules": [{"kernel": "sdpa", "timesteps": [0.8, 1.0],
                                                         "block_types": ["double", "single"]}]},
                    log_summary=False)
    for t in (950.0, 500.0):
        model(**transformer_inputs("hunyuan_video", timestep=t))
    by_step = {s: {c.requested for c in runtime.stats.calls if c.step == s and "refiner" not in c.layer}
               for s in (0, 1)}
    assert by_step == {0: {"sdpa"}, 1: {"fp4"}}
    remove(model)


def test_runtime_scheduler_position_with_bf16_rounded_timesteps():
    from diffusers import FlowMatchEulerDiscreteScheduler
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(20)
    rt = Sage3Runtime(None, "flux", scheduler=sched, log_summary=False)
    rt.register_layers(["transformer_blocks.0.attn"])
    seen = []
    for i, t in enumerate(sched.timesteps):
        t_model = float(torch.tensor(float(t)).to(torch.bfloat16)) / 1000.0  # what Flux passes in bf16
        for _ in range(2):  # true CFG
            rt.begin_forward(t_model)
            seen.append((rt.step, rt.num_steps, rt.kernel_for("transformer_blocks.0.attn")))
            rt.end_forward()
        sched._step_index = i + 1  # what scheduler.step() does
    assert [s[0] for s in seen] == [i // 2 for i in range(40)]
    assert {s[1] for s in seen} == {20}
    assert [s[2] for s in seen[::2]] == ["int8_fp8"] + ["fp4"] * 18 + ["int8_fp8"]


def test_summary_logged_once_per_generation(caplog):
    model = tiny_transformer("flux", layers=1)
    apply(model, num_inference_steps=2)
    with caplog.at_level("INFO", logger="sage3_diffusers"):
        for _ in range(2):
            for t in (1.0, 1.0, 0.5, 0.5):
                model(**transformer_inputs("flux", timestep=t))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sage3: generation")]
    assert len(lines) == 2 and lines[0].startswith("sage3: generation 0, 2 steps, 8 attention calls")
    assert "kernels by step 0:int8_fp8 1:int8_fp8" in lines[0]
    remove(model)


def test_stats_memory_is_bounded_and_tables_aggregate():
    from sage3_diffusers.integration.stats import KernelStats
    st = KernelStats(max_calls=10)
    for i in range(25):
        st.record(0, i % 3, f"l{i % 2}", "fp4", "reference_fp4", None if i % 2 else "why")
    assert len(st.calls) <= 10 and st.calls[-1].step == 24 % 3
    rows = st.table()
    assert {(r["step"], r["layer"]) for r in rows} == {(c.step, c.layer) for c in st.calls}
    assert sum(sum(r["backends"].values()) for r in rows) == len(st.calls)
