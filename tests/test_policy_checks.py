"""Policies as a user meets them: bundled names, kernel="auto", empty files, rules that can never match."""
import warnings

import pytest

import sage3_diffusers as s3
from sage3_diffusers.integration.policy import (BUNDLED_DIR, PolicyError, bundled_policies, fixed_policy,
                                                load_policy, steps_beyond_warnings, unmatched_rule_warnings)

FLUX_LAYERS = [f"transformer_blocks.{i}.attn" for i in range(2)] + \
    [f"single_transformer_blocks.{i}.attn" for i in range(3)]
# Wan 2.2 A14B: two experts; the second one's layers carry its pipeline attribute as a prefix.
WAN22_LAYERS = [f"{prefix}blocks.{i}.attn{j}" for prefix in ("", "transformer_2.") for i in range(2) for j in (1, 2)]


def test_bundled_policies_load_by_name():
    assert set(bundled_policies()) >= {"flux", "sd35", "cogvideox", "hunyuan_video", "mochi"}
    for name in bundled_policies():
        pol = load_policy(name)
        assert pol.source == str(BUNDLED_DIR / f"{name}.yaml")
        assert pol.kernel_for("transformer_blocks.0.attn", step=0, num_steps=10) == "int8_fp8"
        assert pol.kernel_for("transformer_blocks.0.attn", step=5, num_steps=10) == "fp4"


def test_auto_is_a_kernel_everywhere():
    assert fixed_policy("auto").default == "auto"
    assert load_policy("auto").default == "auto"
    pol = load_policy({"default": "fp4", "rules": [{"kernel": "auto", "blocks": [0, 0]}]})
    assert pol.kernel_for("transformer_blocks.0.attn") == "auto"
    from sage3_diffusers.integration import Sage3Processor
    assert Sage3Processor(kernel="auto").kernel == "auto"
    with pytest.raises(ValueError, match=r"Sage3Processor\(kernel=...\): unknown kernel 'fp5'; allowed: auto, "):
        Sage3Processor(kernel="fp5")


def test_unknown_kernel_names_the_argument():
    with pytest.raises(PolicyError) as e:
        fixed_policy("flux3")
    msg = str(e.value)
    assert msg.startswith("the kernel= argument of apply: unknown kernel 'flux3'") and "<fixed>" not in msg
    assert "auto" in msg
    with pytest.raises(PolicyError, match=r"policy 'flux3': not a bundled policy \(cogvideox, flux"):
        load_policy("flux3")


