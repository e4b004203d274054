"""What context parallelism needs from the GPU backends, checked on one GPU (and the world-size-1 ring on CPU).

1. Each CUDA/Triton backend's LSE (return_lse=True, through the same forward the context-parallel forward_op
   calls) is the LSE of the unsmoothed scores: against fp32 SDPA's LSE (the sdpa backend on fp32 copies of the
   inputs) on smoothed-K inputs (every key offset by ±50), odd shapes, both layouts.
2. Key chunks handed as views of one flat buffer (value at a non-zero storage offset, as diffusers' ring attention
   does) give the same result as contiguous copies, and merging the chunks' partial results by LSE gives the
   full attention (as accurate as one call over all keys).
3. diffusers' templated ring (and Ulysses) attention run with world size 1 (one process, NCCL on the GPU, gloo on
   CPU) with our forward_op give exactly the output of the backend called without parallelism.

    python -m pytest -q -rs tests/gpu/test_context_parallel_gpu.py
"""
import pytest
import torch

from sage3_diffusers import get_backend, list_backends
from sage3_diffusers.numerics.metrics import accuracy_metrics

CUDA = torch.cuda.is_available()
needs_cuda = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]
GPU_BACKENDS = ["cuda_sm90_int8_fp8", "triton_int8_fp8", "cuda_fp4_emulated", "cuda_sm120_fp4"]
# family: (mean |lse err|, max |lse err|, min cos of the chunk-merged output to the one-call output, how much
# further from exact (cos sim) the merged output may be than the one-call output). FP4 is ~0.97 cos to exact on
# these inputs (its accuracy, see tests/test_numerics_attention.py), so chunking moves it more.
LEVELS = {"int8_fp8": (0.02, 0.25, 0.999, 5e-4), "fp4": (0.16, 1.5, 0.97, 2e-3), "sdpa": (2e-3, 2e-2, 0.9999, 1e-5)}


def _backend_or_skip(name):
    if not CUDA:
        pytest.skip("needs a CUDA GPU")
    names = {b.name for b in list_backends()}
    if name not in names:
        pytest.skip(f"{name} not registered")
    b = get_backend(name)
    reasons = b.unavailable_reasons()
    if reasons:
        pytest.skip(f"{name}: {'; '.join(reasons)}")
    return b


