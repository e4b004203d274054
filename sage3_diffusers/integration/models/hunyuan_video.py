"""HunyuanVideo: 20 double + 40 single blocks, 24 heads x 128, joint [video, text], a token refiner.

`HunyuanVideoAttnProcessor2_0` calls `dispatch_attention_fn`: the dispatcher route. The transformer builds
a bool [B, 1, 1, N] key mask (right-padded text) on every forward, from `encoder_attention_mask`; the token
refiner's `AttnProcessor2_0` has an arbitrary [B, 1, S, S] mask and stays exact SDPA, counted. The
transformer receives `timestep` in [0, 1000]. diffusers has no context-parallel plan for it: `cp_plan` is ours,
with a hook (`prepare_cp`) that gives each joint attention the mask of the rank's own keys.
"""
import torch

from ..processors import EXACT_REFINER_REASON, HunyuanVideoSage3Processor
from . import BenchSpec, Example, ModelFamily


def tiny_transformer(*, seed, layers, head_dim):
    from diffusers import HunyuanVideoTransformer3DModel
    return HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                          attention_head_dim=head_dim, num_layers=layers, num_single_layers=layers,
                                          num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
                                          text_embed_dim=16, pooled_projection_dim=32,
                                          rope_axes_dim=(4, 4, head_dim - 8))


def tiny_inputs(c, t, *, grid=None, text_len=None):
    f, h, w = grid or (2, 4, 4)
    n = text_len or 12
    kw = dict(hidden_states=t.randn(t.batch, c.in_channels, f, h, w), timestep=t.full(t.t(700.0)),
              encoder_hidden_states=t.randn(t.batch, n, c.text_embed_dim),
              encoder_attention_mask=t.text_mask(n).long(),
              pooled_projections=t.randn(t.batch, c.pooled_projection_dim), return_dict=False)
    if c.guidance_embeds:
        kw["guidance"] = t.full(3.5) * 1000.0
    return kw


def tiny_pipeline(transformer):
    import diffusers as d
    from transformers import LlamaConfig, LlamaModel

    from ..tiny import clip_text_model, lower_case, word_tokenizer
    torch.manual_seed(0)
    vae = d.AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        act_fn="silu", norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8,
        temporal_compression_ratio=4, mid_block_add_attention=True).eval()
    llama = LlamaModel(LlamaConfig(bos_token_id=2, eos_token_id=3, hidden_size=16, intermediate_size=37,
                                   num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2,
                                   pad_token_id=0, vocab_size=100, hidden_act="silu")).eval()
    return d.HunyuanVideoPipeline(text_encoder=llama, tokenizer=lower_case(word_tokenizer(256)),
                                  transformer=transformer, vae=vae,
                                  scheduler=d.FlowMatchEulerDiscreteScheduler(shift=7.0),
                                  text_encoder_2=clip_text_model(32),
                                  tokenizer_2=lower_case(word_tokenizer(77, bos=True)))


def tiny_call_kwargs(*, true_cfg=False):
    kw = dict(height=16, width=16, num_frames=5, guidance_scale=6.0, max_sequence_length=12,
              prompt_template={"template": "{}", "crop_start": 0})
    if true_cfg:
        kw.update(true_cfg_scale=2.0, negative_prompt="dark")
    return kw