@pytest.mark.parametrize("text", ["", "# only a comment\n", "model: flux\n", "rules: []\n", "{}\n"])
def test_empty_policy_file_is_an_error(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as e:
        load_policy(path)
    msg = str(e.value)
    assert msg.startswith(str(path)) and "empty" in msg and "default: fp4" in msg and "policy=None" in msg


def test_rules_that_never_match_are_named():
    pol = load_policy({"default": "fp4", "rules": [
        {"name": "typo", "kernel": "sdpa", "layers": ["transformer_block.*"]},
        {"kernel": "sdpa", "blocks": [40, 50]},
        {"kernel": "sdpa", "block_types": ["refiner"]},
        {"kernel": "sdpa", "layers": ["transformer_blocks.*", "nothing.*"]},
        {"kernel": "sdpa", "blocks": [1, 50], "block_types": ["single"]},   # fine: block 1 exists
        {"kernel": "sdpa", "steps": {"first": 0}},
    ]})
    msgs = unmatched_rule_warnings(pol, FLUX_LAYERS, "flux")
    assert len(msgs) == 5, msgs
    assert "rules[0] ('typo') never matches: layers ['transformer_block.*'] match no attention layer" in msgs[0]
    assert "'transformer_blocks.0.attn'" in msgs[0]
    assert "rules[1] never matches: blocks [40, 50] lie beyond the model's blocks (transformer_blocks 0..1, " \
           "single_transformer_blocks 0..2)" in msgs[1]
    assert "rules[2] never matches: block_types ['refiner']" in msgs[2] and "double, single" in msgs[2]
    assert "rules[3]: layers glob 'nothing.*' matches no attention layer" in msgs[3]
    assert "rules[5]: steps.first 0 matches no step: the rule never matches" in msgs[4]
    # Every bundled policy fits its own model's layer names.
    assert unmatched_rule_warnings(load_policy("flux"), FLUX_LAYERS, "flux") == []


def test_never_matching_rules_in_a_two_transformer_pipeline():
    pol = load_policy({"model": "wan22", "default": "fp4", "rules": [
        {"kernel": "sdpa", "layers": ["transformer_2.blocks.*"]},   # the low-noise expert only: fine
        {"kernel": "sdpa", "block_types": ["cross"]},                 # Wan's text cross-attention: fine
        {"kernel": "sdpa", "blocks": [1, 1]},                         # block 1 of both experts: fine
        {"name": "first-expert", "kernel": "sdpa", "layers": ["transformer.blocks.*"]},  # its layers: no prefix
        {"kernel": "sdpa", "block_types": ["double"]},
        {"kernel": "sdpa", "blocks": [5, 9]},
    ]})
    msgs = unmatched_rule_warnings(pol, WAN22_LAYERS, "wan22")
    assert len(msgs) == 3, msgs
    assert "rules[3] ('first-expert') never matches: layers ['transformer.blocks.*'] match no attention layer of " \
           "this wan22 model" in msgs[0]
    assert "'blocks.0.attn1'" in msgs[0] and "'transformer_2.blocks.0.attn2'" in msgs[0]  # both experts' names
    assert "rules[4] never matches: block_types ['double']: this wan22 model has only cross, self blocks" in msgs[1]
    assert "rules[5] never matches: blocks [5, 9] lie beyond the model's blocks (blocks 0..1, " \
           "transformer_2.blocks 0..1)" in msgs[2]


def test_policy_model_and_block_types_come_from_the_registry():
    from sage3_diffusers.integration import models
    for fam in models.families():
        assert load_policy({"model": fam.name, "default": "fp4"}).model == fam.name
    pol = load_policy({"default": "fp4", "rules": [{"kernel": "sdpa", "block_types": ["cross", "audio_video"]}]})
    assert pol.kernel_for("blocks.0.attn2", family="wan") == "sdpa"
    assert pol.kernel_for("blocks.0.attn1", family="wan") == "fp4"
    with pytest.raises(PolicyError, match=r"<dict>: model: unknown model 'wan3'; allowed: .*hunyuan_video15.*wan22"):
        load_policy({"model": "wan3", "default": "fp4"})
    with pytest.raises(PolicyError, match=r"<dict>: model: unknown model 'wan3'"):  # named before "empty"
        load_policy({"model": "wan3"})
    with pytest.raises(PolicyError, match=r"rules\[0\].block_types: unknown value 'crosss'; allowed: .*cross"):
        load_policy({"default": "fp4", "rules": [{"kernel": "sdpa", "block_types": ["crosss"]}]})


@pytest.mark.parametrize("name", bundled_policies())
def test_bundled_policy_fits_its_own_model(name):
    """Each bundled policy names a registered family, and applying it to that family's tiny transformer warns
    about nothing."""
    pytest.importorskip("diffusers")
    from sage3_diffusers.integration import models
    from sage3_diffusers.integration.tiny import tiny_transformer
    pol = load_policy(name)
    assert models.find(pol.model) is not None, pol.model
    model = tiny_transformer(pol.model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runtime = s3.apply(model, name, log_summary=False)
    assert runtime.layers
    s3.remove(model)


def test_steps_range_beyond_the_run():
    pol = load_policy({"default": "fp4", "rules": [
        {"kernel": "sdpa", "steps": {"range": [10, 12]}},
        {"kernel": "sdpa", "steps": {"first": 1, "range": [10, 12]}},
        {"kernel": "sdpa", "steps": {"range": [2, 40]}}]})
    got = steps_beyond_warnings(pol, 4)
    assert [i for i, _ in got] == [0, 1]
    assert "rules[0]: steps.range [10, 12] lies beyond this run's 4 steps (0..3); the rule never matches" in got[0][1]
    assert "that part of the rule never matches" in got[1][1]
    assert steps_beyond_warnings(pol, 11) == []


@pytest.fixture
def emulate():
    s3.set_fallback("emulate")
    yield
    s3.set_fallback(None)


def test_apply_warns_at_apply_time_and_once_steps_are_known(emulate):
    pytest.importorskip("diffusers")
    from sage3_diffusers.integration.tiny import pipeline_call_kwargs, tiny_pipeline
    pipe = tiny_pipeline("flux")
    pipe.set_progress_bar_config(disable=True)
    policy = {"default": "sdpa", "rules": [{"name": "late", "kernel": "int8_fp8", "steps": {"range": [5, 9]}},
                                           {"name": "deep", "kernel": "int8_fp8", "blocks": [30, 40]}]}
    with pytest.warns(UserWarning, match=r"rules\[1\] \('deep'\) never matches: blocks \[30, 40\]") as rec:
        runtime = s3.apply(pipe, policy, log_summary=False)
    assert not any("late" in str(w.message) for w in rec)  # the step count is not known yet
    with pytest.warns(UserWarning, match=r"rules\[0\] \('late'\): steps.range \[5, 9\] lies beyond this run's 2 "):
        pipe(**pipeline_call_kwargs("flux", prompt="a cat", steps=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per rule and step count
        pipe(**pipeline_call_kwargs("flux", prompt="a cat", steps=2))
    s3.remove(pipe)
    assert runtime.stats.calls


def test_apply_kernel_auto_runs_the_dispatchers_choice(emulate):
    pytest.importorskip("diffusers")
    from sage3_diffusers.integration.tiny import tiny_transformer, transformer_inputs
    model = tiny_transformer("sd3")
    runtime = s3.apply(model, kernel="auto", log_summary=False)
    model(**transformer_inputs("sd3"))
    calls = runtime.stats.calls
    assert calls and {c.requested for c in calls} == {"auto"}
    # On CPU (fp32) the fastest backend that can run is exact SDPA; auto never picks an emulation.
    assert {c.backend for c in calls} == {"sdpa"}
    assert runtime.stats.backends_by_step() == runtime.stats.backends_by_step(runtime.stats.generation())
    s3.remove(model)


def test_apply_checks_rules_against_both_transformers_of_a_pipeline(emulate):
    pytest.importorskip("diffusers")
    from sage3_diffusers.integration.tiny import tiny_pipeline
    pipe = tiny_pipeline("wan22")
    assert pipe.transformer_2 is not None
    policy = {"model": "wan22", "default": "fp4", "rules": [
        {"name": "low-noise-expert", "kernel": "sdpa", "layers": ["transformer_2.blocks.1.*"]},
        {"name": "typo", "kernel": "sdpa", "layers": ["transformer_3.*"]}]}
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        runtime = s3.apply(pipe, policy, log_summary=False)
    ours = [str(w.message) for w in rec if "sage3_diffusers" in str(w.message)]
    assert len(ours) == 1, ours
    assert "rules[1] ('typo') never matches" in ours[0] and "'transformer_2.blocks.0.attn1'" in ours[0]
    assert any(layer.startswith("transformer_2.blocks.1.") for layer in runtime.layers)
    s3.remove(pipe)