def _inputs(b, h, sq, skv, d, offset, layout, dtype=torch.bfloat16, seed=0, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(b, h, sq, d, device=device, generator=g)
    q[..., : max(1, d // 16)] *= 4.0
    k = torch.randn(b, h, skv, d, device=device, generator=g) + offset
    v = torch.randn(b, h, skv, d, device=device, generator=g)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    if layout == "NHD":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    return q, k, v


def _fp32_lse(q, k, layout, scale):
    ref = get_backend("sdpa")
    _, lse = ref.forward(q.float(), k.float(), k.float(), layout=layout, is_causal=False, sm_scale=scale,
                         return_lse=True)
    return lse


@pytest.mark.parametrize("name", GPU_BACKENDS + ["sdpa"])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("offset", [50.0, -50.0])
@pytest.mark.parametrize("shape", [(2, 3, 333, 1037, 64), (1, 2, 4133, 4133, 128), (1, 4, 1, 77, 128)])
def test_gpu_lse_of_unsmoothed_scores(name, layout, offset, shape):
    backend = get_backend("sdpa") if name == "sdpa" else _backend_or_skip(name)
    if name == "sdpa" and not CUDA:
        pytest.skip("needs a CUDA GPU")
    b, h, sq, skv, d = shape
    q, k, v = _inputs(b, h, sq, skv, d, offset, layout)
    scale = d ** -0.5
    out, lse = backend.forward(q, k, v, layout=layout, is_causal=False, sm_scale=scale, return_lse=True)
    assert lse.shape == (b, h, sq) and lse.dtype == torch.float32
    err = (lse - _fp32_lse(q, k, layout, scale)).abs()
    mean_tol, max_tol, _, _ = LEVELS[backend.family]
    assert err.mean() <= mean_tol and err.max() <= max_tol, (name, err.mean().item(), err.max().item())


def _merge(out_a, lse_a, out_b, lse_b, layout):
    """diffusers' ring merge; lse [B, H, S] broadcast to the output layout."""
    la, lb = (x.unsqueeze(-1) if layout == "HND" else x.transpose(1, 2).unsqueeze(-1) for x in (lse_a, lse_b))
    out = out_a - torch.sigmoid(lb - la) * (out_a - out_b)
    return out, lse_a - torch.nn.functional.logsigmoid(lse_a - lse_b)


@pytest.mark.parametrize("name", GPU_BACKENDS)
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("lead", [0, 3], ids=["aligned", "misaligned"])
def test_gpu_ring_chunks_views_and_merge(name, layout, lead):
    """lead: elements in front of the chunk in the flat buffer (3: key and value start off 16-byte alignment)."""
    backend = _backend_or_skip(name)
    b, h, s, d = 1, 4, 2048 + 77, 128
    q, k, v = _inputs(b, h, s, s, d, 50.0, layout)
    seq_dim = 1 if layout == "NHD" else 2
    scale = d ** -0.5
    kw = dict(layout=layout, is_causal=False, sm_scale=scale, return_lse=True)
    full, _ = backend.forward(q, k, v, **kw)
    out = lse = None
    sizes = [700, 700, s - 1400]
    for kc, vc in zip(k.split(sizes, dim=seq_dim), v.split(sizes, dim=seq_dim)):
        kc, vc = kc.contiguous(), vc.contiguous()
        buffer = torch.cat([kc.new_zeros(lead), kc.flatten(), vc.flatten()])  # as diffusers' ring all-gathers K, V
        k_view = buffer[lead:lead + kc.numel()].reshape_as(kc)
        v_view = buffer[lead + kc.numel():].reshape_as(vc)
        assert v_view.storage_offset() == lead + kc.numel()
        o, l = backend.forward(q, k_view, v_view, **kw)
        o_copy, l_copy = backend.forward(q, kc.clone(), vc.clone(), **kw)
        assert torch.equal(o, o_copy) and torch.equal(l, l_copy), "storage-offset views differ from copies"
        out, lse = (o.float(), l) if out is None else _merge(out, lse, o.float(), l, layout)
    exact = torch.nn.functional.scaled_dot_product_attention(
        *(t.float() if layout == "HND" else t.float().transpose(1, 2) for t in (q, k, v)), scale=scale)
    if layout == "NHD":
        exact = exact.transpose(1, 2)
    one_call = accuracy_metrics(full.float(), exact)["cos_sim"]
    merged = accuracy_metrics(out, exact)["cos_sim"]
    _, _, min_cos, margin = LEVELS[backend.family]
    assert accuracy_metrics(out, full.float())["cos_sim"] >= min_cos
    assert merged >= one_call - margin, (merged, one_call)


# ----------------------------------------------------------------------------------- world-size-1 templated CP

@pytest.fixture(scope="module")
def world_one():
    import torch.distributed as dist
    created = not dist.is_initialized()
    if created:
        backend = "cpu:gloo,cuda:nccl" if CUDA else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    yield
    if created:
        dist.destroy_process_group()


def _world_one_config(device, mode):
    from diffusers import ContextParallelConfig, ParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    # ContextParallelConfig refuses degrees of 1 at construction; validate as 2 ranks, then narrow to this world.
    cp = ContextParallelConfig(ring_degree=2) if mode == "ring" else ContextParallelConfig(ulysses_degree=2)
    cp.ring_degree = cp.ulysses_degree = 1
    mesh = init_device_mesh(device.type, (1, 1), mesh_dim_names=("ring", "ulysses"))
    config = ParallelConfig(context_parallel_config=cp)
    config.setup(0, 1, device, mesh=mesh)
    return config


_DEVICE_PARAMS = [pytest.param("cpu", "reference_int8_fp8", id="cpu-reference_int8_fp8"),
                  pytest.param("cpu", "sdpa", id="cpu-sdpa")] + [
    pytest.param("cuda", n, id=f"cuda-{n}", marks=needs_cuda) for n in GPU_BACKENDS + ["sdpa"]]


@pytest.mark.parametrize("device_type,name", _DEVICE_PARAMS)
@pytest.mark.parametrize("mode", ["ring", "ulysses"])
@pytest.mark.parametrize("masked", [False, True])
def test_templated_world_size_one_equals_no_parallelism(world_one, device_type, name, mode, masked):
    from diffusers.models.attention_dispatch import TemplatedRingAttention, TemplatedUlyssesAttention
    from sage3_diffusers.integration.context_parallel import _chunk_keys, _ForwardOp, _no_backward

    backend = get_backend(name) if device_type == "cpu" or name == "sdpa" else _backend_or_skip(name)
    device = torch.device(device_type)
    dtype = torch.float32 if device_type == "cpu" else torch.bfloat16
    b, h, s, d = 2, 4, 300 if device_type == "cpu" else 3001, 64
    q, k, v = _inputs(b, h, s, s, d, 50.0, "NHD", dtype=dtype, device=device_type)
    scale = d ** -0.5
    config = _world_one_config(device, mode)
    mask = None
    if masked:  # right padding of unequal lengths (HunyuanVideo's text), global key order = local order here
        mask = torch.ones(b, s, dtype=torch.bool)
        mask[1, s - 37:] = False
    op = _ForwardOp(name, scale, mask, None if mask is None else _chunk_keys(config.context_parallel_config, [s]),
                    None)
    templated = TemplatedRingAttention if mode == "ring" else TemplatedUlyssesAttention
    with torch.no_grad():
        out = templated.apply(q, k, v, None, 0.0, False, scale, False, False, op, _no_backward, config)
        kw = dict(layout="NHD", is_causal=False, sm_scale=scale, return_lse=False)
        if mask is None:
            direct = backend.forward(q, k, v, **kw)
        else:
            direct = torch.cat([backend.forward(q[i:i + 1], k[i:i + 1, mask[i].to(device)],
                                                v[i:i + 1, mask[i].to(device)], **kw) for i in range(b)])
    assert out.dtype == q.dtype
    assert torch.equal(out, direct), (out.float() - direct.float()).abs().max().item()
