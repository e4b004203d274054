"""Policy rules, YAML loading and validation errors."""
from pathlib import Path

import pytest

from sage3_diffusers.integration.policy import (Policy, PolicyError, Rule, default_policy, layer_block,
                                                load_policy)

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "sage3_diffusers" / "configs").glob("*.yaml"))


def test_every_config_loads_and_is_the_recommended_hybrid():
    names = {p.stem for p in CONFIGS}
    assert {"flux", "sd35", "cogvideox", "hunyuan_video", "mochi"} <= names
    for path in CONFIGS:
        pol = load_policy(path)
        assert pol.source == str(path)
        for step, kernel in [(0, "int8_fp8"), (1, "fp4"), (27, "fp4"), (28, "fp4"), (29, "int8_fp8")]:
            assert pol.kernel_for("transformer_blocks.3.attn", step=step, num_steps=30) == kernel, (path, step)


def test_default_policy_first_and_last_step():
    pol = default_policy()
    got = [pol.kernel_for("single_transformer_blocks.0.attn", step=s, num_steps=5) for s in range(5)]
    assert got == ["int8_fp8", "fp4", "fp4", "fp4", "int8_fp8"]
    # Unknown total: "last" cannot match; unknown step: no step rule matches.
    assert pol.kernel_for("x", step=4, num_steps=None) == "fp4"
    assert pol.kernel_for("x", step=None) == "fp4"


def test_rule_conditions_and_precedence():
    pol = Policy.from_dict({
        "default": "fp4",
        "rules": [
            {"name": "refiner", "kernel": "sdpa", "block_types": ["refiner"]},
            {"kernel": "int8_fp8", "timesteps": [0.9, 1.0]},
            {"kernel": "sdpa", "layers": ["single_transformer_blocks.*"], "blocks": [0, 1],
             "steps": {"range": [2, 3]}},
            {"kernel": "int8_fp8", "block_types": "double", "blocks": [5, 6]},
        ]})
    kf = pol.kernel_for
    assert kf("context_embedder.token_refiner.refiner_blocks.0.attn", step=9, t_norm=0.95) == "sdpa"  # rule order
    assert kf("transformer_blocks.0.attn", step=0, t_norm=0.95) == "int8_fp8"
    assert kf("single_transformer_blocks.1.attn", step=2, t_norm=0.5) == "sdpa"
    assert kf("single_transformer_blocks.2.attn", step=2, t_norm=0.5) == "fp4"   # block outside range
    assert kf("single_transformer_blocks.1.attn", step=4, t_norm=0.5) == "fp4"   # step outside range
    assert kf("transformer_blocks.5.attn", step=4, t_norm=0.5) == "int8_fp8"
    assert kf("single_transformer_blocks.5.attn", step=4, t_norm=0.5) == "fp4"   # wrong block type
    assert kf("transformer_blocks.5.attn", step=4, t_norm=None) == "int8_fp8"    # t unknown: rule 2 skipped


def test_block_types_per_family():
    assert layer_block("transformer_blocks.3.attn") == (3, "double")
    assert layer_block("single_transformer_blocks.7.attn") == (7, "single")
    assert layer_block("transformer_blocks.2.attn2") == (2, "self")
    assert layer_block("context_embedder.token_refiner.refiner_blocks.1.attn") == (1, "refiner")
    assert layer_block("transformer_blocks.4.attn1", "cogvideox") == (4, "single")
    assert layer_block("transformer_blocks.4.attn1", "mochi") == (4, "double")
    assert layer_block("proj_out") == (None, None)


def test_kernel_name_shortcuts():
    assert load_policy("int8_fp8").kernel_for("anything", step=0, num_steps=1) == "int8_fp8"
    assert load_policy({"default": "reference_fp4"}).default == "reference_fp4"
    with pytest.raises(PolicyError, match="policy 'fp3': not a bundled policy"):
        load_policy("fp3")


