"""Mochi 1: 48 blocks with separate video and text weights; per sample, video + that sample's valid text.

`MochiAttnProcessor2_0` calls SDPA directly (per sample): the processor route. `MochiAttention` has no
`set_processor`: `apply` assigns `processor`. The transformer receives `timestep` in [0, 1000] and a bool
text mask `encoder_attention_mask` (right padding).
"""
import torch

from ..processors import MochiSage3Processor
from . import BenchSpec, Example, ModelFamily


def tiny_transformer(*, seed, layers, head_dim):
    from diffusers import MochiTransformer3DModel
    m = MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=head_dim, num_layers=layers,
                                pooled_projection_dim=16, in_channels=12, qk_norm="rms_norm", text_embed_dim=32,
                                time_embed_dim=4, max_sequence_length=12)
    # Random (not the zero init) RoPE frequencies so the tiny model exercises the rotation.
    with torch.no_grad():
        m.pos_frequencies.normal_(0, 0.5)
    return m


def tiny_inputs(c, t, *, grid=None, text_len=None):
    f, h, w = grid or (2, 4, 4)
    n = text_len or 12
    return dict(hidden_states=t.randn(t.batch, c.in_channels, f, h, w),
                encoder_hidden_states=t.randn(t.batch, n, c.text_embed_dim), timestep=t.full(t.t(700.0)),
                encoder_attention_mask=t.text_mask(n), return_dict=False)


def tiny_pipeline(transformer):
    import diffusers as d

    from ..tiny import lower_case, t5_encoder, word_tokenizer
    torch.manual_seed(0)
    vae = d.AutoencoderKLMochi(latent_channels=12, out_channels=3, encoder_block_out_channels=(32, 32, 32, 32),
                               decoder_block_out_channels=(32, 32, 32, 32), layers_per_block=(1, 1, 1, 1, 1)).eval()
    return d.MochiPipeline(scheduler=d.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=t5_encoder(32),
                           tokenizer=lower_case(word_tokenizer(256)), transformer=transformer)


def tiny_call_kwargs(*, true_cfg=False):
    return dict(height=16, width=16, num_frames=7, guidance_scale=4.5, max_sequence_length=12)


def bench_inputs(batch, device, dtype, *, height, width, frames, gen):
    """12 latent channels, /6 temporal compression, /8 spatial; 256 T5 tokens, 200 valid."""
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)
    lat_f = (frames - 1) // 6 + 1
    mask = torch.zeros(batch, 256, device=device, dtype=torch.bool)
    mask[:, :200] = True
    return dict(hidden_states=rnd(batch, 12, lat_f, height // 8, width // 8),
                encoder_hidden_states=rnd(batch, 256, 4096), timestep=torch.full((batch,), 500.0, device=device), encoder_attention_mask=mask)


MOCHI = ModelFamily(
    name="mochi",
    transformer_classes=("MochiTransformer3DModel",),
    route="processor",
    attention_processors=("MochiAttnProcessor2_0",),
    processor=MochiSage3Processor,
    block_types={"transformer_blocks": "double"},
    timestep_scale=1000.0,
    mask_kwarg="encoder_attention_mask",
    hub_id="genmo/mochi-1-preview",
    pipeline_class="MochiPipeline",
    example=Example(dict(height=480, width=848, num_frames=85, num_inference_steps=64, guidance_scale=4.5),
                    prompt="a red car driving through a forest, wide shot", video=True),
    tiny_transformer=tiny_transformer,
    tiny_inputs=tiny_inputs,
    tiny_pipeline=tiny_pipeline,
    tiny_call_kwargs=tiny_call_kwargs,
    bench=BenchSpec(config={}, layer_args=("num_layers",), default_size=(480, 848, 163, 2), make_inputs=bench_inputs),
    report_shape=((7, 30, 53), 256),
    attention_shape="Mochi",
    description="Mochi 1: 48 blocks, per-sample valid text",
)

FAMILIES = (MOCHI,)
