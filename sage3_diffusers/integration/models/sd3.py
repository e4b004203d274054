"""Stable Diffusion 3 / 3.5: joint [image, text] blocks; SD3.5 adds image-only `attn2` in its dual layers.

`JointAttnProcessor2_0` calls SDPA directly (`set_attention_backend` is a no-op there): the processor
route. The transformer receives `timestep` in [0, 1000]; SD3 takes no attention mask (the default
processor ignores one).
"""
import torch

from ..processors import SD3Sage3Processor
from . import BenchSpec, Example, ModelFamily


def _tiny(extra):
    def build(*, seed, layers, head_dim):
        from diffusers import SD3Transformer2DModel
        return SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=layers,
                                     attention_head_dim=head_dim, num_attention_heads=2,
                                     caption_projection_dim=2 * head_dim, joint_attention_dim=32,
                                     pooled_projection_dim=64, out_channels=4, pos_embed_max_size=8, **extra)
    return build


def tiny_inputs(c, t, *, grid=None, text_len=None):
    _, h, w = grid or (1, 6, 6)
    p = c.patch_size
    return dict(hidden_states=t.randn(t.batch, c.in_channels, h * p, w * p),
                encoder_hidden_states=t.randn(t.batch, text_len or 10, c.joint_attention_dim),
                pooled_projections=t.randn(t.batch, c.pooled_projection_dim), timestep=t.full(t.t(700.0)),
                return_dict=False)


def tiny_pipeline(transformer):
    import diffusers as d

    from ..tiny import clip_text_model, image_vae, lower_case, t5_encoder, word_tokenizer
    return d.StableDiffusion3Pipeline(
        scheduler=d.FlowMatchEulerDiscreteScheduler(), vae=image_vae(4), transformer=transformer,
        text_encoder=clip_text_model(16, projection=32), tokenizer=lower_case(word_tokenizer(77, bos=True)),
        text_encoder_2=clip_text_model(16, projection=32), tokenizer_2=lower_case(word_tokenizer(77, bos=True)),
        text_encoder_3=t5_encoder(32), tokenizer_3=lower_case(word_tokenizer(512)))


def tiny_call_kwargs(*, true_cfg=False):
    return dict(height=8, width=8, guidance_scale=5.0, max_sequence_length=16)


def bench_inputs(batch, device, dtype, *, height, width, frames, gen):
    """Latents /8, 77 CLIP + 256 T5 tokens."""
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)
    return dict(hidden_states=rnd(batch, 16, height // 8, width // 8), encoder_hidden_states=rnd(batch, 333, 4096),
                pooled_projections=rnd(batch, 2048), timestep=torch.full((batch,), 500.0, device=device))


_COMMON = dict(
    route="processor",
    attention_processors=("JointAttnProcessor2_0", "FusedJointAttnProcessor2_0"),
    processor=SD3Sage3Processor,
    block_types={"transformer_blocks": "double"},
    attr_block_types={"attn2": "self"},
    timestep_scale=1000.0,
    pipeline_class="StableDiffusion3Pipeline",
    tiny_inputs=tiny_inputs,
    tiny_pipeline=tiny_pipeline,
    tiny_call_kwargs=tiny_call_kwargs,
    report_shape=((1, 64, 64), 333),
    attention_shape="SD3.5-L-1024",
)

SD3 = ModelFamily(
    name="sd3",
    transformer_classes=("SD3Transformer2DModel",),
    hub_id="stabilityai/stable-diffusion-3-medium-diffusers",  # example: examples/sd35.py --model <this id>
    tiny_transformer=_tiny({}),
    description="SD3: joint blocks",
    **_COMMON,
)

SD35 = ModelFamily(
    name="sd35",
    transformer_classes=(),
    variant_of="sd3",
    hub_id="stabilityai/stable-diffusion-3.5-large",
    example=Example(dict(height=1024, width=1024, num_inference_steps=28, guidance_scale=3.5),
                    prompt="a portrait of an old astronaut, detailed"),
    tiny_transformer=_tiny(dict(dual_attention_layers=(0,), qk_norm="rms_norm")),
    bench=BenchSpec(config={"num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
                            "pos_embed_max_size": 192, "qk_norm": "rms_norm"}, layer_args=("num_layers",),
                    default_size=(1024, 1024, 1, 2), make_inputs=bench_inputs,
                    transformer_class="SD3Transformer2DModel"),
    description="SD3.5: joint blocks, image-only attn2 in dual layers",
    **_COMMON,
)

FAMILIES = (SD3, SD35)