BAD_FILES = [
    # (file text, fragments the error must contain)
    ("default: fp4\nrule: []\n", ["unknown key 'rule'", "allowed keys: model, default, rules"]),
    ("default: fp8\n", ["default", "unknown kernel 'fp8'", "allowed: auto, fp4, int8_fp8, sdpa"]),
    ("rules:\n  - kernel: int4\n", ["rules[0].kernel", "unknown kernel 'int4'"]),
    ("rules:\n  - kernel: fp4\n    step: {first: 1}\n", ["rules[0]", "unknown key 'step'", "steps"]),
    ("rules:\n  - kernel: fp4\n    steps: {first: 1, middle: 2}\n", ["rules[0].steps", "unknown key 'middle'",
                                                                     "first, last, range"]),
    ("rules:\n  - kernel: fp4\n    steps: {range: [5, 2]}\n", ["rules[0].steps.range", "bad range [5, 2]"]),
    ("rules:\n  - kernel: fp4\n    steps: {first: one}\n", ["rules[0].steps.first", "expected an integer",
                                                            "str 'one'"]),
    ("rules:\n  - kernel: fp4\n    steps: {last: -1}\n", ["rules[0].steps.last", "integer >= 0"]),
    ("rules:\n  - kernel: fp4\n    timesteps: [0.2, 1.5]\n", ["rules[0].timesteps", "[0, 1]"]),
    ("rules:\n  - kernel: fp4\n    timesteps: [0.8, 0.2]\n", ["rules[0].timesteps", "bad range"]),
    ("rules:\n  - kernel: fp4\n    timesteps: 0.5\n", ["rules[0].timesteps", "list of two numbers"]),
    ("rules:\n  - kernel: fp4\n    blocks: [0, 1, 2]\n", ["rules[0].blocks", "list of two integers"]),
    ("rules:\n  - kernel: fp4\n    blocks: [0, 1.5]\n", ["rules[0].blocks", "expected an integer"]),
    ("rules:\n  - kernel: fp4\n    block_types: [triple]\n", ["rules[0].block_types", "unknown value 'triple'",
                                                              "double, single, self, refiner"]),
    ("rules:\n  - kernel: fp4\n    layers: 3\n", ["rules[0].layers", "string or list of strings"]),
    ("rules:\n  - steps: {first: 1}\n", ["rules[0]", "missing required key 'kernel'"]),
    ("rules:\n  - kernel: [fp4]\n", ["rules[0].kernel", "expected a kernel name", "list"]),
    ("rules: {kernel: fp4}\n", ["rules", "expected a list of rules"]),
    ("rules:\n  - fp4\n", ["rules[0]", "expected a mapping"]),
    ("- fp4\n", ["top level must be a mapping"]),
    ("model: sdxl\n", ["model", "unknown model 'sdxl'", "flux"]),
    ("rules:\n  - kernel: fp4\n    name: 7\n", ["rules[0].name", "expected a string"]),
    ("default: fp4\nrules: [\n", ["not valid YAML"]),
]


@pytest.mark.parametrize("text,fragments", BAD_FILES, ids=[f"bad{i}" for i in range(len(BAD_FILES))])
def test_bad_policy_file_gets_a_named_error(tmp_path, text, fragments):
    path = tmp_path / "policy_under_test.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as e:
        load_policy(path)
    msg = str(e.value)
    assert msg.startswith(str(path)), msg  # names the file
    for frag in fragments:
        assert frag in msg, (frag, msg)


def test_missing_file(tmp_path):
    with pytest.raises(PolicyError, match="not found"):
        load_policy(tmp_path / "nope.yaml")


def test_rule_round_trip_to_dict():
    pol = Policy.from_dict({"default": "int8_fp8", "rules": [
        {"name": "r", "kernel": "fp4", "steps": {"first": 2, "range": [3, 4]}, "timesteps": [0.1, 0.2],
         "layers": ["a.*"], "blocks": [1, 2], "block_types": ["single"]}]})
    again = Policy.from_dict(pol.to_dict())
    assert again.rules == pol.rules and again.default == "int8_fp8"
    assert isinstance(pol.rules[0], Rule)
