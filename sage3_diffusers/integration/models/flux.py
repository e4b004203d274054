"""FLUX.1 (dev / schnell): 19 double-stream + 38 single-stream blocks, 24 heads x 128, joint [text, image].

`FluxAttnProcessor` calls `dispatch_attention_fn`: the dispatcher route. The transformer receives
`timestep = t / 1000` (a sigma in [0, 1]); Flux passes no attention mask.
"""
import torch

from ..processors import FluxSage3Processor
from . import BenchSpec, Example, ModelFamily


def tiny_transformer(*, seed, layers, head_dim):
    from diffusers import FluxTransformer2DModel
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=layers, num_single_layers=layers,
                                  attention_head_dim=head_dim, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=(4, 4, head_dim - 8))


def tiny_inputs(c, t, *, grid=None, text_len=None):
    _, h, w = grid or (1, 4, 4)
    n = text_len or 10
    kw = dict(hidden_states=t.randn(t.batch, h * w, c.in_channels),
              encoder_hidden_states=t.randn(t.batch, n, c.joint_attention_dim),
              pooled_projections=t.randn(t.batch, c.pooled_projection_dim), timestep=t.full(t.t(0.7)),
              img_ids=t.positions_2d(h, w), txt_ids=torch.zeros(n, 3, device=t.device), return_dict=False)
    if c.guidance_embeds:
        kw["guidance"] = t.full(3.5)
    return kw


def tiny_pipeline(transformer):
    import diffusers as d

    from ..tiny import clip_text_model, image_vae, lower_case, t5_encoder, word_tokenizer
    return d.FluxPipeline(scheduler=d.FlowMatchEulerDiscreteScheduler(), vae=image_vae(1),
                          text_encoder=clip_text_model(32), tokenizer=lower_case(word_tokenizer(77, bos=True)),
                          text_encoder_2=t5_encoder(32), tokenizer_2=lower_case(word_tokenizer(512)),
                          transformer=transformer)


def tiny_call_kwargs(*, true_cfg=False):
    kw = dict(height=16, width=16, guidance_scale=3.5, max_sequence_length=16)
    if true_cfg:
        kw.update(true_cfg_scale=2.0, negative_prompt="dark")
    return kw


def bench_inputs(batch, device, dtype, *, height, width, frames, gen):
    """2x2-packed latents (VAE /8), 512 T5 tokens."""
    h2, w2 = height // 16, width // 16
    img_ids = torch.zeros(h2, w2, 3, device=device)
    img_ids[..., 1] = torch.arange(h2, device=device)[:, None]
    img_ids[..., 2] = torch.arange(w2, device=device)[None, :]

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)
    return dict(hidden_states=rnd(batch, h2 * w2, 64), encoder_hidden_states=rnd(batch, 512, 4096),
                pooled_projections=rnd(batch, 768), timestep=torch.full((batch,), 0.5, device=device),
                img_ids=img_ids.flatten(0, 1), txt_ids=torch.zeros(512, 3, device=device),
                guidance=torch.full((batch,), 3.5, device=device))


FLUX = ModelFamily(
    name="flux",
    transformer_classes=("FluxTransformer2DModel",),
    route="dispatcher",
    attention_processors=("FluxAttnProcessor",),
    processor=FluxSage3Processor,
    block_types={"transformer_blocks": "double", "single_transformer_blocks": "single"},
    timestep_scale=1.0,
    scheduler_units=1000.0,
    hub_id="black-forest-labs/FLUX.1-dev",
    pipeline_class="FluxPipeline",
    example=Example(dict(height=1024, width=1024, num_inference_steps=28, guidance_scale=3.5),
                    prompt="a cat riding a horse on the moon, cinematic"),
    tiny_transformer=tiny_transformer,
    tiny_inputs=tiny_inputs,
    tiny_pipeline=tiny_pipeline,
    tiny_call_kwargs=tiny_call_kwargs,
    bench=BenchSpec(config={"guidance_embeds": True}, layer_args=("num_layers", "num_single_layers"),
                    default_size=(1024, 1024, 1, 1), make_inputs=bench_inputs),
    report_shape=((1, 64, 64), 512),
    attention_shape="Flux-1024",
    description="FLUX.1: 19 double + 38 single blocks, head_dim 128",
)

FAMILIES = (FLUX,)
