"""CogVideoX: single-weight blocks on the joint [text, video] sequence (text concatenated before the
projections), RoPE on video.

`CogVideoXAttnProcessor2_0` calls SDPA directly: the processor route. The transformer receives the DDIM
integer timestep in [0, 1000); pipelines pass no attention mask. diffusers has no context-parallel plan for
it: `cp_plan` is ours, run by our processor (diffusers' own cannot run it).
"""
import torch

from ..processors import CogVideoXSage3Processor
from . import BenchSpec, Example, ModelFamily


def tiny_transformer(*, seed, layers, head_dim):
    from diffusers import CogVideoXTransformer3DModel
    return CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=head_dim, in_channels=4,
                                       out_channels=4, time_embed_dim=2, text_embed_dim=32, num_layers=layers,
                                       sample_width=4, sample_height=4, sample_frames=9, patch_size=2,
                                       temporal_compression_ratio=4, max_text_seq_length=12,
                                       use_rotary_positional_embeddings=True)


def tiny_inputs(c, t, *, grid=None, text_len=None):
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    f, h, w = grid or (3, 2, 2)  # in patches
    p = c.patch_size
    timestep = t.t(700)
    kw = dict(hidden_states=t.randn(t.batch, f, c.in_channels, h * p, w * p),
              encoder_hidden_states=t.randn(t.batch, text_len or c.max_text_seq_length, c.text_embed_dim),
              timestep=t.full(int(timestep), dtype=torch.long), return_dict=False)
    if c.use_rotary_positional_embeddings:
        cos, sin = get_3d_rotary_pos_embed(embed_dim=c.attention_head_dim, crops_coords=((0, 0), (h, w)),
                                           grid_size=(h, w), temporal_size=f, use_real=True)
        kw["image_rotary_emb"] = (cos.to(t.device), sin.to(t.device))
    return kw


def tiny_pipeline(transformer):
    import diffusers as d

    from ..tiny import lower_case, t5_encoder, word_tokenizer
    torch.manual_seed(0)
    vae = d.AutoencoderKLCogVideoX(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
                                   up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                   latent_channels=4, layers_per_block=1, norm_num_groups=2,
                                   temporal_compression_ratio=4).eval()
    return d.CogVideoXPipeline(tokenizer=lower_case(word_tokenizer(226)), text_encoder=t5_encoder(32), vae=vae,
                               transformer=transformer, scheduler=d.CogVideoXDDIMScheduler())


def tiny_call_kwargs(*, true_cfg=False):
    return dict(height=16, width=16, num_frames=9, guidance_scale=6.0, max_sequence_length=12,
                use_dynamic_cfg=False)


def bench_inputs(batch, device, dtype, *, height, width, frames, gen):
    """Frames second (VAE /4 temporally, /8 spatially), 226 T5 tokens."""
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)
    lat_f = (frames - 1) // 4 + 1 if frames > 1 else 1
    return dict(hidden_states=rnd(batch, lat_f, 16, height // 8, width // 8),
                encoder_hidden_states=rnd(batch, 226, 4096),
                timestep=torch.full((batch,), 500, device=device, dtype=torch.long))


def cp_plan():
    """[text, video] sharded as [text_r, video_r] on rank r, RoPE sharded per block."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    rope_shard = ContextParallelInput(split_dim=0, expected_dims=2, split_output=False)
    return {
        # Rank r holds [text_r, video_r]; the patch embedding (text and video together) runs before the split.
        "transformer_blocks.0": {
            "hidden_states": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False),
            "encoder_hidden_states": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False),
        },
        # RoPE (cos, sin) of the video tokens, [S_video, D], passed to every block (None without RoPE).
        "transformer_blocks.*": {"image_rotary_emb": [rope_shard, rope_shard]},
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }


COGVIDEOX = ModelFamily(
    name="cogvideox",
    transformer_classes=("CogVideoXTransformer3DModel",),
    route="processor",
    attention_processors=("CogVideoXAttnProcessor2_0", "FusedCogVideoXAttnProcessor2_0"),
    processor=CogVideoXSage3Processor,
    block_types={"transformer_blocks": "single"},
    timestep_scale=1000.0,
    hub_id="THUDM/CogVideoX-2b",
    pipeline_class="CogVideoXPipeline",
    example=Example(dict(height=480, width=720, num_frames=49, num_inference_steps=50, guidance_scale=6.0),
                    prompt="a small robot dancing in the rain at night", video=True),
    tiny_transformer=tiny_transformer,
    tiny_inputs=tiny_inputs,
    tiny_pipeline=tiny_pipeline,
    tiny_call_kwargs=tiny_call_kwargs,
    bench=BenchSpec(config={}, layer_args=("num_layers",), default_size=(480, 720, 49, 2), make_inputs=bench_inputs),
    report_shape=((13, 30, 45), 226),
    attention_shape="CogVideoX-2B-480p",
    description="CogVideoX: single-stream blocks on [text, video]",
    cp_plan=cp_plan,
)

FAMILIES = (COGVIDEOX,)
