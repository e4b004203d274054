"""Qwen-Image (and its Edit variants): 60 double-stream blocks, 24 heads x 128, joint [text, image].

`QwenDoubleStreamAttnProcessor2_0` calls `dispatch_attention_fn`: the dispatcher route. With a batch of
prompts of unequal length the pipeline passes `encoder_hidden_states_mask` (right-padded text; None when
every token is valid) and the processor builds a bool [B, 1, 1, text + image] key mask: the padding sits
between the valid text and the image, so the quantized kernels run on the valid keys gathered per sample.
The pipelines pass `timestep = t / 1000` (a sigma in [0, 1]).
"""
import torch

from . import BenchSpec, Example, ModelFamily


def tiny_transformer(*, seed, layers, head_dim):
    from diffusers import QwenImageTransformer2DModel
    # RoPE axes (frame, height, width) sum to head_dim; in_channels = 4 latent channels x 2x2 packing.
    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=layers,
                                       attention_head_dim=head_dim, num_attention_heads=2, joint_attention_dim=16,
                                       axes_dims_rope=(head_dim - 12, 6, 6))


def tiny_inputs(c, t, *, grid=None, text_len=None):
    _, h, w = grid or (1, 4, 4)  # packed latent grid
    n = text_len or 10
    return dict(hidden_states=t.randn(t.batch, h * w, c.in_channels),
                encoder_hidden_states=t.randn(t.batch, n, c.joint_attention_dim),
                encoder_hidden_states_mask=t.text_mask(n), timestep=t.full(t.t(0.7)),
                img_shapes=[[(1, h, w)]] * t.batch, return_dict=False)


def tiny_pipeline(transformer):
    """Tiny Qwen2.5-VL text encoder (a 100-word vocabulary), Qwen-Image VAE (4 latent channels)."""
    import diffusers as d
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from ..tiny import lower_case, word_tokenizer
    torch.manual_seed(0)
    vae = d.AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                   temperal_downsample=[False, True], latents_mean=[0.0] * 4,
                                   latents_std=[1.0] * 4).eval()
    hidden = transformer.config.joint_attention_dim
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": hidden, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "vocab_size": 100, "bos_token_id": 2, "eos_token_id": 3,
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                     "rope_theta": 1e6},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": hidden},
        hidden_size=hidden, vocab_size=100, bos_token_id=2, eos_token_id=3, vision_start_token_id=97,
        vision_end_token_id=98, vision_token_id=99)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    # The pipeline drops its prompt template's first 34 tokens and allows 1024 after them.
    return d.QwenImagePipeline(transformer=transformer, vae=vae, scheduler=d.FlowMatchEulerDiscreteScheduler(),
                               text_encoder=text_encoder, tokenizer=lower_case(word_tokenizer(1058)))


def tiny_call_kwargs(*, true_cfg=False):
    kw = dict(height=32, width=32, max_sequence_length=16, true_cfg_scale=1.0)
    if true_cfg:
        kw.update(true_cfg_scale=2.0, negative_prompt="dark")
    return kw


def bench_inputs(batch, device, dtype, *, height, width, frames, gen):
    """Latents /8, packed 2x2 (64 channels): 1328x1328 gives 83 x 83 = 6,889 image tokens; 256 text tokens
    (Qwen2.5-VL hidden size 3584), all valid (a single prompt: the pipeline passes no mask)."""
    h2, w2 = height // 16, width // 16

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)
    return dict(hidden_states=rnd(batch, h2 * w2, 64), encoder_hidden_states=rnd(batch, 256, 3584),
                encoder_hidden_states_mask=None, timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
                img_shapes=[[(1, h2, w2)]] * batch)


QWENIMAGE = ModelFamily(
    name="qwenimage",
    transformer_classes=("QwenImageTransformer2DModel",),
    route="dispatcher",
    attention_processors=("QwenDoubleStreamAttnProcessor2_0",),
    block_types={"transformer_blocks": "double"},
    timestep_scale=1.0,
    scheduler_units=1000.0,
    mask_kwarg="encoder_hidden_states_mask",
    hub_id="Qwen/Qwen-Image",
    pipeline_class="QwenImagePipeline",
    example=Example(dict(height=1328, width=1328, num_inference_steps=50, true_cfg_scale=4.0,
                         negative_prompt=" "),
                    prompt="a red robot reading a newspaper in a city street at night, cinematic"),
    tiny_transformer=tiny_transformer,
    tiny_inputs=tiny_inputs,
    tiny_pipeline=tiny_pipeline,
    tiny_call_kwargs=tiny_call_kwargs,
    # Batch 1: true CFG runs cond and uncond as separate calls.
    bench=BenchSpec(config={}, layer_args=("num_layers",), default_size=(1328, 1328, 1, 1),
                    make_inputs=bench_inputs),
    report_shape=((1, 64, 64), 256),
    description="Qwen-Image: 60 double-stream blocks, 24 heads x 128",
)

FAMILIES = (QWENIMAGE,)
