"""LTX-Video and LTX-2: video self-attention `attn1` and text cross-attention `attn2` per block (LTX-2 adds the
audio stream: `audio_attn1`, `audio_attn2`, and audio-video cross-attention `audio_to_video_attn`,
`video_to_audio_attn`).

`LTXVideoAttnProcessor` and `LTX2AudioVideoAttnProcessor` (`LTX2PerturbedAttnProcessor` with STG) call
`dispatch_attention_fn`: the dispatcher route. The transformer turns `encoder_attention_mask` into an additive
bias `(1 - mask) * -10000`, repeated over heads ([B, heads, 1, text]): a key-padding mask, run on the
quantized kernels over each sample's valid text keys (right padding for LTX's T5 prompts; LTX-2's Gemma
prompts are left-padded, and with the connector's learnable registers every key is valid). The transformer
receives `timestep` in [0, 1000].
"""
import torch

from . import BenchSpec, Example, ModelFamily

_LTX_ATTR_TYPES = {"attn1": "self", "attn2": "cross"}
_LTX2_ATTR_TYPES = {"attn1": "self", "attn2": "cross", "audio_attn1": "audio_self", "audio_attn2": "audio_cross",
                    "audio_to_video_attn": "audio_video", "video_to_audio_attn": "audio_video"}


# ------------------------------------------------------------------------------------------- LTX-Video

def tiny_transformer(*, seed, layers, head_dim):
    from diffusers import LTXVideoTransformer3DModel
    return LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2,
                                      attention_head_dim=head_dim, cross_attention_dim=2 * head_dim,
                                      num_layers=layers, caption_channels=32)


def tiny_inputs(c, t, *, grid=None, text_len=None):
    f, h, w = grid or (2, 4, 4)  # latent grid, patch size 1
    n = text_len or 10
    return dict(hidden_states=t.randn(t.batch, f * h * w, c.in_channels),
                encoder_hidden_states=t.randn(t.batch, n, c.caption_channels), timestep=t.full(t.t(700.0)),
                encoder_attention_mask=t.text_mask(n).long(), num_frames=f, height=h, width=w, return_dict=False)


def tiny_pipeline(transformer):
    import diffusers as d

    from ..tiny import lower_case, t5_encoder, word_tokenizer
    torch.manual_seed(0)
    vae = d.AutoencoderKLLTXVideo(in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
                                  decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
                                  decoder_layers_per_block=(1, 1, 1, 1, 1),
                                  spatio_temporal_scaling=(True, True, False, False),
                                  decoder_spatio_temporal_scaling=(True, True, False, False),
                                  decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4,
                                  upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1,
                                  patch_size_t=1, encoder_causal=True, decoder_causal=False).eval()
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    return d.LTXPipeline(scheduler=d.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=t5_encoder(32),
                         tokenizer=lower_case(word_tokenizer(128)), transformer=transformer)


def tiny_call_kwargs(*, true_cfg=False):
    return dict(height=32, width=32, num_frames=9, guidance_scale=3.0, max_sequence_length=16,
                negative_prompt="dark", decode_timestep=0.05, decode_noise_scale=0.025)


def bench_inputs(batch, device, dtype, *, height, width, frames, gen):
    """Latents /32 spatially, /8 temporally, 128 channels: 704x512x161 gives 21 x 16 x 22 = 7,392 video
    tokens; 128 T5 tokens, right-padded (100 valid); CFG batched (batch 2)."""
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)
    lat_f, lat_h, lat_w = (frames - 1) // 8 + 1, height // 32, width // 32
    mask = torch.zeros(batch, 128, device=device, dtype=torch.long)
    mask[:, :100] = 1
    return dict(hidden_states=rnd(batch, lat_f * lat_h * lat_w, 128), encoder_hidden_states=rnd(batch, 128, 4096),
                timestep=torch.full((batch,), 500.0, device=device), encoder_attention_mask=mask,
                num_frames=lat_f, height=lat_h, width=lat_w, rope_interpolation_scale=(8 / 25, 32, 32))


LTX = ModelFamily(
    name="ltx",
    transformer_classes=("LTXVideoTransformer3DModel",),
    route="dispatcher",
    attention_processors=("LTXVideoAttnProcessor",),
    block_types={"transformer_blocks": "self"},
    attr_block_types=_LTX_ATTR_TYPES,
    timestep_scale=1000.0,
    mask_kwarg="encoder_attention_mask",
    hub_id="Lightricks/LTX-Video",
    pipeline_class="LTXPipeline",
    example=Example(dict(height=512, width=704, num_frames=161, num_inference_steps=50, guidance_scale=3.0),
                    prompt="a red car driving through a forest, wide shot", video=True),
    tiny_transformer=tiny_transformer,
    tiny_inputs=tiny_inputs,
    tiny_pipeline=tiny_pipeline,
    tiny_call_kwargs=tiny_call_kwargs,
    bench=BenchSpec(config={}, layer_args=("num_layers",), default_size=(512, 704, 161, 2),
                    make_inputs=bench_inputs),
    report_shape=((5, 16, 22), 128),
    description="LTX-Video: 28 blocks of self + cross attention, 32 heads x 64",
)


