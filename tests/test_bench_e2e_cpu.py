"""The end-to-end benchmark builds real-config transformers and inputs that fit them (checked on the meta
device: shapes only, no memory, no GPU)."""
import pytest
import torch

from sage3_diffusers.bench_e2e import DEFAULT_SIZES, MODEL_CONFIGS, build_transformer, main, make_inputs


# Every family of the registry that declares a bench spec (mochi autocasts, HunyuanVideo 1.5 gathers its valid
# text tokens with data-dependent shapes: neither runs on the meta device).
@pytest.mark.parametrize("family", sorted(set(MODEL_CONFIGS) - {"mochi", "hunyuan_video15"}))
def test_real_config_inputs_fit_the_model(family):
    model = build_transformer(family, (1,) * len(MODEL_CONFIGS[family][2]), "meta", torch.bfloat16)
    frames = DEFAULT_SIZES[family][2]
    inputs = make_inputs(family, 1, "meta", torch.bfloat16, height=128, width=128, frames=min(frames, 9), gen=None)
    out = model(**inputs, return_dict=False)[0]
    assert out.shape[0] == 1


def test_layers_argument_is_checked():
    with pytest.raises(ValueError, match="takes 2 numbers"):
        build_transformer("flux", (1,), "meta", torch.bfloat16)


def test_needs_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert main(["--model", "flux"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out
