"""Context parallelism with our kernels on CPU processes (gloo), against the single-process result.

Each world size runs once (one `torch.multiprocessing` spawn per size, every case inside it); rank 0 writes the
measured differences and the tests below assert them per case. Cases: the op (`parallel_attention`) in every mode
diffusers has (Ulysses, ring, unified, Ulysses-/ring-anything) with and without key masks, exact (sdpa, fp32,
<= 1e-5) and with the emulated INT8/FP8 kernel (Ulysses equal to the single-process quantized output: same heads,
same tokens, same quantization groups; ring and unified quantize each key chunk on their own, so they must be as
close to exact attention as the one-process kernel); tiny Flux (diffusers' plan) and tiny HunyuanVideo (our plan,
masked text of unequal lengths) through the "sage2pp" dispatcher backend: exact with sdpa (<= 1e-5), within cos
sim 0.9999 of the one-process output with the emulated kernel in every mode (Ulysses too: after its all-to-all the
keys arrive in rank order [text_0, image_0, text_1, ...], so the token groups the kernel quantizes together differ
from one process's [text, image]).
"""
import json
import os
import socket
import tempfile
from datetime import timedelta

import pytest
import torch

EXACT_TOL = 1e-5
RING_MIN_COS = 0.9999  # a whole tiny model, quantized, ring / unified / Ulysses vs one process
OP_RING_MIN_COS = 0.999


# ------------------------------------------------------------------------------------------------ worker side

def _cp_config(rank, world, ring, ulysses, **kw):
    from diffusers import ContextParallelConfig, ParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    config = ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses,
                                                                          **kw))
    mesh = init_device_mesh("cpu", (ring, ulysses), mesh_dim_names=("ring", "ulysses"))
    config.setup(rank, world, torch.device("cpu"), mesh=mesh)
    return config


def _metrics(out, ref):
    out, ref = out.double().flatten(), ref.double().flatten()
    return {"max_abs": (out - ref).abs().max().item(),
            "cos": torch.nn.functional.cosine_similarity(out, ref, dim=0).item()}


def _gather_seq(x, sizes, rank):
    """Every rank's shard (dim 1) gathered back into the whole sequence."""
    import torch.distributed as dist
    width = max(sizes)
    pad = torch.zeros((x.shape[0], width) + x.shape[2:], dtype=x.dtype)
    pad[:, :x.shape[1]] = x
    parts = [torch.empty_like(pad) for _ in sizes]
    dist.all_gather(parts, pad.contiguous())
    return torch.cat([p[:, :n] for p, n in zip(parts, sizes)], dim=1)


def _op_case(rank, world, ring, ulysses, kernel, masked, anything=False, seq=None, bias=False):
    from sage3_diffusers import get_backend
    from sage3_diffusers.integration.context_parallel import parallel_attention

    kw = {}
    if anything:
        kw = {"ring_anything": True} if ring > 1 else {"ulysses_anything": True}
    config = _cp_config(rank, world, ring, ulysses, **kw)
    b, h, d = 2, 4, 32
    s = seq or 16 * world
    g = torch.Generator().manual_seed(1234)
    q, k, v = (torch.randn(b, s, h, d, generator=g) for _ in range(3))
    k = k + 50.0  # large key offset: K smoothing must be undone in every chunk's LSE
    mask = None
    if masked:  # right padding of unequal lengths; sample 1 also loses a block in the middle
        mask = torch.ones(b, s, dtype=torch.bool)
        mask[0, s - 5:] = False
        mask[1, s // 2 - 3:s // 2 + 2] = False
        mask[1, s - 9:] = False
    bounds = torch.arange(s).tensor_split(world)
    mine = bounds[rank]
    lo, hi = int(mine[0]), int(mine[-1]) + 1
    local = [t[:, lo:hi] for t in (q, k, v)]
    local_mask = None if mask is None else mask[:, None, None, lo:hi]
    if bias:  # the same key mask as an additive 0 / -10000 bias (LTX, Qwen-Image style)
        local_mask = torch.zeros(local_mask.shape).masked_fill(~local_mask, -10000.0)
    with torch.no_grad():
        out = parallel_attention(*local, attn_mask=local_mask, kernel=kernel, parallel_config=config)
        full = get_backend(kernel).forward(q, k, v, layout="NHD", is_causal=False, sm_scale=d ** -0.5,
                                           return_lse=False,
                                           attn_mask=None if mask is None else mask[:, None, None, :])
    if mask is not None and kernel != "sdpa":  # the quantized kernels take no mask: attend to the valid keys
        full = torch.cat([get_backend(kernel).forward(q[i:i + 1], k[i:i + 1, mask[i]], v[i:i + 1, mask[i]],
                                                      layout="NHD", is_causal=False, sm_scale=d ** -0.5,
                                                      return_lse=False) for i in range(b)])
    gathered = _gather_seq(out, [len(x) for x in bounds], rank)
    result = _metrics(gathered, full)
    if kernel != "sdpa":  # how far each is from exact attention (fp64)
        exact = get_backend("sdpa").forward(q.double(), k.double(), v.double(), layout="NHD", is_causal=False,
                                            sm_scale=d ** -0.5, return_lse=False,
                                            attn_mask=None if mask is None else mask[:, None, None, :])
        result["cos_exact"] = _metrics(gathered, exact)["cos"]
        result["single_cos_exact"] = _metrics(full, exact)["cos"]
    return result


def _tiny(family, heads=4, head_dim=16):
    from diffusers import CogVideoXTransformer3DModel, FluxTransformer2DModel, HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    if family == "cogvideox":
        m = CogVideoXTransformer3DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
                                        out_channels=4, time_embed_dim=2, text_embed_dim=32, num_layers=2,
                                        sample_width=4, sample_height=4, sample_frames=9, patch_size=2,
                                        temporal_compression_ratio=4, max_text_seq_length=12,
                                        use_rotary_positional_embeddings=True)
    elif family == "flux":
        m = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                   attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=32,
                                   pooled_projection_dim=32, axes_dims_rope=(4, 4, head_dim - 8))
    else:
        m = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=heads,
                                           attention_head_dim=head_dim, num_layers=1, num_single_layers=1,
                                           num_refiner_layers=1, patch_size=1, patch_size_t=1,
                                           guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=32,
                                           rope_axes_dim=(4, 4, head_dim - 8))
    return m.eval()


