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
    return HunyuanVideo15Transformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
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


def bench_inputs(batch, device, dtype, *, height, width, frames, gen):
    """Latents /16 spatially, /4 temporally (65 input channels: latents, condition latents, mask): 848x480x121
    gives 31 x 30 x 53 = 49,290 video tokens; text-to-video: 1000 Qwen2.5-VL tokens (200 valid), 256 ByT5
    tokens and 729 image tokens (none valid), so the joint mask is [B, 1, 51275, 51275]."""
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)
    lat_f, lat_h, lat_w = (frames - 1) // 4 + 1, height // 16, width // 16
    mask = torch.zeros(batch, 1000, device=device, dtype=torch.long)
    mask[:, :200] = 1
    return dict(hidden_states=rnd(batch, 65, lat_f, lat_h, lat_w), timestep=torch.full((batch,), 500.0, device=device),
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
    bench=BenchSpec(config={}, layer_args=("num_layers",), default_size=(480, 848, 121, 1),
                    make_inputs=bench_inputs),
    report_shape=((5, 30, 53), 256),
    description="HunyuanVideo 1.5: 54 double-stream blocks, 16 heads x 128, token refiner exact",
)

FAMILIES = (HUNYUAN_VIDEO15,)
