"""Tiny random models and pipelines, built from config only (no download), for every registered family.

Each family module (`integration/models/<family>.py`) declares its tiny transformer, inputs and pipeline;
this module holds the shared building blocks (word-level tokenizers, tiny CLIP / T5 / image VAE,
random inputs) and the entry points. Used by the tests, the `--tiny` examples and the accuracy report.
Tokenizers are word-level (`tokenizers.WordLevel`, right padding) so every prompt word maps to a real id
and padding masks are meaningful; unknown words map to [UNK]. Head dims are multiples of 16 so the NVFP4 numerics see whole
16-element blocks, as on real models.
"""
from __future__ import annotations

import torch


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


def lower_case(tok):
    # WordLevel has no normaliser above; lower-case via the backend so "A" and "a" agree.
    from tokenizers import normalizers
    tok.backend_tokenizer.normalizer = normalizers.Lowercase()
    return tok


def clip_text_model(hidden=32, projection=None, max_pos=77):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    cfg = CLIPTextConfig(bos_token_id=2, eos_token_id=3, hidden_size=hidden, intermediate_size=37,
                         layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, pad_token_id=0,
                         vocab_size=100, hidden_act="gelu", projection_dim=projection or hidden,
                         max_position_embeddings=max_pos)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def t5_encoder(d_model=32):
    from transformers import T5Config, T5EncoderModel
    cfg = T5Config(vocab_size=100, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=3, decoder_start_token_id=0)
    return T5EncoderModel(cfg).eval()


# ---------------------------------------------------------------------------------------------- inputs

class TinyInputs:
    """Random tensors for a family's `tiny_inputs`: one generator, the batch, dtype and device, and the
    per-sample valid text lengths of right-padded masks (default: sample b has 3b fewer tokens)."""

    def __init__(self, batch: int, seed: int, dtype, device, text_lengths=None, timestep=None):
        self.batch, self.dtype, self.device = batch, dtype, device
        self.generator = torch.Generator().manual_seed(seed)
        self.text_lengths = text_lengths
        self.timestep = timestep

    def randn(self, *shape, dtype=None):
        return torch.randn(*shape, generator=self.generator).to(device=self.device, dtype=dtype or self.dtype)

    def full(self, value, dtype=None):
        """A (batch,) tensor of `value` (dtype: the inputs' dtype)."""
        return torch.full((self.batch,), value, dtype=torch.float64).to(device=self.device,
                                                                         dtype=dtype or self.dtype)

    def t(self, default):
        """The timestep asked for, else `default` (model units)."""
        return default if self.timestep is None else self.timestep

    def text_mask(self, n_text: int) -> torch.Tensor:
        """Bool [batch, n_text] right-padding mask with the requested valid lengths."""
        lengths = self.text_lengths or [n_text - 3 * i for i in range(self.batch)]
        lengths = [max(1, min(n_text, int(n))) for n in lengths]
        return (torch.arange(n_text)[None, :] < torch.tensor(lengths)[:, None]).to(self.device)

    def positions_2d(self, h: int, w: int) -> torch.Tensor:
        """(h*w, 3) ids (0, row, column), as Flux-style pipelines build them."""
        ids = torch.zeros(h, w, 3)
        ids[..., 1] = torch.arange(h)[:, None]
        ids[..., 2] = torch.arange(w)[None, :]
        return ids.reshape(-1, 3).to(self.device)


def _family(family: str, what: str):
    from . import models
    fam = models.get(family)
    fn = getattr(fam, what)
    if fn is None:
        raise ValueError(f"model family {family!r} declares no {what}")
    return fn


def families_with(what: str) -> tuple[str, ...]:
    """Registered families that declare `what` (e.g. "tiny_pipeline")."""
    from . import models
    return tuple(f.name for f in models.families() if getattr(f, what) is not None)


def tiny_transformer(family: str, *, seed: int = 0, layers: int = 2, head_dim: int = 16):
    """A tiny random transformer of `family` (eval mode, fp32, CPU)."""
    build = _family(family, "tiny_transformer")
    torch.manual_seed(seed)
    return build(seed=seed, layers=layers, head_dim=head_dim).eval()


def transformer_inputs(family: str, *, batch: int = 2, seed: int = 0, text_lengths=None, timestep=None,
                       config=None, text_len: int | None = None, grid: tuple[int, int, int] | None = None,
                       dtype=torch.float32, device="cpu"):
    """Random forward kwargs for a transformer of `family`. Dimensions come from `config` (a transformer's
    `.config`; default: `tiny_transformer(family).config`). grid = latent (frames, height, width) before
    patching (images ignore frames); text_len = text tokens. `text_lengths` (one per sample) sets the valid
    prefix of masked families' text masks (default: unequal lengths, sample b has 3b fewer)."""
    make = _family(family, "tiny_inputs")
    if config is None:
        config = _TINY_CONFIGS.get(family)
        if config is None:
            config = _TINY_CONFIGS[family] = tiny_transformer(family).config
    t = TinyInputs(batch, seed, dtype, device, text_lengths=text_lengths, timestep=timestep)
    return make(config, t, grid=grid, text_len=text_len)


_TINY_CONFIGS: dict = {}


# ---------------------------------------------------------------------------------------------- pipelines

def image_vae(latent_channels):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035).eval()


def tiny_pipeline(family: str, *, layers: int = 2, seed: int = 0):
    """A complete tiny pipeline of `family` (random weights, word-level tokenizers), fp32 on CPU."""
    build = _family(family, "tiny_pipeline")
    transformer = tiny_transformer(family, seed=seed, layers=layers)
    torch.manual_seed(seed)
    return build(transformer)


def pipeline_call_kwargs(family: str, *, prompt, steps: int = 4, seed: int = 0, true_cfg: bool = False,
                         output_type: str = "pil"):
    """Keyword arguments for a small, fast call of `tiny_pipeline(family)`."""
    extra = _family(family, "tiny_call_kwargs")
    g = torch.Generator().manual_seed(seed)
    kw = dict(prompt=prompt, num_inference_steps=steps, generator=g, output_type=output_type)
    kw.update(extra(true_cfg=true_cfg))
    return kw
