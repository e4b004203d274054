"""Wan 2.1/2.2 (T2V, I2V, TI2V, VACE), Qwen-Image, LTX-Video, LTX-2, FLUX.2 and HunyuanVideo 1.5 on the
dispatcher route: tiny models built from config (CPU, fp32, batch 2, unequal text lengths where the model
takes a text mask), fresh random inputs each run (seed in messages). The checks every family shares come from
`integration_mixins`; what is particular to these families (Wan's image cross-attention, per-token timesteps,
VACE, the two Wan 2.2 experts, padding in any position) is tested here."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

import sage3_diffusers as s3  # noqa: E402
from integration_mixins import (HybridPolicyMixin, MaskedTextMixin, RoundTripMixin,  # noqa: E402
                                SdpaMatchesDefaultMixin, fresh_seed)
from sage3_diffusers.integration import apply, models, remove  # noqa: E402
from sage3_diffusers.integration.masks import attend_padded, padding_plan  # noqa: E402
from sage3_diffusers.integration.tiny import tiny_pipeline, tiny_transformer, transformer_inputs  # noqa: E402

MASKED = {"qwenimage": [10, 6], "ltx": [10, 6], "ltx2": [10, 6], "hunyuan_video15": [10, 6]}


@pytest.fixture(autouse=True)
def _no_grad_and_emulate():
    with torch.no_grad():
        s3.set_fallback("emulate")
        yield
        s3.set_fallback(None)


def _out(model, inputs):
    out = model(**inputs)
    return out[0] if isinstance(out, tuple) else out


class TestWan(SdpaMatchesDefaultMixin, HybridPolicyMixin, RoundTripMixin):
    family = "wan"


class TestQwenImage(SdpaMatchesDefaultMixin, HybridPolicyMixin, MaskedTextMixin, RoundTripMixin):
    family = "qwenimage"
    text_lengths = MASKED["qwenimage"]


class TestLTX(SdpaMatchesDefaultMixin, HybridPolicyMixin, MaskedTextMixin, RoundTripMixin):
    family = "ltx"
    text_lengths = MASKED["ltx"]


class TestLTX2(SdpaMatchesDefaultMixin, HybridPolicyMixin, MaskedTextMixin, RoundTripMixin):
    family = "ltx2"
    text_lengths = MASKED["ltx2"]


class TestFlux2(SdpaMatchesDefaultMixin, HybridPolicyMixin, RoundTripMixin):
    family = "flux2"


class TestHunyuanVideo15(SdpaMatchesDefaultMixin, HybridPolicyMixin, MaskedTextMixin, RoundTripMixin):
    family = "hunyuan_video15"
    text_lengths = MASKED["hunyuan_video15"]


# ------------------------------------------------------------------------------------------ Wan variants

class TestWanImageToVideo(SdpaMatchesDefaultMixin, HybridPolicyMixin):
    """I2V cross-attention: two dispatcher calls per `attn2` (image tokens, then the 512 text tokens)."""
    family = "wan"

    def model(self, seed=0):
        from diffusers import WanTransformer3DModel
        torch.manual_seed(seed)
        return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                     in_channels=8, out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32,
                                     num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                     rope_max_seq_len=32, image_dim=8, added_kv_proj_dim=32).eval()

    def inputs(self, seed, timestep=None, batch=2):
        g = torch.Generator().manual_seed(seed)
        return dict(hidden_states=torch.randn(batch, 8, 2, 8, 8, generator=g),
                    timestep=torch.full((batch,), 700.0 if timestep is None else timestep),
                    encoder_hidden_states=torch.randn(batch, 512, 16, generator=g),
                    encoder_hidden_states_image=torch.randn(batch, 5, 8, generator=g), return_dict=False)


class TestWanPerTokenTimesteps(HybridPolicyMixin):
    """Wan 2.2 TI2V image-to-video passes one timestep per token, 0 on the conditioning frame: the step is
    the noisiest token's."""
    family = "wan"

    def inputs(self, seed, timestep=None, batch=2):
        kw = transformer_inputs("wan", seed=seed, batch=batch, timestep=timestep)
        t = float(kw["timestep"][0])
        per_token = torch.full((batch, 2 * 4 * 4), t)
        per_token[:, :16] = 0.0  # the first latent frame
        kw["timestep"] = per_token
        return kw

    def test_t_norm_is_the_largest_timestep(self):
        model = self.model()
        runtime = apply(model, log_summary=False)
        _out(model, self.inputs(fresh_seed(), timestep=700.0))
        assert runtime.t_norm == pytest.approx(0.7)
        remove(model)


