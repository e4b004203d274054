"""The dispatcher route of `apply`: per-layer / per-step kernels, masks, no process-wide side effect, the
generic adapter, unreachable models, context parallelism refused, several transformers in one pipeline."""
import dataclasses
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

import sage3_diffusers as s3  # noqa: E402
from integration_mixins import (FamilyConfig, HybridPolicyMixin, RoundTripMixin, SdpaMatchesDefaultMixin,  # noqa: E402
                                fresh_seed)
from sage3_diffusers.integration import apply, models, remove  # noqa: E402
from sage3_diffusers.integration.dispatcher_backend import POLICY_BACKEND, context_parallel_available  # noqa: E402
from sage3_diffusers.integration.tiny import tiny_transformer, transformer_inputs  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _emulate():
    with torch.no_grad():
        s3.set_fallback("emulate")
        yield
        s3.set_fallback(None)


def _active_backend():
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    return _AttentionBackendRegistry._active_backend


def test_apply_keeps_diffusers_processors_and_the_global_backend():
    before = _active_backend()
    for family in ("flux", "hunyuan_video"):
        model = tiny_transformer(family)
        classes = {n: type(p) for n, p in model.attn_processors.items()}
        apply(model, log_summary=False)
        assert {n: type(p) for n, p in model.attn_processors.items()} == classes
        assert _active_backend() == before
        remove(model)
        assert all(p._attention_backend is None for p in model.attn_processors.values()
                   if hasattr(p, "_attention_backend"))
    assert _active_backend() == before


def test_per_layer_and_per_step_kernels_in_stats():
    model = tiny_transformer("flux", layers=2)
    policy = {"default": "fp4", "rules": [
        {"kernel": "int8_fp8", "steps": {"first": 1}},
        {"kernel": "sdpa", "block_types": ["single"]},
        {"kernel": "int8_fp8", "layers": ["transformer_blocks.1.*"]}]}
    runtime = apply(model, policy, num_inference_steps=3, log_summary=False)
    for i, t in enumerate((1.0, 0.6, 0.3)):
        model(**transformer_inputs("flux", timestep=t, seed=i))
    ran = {(c.step, c.layer): c.backend for c in runtime.stats.calls}
    for layer in runtime.layers:
        assert ran[(0, layer)] == "reference_int8_fp8", layer
        for step in (1, 2):
            expected = ("sdpa" if layer.startswith("single") else
                        "reference_int8_fp8" if layer.startswith("transformer_blocks.1.") else "reference_fp4")
            assert ran[(step, layer)] == expected, (step, layer)
    assert len(runtime.stats.calls) == 3 * len(runtime.layers)
    remove(model)


def _capture(model, name, inputs):
    seen = {}
    h = model.get_submodule(name).register_forward_pre_hook(
        lambda m, a, k: seen.update(args=a, kwargs=dict(k)), with_kwargs=True)
    model(**inputs)
    h.remove()
    return seen["args"], seen["kwargs"]


def test_hunyuan_layer_with_other_masks_matches_its_default_processor():
    """A key mask with a hole and a per-query mask in a HunyuanVideo layer: the output is what the default
    processor gives; with a quantized kernel, a per-query mask runs exact SDPA, counted with its reason."""
    model = tiny_transformer("hunyuan_video")
    inputs = transformer_inputs("hunyuan_video", seed=fresh_seed(), text_lengths=[12, 7])
    name = "transformer_blocks.0.attn"
    args, kwargs = _capture(model, name, inputs)
    module = model.get_submodule(name)
    holes = kwargs["attention_mask"].clone()
    holes[0, ..., 3] = False
    per_query = holes.expand(-1, -1, holes.shape[-1], -1).clone()
    per_query[1, 0, 5, :4] = False
    for mask, kernels in ((holes, ["sdpa"]), (per_query, ["sdpa", "reference_int8_fp8"])):
        kwargs["attention_mask"] = mask
        ref = module(*args, **kwargs)
        for kernel in kernels:
            runtime = apply(model, kernel=kernel, log_summary=False)
            out = module(*args, **kwargs)
            for o, r in zip(out, ref):
                torch.testing.assert_close(o, r, atol=1e-5, rtol=0)
            last = runtime.stats.calls[-1]
            assert last.layer == name and last.backend == "sdpa"
            remove(model)
    assert "exact SDPA" in last.reason


def _backend(kernel):
    from sage3_diffusers.integration.dispatcher_backend import _make_backend_fn
    return _make_backend_fn("test", kernel)


@pytest.mark.parametrize("kind", ["bool_2d_prefix", "bool_4d_text_first", "float_additive_heads",
                                  "float_other_values", "per_query"])