def _model_inputs(family, model, text_len=12):
    from sage3_diffusers.integration.tiny import transformer_inputs
    if family == "flux":
        return transformer_inputs("flux", config=model.config, grid=(1, 4, 4), text_len=8)
    if family == "cogvideox":  # 12 video tokens (3 latent frames of 2x2 patches), 12 text tokens
        return transformer_inputs("cogvideox", config=model.config, grid=(3, 2, 2), text_len=12)
    return transformer_inputs("hunyuan_video", config=model.config, grid=(2, 4, 4), text_len=text_len,
                              text_lengths=[text_len, 7])


def _model_case(rank, world, family, ring, ulysses, backend_env, attention_backend="sage2pp", anything=False):
    from sage3_diffusers.integration import register_dispatcher_backends
    from sage3_diffusers.integration.context_parallel import prepare_context_parallel

    register_dispatcher_backends()
    os.environ["SAGE3_BACKEND"] = backend_env
    try:
        model = _tiny(family)
        model.set_attention_backend(attention_backend)
        # The "anything" variants: a text length that does not split evenly over the ranks.
        inputs = _model_inputs(family, model, text_len=13 if anything else 12)
        kw = {} if not anything else {"ring_anything": True} if ring > 1 else {"ulysses_anything": True}
        with torch.no_grad():
            ref = model(**inputs)[0]
            prepare_context_parallel(model)
            from diffusers import ContextParallelConfig
            model.enable_parallelism(config=ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses, **kw))
            out = model(**inputs)[0]
    finally:
        os.environ.pop("SAGE3_BACKEND", None)
    return _metrics(out, ref)


def _processor_cp_case(rank, world, ring, ulysses, kernel):
    """CogVideoX calls SDPA from its processors: ours (installed by apply, with the plan) run the CP path, with the
    layer's kernel from the policy and the calls counted."""
    from diffusers import ContextParallelConfig
    from sage3_diffusers.integration import apply

    model = _tiny("cogvideox")
    inputs = _model_inputs("cogvideox", model)
    runtime = apply(model, kernel=kernel, log_summary=False)
    with torch.no_grad():
        ref = model(**inputs)[0]
        model.enable_parallelism(config=ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses))
        out = model(**inputs)[0]
    result = _metrics(out, ref)
    # One call per attention layer per forward (2 layers, one forward without and one with parallelism), every
    # one on the requested backend.
    result["calls_ok"] = len(runtime.stats.calls) == 4 and all(c.backend == kernel for c in runtime.stats.calls)
    from sage3_diffusers.integration import remove
    try:  # diffusers' own processors would attend within the shard: remove refuses
        remove(model)
        result["calls_ok"] = False
    except RuntimeError:
        pass
    return result


