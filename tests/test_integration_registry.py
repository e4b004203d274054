"""The model registry: every family module declares what its model really has (checked on its tiny model),
and ships its policy and example; the registry's lookups and errors."""
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from sage3_diffusers.integration import models  # noqa: E402
from sage3_diffusers.integration.policy import PolicyError, load_policy  # noqa: E402
from sage3_diffusers.integration.tiny import tiny_transformer, transformer_inputs  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", models.names())
def test_family_declaration_matches_its_tiny_model(name):
    fam = models.get(name)
    assert fam.tiny_transformer and fam.tiny_inputs, "every family has a tiny model for the tests"
    model = tiny_transformer(name, layers=1)
    assert models.for_transformer(model).name == fam.transformer_family
    served = [m.processor for m in model.modules()
              if type(getattr(m, "processor", None)).__name__ in fam.attention_processors]
    assert served, f"no processor of {fam.attention_processors} in the tiny {name} model"
    for proc in served:  # the declared route is the one diffusers' processors take
        assert models.calls_dispatcher(proc) == (fam.route == "dispatcher"), type(proc).__name__
    for layer in (n for n, m in model.named_modules() if getattr(m, "processor", None) in served):
        index, kind = fam.block_of(layer)
        assert index is not None and kind in models.block_types(), (layer, index, kind)
    inputs = transformer_inputs(name, config=model.config)
    if fam.mask_kwarg:
        assert inputs[fam.mask_kwarg].shape[0] == 2
    with torch.no_grad():
        model(**inputs)


@pytest.mark.parametrize("name", [f.name for f in models.families() if f.example is not None])
def test_family_with_an_example_ships_its_policy_and_script(name):
    assert (REPO / "examples" / f"{name}.py").is_file()
    assert load_policy(name).model == name  # sage3_diffusers/configs/<name>.yaml, by name
    fam = models.get(name)
    assert fam.hub_id and fam.pipeline_class


def test_lookups_and_errors():
    assert models.get("sd35").transformer_family == "sd3"
    with pytest.raises(ValueError, match="unknown model family 'nope'; known: .*flux"):
        models.get("nope")
    with pytest.raises(ValueError, match="route must be one of"):
        models.ModelFamily(name="x", transformer_classes=("X",), route="sdpa")
    with pytest.raises(ValueError, match="needs `processor`"):
        models.ModelFamily(name="x", transformer_classes=("X",), route="processor")
    with pytest.raises(ValueError, match="registered twice"):
        models.register(models.ModelFamily(name="flux", transformer_classes=("X",)))
    with pytest.raises(PolicyError, match="unknown model 'nope'"):
        load_policy({"model": "nope"})
    assert models.layer_block("blocks.3.attn1") == (3, None)  # no family: index only
    assert models.layer_block("transformer_blocks.2.attn2") == (2, "self")