class TestWanVACE(SdpaMatchesDefaultMixin, HybridPolicyMixin):
    family = "wan"

    def model(self, seed=0):
        from diffusers import WanVACETransformer3DModel
        torch.manual_seed(seed)
        return WanVACETransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                         in_channels=16, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32,
                                         num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                         rope_max_seq_len=32, vace_layers=[0], vace_in_channels=48).eval()

    def inputs(self, seed, timestep=None, batch=2):
        kw = transformer_inputs("wan", seed=seed, batch=batch, timestep=timestep)
        kw["control_hidden_states"] = torch.randn(batch, 48, 2, 8, 8, generator=torch.Generator().manual_seed(seed))
        return kw


class TestWanAnimate(SdpaMatchesDefaultMixin):
    """Wan 2.2 Animate: the blocks' attention plus the face adapter's cross-attention (`face_adapter.<i>`,
    `WanAnimateFaceBlockAttnProcessor`), all on the dispatcher route."""
    family = "wan"

    def model(self, seed=0):
        from diffusers import WanAnimateTransformer3DModel
        torch.manual_seed(seed)
        return WanAnimateTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=12, latent_channels=4,
            out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", image_dim=16, rope_max_seq_len=32,
            motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16}, motion_encoder_size=16, motion_style_dim=8,
            motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=16, face_encoder_num_heads=2,
            inject_face_latents_blocks=2).eval()

    def inputs(self, seed, timestep=None, batch=1):
        g = torch.Generator().manual_seed(seed)
        return dict(hidden_states=torch.randn(batch, 12, 5, 16, 16, generator=g),
                    timestep=torch.full((batch,), 700.0 if timestep is None else timestep),
                    encoder_hidden_states=torch.randn(batch, 12, 16, generator=g),
                    encoder_hidden_states_image=torch.randn(batch, 12, 16, generator=g),
                    pose_hidden_states=torch.randn(batch, 4, 4, 16, 16, generator=g),
                    face_pixel_values=torch.randn(batch, 3, 13, 16, 16, generator=g), return_dict=False)


# ------------------------------------------------------------------------------------------ masked text

@pytest.mark.parametrize("family", sorted(MASKED))
def test_masked_batch_runs_the_quantized_kernels_on_valid_keys(family):
    """Unequal text lengths: the quantized kernels serve every attention layer (no exact-SDPA fallback for
    the mask), so the padded batch's agreement with per-sample runs (MaskedTextMixin) is not trivial."""
    model = tiny_transformer(family)
    inputs = transformer_inputs(family, seed=fresh_seed(), text_lengths=MASKED[family])
    runtime = apply(model, kernel="reference_int8_fp8", log_summary=False)
    _out(model, inputs)
    fallbacks = [c for c in runtime.stats.calls
                 if c.reason and "emulated" not in c.reason and "refiner" not in c.reason]
    assert not fallbacks, fallbacks[:3]
    assert {c.backend for c in runtime.stats.calls} - {"sdpa"} == {"reference_int8_fp8"}
    remove(model)


# ------------------------------------------------------------------------------ Wan 2.2 A14B: two experts

def _wan_image_to_video(two_experts: bool):
    """WanImageToVideoPipeline, tiny: Wan 2.2 A14B I2V (two experts, 36 input channels: latents + condition +
    mask; its calls carry no step index, so the step comes from the scheduler) or Wan 2.2 TI2V I2V (one
    transformer, `expand_timesteps`: one timestep per token, 0 on the conditioning frame)."""
    import diffusers as d

    from sage3_diffusers.integration.models import wan
    from sage3_diffusers.integration.tiny import lower_case, t5_encoder, word_tokenizer
    if two_experts:
        def expert(seed):
            torch.manual_seed(seed)
            return d.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                           in_channels=36, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32,
                                           num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                           rope_max_seq_len=32).eval()
        return d.WanImageToVideoPipeline(tokenizer=lower_case(word_tokenizer(512)), text_encoder=t5_encoder(32),
                                         transformer=expert(0), transformer_2=expert(1), vae=wan._tiny_vae(),
                                         scheduler=wan._scheduler(), image_encoder=None, image_processor=None,
                                         boundary_ratio=0.875)
    pipe = wan.tiny_pipeline_ti2v(tiny_transformer("wan22_ti2v"))
    return d.WanImageToVideoPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder,
                                     transformer=pipe.transformer, vae=pipe.vae, scheduler=pipe.scheduler,
                                     image_encoder=None, image_processor=None, expand_timesteps=True)


