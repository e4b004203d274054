"""Wan 2.1 / 2.2 (T2V, I2V, the 5B TI2V, VACE, Animate): self-attention `attn1` and text cross-attention `attn2`
in every block, head_dim 128 (14B: 40 heads, 5B: 24 heads, 1.3B: 12 heads).

`WanAttnProcessor` calls `dispatch_attention_fn` (twice in I2V cross-attention: image tokens and text tokens):
the dispatcher route; so does Animate's face adapter (`face_adapter.<i>`, `WanAnimateFaceBlockAttnProcessor`,
a layer without a block index or type for policies). VACE's `vace_blocks` are typed like the main blocks.
Wan passes no attention mask: prompts are zero-padded to 512 tokens and attended unmasked. The transformer
receives `timestep` in [0, 1000]; the 5B TI2V pipeline passes one timestep per token ([B, S], 0 on the
conditioning frame of image-to-video), so the step is read from the largest one.

The Wan 2.2 A14B pipelines hold two experts, `transformer` (high noise) and `transformer_2` (low noise),
switched at `boundary_ratio`: `apply(pipe)` installs on both with one runtime, so "first and last step" are
the first step of `transformer` and the last of `transformer_2`. Layers of `transformer_2` are named
`transformer_2.blocks.<i>.attn<j>` in stats and policies.
"""
import torch

from . import BenchSpec, Example, ModelFamily

_PROCESSORS = ("WanAttnProcessor", "WanAnimateFaceBlockAttnProcessor")
_BLOCK_TYPES = {"blocks": "self", "vace_blocks": "self"}
_ATTR_TYPES = {"attn1": "self", "attn2": "cross"}


def tiny_transformer(*, seed, layers, head_dim):
    from diffusers import WanTransformer3DModel
    # in/out channels match the tiny pipeline's VAE (z_dim 16); rope_max_seq_len bounds the latent grid.
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=head_dim,
                                 in_channels=16, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32,
                                 num_layers=layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                 rope_max_seq_len=32)


def tiny_inputs(c, t, *, grid=None, text_len=None):
    f, h, w = grid or (2, 8, 8)  # latent grid; patches of (1, 2, 2)
    return dict(hidden_states=t.randn(t.batch, c.in_channels, f, h, w), timestep=t.full(t.t(700.0)),
                encoder_hidden_states=t.randn(t.batch, text_len or 12, c.text_dim), return_dict=False)


def _tiny_vae():
    import diffusers as d
    torch.manual_seed(0)
    return d.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                              temperal_downsample=[False, True, True]).eval()


def _scheduler():
    import diffusers as d
    # What the Wan pipelines ship with; 4 steps give timesteps 999, 900, 750, 500.
    return d.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def tiny_pipeline(transformer):
    """Wan 2.1: one transformer."""
    import diffusers as d

    from ..tiny import lower_case, t5_encoder, word_tokenizer
    return d.WanPipeline(tokenizer=lower_case(word_tokenizer(512)), text_encoder=t5_encoder(32),
                         transformer=transformer, vae=_tiny_vae(), scheduler=_scheduler())


def tiny_pipeline_two_experts(transformer):
    """Wan 2.2 A14B: `transformer` (high noise) and a second, differently seeded `transformer_2` (low
    noise) of the same config; boundary 0.875 of 1000: with 4 steps (999, 900, 750, 500) each expert runs 2."""
    import diffusers as d

    from ..tiny import lower_case, t5_encoder, word_tokenizer
    torch.manual_seed(1)
    transformer_2 = type(transformer).from_config(transformer.config).eval()
    return d.WanPipeline(tokenizer=lower_case(word_tokenizer(512)), text_encoder=t5_encoder(32),
                         transformer=transformer, transformer_2=transformer_2, vae=_tiny_vae(),
                         scheduler=_scheduler(), boundary_ratio=0.875)


def tiny_transformer_ti2v(*, seed, layers, head_dim):
    from diffusers import WanTransformer3DModel
    # 48 latent channels, as the TI2V VAE (16x spatial compression) produces.
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=head_dim,
                                 in_channels=48, out_channels=48, text_dim=32, freq_dim=32, ffn_dim=32,
                                 num_layers=layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                 rope_max_seq_len=32)


def tiny_pipeline_ti2v(transformer):
    """Wan 2.2 TI2V: one transformer, per-token timesteps (`expand_timesteps`), the residual 48-channel VAE."""
    import diffusers as d

    from ..tiny import lower_case, t5_encoder, word_tokenizer
    torch.manual_seed(0)
    vae = d.AutoencoderKLWan(base_dim=3, z_dim=48, in_channels=12, out_channels=12, is_residual=True, patch_size=2,
                             latents_mean=[0.0] * 48, latents_std=[1.0] * 48, dim_mult=[1, 1, 1, 1],
                             num_res_blocks=1, scale_factor_spatial=16, scale_factor_temporal=4,
                             temperal_downsample=[False, True, True]).eval()
    return d.WanPipeline(tokenizer=lower_case(word_tokenizer(512)), text_encoder=t5_encoder(32),
                         transformer=transformer, vae=vae, scheduler=_scheduler(), expand_timesteps=True)


def tiny_call_kwargs(*, true_cfg=False):
    # Wan always runs cond and uncond as two calls when guidance_scale > 1.
    return dict(height=16, width=16, num_frames=5, guidance_scale=5.0, max_sequence_length=16,
                negative_prompt="dark")