def bench_inputs(batch, device, dtype, *, height, width, frames, gen):
    """Latents /8 spatially, /4 temporally; 256 Llama tokens, right-padded: 200 valid."""
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)
    lat_f = (frames - 1) // 4 + 1 if frames > 1 else 1
    mask = torch.zeros(batch, 256, device=device, dtype=torch.bool)
    mask[:, :200] = True
    return dict(hidden_states=rnd(batch, 16, lat_f, height // 8, width // 8),
                timestep=torch.full((batch,), 500.0, device=device), encoder_hidden_states=rnd(batch, 256, 4096),
                encoder_attention_mask=mask, pooled_projections=rnd(batch, 768),
                guidance=torch.full((batch,), 6016.0, device=device))


# ------------------------------------------------------------------ context parallelism (diffusers has no plan)

def cp_plan():
    """The joint sequence [video, text] sharded as [video_r, text_r] on rank r; see `prepare_cp` for its mask."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    rope_shard = ContextParallelInput(split_dim=0, expected_dims=2, split_output=True)
    return {
        # RoPE (cos, sin) of the video tokens, [S_video, D]: sharded like the video tokens.
        "rope": {0: rope_shard, 1: rope_shard},
        # The joint sequence is sharded as [video_r, text_r] on rank r: both streams enter the first dual block
        # sharded. The token refiner and the mask construction run before it, on the whole text.
        "transformer_blocks.0": {
            "hidden_states": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False),
            "encoder_hidden_states": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False),
        },
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }


_MASK_HOOK = "sage3_cp_joint_mask"


def prepare_cp(transformer):
    """Before the plan: refuse I2V (token_replace) and put the joint-mask hook on every joint attention module."""
    if getattr(transformer.config, "image_condition_type", None) == "token_replace":
        raise ValueError("HunyuanVideo context parallelism: image_condition_type='token_replace' (I2V) treats "
                         "the first frame's tokens specially; the sequence plan cannot shard it")
    from diffusers.hooks import HookRegistry
    hook_cls, shared = _joint_mask_hook(), {}
    for attn in _joint_attention_modules(transformer):
        registry = HookRegistry.check_if_exists_or_initialize(attn)
        if registry.get_hook(_MASK_HOOK) is None:
            registry.register_hook(hook_cls(shared), _MASK_HOOK)


def unprepare_cp(transformer):
    for attn in _joint_attention_modules(transformer):
        registry = getattr(attn, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(_MASK_HOOK) is not None:
            registry.remove_hook(_MASK_HOOK, recurse=False)


def _joint_mask_hook():
    """The class of the hook on HunyuanVideo's attention modules: under context parallelism the transformer still
    builds its key mask over the whole joint sequence [video, text] (before the plan shards the streams), while
    rank r holds [video_r, text_r]. The hook gives the attention the mask of the rank's own keys, in that layout;
    diffusers' Ulysses all-gather and our ring/unified path then see the keys and the mask in the same order.
    Without it the mask would silently address the wrong keys. Inert without context parallelism."""
    import torch.distributed as dist
    from diffusers.hooks import ModelHook
    from diffusers.models._modeling_parallel import gather_size_by_comm

    class JointMaskHook(ModelHook):
        def __init__(self, shared):
            super().__init__()
            self.shared = shared  # one dict per transformer: the last (whole mask, local mask) pair

        def pre_forward(self, module, *args, **kwargs):
            mask = kwargs.get("attention_mask")
            config = getattr(getattr(module, "processor", None), "_parallel_config", None)
            cp = getattr(config, "context_parallel_config", None)
            if mask is None or cp is None:
                return args, kwargs
            hs, ehs = kwargs.get("hidden_states"), kwargs.get("encoder_hidden_states")
            if hs is None or ehs is None or args:
                raise RuntimeError("HunyuanVideo context parallelism: the attention module was called without "
                                   "hidden_states/encoder_hidden_states keyword arguments; cannot shard its mask")
            n_video, n_text = hs.shape[1], ehs.shape[1]
            if mask.shape[-1] == n_video + n_text:
                return args, kwargs  # already over the local keys
            last = self.shared.get("last")
            if last is not None and last[0] is mask and last[1] == (n_video, n_text):
                kwargs["attention_mask"] = last[2]  # the same local mask object for every layer of a forward
                return args, kwargs
            group = cp._flattened_mesh.get_group()
            world, rank = dist.get_world_size(group), dist.get_rank(group)
            if cp.ulysses_anything or cp.ring_anything:
                video_sizes, text_sizes = gather_size_by_comm(n_video, group), gather_size_by_comm(n_text, group)
            else:
                video_sizes, text_sizes = [n_video] * world, [n_text] * world
            total_video, total_text = sum(video_sizes), sum(text_sizes)
            if mask.shape[-1] != total_video + total_text:
                raise ValueError(f"HunyuanVideo context parallelism: the attention mask covers {mask.shape[-1]} keys, "
                                 f"expected the whole joint sequence ({total_video} video + {total_text} text)")
            v0, t0 = sum(video_sizes[:rank]), total_video + sum(text_sizes[:rank])
            local = torch.cat([mask[..., v0:v0 + n_video], mask[..., t0:t0 + n_text]], dim=-1)
            self.shared["last"] = (mask, (n_video, n_text), local)
            kwargs["attention_mask"] = local
            return args, kwargs

    return JointMaskHook


def _joint_attention_modules(transformer):
    """HunyuanVideo's joint attention modules (the ones the mask hook sits on); none for other models."""
    for name in ("transformer_blocks", "single_transformer_blocks"):
        for block in getattr(transformer, name, ()):
            yield block.attn


HUNYUAN_VIDEO = ModelFamily(
    name="hunyuan_video",
    transformer_classes=("HunyuanVideoTransformer3DModel",),
    route="dispatcher",
    attention_processors=("HunyuanVideoAttnProcessor2_0",),
    exact_processors=("AttnProcessor2_0",),
    exact_reason=EXACT_REFINER_REASON,
    processor=HunyuanVideoSage3Processor,
    block_types={"transformer_blocks": "double", "single_transformer_blocks": "single",
                 "refiner_blocks": "refiner"},
    timestep_scale=1000.0,
    mask_kwarg="encoder_attention_mask",
    hub_id="hunyuanvideo-community/HunyuanVideo",
    pipeline_class="HunyuanVideoPipeline",
    example=Example(dict(height=544, width=960, num_frames=61, num_inference_steps=30),
                    prompt="a dog running on the beach at sunset", video=True),
    tiny_transformer=tiny_transformer,
    tiny_inputs=tiny_inputs,
    tiny_pipeline=tiny_pipeline,
    tiny_call_kwargs=tiny_call_kwargs,
    bench=BenchSpec(config={}, layer_args=("num_layers", "num_single_layers"), default_size=(720, 1280, 129, 1),
                    make_inputs=bench_inputs),
    report_shape=((9, 30, 45), 256),
    attention_shape="HunyuanVideo-720p",
    description="HunyuanVideo: 20 double + 40 single blocks, token refiner exact",
    cp_plan=cp_plan,
    prepare_cp=prepare_cp,
    unprepare_cp=unprepare_cp,
)

FAMILIES = (HUNYUAN_VIDEO,)