def test_backend_masks_match_masked_sdpa(kind):
    """Every mask form diffusers' processors pass gives masked SDPA's output; a mask that is no per-sample key
    set (other bias values, per-query structure) runs exact SDPA, counted with its reason."""
    from sage3_diffusers.integration.stats import GLOBAL_STATS
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    b, s_q, s_k, h, d = 3, 9, 21, 2, 16
    q, k, v = (torch.randn(b, n, h, d, generator=g) for n in (s_q, s_k, s_k))
    keep = torch.ones(b, s_k, dtype=torch.bool)
    if kind in ("bool_2d_prefix", "float_additive_heads", "float_other_values"):
        for i, n in enumerate((21, 13, 4)):
            keep[i, n:] = False
        mask = keep
    else:  # text (6 tokens, right padded) first, then image: padded text in the middle of the keys
        for i, n in enumerate((6, 2, 5)):
            keep[i, n:6] = False
        mask = keep[:, None, None, :]
    if kind.startswith("float"):
        mask = torch.zeros(b, h, 1, s_k).masked_fill(~keep[:, None, None, :], -10000.0)
        if kind == "float_other_values":
            mask[0, :, 0, 0] = -3.0
    if kind == "per_query":
        mask = keep[:, None, None, :].expand(b, 1, s_q, s_k).clone()
        mask[0, 0, 2, :3] = False
    m4 = mask[:, None, None, :] if mask.dim() == 2 else mask
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           attn_mask=m4).transpose(1, 2)
    before = [t.clone() for t in (q, k, v, mask)]
    out = _backend("sdpa")(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0, msg=f"seed {seed}")
    GLOBAL_STATS.reset()
    quantized = _backend("reference_int8_fp8")(q, k, v, attn_mask=mask)
    call = GLOBAL_STATS.calls[-1]
    if kind in ("float_other_values", "per_query"):
        assert call.backend == "sdpa" and "exact SDPA" in call.reason
        torch.testing.assert_close(quantized, ref, atol=1e-5, rtol=0)
    else:
        cos = torch.nn.functional.cosine_similarity(quantized.flatten(), ref.flatten(), dim=0).item()
        assert cos > 0.999, f"seed {seed}: {cos}"
    assert all(torch.equal(a, t) for a, t in zip(before, (q, k, v, mask)))  # caller's tensors untouched


_BUILD = textwrap.dedent("""
    import sys, torch
    from diffusers import FluxTransformer2DModel, HunyuanVideoTransformer3DModel
    def build():
        torch.manual_seed(0)
        flux = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                      attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                      pooled_projection_dim=32, axes_dims_rope=(4, 4, 8)).eval()
        hy = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                            attention_head_dim=16, num_layers=1, num_single_layers=1,
                                            num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
                                            text_embed_dim=16, pooled_projection_dim=32, rope_axes_dim=(4, 4, 8)).eval()
        return flux, hy
    def run(flux, hy):
        g = torch.Generator().manual_seed(1)
        r = lambda *s: torch.randn(*s, generator=g)
        ids = torch.zeros(16, 3)
        out = [flux(hidden_states=r(2, 16, 4), encoder_hidden_states=r(2, 10, 32), pooled_projections=r(2, 32),
                    timestep=torch.full((2,), 0.7), img_ids=ids, txt_ids=torch.zeros(10, 3), return_dict=False)[0]]
        mask = torch.tensor([[1] * 12, [1] * 7 + [0] * 5])
        out.append(hy(hidden_states=r(2, 4, 2, 4, 4), timestep=torch.full((2,), 700.0),
                      encoder_hidden_states=r(2, 12, 16), encoder_attention_mask=mask, pooled_projections=r(2, 32),
                      guidance=torch.full((2,), 3500.0), return_dict=False)[0])
        return out
    with torch.no_grad():
        if sys.argv[2] == "plugin":
            import sage3_diffusers as s3
            from sage3_diffusers.integration.tiny import tiny_transformer, transformer_inputs
            for family in ("hunyuan_video", "flux"):
                other = tiny_transformer(family, seed=5)
                s3.apply(other, log_summary=False)
                other(**transformer_inputs(family))
                s3.remove(other)
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry
        outs = run(*build())
        torch.save({"outs": outs, "active": str(_AttentionBackendRegistry._active_backend)}, sys.argv[1])
""")