# Per layer and per step: the first step exact, then the emulated INT8/FP8 kernel in the double blocks and exact in
# the single ones.
APPLY_POLICY = {"default": "reference_int8_fp8", "rules": [
    {"name": "first-step-exact", "kernel": "sdpa", "steps": {"first": 1}},
    {"name": "single-blocks-exact", "kernel": "sdpa", "block_types": ["single"]}]}


def _apply_case(rank, world, family, ring, ulysses, enable_first):
    """apply(model, policy) and enable_parallelism, in either order, on the dispatcher route (the policy backend):
    two forwards (two steps) give the one-process output and exactly the one-process stats (step, layer, requested
    kernel, backend that ran), and remove() refuses while parallelism is on."""
    from diffusers import ContextParallelConfig
    from sage3_diffusers.integration import apply, remove

    model = _tiny(family)
    steps = [_model_inputs(family, model)]
    steps.append(dict(steps[0], timestep=steps[0]["timestep"] * 0.5))

    def run():
        runtime = apply(model, policy=APPLY_POLICY, log_summary=False)
        with torch.no_grad():
            out = torch.cat([model(**kw)[0] for kw in steps])
        return out, [(c.step, c.layer, c.requested, c.backend) for c in runtime.stats.calls]

    ref, ref_calls = run()
    remove(model)
    config = ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses)
    if enable_first:
        model.enable_parallelism(config=config)
        out, calls = run()
    else:
        runtime = apply(model, policy=APPLY_POLICY, log_summary=False)
        model.enable_parallelism(config=config)
        with torch.no_grad():
            out = torch.cat([model(**kw)[0] for kw in steps])
        calls = [(c.step, c.layer, c.requested, c.backend) for c in runtime.stats.calls]
    result = _metrics(out, ref)
    kernels = {(step, requested) for step, _, requested, _ in ref_calls}
    result["calls_ok"] = calls == ref_calls and kernels == {(0, "sdpa"), (1, "sdpa"), (1, "reference_int8_fp8")}
    try:
        remove(model)
        result["calls_ok"] = False
    except RuntimeError:
        pass
    return result


def _processor_route_case(rank, world):
    """Processors without a context-parallel path (installed by hand, or the processor route of SD3) must raise,
    never attend only within the shard."""
    from diffusers import ContextParallelConfig
    from sage3_diffusers.integration import Sage3Processor, apply, models

    found = {}
    model = _tiny("flux")
    inputs = _model_inputs("flux", model)
    model.set_attn_processor(Sage3Processor(kernel="sdpa"))
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    try:
        with torch.no_grad():
            model(**inputs)
        found["by_hand_then_enable"] = "ran"
    except NotImplementedError as e:
        found["by_hand_then_enable"] = "raised" if "cannot run under context parallelism" in str(e) else repr(e)
    sd3 = models.find("sd3").tiny_transformer(seed=0, layers=1, head_dim=16)
    sd3.enable_parallelism(config=ContextParallelConfig(ring_degree=world), cp_plan={})
    try:
        apply(sd3, kernel="sdpa", log_summary=False)
        found["enable_then_apply"] = "ran"
    except NotImplementedError as e:
        found["enable_then_apply"] = "raised" if "do not support it" in str(e) else repr(e)
    return found


def _errors_case(rank, world):
    """What the op refuses, with a clear error on every rank (never a wrong result)."""
    from sage3_diffusers.integration.context_parallel import parallel_attention

    config = _cp_config(rank, world, world, 1)
    q, k, v = (torch.randn(1, 8, 2, 16) for _ in range(3))
    found = {}
    calls = {
        "grad": lambda: parallel_attention(q.requires_grad_(), k, v, kernel="sdpa", parallel_config=config),
        "query_mask": lambda: parallel_attention(q.detach(), k, v, kernel="sdpa", parallel_config=config,
                                                 attn_mask=torch.ones(1, 1, 8, 8, dtype=torch.bool)),
        "float_mask": lambda: parallel_attention(q.detach(), k, v, kernel="sdpa", parallel_config=config,
                                                 attn_mask=torch.randn(1, 1, 1, 8)),
        "causal": lambda: parallel_attention(q.detach(), k, v, kernel="sdpa", parallel_config=config,
                                             is_causal=True),
    }
    for name, call in calls.items():
        try:
            call()
            found[name] = "ran"
        except (ValueError, RuntimeError) as e:
            found[name] = type(e).__name__
    return found


