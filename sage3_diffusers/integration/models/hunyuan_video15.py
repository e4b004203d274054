"""HunyuanVideo 1.5: 54 double-stream blocks, 16 heads x 128, joint [video, text]; a token refiner on the
Qwen2.5-VL prompt.

`HunyuanVideo15AttnProcessor2_0` calls `dispatch_attention_fn`: the dispatcher route. The transformer puts
each sample's valid text tokens (image, ByT5 glyphs, Qwen2.5-VL prompt) first and the padding last, and the
processor builds a joint bool [B, 1, S, S] mask `valid[q] & valid[k]` (S = video + text): the quantized
kernels run on each sample's valid prefix, and the rows of padding are zero, as SDPA gives them. The token
refiner's `AttnProcessor2_0` stays exact SDPA, counted. The transformer receives `timestep` in [0, 1000].
"""
import torch

from ..processors import EXACT_REFINER_REASON
from . import BenchSpec, Example, ModelFamily


def tiny_transformer(*, seed, layers, head_dim):
    from diffusers import HunyuanVideo15Transformer3DModel
    # 9 input channels: 4 latent channels, 4 of the condition latents, 1 of the condition mask.
    return HunyuanVideo15Transformer3DModel(in_channels=9, out_channels=4, num_attention_heads=2,
                                            attention_head_dim=head_dim, num_layers=layers, num_refiner_layers=1,
                                            mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16,
                                            text_embed_2_dim=8, image_embed_dim=12,
                                            rope_axes_dim=(head_dim - 12, 6, 6), target_size=16, task_type="t2v")


def tiny_inputs(c, t, *, grid=None, text_len=None):
    """Text-to-video inputs: the image tokens are zero (masked by the transformer), the ByT5 glyph text has
    4 tokens with the last one padding in sample 0."""
    f, h, w = grid or (2, 4, 4)
    n = text_len or 10
    glyph = torch.ones(t.batch, 4, dtype=torch.long, device=t.device)
    glyph[0, 3:] = 0
    return dict(hidden_states=t.randn(t.batch, c.in_channels, f, h, w), timestep=t.full(t.t(700.0)),
                encoder_hidden_states=t.randn(t.batch, n, c.text_embed_dim),
                encoder_attention_mask=t.text_mask(n).long(),
                encoder_hidden_states_2=t.randn(t.batch, 4, c.text_embed_2_dim), encoder_attention_mask_2=glyph,
                image_embeds=torch.zeros(t.batch, 3, c.image_embed_dim, dtype=t.dtype, device=t.device),
                return_dict=False)


def tiny_pipeline(transformer):
    """A 2-layer Qwen2.5-VL text model, a ByT5-style T5 encoder, a two-block HunyuanVideo 1.5 VAE (4 latent
    channels, 4x spatial / 2x temporal compression), classifier-free guidance (cond and uncond calls). The
    word-level tokenizer's chat template puts 108 filler tokens before the prompt: the pipeline crops the
    first 108 (its system prompt)."""
    import diffusers as d
    from diffusers.guiders import ClassifierFreeGuidance
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    from ..tiny import lower_case, t5_encoder, word_tokenizer
    torch.manual_seed(0)
    vae = d.AutoencoderKLHunyuanVideo15(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16),
                                        layers_per_block=1, spatial_compression_ratio=4, temporal_compression_ratio=2,
                                        downsample_match_channel=False, upsample_match_channel=False).eval()
    text_encoder = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        hidden_size=transformer.config.text_embed_dim, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=100, bos_token_id=2, eos_token_id=3, pad_token_id=0, rope_theta=1e6,
        rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"})).eval()
    tokenizer = lower_case(word_tokenizer(1108))
    tokenizer.chat_template = ("{{ '[UNK] ' * 108 }}{% for m in messages %}{% if m['role'] == 'user' %}"
                               "{{ m['content'] }}{% endif %}{% endfor %}")
    return d.HunyuanVideo15Pipeline(transformer=transformer, vae=vae,
                                    scheduler=d.FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder=text_encoder,
                                    tokenizer=tokenizer, text_encoder_2=t5_encoder(transformer.config.text_embed_2_dim),
                                    tokenizer_2=ByT5Tokenizer(), guider=ClassifierFreeGuidance(guidance_scale=6.0))


def tiny_call_kwargs(*, true_cfg=False):
    return dict(height=16, width=16, num_frames=5, negative_prompt="dark")


def bench_inputs(batch, device, dtype, *, height, width, frames, gen):
    """Latents /16 spatially, /4 temporally (65 input channels: latents, condition latents, mask): 848x480x121
    gives 31 x 30 x 53 = 49,290 video tokens; text-to-video: 1000 Qwen2.5-VL tokens (200 valid), 256 ByT5
    tokens and 729 image tokens (none valid), so the joint mask is [B, 1, 51275, 51275]."""
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)
    lat_f, lat_h, lat_w = (frames - 1) // 4 + 1, height // 16, width // 16
    mask = torch.zeros(batch, 1000, device=device, dtype=torch.long)
    mask[:, :200] = 1
    # The pipeline passes the timestep in the latents' dtype (the time embedding casts its projection to it).
    return dict(hidden_states=rnd(batch, 65, lat_f, lat_h, lat_w),
                timestep=torch.full((batch,), 500.0, device=device, dtype=dtype),
                encoder_hidden_states=rnd(batch, 1000, 3584), encoder_attention_mask=mask,
                encoder_hidden_states_2=rnd(batch, 256, 1472),
                encoder_attention_mask_2=torch.zeros(batch, 256, device=device, dtype=torch.long),
                image_embeds=torch.zeros(batch, 729, 1152, device=device, dtype=dtype))


HUNYUAN_VIDEO15 = ModelFamily(
    name="hunyuan_video15",
    transformer_classes=("HunyuanVideo15Transformer3DModel",),
    route="dispatcher",
    attention_processors=("HunyuanVideo15AttnProcessor2_0",),
    exact_processors=("AttnProcessor2_0",),
    exact_reason=EXACT_REFINER_REASON,
    block_types={"transformer_blocks": "double", "refiner_blocks": "refiner"},
    timestep_scale=1000.0,
    mask_kwarg="encoder_attention_mask",
    hub_id="hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v",
    pipeline_class="HunyuanVideo15Pipeline",
    example=Example(dict(num_frames=121, num_inference_steps=50),
                    prompt="a dog running on the beach at sunset", video=True),
    tiny_transformer=tiny_transformer,
    tiny_inputs=tiny_inputs,
    tiny_pipeline=tiny_pipeline,
    tiny_call_kwargs=tiny_call_kwargs,
    bench=BenchSpec(config={}, layer_args=("num_layers",), default_size=(480, 848, 121, 1),
                    make_inputs=bench_inputs),
    report_shape=((5, 30, 53), 256),
    description="HunyuanVideo 1.5: 54 double-stream blocks, 16 heads x 128, token refiner exact",
)

FAMILIES = (HUNYUAN_VIDEO15,)