@pytest.mark.parametrize("kind", ["t2v_a14b", "i2v_a14b", "ti2v_i2v"])
def test_wan22_first_and_last_step_across_experts(kind):
    """4 steps (timesteps 999, 900, 750, 500; boundary 875): with two experts `transformer` runs steps 0-1 and
    `transformer_2` steps 2-3, cond and uncond each; the default policy gives int8_fp8 at steps 0 and 3, fp4
    at 1 and 2, whichever transformer runs them. TI2V image-to-video: one transformer, per-token timesteps."""
    from PIL import Image
    two_experts = kind != "ti2v_i2v"
    pipe = tiny_pipeline("wan22") if kind == "t2v_a14b" else _wan_image_to_video(two_experts)
    pipe.set_progress_bar_config(disable=True)
    runtime = apply(pipe, log_summary=False)
    if two_experts:
        assert runtime is pipe.transformer_2._sage3_runtime
        layers_2 = [n for n in runtime.layers if n.startswith("transformer_2.")]
        assert layers_2 and len(layers_2) == len(runtime.layers) // 2
    kw = dict(models.get("wan22").tiny_call_kwargs(), prompt="a cat dancing in the rain")
    if kind != "t2v_a14b":
        # The I2V pipeline cleans prompts with ftfy (not installed here): pass text embeddings instead.
        size = 64 if kind == "ti2v_i2v" else 16
        g = torch.Generator().manual_seed(0)
        kw.update(image=Image.new("RGB", (size, size)), height=size, width=size, prompt=None, negative_prompt=None,
                  prompt_embeds=torch.randn(1, 16, 32, generator=g),
                  negative_prompt_embeds=torch.randn(1, 16, 32, generator=g))
    for gen in range(2 if kind == "t2v_a14b" else 1):  # a second call starts a new generation at step 0
        out = pipe(num_inference_steps=4, output_type="pt", generator=torch.Generator().manual_seed(gen), **kw)
        assert torch.isfinite(out.frames).all()
        calls = runtime.stats.generation(gen)
        by_step = {s: set(k) for s, k in runtime.stats.requested_by_step(calls).items()}
        assert by_step == {0: {"int8_fp8"}, 1: {"fp4"}, 2: {"fp4"}, 3: {"int8_fp8"}}, by_step
        for step in range(4):
            if two_experts:
                expert_2 = {c.layer.startswith("transformer_2.") for c in calls if c.step == step}
                assert expert_2 == {step >= 2}, (step, expert_2)
            per_layer = {}
            for c in calls:
                if c.step == step:
                    per_layer[c.layer] = per_layer.get(c.layer, 0) + 1
            assert set(per_layer.values()) == {2}, per_layer  # cond + uncond, every layer of that expert
    remove(pipe)
    assert not hasattr(pipe.transformer, "_sage3_runtime")
    assert pipe.transformer_2 is None or not hasattr(pipe.transformer_2, "_sage3_runtime")


# ------------------------------------------------------------------------------------------ padding masks

def _sdpa_op(q, k, v):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return out, "sdpa", None


def _masked_sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=mask).transpose(1, 2)


def _keep(batch, total, spans):
    m = torch.ones(batch, total, dtype=torch.bool)
    for b, (lo, hi) in spans.items():
        m[b, lo:hi] = False
    return m