def _bench_cp_case(rank, world):
    """`bench cp --tiny` inside the running process group (as under torchrun): it runs every mode that fits and
    reports the CP output's agreement with the one-process output."""
    import sage3_diffusers
    from sage3_diffusers import bench_cp

    path = os.path.join(tempfile.gettempdir(), f"sage3_bench_cp_{os.getppid()}.json")
    try:
        bench_cp.main(["--tiny", "--model", "hunyuan_video", "--iters", "1", "--warmup", "0", "--json", path])
    finally:
        sage3_diffusers.set_fallback(None)
    if rank != 0:
        return {}
    with open(path) as f:
        rows = json.load(f)["rows"]
    os.remove(path)
    return {"rows": sorted(f"{r['mode']}-{r['variant']}" for r in rows),
            "min_cos": min(r["cos"] for r in rows if r["mode"] != "none")}


ERRORS = {"grad": "RuntimeError", "query_mask": "ValueError", "float_mask": "ValueError", "causal": "ValueError"}


def _cases(world):
    ref = "reference_int8_fp8"
    cases = {}
    modes = [("ulysses", 1, world), ("ring", world, 1)]
    if world == 4:
        modes.append(("unified", 2, 2))
    for mode, r, u in modes:
        for masked in (False, True):
            tag = f"{mode}-{'mask' if masked else 'nomask'}"
            cases[f"op-sdpa-{tag}"] = lambda rank, r=r, u=u, m=masked: _op_case(rank, world, r, u, "sdpa", m)
            cases[f"op-{ref}-{tag}"] = lambda rank, r=r, u=u, m=masked: _op_case(rank, world, r, u, ref, m)
        if mode != "unified":  # the "anything" variants: a sequence that does not split evenly
            cases[f"op-sdpa-{mode}_anything-mask"] = (
                lambda rank, r=r, u=u: _op_case(rank, world, r, u, "sdpa", True, anything=True, seq=16 * world + 3))
    for family in ("flux", "hunyuan_video"):
        for mode, r, u in modes:
            cases[f"model-{family}-sdpa-{mode}"] = lambda rank, f=family, r=r, u=u: _model_case(
                rank, world, f, r, u, "sdpa")
            cases[f"model-{family}-{ref}-{mode}"] = lambda rank, f=family, r=r, u=u: _model_case(
                rank, world, f, r, u, ref)
    for mode, r, u in modes:
        cases[f"apply-hunyuan_video-{mode}"] = lambda rank, r=r, u=u: _apply_case(rank, world, "hunyuan_video", r, u,
                                                                                False)
        for enable_first in (False, True):
            order = "enable_first" if enable_first else "apply_first"
            cases[f"apply-flux-{mode}-{order}"] = lambda rank, r=r, u=u, e=enable_first: _apply_case(
                rank, world, "flux", r, u, e)
    for mode, r, u in modes:
        cases[f"model-cogvideox-sdpa-{mode}"] = lambda rank, r=r, u=u: _processor_cp_case(rank, world, r, u, "sdpa")
        cases[f"model-cogvideox-{ref}-{mode}"] = lambda rank, r=r, u=u: _processor_cp_case(rank, world, r, u, ref)
    # The plan alone (no sage3 kernel): diffusers' own native backend, Ulysses, masked HunyuanVideo.
    cases["model-hunyuan_video-native-ulysses"] = lambda rank: _model_case(rank, world, "hunyuan_video", 1, world,
                                                                           "sdpa", attention_backend="native")
    if world == 2:
        for mode, r, u in modes:
            cases[f"model-hunyuan_video-sdpa-{mode}_anything"] = lambda rank, r=r, u=u: _model_case(
                rank, world, "hunyuan_video", r, u, "sdpa", anything=True)
        cases["processor-route-raises"] = lambda rank: _processor_route_case(rank, world)
        cases["op-errors"] = lambda rank: _errors_case(rank, world)
        for mode, r, u in modes:
            cases[f"op-sdpa-{mode}-biasmask"] = lambda rank, r=r, u=u: _op_case(rank, world, r, u, "sdpa", True,
                                                                               bias=True)
        cases["bench-cp"] = lambda rank: _bench_cp_case(rank, world)
    return cases