@pytest.mark.slow  # two child processes importing torch and diffusers
def test_no_process_wide_side_effect_after_remove(tmp_path):
    """Models built after apply + remove on other models give outputs bit-identical to a process where the
    plugin was never imported (same global active backend)."""
    script = tmp_path / "build.py"
    script.write_text(_BUILD)
    results = {}
    for mode in ("plugin", "plain"):
        out = tmp_path / f"{mode}.pt"
        r = subprocess.run([sys.executable, str(script), str(out), mode], cwd=REPO, capture_output=True, text=True,
                           env={"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                                "PATH": "/usr/bin:/bin"}, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        results[mode] = torch.load(out)
    assert results["plugin"]["active"] == results["plain"]["active"]
    for a, b in zip(results["plugin"]["outs"], results["plain"]["outs"]):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------- generic adapter

def _skyreels(seed=0, layers=2):
    from diffusers import SkyReelsV2Transformer3DModel
    torch.manual_seed(seed)
    return SkyReelsV2Transformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                        in_channels=4, out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32,
                                        num_layers=layers, rope_max_seq_len=32).eval()


def _skyreels_inputs(seed, timestep=700):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, 4, 2, 8, 8, generator=g), timestep=torch.tensor([timestep] * 2),
                encoder_hidden_states=torch.randn(2, 12, 16, generator=g), return_dict=False)


def test_generic_adapter_reaches_a_transformer_without_a_module(caplog):
    """SkyReels-V2 has no module of ours; its processors call dispatch_attention_fn."""
    assert models.for_transformer(_skyreels()) is None
    seed = fresh_seed()
    model = _skyreels(seed % 1000)
    inputs = _skyreels_inputs(seed)
    ref = model(**inputs)[0]
    with caplog.at_level(logging.INFO, logger="sage3_diffusers"):
        runtime = apply(model, kernel="sdpa", log_summary=False)
    lines = [r.getMessage() for r in caplog.records if "generic dispatcher adapter" in r.getMessage()]
    assert len(lines) == 1 and "SkyReelsV2Transformer3DModel" in lines[0] and "dispatcher route" in lines[0]
    torch.testing.assert_close(model(**inputs)[0], ref, atol=1e-5, rtol=0, msg=f"seed {seed}")
    assert {c.layer for c in runtime.stats.calls} == {f"blocks.{i}.attn{j}" for i in range(2) for j in (1, 2)}
    remove(model)


@pytest.mark.parametrize("stated", [None, 1000.0])
def test_generic_adapter_follows_the_policy_steps_from_the_timestep(stated):
    model = _skyreels()
    runtime = apply(model, num_inference_steps=3, log_summary=False, timestep_scale=stated)
    refs = []
    for i, t in enumerate((999, 500, 10)):
        out = model(**_skyreels_inputs(i, t))[0]
        refs.append(out)
    assert runtime.timestep_scale == 1000.0 and runtime.t_norm == pytest.approx(0.01)
    by_step = runtime.stats.requested_by_step(runtime.stats.calls)
    assert {s: set(k) for s, k in by_step.items()} == {0: {"int8_fp8"}, 1: {"fp4"}, 2: {"int8_fp8"}}
    remove(model)
    for i, t in enumerate((999, 500, 10)):
        cos = torch.nn.functional.cosine_similarity(model(**_skyreels_inputs(i, t))[0].flatten(),
                                                    refs[i].flatten(), dim=0).item()
        assert 0.99 <= cos < 1.0, (i, cos)


def test_unreachable_transformer_gets_a_clear_error():
    from diffusers import DiTTransformer2DModel
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1,
                                  sample_size=8, patch_size=2, norm_num_groups=2)
    with pytest.raises(ValueError, match=r"cannot reach the attention of DiTTransformer2DModel.*AttnProcessor2_0.*"
                                         r"SDPA directly"):
        apply(model)
    assert not hasattr(model, "_sage3_installed")
    with pytest.raises(TypeError, match="pipeline"):
        apply(object())


# ------------------------------------------------------------------------------------------ context parallelism

def test_processor_route_refuses_context_parallelism():
    model = tiny_transformer("sd3", layers=1)
    inputs = transformer_inputs("sd3")
    apply(model, kernel="sdpa", log_summary=False)
    # What enable_parallelism does to every processor with the attribute (it needs torch.distributed here).
    processors = {id(p): p for p in model.attn_processors.values()}.values()
    for p in processors:
        p._parallel_config = object()
    with pytest.raises(NotImplementedError, match="context parallelism"):
        model(**inputs)
    for p in processors:
        del p._parallel_config
    remove(model)

    class _CP:
        context_parallel_config = object()
    model._parallel_config = _CP()
    with pytest.raises(NotImplementedError, match="context parallelism enabled"):
        apply(model, kernel="sdpa")
    assert not hasattr(model, "_sage3_installed")


