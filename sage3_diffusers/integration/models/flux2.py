"""FLUX.2 (dev, klein): double-stream `transformer_blocks` and parallel single-stream `single_transformer_blocks`,
joint [text, image]; dev: 8 + 48 blocks, 48 heads x 128.

`Flux2AttnProcessor` and `Flux2ParallelSelfAttnProcessor` (and their KV-cache variants) call
`dispatch_attention_fn`: the dispatcher route. The pipelines pass no attention mask and
`timestep = t / 1000` (a sigma in [0, 1]).
"""
import torch

from . import BenchSpec, Example, ModelFamily


def tiny_transformer(*, seed, layers, head_dim):
    from diffusers import Flux2Transformer2DModel
    # Four RoPE axes (time, height, width, text position) of head_dim / 4 each; the text is three hidden
    # layers of a 16-wide text encoder, stacked (48).
    return Flux2Transformer2DModel(patch_size=1, in_channels=4, num_layers=layers, num_single_layers=layers,
                                   attention_head_dim=head_dim, num_attention_heads=2, joint_attention_dim=48,
                                   timestep_guidance_channels=32, axes_dims_rope=(head_dim // 4,) * 4)


def _ids(h, w, n, device):
    """(h*w, 4) image ids (0, row, column, 0) and (n, 4) text ids (0, 0, 0, position), as the pipeline builds."""
    img = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))
    txt = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(n))
    return img.to(device), txt.to(device)


def tiny_inputs(c, t, *, grid=None, text_len=None):
    _, h, w = grid or (1, 4, 4)
    n = text_len or 10
    img_ids, txt_ids = _ids(h, w, n, t.device)
    kw = dict(hidden_states=t.randn(t.batch, h * w, c.in_channels),
              encoder_hidden_states=t.randn(t.batch, n, c.joint_attention_dim), timestep=t.full(t.t(0.7)),
              img_ids=img_ids[None].expand(t.batch, -1, -1), txt_ids=txt_ids[None].expand(t.batch, -1, -1),
              return_dict=False)
    if c.guidance_embeds:
        kw["guidance"] = t.full(4.0)
    return kw


def tiny_pipeline(transformer):
    """A 2-layer, 16-wide Mistral3 text encoder (its 3 hidden states stacked: 48 channels), a one-block
    FLUX.2 VAE with 1 latent channel (4 after 2x2 packing), a word-level tokenizer with a plain chat template."""
    import diffusers as d
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    from ..tiny import lower_case, word_tokenizer
    torch.manual_seed(0)
    config = Mistral3Config(
        text_config={"model_type": "mistral", "hidden_size": 16, "intermediate_size": 37, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 100,
                     "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0},
        vision_config={"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "head_dim": 8, "image_size": 32, "patch_size": 16},
        image_token_index=99)
    text_encoder = Mistral3ForConditionalGeneration(config).eval()
    tokenizer = lower_case(word_tokenizer(512))
    tokenizer.chat_template = ("{% for m in messages %}{% for c in m['content'] %}{{ c['text'] }} {% endfor %}"
                               "{% endfor %}")
    vae = d.AutoencoderKLFlux2(sample_size=32, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                               up_block_types=("UpDecoderBlock2D",), block_out_channels=(4,), layers_per_block=1,
                               latent_channels=1, norm_num_groups=1, use_quant_conv=False,
                               use_post_quant_conv=False).eval()
    return d.Flux2Pipeline(scheduler=d.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                           tokenizer=tokenizer, transformer=transformer)


def tiny_call_kwargs(*, true_cfg=False):
    # Guidance-distilled: one call per step. The tiny text encoder has 3 hidden states (0, 1, 2).
    return dict(height=16, width=16, guidance_scale=4.0, max_sequence_length=16, text_encoder_out_layers=(0, 1, 2))


def bench_inputs(batch, device, dtype, *, height, width, frames, gen):
    """Latents /8 with 32 channels, packed 2x2 (128 channels): 1024x1024 gives 64 x 64 = 4,096 image tokens;
    512 Mistral tokens (3 hidden layers stacked: 15,360 channels)."""
    h2, w2 = height // 16, width // 16
    img_ids, txt_ids = _ids(h2, w2, 512, device)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)
    return dict(hidden_states=rnd(batch, h2 * w2, 128), encoder_hidden_states=rnd(batch, 512, 15360),
                timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
                img_ids=img_ids[None].expand(batch, -1, -1), txt_ids=txt_ids[None].expand(batch, -1, -1),
                guidance=torch.full((batch,), 4.0, device=device, dtype=dtype))


FLUX2 = ModelFamily(
    name="flux2",
    transformer_classes=("Flux2Transformer2DModel",),
    route="dispatcher",
    attention_processors=("Flux2AttnProcessor", "Flux2ParallelSelfAttnProcessor", "Flux2KVAttnProcessor",
                          "Flux2KVParallelSelfAttnProcessor"),
    block_types={"transformer_blocks": "double", "single_transformer_blocks": "single"},
    timestep_scale=1.0,
    scheduler_units=1000.0,
    hub_id="black-forest-labs/FLUX.2-dev",
    pipeline_class="Flux2Pipeline",
    example=Example(dict(height=1024, width=1024, num_inference_steps=50, guidance_scale=4.0),
                    prompt="a cat riding a horse on the moon, cinematic"),
    tiny_transformer=tiny_transformer,
    tiny_inputs=tiny_inputs,
    tiny_pipeline=tiny_pipeline,
    tiny_call_kwargs=tiny_call_kwargs,
    bench=BenchSpec(config={}, layer_args=("num_layers", "num_single_layers"), default_size=(1024, 1024, 1, 1),
                    make_inputs=bench_inputs),
    report_shape=((1, 64, 64), 512),
    description="FLUX.2 dev: 8 double + 48 single blocks, 48 heads x 128",
)

FAMILIES = (FLUX2,)
