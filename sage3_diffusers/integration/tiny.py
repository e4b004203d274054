"""Tiny random models and pipelines of the five families, built from config only (no download).

Used by the tests, the `--tiny` examples and the accuracy report. Tokenizers are word-level
(`tokenizers.WordLevel`, right padding) so every prompt word maps to a real id and padding masks are
meaningful; unknown words map to [UNK]. Head dims are multiples of 16 so the NVFP4 numerics see whole
16-element blocks, as on real models.
"""
from __future__ import annotations

import torch

FAMILIES = ("flux", "sd3", "sd35", "cogvideox", "hunyuan_video", "mochi")

_WORDS = ("a an the of on in with and at by to is are photo painting video cat dog monkey squirrel "
          "burger astronaut horse riding moon city night street rain red blue green small large old "
          "young dance dancing eating running sunset forest river mountain beach ocean robot car "
          "bright dark portrait close up wide shot cinematic detailed").split()


def word_tokenizer(max_length: int, *, bos: bool = False):
    """A right-padding word-level fast tokenizer with a ~60-word vocabulary (ids < 100)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    vocab = {w: i for i, w in enumerate(specials + list(dict.fromkeys(_WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="[BOS] $A [EOS]", special_tokens=[
            ("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]",
                                   eos_token="[EOS]", padding_side="right", model_max_length=max_length)


def _lower_case(tok):
    # WordLevel has no normaliser above; lower-case via the backend so "A" and "a" agree.
    from tokenizers import normalizers
    tok.backend_tokenizer.normalizer = normalizers.Lowercase()
    return tok


def _clip(hidden=32, projection=None, max_pos=77):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    cfg = CLIPTextConfig(bos_token_id=2, eos_token_id=3, hidden_size=hidden, intermediate_size=37,
                         layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, pad_token_id=0,
                         vocab_size=100, hidden_act="gelu", projection_dim=projection or hidden,
                         max_position_embeddings=max_pos)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _t5(d_model=32):
    from transformers import T5Config, T5EncoderModel
    cfg = T5Config(vocab_size=100, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=3, decoder_start_token_id=0)
    return T5EncoderModel(cfg).eval()


# ---------------------------------------------------------------------------------------------- transformers

def tiny_transformer(family: str, *, seed: int = 0, layers: int = 2, head_dim: int = 16):
    """A tiny random transformer of `family` (eval mode, fp32, CPU)."""
    from diffusers import (CogVideoXTransformer3DModel, FluxTransformer2DModel, HunyuanVideoTransformer3DModel,
                           MochiTransformer3DModel, SD3Transformer2DModel)
    torch.manual_seed(seed)
    heads = 2
    if family == "flux":
        m = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=layers, num_single_layers=layers,
                                   attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=32,
                                   pooled_projection_dim=32, axes_dims_rope=(4, 4, head_dim - 8))
    elif family in ("sd3", "sd35"):
        extra = dict(dual_attention_layers=(0,), qk_norm="rms_norm") if family == "sd35" else {}
        m = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=layers,
                                  attention_head_dim=head_dim, num_attention_heads=heads,
                                  caption_projection_dim=heads * head_dim, joint_attention_dim=32,
                                  pooled_projection_dim=64, out_channels=4, pos_embed_max_size=8, **extra)
    elif family == "cogvideox":
        m = CogVideoXTransformer3DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
                                        out_channels=4, time_embed_dim=2, text_embed_dim=32, num_layers=layers,
                                        sample_width=4, sample_height=4, sample_frames=9, patch_size=2,
                                        temporal_compression_ratio=4, max_text_seq_length=12,
                                        use_rotary_positional_embeddings=True)
    elif family == "hunyuan_video":
        m = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=heads,
                                           attention_head_dim=head_dim, num_layers=layers, num_single_layers=layers,
                                           num_refiner_layers=1, patch_size=1, patch_size_t=1,
                                           guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=32,
                                           rope_axes_dim=(4, 4, head_dim - 8))
    elif family == "mochi":
        m = MochiTransformer3DModel(patch_size=2, num_attention_heads=heads, attention_head_dim=head_dim,
                                    num_layers=layers, pooled_projection_dim=16, in_channels=12, qk_norm="rms_norm",
                                    text_embed_dim=32, time_embed_dim=4, max_sequence_length=12)
        # Random (not the zero init) RoPE frequencies so the tiny model exercises the rotation.
        with torch.no_grad():
            m.pos_frequencies.normal_(0, 0.5)
    else:
        raise ValueError(f"unknown family {family!r}; allowed: {FAMILIES}")
    return m.eval()


def transformer_inputs(family: str, *, batch: int = 2, seed: int = 0, text_lengths=None, timestep=None,
                       config=None, text_len: int | None = None, grid: tuple[int, int, int] | None = None,
                       dtype=torch.float32, device="cpu"):
    """Random forward kwargs for a transformer of `family`. Dimensions come from `config` (a transformer's
    `.config`; default: `tiny_transformer(family).config`). grid = latent (frames, height, width) before
    patching (images ignore frames); text_len = text tokens. `text_lengths` (one per sample) sets the valid
    prefix of HunyuanVideo's and Mochi's text mask (default: unequal lengths, sample b has 3b fewer)."""
    if config is None:
        config = _TINY_CONFIGS.get(family)
        if config is None:
            config = _TINY_CONFIGS[family] = tiny_transformer(family).config
    c = config
    g = torch.Generator().manual_seed(seed)

    def rn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    def mask(n_text):
        lengths = text_lengths or [n_text - 3 * i for i in range(batch)]
        lengths = [max(1, min(n_text, int(n))) for n in lengths]
        return (torch.arange(n_text)[None, :] < torch.tensor(lengths)[:, None]).to(device)

    def full(value, **kw):
        return torch.full((batch,), value, **kw).to(device)

    if family == "flux":
        _, h, w = grid or (1, 4, 4)
        n = text_len or 10
        img_ids = torch.zeros(h, w, 3)
        img_ids[..., 1] = torch.arange(h)[:, None]
        img_ids[..., 2] = torch.arange(w)[None, :]
        kw = dict(hidden_states=rn(batch, h * w, c.in_channels),
                  encoder_hidden_states=rn(batch, n, c.joint_attention_dim),
                  pooled_projections=rn(batch, c.pooled_projection_dim),
                  timestep=full(0.7 if timestep is None else timestep, dtype=dtype),
                  img_ids=img_ids.reshape(-1, 3).to(device), txt_ids=torch.zeros(n, 3, device=device),
                  return_dict=False)
        if c.guidance_embeds:
            kw["guidance"] = full(3.5, dtype=dtype)
        return kw
    if family in ("sd3", "sd35"):
        _, h, w = grid or (1, 6, 6)
        p = c.patch_size
        return dict(hidden_states=rn(batch, c.in_channels, h * p, w * p),
                    encoder_hidden_states=rn(batch, text_len or 10, c.joint_attention_dim),
                    pooled_projections=rn(batch, c.pooled_projection_dim),
                    timestep=full(700.0 if timestep is None else timestep, dtype=dtype), return_dict=False)
    if family == "cogvideox":
        from diffusers.models.embeddings import get_3d_rotary_pos_embed
        f, h, w = grid or (3, 2, 2)  # in patches
        p = c.patch_size
        kw = dict(hidden_states=rn(batch, f, c.in_channels, h * p, w * p),
                  encoder_hidden_states=rn(batch, text_len or c.max_text_seq_length, c.text_embed_dim),
                  timestep=full(700 if timestep is None else int(timestep), dtype=torch.long), return_dict=False)
        if c.use_rotary_positional_embeddings:
            cos, sin = get_3d_rotary_pos_embed(embed_dim=c.attention_head_dim, crops_coords=((0, 0), (h, w)),
                                               grid_size=(h, w), temporal_size=f, use_real=True)
            kw["image_rotary_emb"] = (cos.to(device), sin.to(device))
        return kw
    if family == "hunyuan_video":
        f, h, w = grid or (2, 4, 4)
        n = text_len or 12
        kw = dict(hidden_states=rn(batch, c.in_channels, f, h, w),
                  timestep=full(700.0 if timestep is None else timestep, dtype=dtype),
                  encoder_hidden_states=rn(batch, n, c.text_embed_dim), encoder_attention_mask=mask(n).long(),
                  pooled_projections=rn(batch, c.pooled_projection_dim), return_dict=False)
        if c.guidance_embeds:
            kw["guidance"] = full(3.5, dtype=dtype) * 1000.0
        return kw
    if family == "mochi":
        f, h, w = grid or (2, 4, 4)
        n = text_len or 12
        return dict(hidden_states=rn(batch, c.in_channels, f, h, w),
                    encoder_hidden_states=rn(batch, n, c.text_embed_dim),
                    timestep=full(700.0 if timestep is None else timestep, dtype=dtype),
                    encoder_attention_mask=mask(n), return_dict=False)
    raise ValueError(f"unknown family {family!r}; allowed: {FAMILIES}")


_TINY_CONFIGS: dict = {}


# ---------------------------------------------------------------------------------------------- pipelines

def _image_vae(latent_channels):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035).eval()


def tiny_pipeline(family: str, *, layers: int = 2, seed: int = 0):
    """A complete tiny pipeline of `family` (random weights, word-level tokenizers), fp32 on CPU."""
    import diffusers as d
    transformer = tiny_transformer(family, seed=seed, layers=layers)
    torch.manual_seed(seed)
    if family == "flux":
        return d.FluxPipeline(scheduler=d.FlowMatchEulerDiscreteScheduler(), vae=_image_vae(1),
                              text_encoder=_clip(32), tokenizer=_lower_case(word_tokenizer(77, bos=True)),
                              text_encoder_2=_t5(32), tokenizer_2=_lower_case(word_tokenizer(512)),
                              transformer=transformer)
    if family in ("sd3", "sd35"):
        return d.StableDiffusion3Pipeline(
            scheduler=d.FlowMatchEulerDiscreteScheduler(), vae=_image_vae(4), transformer=transformer,
            text_encoder=_clip(16, projection=32), tokenizer=_lower_case(word_tokenizer(77, bos=True)),
            text_encoder_2=_clip(16, projection=32), tokenizer_2=_lower_case(word_tokenizer(77, bos=True)),
            text_encoder_3=_t5(32), tokenizer_3=_lower_case(word_tokenizer(512)))
    if family == "cogvideox":
        torch.manual_seed(0)
        vae = d.AutoencoderKLCogVideoX(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
                                       up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                       latent_channels=4, layers_per_block=1, norm_num_groups=2,
                                       temporal_compression_ratio=4).eval()
        return d.CogVideoXPipeline(tokenizer=_lower_case(word_tokenizer(226)), text_encoder=_t5(32), vae=vae,
                                   transformer=transformer, scheduler=d.CogVideoXDDIMScheduler())
    if family == "hunyuan_video":
        from transformers import LlamaConfig, LlamaModel
        torch.manual_seed(0)
        vae = d.AutoencoderKLHunyuanVideo(
            in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
            up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
            act_fn="silu", norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8,
            temporal_compression_ratio=4, mid_block_add_attention=True).eval()
        llama = LlamaModel(LlamaConfig(bos_token_id=2, eos_token_id=3, hidden_size=16, intermediate_size=37,
                                       num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2,
                                       pad_token_id=0, vocab_size=100, hidden_act="silu")).eval()
        return d.HunyuanVideoPipeline(text_encoder=llama, tokenizer=_lower_case(word_tokenizer(256)),
                                      transformer=transformer, vae=vae,
                                      scheduler=d.FlowMatchEulerDiscreteScheduler(shift=7.0),
                                      text_encoder_2=_clip(32), tokenizer_2=_lower_case(word_tokenizer(77, bos=True)))
    if family == "mochi":
        torch.manual_seed(0)
        vae = d.AutoencoderKLMochi(latent_channels=12, out_channels=3, encoder_block_out_channels=(32, 32, 32, 32),
                                   decoder_block_out_channels=(32, 32, 32, 32),
                                   layers_per_block=(1, 1, 1, 1, 1)).eval()
        return d.MochiPipeline(scheduler=d.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=_t5(32),
                               tokenizer=_lower_case(word_tokenizer(256)), transformer=transformer)
    raise ValueError(f"unknown family {family!r}; allowed: {FAMILIES}")


def pipeline_call_kwargs(family: str, *, prompt, steps: int = 4, seed: int = 0, true_cfg: bool = False,
                         output_type: str = "pil"):
    """Keyword arguments for a small, fast call of `tiny_pipeline(family)`."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(prompt=prompt, num_inference_steps=steps, generator=g, output_type=output_type)
    if family == "flux":
        kw.update(height=16, width=16, guidance_scale=3.5, max_sequence_length=16)
        if true_cfg:
            kw.update(true_cfg_scale=2.0, negative_prompt="dark")
    elif family in ("sd3", "sd35"):
        kw.update(height=8, width=8, guidance_scale=5.0, max_sequence_length=16)
    elif family == "cogvideox":
        kw.update(height=16, width=16, num_frames=9, guidance_scale=6.0, max_sequence_length=12,
                  use_dynamic_cfg=False)
    elif family == "hunyuan_video":
        kw.update(height=16, width=16, num_frames=5, guidance_scale=6.0, max_sequence_length=12,
                  prompt_template={"template": "{}", "crop_start": 0})
        if true_cfg:
            kw.update(true_cfg_scale=2.0, negative_prompt="dark")
    elif family == "mochi":
        kw.update(height=16, width=16, num_frames=7, guidance_scale=4.5, max_sequence_length=12)
    return kw