# --------------------------------------------------------------------------------------------- LTX-2

def tiny_transformer_ltx2(*, seed, layers, head_dim):
    from diffusers import LTX2VideoTransformer3DModel
    return LTX2VideoTransformer3DModel(in_channels=4, out_channels=4, patch_size=1, patch_size_t=1,
                                       num_attention_heads=2, attention_head_dim=head_dim,
                                       cross_attention_dim=2 * head_dim, audio_in_channels=4, audio_out_channels=4,
                                       audio_num_attention_heads=2, audio_attention_head_dim=head_dim,
                                       audio_cross_attention_dim=2 * head_dim, num_layers=layers,
                                       qk_norm="rms_norm_across_heads", caption_channels=16,
                                       rope_double_precision=False)


def tiny_inputs_ltx2(c, t, *, grid=None, text_len=None):
    f, h, w = grid or (2, 4, 4)
    n = text_len or 10
    audio_frames = 9
    mask = t.text_mask(n).long()
    return dict(hidden_states=t.randn(t.batch, f * h * w, c.in_channels),
                audio_hidden_states=t.randn(t.batch, audio_frames, c.audio_in_channels),
                encoder_hidden_states=t.randn(t.batch, n, c.caption_channels),
                audio_encoder_hidden_states=t.randn(t.batch, n, c.caption_channels), timestep=t.full(t.t(700.0)),
                encoder_attention_mask=mask, audio_encoder_attention_mask=mask, num_frames=f, height=h, width=w,
                audio_num_frames=audio_frames, fps=24.0, return_dict=False)


def bench_inputs_ltx2(batch, device, dtype, *, height, width, frames, gen):
    """Latents /32 spatially, /8 temporally, 128 channels: 768x512x121 gives 16 x 16 x 24 = 6,144 video
    tokens; audio at 25 latents per second (126 for 121 frames at 24 fps); 1024 text tokens of the
    connectors (3840 channels), all valid (the connector's registers fill the padding); CFG batched (batch 2)."""
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)
    lat_f, lat_h, lat_w = (frames - 1) // 8 + 1, height // 32, width // 32
    audio_frames = round(frames / 24.0 * 25.0)
    mask = torch.ones(batch, 1024, device=device, dtype=torch.long)
    return dict(hidden_states=rnd(batch, lat_f * lat_h * lat_w, 128), audio_hidden_states=rnd(batch, audio_frames, 128),
                encoder_hidden_states=rnd(batch, 1024, 3840), audio_encoder_hidden_states=rnd(batch, 1024, 3840),
                timestep=torch.full((batch,), 500.0, device=device), encoder_attention_mask=mask,
                audio_encoder_attention_mask=mask, num_frames=lat_f, height=lat_h, width=lat_w,
                audio_num_frames=audio_frames, fps=24.0)


LTX2 = ModelFamily(
    name="ltx2",
    transformer_classes=("LTX2VideoTransformer3DModel",),
    route="dispatcher",
    attention_processors=("LTX2AudioVideoAttnProcessor", "LTX2PerturbedAttnProcessor"),
    block_types={"transformer_blocks": "self"},
    attr_block_types=_LTX2_ATTR_TYPES,
    timestep_scale=1000.0,
    mask_kwarg="encoder_attention_mask",
    hub_id="Lightricks/LTX-2",
    pipeline_class="LTX2Pipeline",
    example=Example(dict(height=512, width=768, num_frames=121, frame_rate=24.0, num_inference_steps=40,
                         guidance_scale=4.0),
                    prompt="a red car driving through a forest, wide shot", video=True),
    tiny_transformer=tiny_transformer_ltx2,
    tiny_inputs=tiny_inputs_ltx2,
    bench=BenchSpec(config={}, layer_args=("num_layers",), default_size=(512, 768, 121, 2),
                    make_inputs=bench_inputs_ltx2),
    report_shape=((4, 16, 24), 256),
    description="LTX-2: 48 audio-video blocks, video 32 heads x 128, audio 32 heads x 64",
)

FAMILIES = (LTX, LTX2)