def _rnd(gen, device, dtype):
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)
    return rnd


def bench_inputs(batch, device, dtype, *, height, width, frames, gen):
    """Wan 2.1 / 2.2 A14B: latents /8 spatially, /4 temporally, 16 channels; patches (1, 2, 2); 512 umT5
    tokens (zero-padded, unmasked). 1280x720x81 gives 21 x 45 x 80 = 75,600 video tokens."""
    rnd = _rnd(gen, device, dtype)
    lat_f = (frames - 1) // 4 + 1
    return dict(hidden_states=rnd(batch, 16, lat_f, height // 8, width // 8),
                timestep=torch.full((batch,), 500.0, device=device), encoder_hidden_states=rnd(batch, 512, 4096))


def bench_inputs_ti2v(batch, device, dtype, *, height, width, frames, gen):
    """Wan 2.2 TI2V 5B: the VAE compresses /16 spatially, /4 temporally, 48 channels; one timestep per token
    as the pipeline passes it. 1280x704x121 gives 31 x 22 x 40 = 27,280 video tokens."""
    rnd = _rnd(gen, device, dtype)
    lat_f, lat_h, lat_w = (frames - 1) // 4 + 1, height // 16, width // 16
    tokens = lat_f * (lat_h // 2) * (lat_w // 2)
    return dict(hidden_states=rnd(batch, 48, lat_f, lat_h, lat_w),
                timestep=torch.full((batch, tokens), 500.0, device=device),
                encoder_hidden_states=rnd(batch, 512, 4096))


_COMMON = dict(
    route="dispatcher",
    attention_processors=_PROCESSORS,
    block_types=_BLOCK_TYPES,
    attr_block_types=_ATTR_TYPES,
    timestep_scale=1000.0,
    scheduler_units=1.0,
    mask_kwarg=None,
    pipeline_transformers=("transformer", "transformer_2"),
    pipeline_class="WanPipeline",
    tiny_transformer=tiny_transformer,
    tiny_inputs=tiny_inputs,
    tiny_call_kwargs=tiny_call_kwargs,
)

WAN = ModelFamily(
    name="wan",
    transformer_classes=("WanTransformer3DModel", "WanVACETransformer3DModel", "WanAnimateTransformer3DModel"),
    hub_id="Wan-AI/Wan2.1-T2V-14B-Diffusers",
    example=Example(dict(height=720, width=1280, num_frames=81, num_inference_steps=50, guidance_scale=5.0),
                    prompt="a small robot dancing in the rain at night", video=True),
    tiny_pipeline=tiny_pipeline,
    bench=BenchSpec(config={}, layer_args=("num_layers",), default_size=(720, 1280, 81, 1),
                    make_inputs=bench_inputs),
    report_shape=((6, 30, 52), 512),
    attention_shape="Wan2.1-14B-720p",
    description="Wan 2.1/2.2 14B: 40 blocks of self + cross attention, 40 heads x 128",
    **_COMMON,
)

WAN22 = ModelFamily(
    name="wan22",
    transformer_classes=(),
    variant_of="wan",
    hub_id="Wan-AI/Wan2.2-T2V-A14B-Diffusers",
    example=Example(dict(height=720, width=1280, num_frames=81, num_inference_steps=40, guidance_scale=4.0,
                         guidance_scale_2=3.0),
                    prompt="a small robot dancing in the rain at night", video=True),
    tiny_pipeline=tiny_pipeline_two_experts,
    bench=BenchSpec(config={}, layer_args=("num_layers",), default_size=(720, 1280, 81, 1),
                    make_inputs=bench_inputs, transformer_class="WanTransformer3DModel"),
    report_shape=((6, 30, 52), 512),
    attention_shape="Wan2.1-14B-720p",
    description="Wan 2.2 A14B: two 14B experts (high / low noise), one step count across both",
    **_COMMON,
)

def tiny_call_kwargs_ti2v(*, true_cfg=False):
    # The TI2V VAE compresses 16x: 64x64 pixels are a 4x4 latent, 2x2 patches.
    return dict(tiny_call_kwargs(true_cfg=true_cfg), height=64, width=64)


_TI2V_COMMON = dict(_COMMON, tiny_transformer=tiny_transformer_ti2v, tiny_call_kwargs=tiny_call_kwargs_ti2v)

WAN22_TI2V = ModelFamily(
    name="wan22_ti2v",
    transformer_classes=(),
    variant_of="wan",
    hub_id="Wan-AI/Wan2.2-TI2V-5B-Diffusers",
    example=Example(dict(height=704, width=1280, num_frames=121, num_inference_steps=50, guidance_scale=5.0),
                    prompt="a small robot dancing in the rain at night", video=True),
    tiny_pipeline=tiny_pipeline_ti2v,
    bench=BenchSpec(config={"num_attention_heads": 24, "ffn_dim": 14336, "num_layers": 30, "in_channels": 48,
                            "out_channels": 48},
                    layer_args=("num_layers",), default_size=(704, 1280, 121, 1), make_inputs=bench_inputs_ti2v,
                    transformer_class="WanTransformer3DModel"),
    report_shape=((6, 22, 40), 512),
    description="Wan 2.2 TI2V 5B: 30 blocks, 24 heads x 128, per-token timesteps",
    **_TI2V_COMMON,
)

FAMILIES = (WAN, WAN22, WAN22_TI2V)