@pytest.mark.parametrize("kind", ["right", "middle", "left", "bias", "joint", "rows", "cross"])
@pytest.mark.parametrize("chunk", [None, 40])
def test_padding_plan_matches_masked_sdpa(kind, chunk, monkeypatch):
    """chunk: compare a [B, Sq, Sk] mask's rows in chunks of that many elements (a few rows at a time)."""
    if chunk is not None:
        from sage3_diffusers.integration import masks
        monkeypatch.setattr(masks, "_CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(fresh_seed())
    batch, s, heads, d = 3, 21, 2, 8
    skv = 7 if kind == "cross" else s
    q = torch.randn(batch, s, heads, d, generator=g)
    k, v = (torch.randn(batch, skv, heads, d, generator=g) for _ in range(2))
    if kind == "right":      # [video, text, pad] key mask (HunyuanVideo)
        mask = _keep(batch, s, {1: (15, s), 2: (9, s)})[:, None, None, :]
    elif kind == "middle":   # [text, pad, image] (Qwen-Image)
        mask = _keep(batch, s, {1: (5, 8), 2: (2, 8)})[:, None, None, :]
    elif kind == "left":     # left-padded text (LTX-2 without registers)
        mask = _keep(batch, s, {0: (0, 4), 2: (0, 11)})[:, None, None, :]
    elif kind == "bias":     # additive 0 / -10000 bias repeated over heads (LTX)
        keep = _keep(batch, s, {0: (12, s), 2: (6, s)})
        mask = ((~keep).float() * -10000.0)[:, None, None, :].expand(batch, heads, 1, s)
    elif kind == "joint":    # valid[q] & valid[k] (HunyuanVideo 1.5)
        keep = _keep(batch, s, {1: (15, s), 2: (9, s)})
        mask = keep[:, None, :, None] & keep[:, None, None, :]
    elif kind == "rows":     # key padding written out for every query row, [B, 1, Sq, Sk]
        keep = _keep(batch, s, {1: (5, 8), 2: (15, s)})
        mask = keep[:, None, None, :].expand(batch, 1, s, s).clone()
    else:                    # cross-attention to padded text, Sq != Skv
        mask = _keep(batch, skv, {0: (4, skv)})[:, None, None, :]
    plan = padding_plan(mask, batch, s, skv)
    assert plan is not None and not plan.trivial
    assert plan.rows == ("valid" if kind == "joint" else "all")
    out, _, _ = attend_padded(_sdpa_op, q, k, v, plan, seq_dim=1)
    torch.testing.assert_close(out, _masked_sdpa(q, k, v, mask), atol=1e-5, rtol=0)


def test_padding_plan_rejects_masks_that_are_not_padding():
    batch, s = 2, 9
    assert padding_plan(torch.randn(batch, 1, 1, s), batch, s, s) is None           # a real-valued bias
    rows_differ = torch.ones(batch, 1, s, s, dtype=torch.bool).tril()               # causal
    assert padding_plan(rows_differ, batch, s, s) is None
    heads_differ = torch.ones(batch, 2, 1, s, dtype=torch.bool)
    heads_differ[:, 1, :, 3:] = False
    assert padding_plan(heads_differ, batch, s, s) is None
    no_key = torch.zeros(batch, 1, 1, s, dtype=torch.bool)                           # a sample with no key
    assert padding_plan(no_key, batch, s, s) is None
    keep = torch.ones(batch, s, dtype=torch.bool)
    keep[1, 6:] = False
    joint_but_one = (keep[:, None, :, None] & keep[:, None, None, :]).clone()
    joint_but_one[0, 0, 4, 2] = False                                                # one hole inside
    assert padding_plan(joint_but_one, batch, s, s) is None
    assert padding_plan(None, batch, s, s).trivial


# ------------------------------------------------------------------------------------------- bench e2e

@pytest.mark.parametrize("family", ["wan", "wan22_ti2v", "qwenimage", "ltx", "ltx2", "flux2"])
def test_bench_inputs_fit_the_real_config_at_the_default_size(family):
    """Shapes only (meta device): the real config with one block per kind, the pipeline's default size.
    HunyuanVideo 1.5 is left out: its forward gathers valid text tokens (data-dependent shapes, no meta)."""
    from sage3_diffusers.bench_e2e import build_transformer, make_inputs
    spec = models.get(family).bench
    height, width, frames, batch = spec.default_size
    model = build_transformer(family, (1,) * len(spec.layer_args), "meta", torch.bfloat16)
    inputs = make_inputs(family, batch, "meta", torch.bfloat16, height=height, width=width, frames=frames, gen=None)
    out = model(**inputs, return_dict=False)[0]
    assert out.shape[0] == batch