@pytest.mark.skipif(context_parallel_available(), reason="the context-parallel module exists: tested there")
def test_dispatcher_route_raises_under_context_parallelism_without_the_module():
    model = tiny_transformer("flux", layers=1)
    apply(model, kernel="fp4", log_summary=False)
    for p in model.attn_processors.values():
        p._parallel_config = object()
    with pytest.raises(NotImplementedError, match=r"'sage3_policy' \(kernel 'fp4'.*context parallelism"):
        model(**transformer_inputs("flux"))
    remove(model)
    for p in model.attn_processors.values():
        p._parallel_config = None


def test_backends_registered_without_context_parallel_support_unless_the_module_exists():
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    supported = {POLICY_BACKEND, "sage3", "sage2pp"} <= set(_AttentionBackendRegistry._supports_context_parallel)
    assert supported == context_parallel_available()


# ------------------------------------------------------------------------------- several transformers, one runtime

def test_pipeline_with_two_transformers_shares_one_step_count(monkeypatch):
    """A family whose pipeline holds `transformer` and `transformer_2` (a two-expert model): one runtime, one
    step count across both, the second's layers prefixed."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    two = dataclasses.replace(models.get("flux"), pipeline_transformers=("transformer", "transformer_2"))
    monkeypatch.setitem(models._REGISTRY, "flux", two)

    class Pipe:
        transformer = tiny_transformer("flux", seed=1, layers=1)
        transformer_2 = tiny_transformer("flux", seed=2, layers=1)
        scheduler = FlowMatchEulerDiscreteScheduler()
    pipe = Pipe()
    pipe.scheduler.set_timesteps(4)
    runtime = apply(pipe, log_summary=False)
    for i, t in enumerate(pipe.scheduler.timesteps):
        model = pipe.transformer if i < 2 else pipe.transformer_2  # high noise, then low noise
        model(**transformer_inputs("flux", timestep=float(t) / 1000.0, seed=i))
    assert runtime.num_steps == 4
    by_step = runtime.stats.requested_by_step(runtime.stats.calls)
    assert {s: set(k) for s, k in by_step.items()} == {0: {"int8_fp8"}, 1: {"fp4"}, 2: {"fp4"}, 3: {"int8_fp8"}}
    first = {c.layer for c in runtime.stats.calls if c.step < 2}
    second = {c.layer for c in runtime.stats.calls if c.step >= 2}
    assert first == {"transformer_blocks.0.attn", "single_transformer_blocks.0.attn"}
    assert second == {"transformer_2." + layer for layer in first}
    assert pipe.transformer_2._sage3_runtime is runtime
    remove(pipe)
    assert not hasattr(pipe.transformer, "_sage3_installed") and not hasattr(pipe.transformer_2, "_sage3_installed")


class TestSkyReelsGeneric(SdpaMatchesDefaultMixin, RoundTripMixin):
    """The shared mixins on a generic-adapter model (registered for the test only as a tiny builder)."""
    family = "flux"  # overridden below: model() and inputs() build SkyReels-V2

    def model(self, seed=0):
        return _skyreels(seed)

    def inputs(self, seed, **kw):
        return _skyreels_inputs(seed)

    def test_route_is_the_declared_one(self):
        pytest.skip("no declared family: the generic adapter's route is tested above")


def test_dispatcher_route_compiles_fullgraph_per_block_and_switches_kernels_per_step():
    """The layer pre-hook and the backend trace without graph breaks (fullgraph regional compile of
    Flux's blocks); the per-step kernel choice still applies and outputs equal eager. (Exact SDPA on the
    middle step keeps the tracing short; the switch is what is tested.)"""
    import torch._dynamo
    torch._dynamo.reset()
    model = tiny_transformer("flux", layers=1)
    policy = {"default": "sdpa", "rules": [{"kernel": "int8_fp8", "steps": {"first": 1, "last": 1}}]}
    runtime = apply(model, policy, num_inference_steps=3, log_summary=False)
    ts = (1.0, 0.5, 0.25)
    eager = [model(**transformer_inputs("flux", timestep=t, seed=i))[0] for i, t in enumerate(ts)]
    model.compile_repeated_blocks(fullgraph=True, backend="eager")  # tracing is what is tested; no codegen
    for i, t in enumerate(ts):
        out = model(**transformer_inputs("flux", timestep=t, seed=i))[0]
        torch.testing.assert_close(out, eager[i], atol=1e-5, rtol=1e-5)
    calls = runtime.stats.generation()
    assert runtime.stats.backends_by_step(calls) == {0: {"reference_int8_fp8": 2}, 1: {"sdpa": 2},
                                                     2: {"reference_int8_fp8": 2}}
    remove(model)
    torch._dynamo.reset()