def _worker(rank, world, port, path):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    # diffusers computes rank % torch.accelerator.device_count(); on a CPU-only machine that is 0.
    torch.accelerator.device_count = lambda: 1
    import warnings
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    results = {}
    for name, case in _cases(world).items():
        try:
            results[name] = case(rank)
        except Exception as e:  # recorded per case; a failure on one rank only would hang the next collective
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        dist.barrier()
    if rank == 0:
        with open(path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ test side

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_RESULTS: dict = {}


def run_world(world):
    if world not in _RESULTS:
        import torch.multiprocessing as mp
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "results.json")
            mp.spawn(_worker, args=(world, _free_port(), path), nprocs=world, join=True)
            with open(path) as f:
                _RESULTS[world] = json.load(f)
    return _RESULTS[world]


def _case_names(world):
    return sorted(_cases(world))


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_cases(world):
    results = run_world(world)
    assert sorted(results) == _case_names(world)
    failures = []
    for name, m in sorted(results.items()):
        if "error" in m:
            failures.append(f"{name}: {m['error']}")
        elif name == "bench-cp":
            if m["rows"] != ["none-default", "none-int8_fp8", "ring-int8_fp8", "ulysses-int8_fp8"] or \
                    m["min_cos"] < RING_MIN_COS:
                failures.append(f"{name}: {m}")
        elif name == "op-errors":
            if m != ERRORS:
                failures.append(f"{name}: {m}")
        elif name == "processor-route-raises":
            if m != {"by_hand_then_enable": "raised", "enable_then_apply": "raised"}:
                failures.append(f"{name}: {m}")
        elif (name.startswith("model-cogvideox") or name.startswith("apply-")) and not m["calls_ok"]:
            failures.append(f"{name}: the stats do not show one call per layer on the requested backend, or "
                            "remove() did not refuse")
        elif "-sdpa-" in name or "-native-" in name or name.startswith("op-reference_int8_fp8-ulysses"):
            if m["max_abs"] > EXACT_TOL:
                failures.append(f"{name}: max abs diff {m['max_abs']:.3g} > {EXACT_TOL}")
        elif name.startswith("op-"):
            # One attention op: ring quantizes each key chunk on its own, so it differs from the one-process
            # quantized result by about the quantization error itself (both ~0.9992-0.9995 cos to exact on these
            # inputs); it must be as accurate as the one-process kernel.
            if m["cos"] < OP_RING_MIN_COS or m["cos_exact"] < m["single_cos_exact"] - 2e-4:
                failures.append(f"{name}: {m}")
        elif m["cos"] < RING_MIN_COS:
            failures.append(f"{name}: cos sim {m['cos']:.7f} < {RING_MIN_COS}")
    assert not failures, "\n".join(failures)


def test_prepare_is_inert_without_parallelism_and_undone():
    """Our HunyuanVideo plan and mask hooks change nothing until enable_parallelism, and unprepare removes them."""
    from sage3_diffusers.integration.context_parallel import prepare_context_parallel, unprepare_context_parallel

    model = _tiny("hunyuan_video")
    inputs = _model_inputs("hunyuan_video", model)
    with torch.no_grad():
        before = model(**inputs)[0]
        assert prepare_context_parallel(model) and prepare_context_parallel(model)  # idempotent
        assert set(model._cp_plan) == {"rope", "transformer_blocks.0", "proj_out"}
        assert torch.equal(model(**inputs)[0], before)
        unprepare_context_parallel(model)
        assert model._cp_plan is None and model.transformer_blocks[0].attn._diffusers_hook.get_hook(
            "sage3_cp_joint_mask") is None
        assert torch.equal(model(**inputs)[0], before)
    assert not prepare_context_parallel(_tiny("flux"))  # diffusers' own plan: nothing to add


def test_prepare_refuses_token_replace():
    from diffusers import HunyuanVideoTransformer3DModel
    from sage3_diffusers.integration.context_parallel import prepare_context_parallel

    model = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                           num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1,
                                           patch_size_t=1, text_embed_dim=16, pooled_projection_dim=32,
                                           rope_axes_dim=(4, 4, 8), image_condition_type="token_replace")
    with pytest.raises(ValueError, match="token_replace"):
        prepare_context_parallel(model)


def test_cogvideox_plan_needs_our_processors_and_apply_attaches_it():
    from sage3_diffusers.integration import apply, remove
    from sage3_diffusers.integration.context_parallel import prepare_context_parallel

    model = _tiny("cogvideox")
    with pytest.raises(ValueError, match="call SDPA directly"):
        prepare_context_parallel(model)  # diffusers' CogVideoX processors would attend within the shard
    apply(model, kernel="sdpa", log_summary=False)
    assert set(model._cp_plan) == {"transformer_blocks.0", "transformer_blocks.*", "proj_out"}
    remove(model)
    assert model._cp_plan is None
