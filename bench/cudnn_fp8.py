"""cuDNN FP8 (E4M3) attention forward through the cudnn-frontend Python graph API: our competitor's kernel.

`make_cudnn_fp8_fn(q, k, v)` takes bf16/fp16 q, k, v of shape (B, H, S, D) (HND), quantizes each to e4m3 with one
per-tensor scale (amax / 448), builds (once per shape, cached) a `cudnn.pygraph` with one `sdpa_fp8` node
(per-tensor descales for Q, K, V and S; scales for S and O; amax outputs for S and O) and returns
`(attn, None)`, or `(None, "one-line reason")` when cudnn-frontend is missing or cuDNN cannot build the graph.

`attn.run()` is the attention call alone (one graph execute; Q, K, V were quantized beforehand): time this one.
`attn()` runs it and returns the output in the input dtype. The graph asks for a bf16 O first; where cuDNN refuses
that (Hopper kernels may write FP8 O only) it falls back to an E4M3 O with scale_o = 448 / amax(V) (|O| <= max|V|)
and `attn()` dequantizes it (that extra elementwise pass is not part of `run()`). `attn.info` says which.

S (the softmax probabilities, <= 1) is stored with scale_s = 448 and descale_s = 1/448. No K smoothing or other
accuracy aids: plain per-tensor FP8, as cuDNN offers it.

The cudnn-frontend wheel (nvidia-cudnn-frontend, installed with --no-deps) drives the cuDNN library that torch
already loaded; we pass our own cudnn handle to every graph, so no cuda-python is needed. Nothing here raises for
an unsupported setup: every failure becomes a one-line reason.
"""
from __future__ import annotations

import re

import torch

from sage3_diffusers.numerics.formats import E4M3_MAX
_GRAPHS: dict = {}  # shape key -> (graph, descriptors, out_kind, info) | ("error", reason)
_HANDLES: dict = {}  # device index -> cudnn.Handle
_IMPORT: list = []  # [module or None, reason or None], filled once


def one_line(exc: BaseException, limit: int = 300) -> str:
    """`Type: message` on one line (cuDNN messages span many lines), cut to `limit` characters."""
    msg = re.sub(r"\s+", " ", str(exc)).strip()
    text = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def import_cudnn():
    """(cudnn module, None) or (None, reason). Imported once; torch's libcudnn is loaded first so the frontend
    binds to the same library."""
    if not _IMPORT:
        try:
            torch.backends.cudnn.version()  # loads torch's libcudnn (the frontend's dlopen then finds it by soname)
            import cudnn  # noqa: PLC0415
            _IMPORT[:] = [cudnn, None]
        except Exception as exc:  # noqa: BLE001 - a missing or broken frontend is a reason, not a crash
            _IMPORT[:] = [None, f"cudnn-frontend unavailable ({one_line(exc)})"]
    return _IMPORT[0], _IMPORT[1]


def versions() -> dict:
    """Frontend and backend versions (strings; "?" where unknown)."""
    cudnn, _ = import_cudnn()
    out = {"frontend": "?", "backend": "?", "torch_cudnn": str(torch.backends.cudnn.version())}
    if cudnn is not None:
        out["frontend"] = str(getattr(cudnn, "__version__", "?"))
        try:
            out["backend"] = str(cudnn.backend_version_string())
        except Exception:  # noqa: BLE001
            try:
                out["backend"] = str(cudnn.backend_version())
            except Exception as exc:  # noqa: BLE001
                out["backend"] = f"? ({one_line(exc, 80)})"
    return out


def quantize_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor E4M3: (x * 448/amax rounded to e4m3, contiguous; descale = amax/448 as a (1,1,1,1) fp32 tensor)."""
    amax = x.detach().abs().amax().float()
    scale = torch.where(amax > 0, E4M3_MAX / amax, torch.ones_like(amax))
    xq = (x.float() * scale).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).contiguous()
    return xq, (1.0 / scale).reshape(1, 1, 1, 1).contiguous()


def _handle(cudnn, device: torch.device):
    idx = device.index if device.index is not None else torch.cuda.current_device()
    h = _HANDLES.get(idx)
    if h is None:
        with torch.cuda.device(idx):
            h = _HANDLES[idx] = cudnn.create_handle()
    return h


def _set_stream(cudnn, handle) -> None:
    cudnn.set_stream(handle, torch.cuda.current_stream().cuda_stream)


def _build(cudnn, handle, q_shape, kv_shape, sm_scale: float, out_kind: str):
    """Build one sdpa_fp8 graph. Returns (graph, descriptors dict, plan name)."""
    e4m3, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=f32, compute_data_type=f32, handle=handle)

    def dense(shape):
        b, h, s, d = shape
        return [h * s * d, s * d, d, 1]

    t = {"q": graph.tensor(name="q", dim=list(q_shape), stride=dense(q_shape), data_type=e4m3),
         "k": graph.tensor(name="k", dim=list(kv_shape), stride=dense(kv_shape), data_type=e4m3),
         "v": graph.tensor(name="v", dim=list(kv_shape), stride=dense(kv_shape), data_type=e4m3)}
    for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"):
        t[n] = graph.tensor(name=n, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=f32)
    o, _stats, amax_s, amax_o = graph.sdpa_fp8(
        t["q"], t["k"], t["v"], t["descale_q"], t["descale_k"], t["descale_v"], t["descale_s"], t["scale_s"],
        t["scale_o"], generate_stats=False, attn_scale=float(sm_scale), use_causal_mask=False, name="sdpa_fp8")
    o_shape = list(q_shape[:-1]) + [kv_shape[-1]]
    o.set_output(True).set_dim(o_shape).set_stride(dense(o_shape)).set_data_type(
        cudnn.data_type.BFLOAT16 if out_kind == "bf16" else e4m3)
    for a in (amax_s, amax_o):
        a.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(f32)
    t.update(o=o, amax_s=amax_s, amax_o=amax_o)
    _set_stream(cudnn, handle)
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    plan = "?"
    try:
        eng = graph.selected_engine
        plan = f"python engine {eng.name}" if eng is not None else \
            f"cuDNN backend {graph.get_plan_name_at_index(getattr(graph, '_plan_index', 0))}"
    except Exception:  # noqa: BLE001 - a name is only for the report
        pass
    return graph, t, plan


def _graph_for(cudnn, handle, q_shape, kv_shape, sm_scale, device, out_pref):
    key = (device.index, tuple(q_shape), tuple(kv_shape), float(sm_scale), tuple(out_pref))
    hit = _GRAPHS.get(key)
    if hit is None:
        reasons = []
        for kind in out_pref:
            try:
                graph, t, plan = _build(cudnn, handle, q_shape, kv_shape, sm_scale, kind)
                hit = (graph, t, kind, {"out": kind, "plan": plan,
                                        "refused": "; ".join(reasons) or None})
                break
            except Exception as exc:  # noqa: BLE001 - try the next output type, then give the reasons
                reasons.append(f"{kind} O: {one_line(exc, 240)}")
        if hit is None:
            hit = ("error", "cuDNN FP8 graph not built: " + "; ".join(reasons))
        _GRAPHS[key] = hit
    return hit


class CudnnFp8Attention:
    """One shape's cuDNN FP8 attention with its quantized inputs, output and workspace bound."""

    def __init__(self, cudnn, handle, graph, t, out_kind, info, q, qf, kf, vf, dq, dk, dv):
        self._cudnn, self._handle, self._graph, self.info = cudnn, handle, graph, dict(info)
        self.out_dtype = q.dtype
        dev = q.device
        b, h, s, _ = q.shape
        d_v = vf.shape[-1]
        one = torch.ones(1, 1, 1, 1, dtype=torch.float32, device=dev)
        scale_s = one * E4M3_MAX
        descale_s = one / E4M3_MAX
        if out_kind == "bf16":
            scale_o = one
            self._descale_o = None
            self.out = torch.empty(b, h, s, d_v, dtype=torch.bfloat16, device=dev)
        else:  # |O| <= max|V| = 448 * descale_v
            scale_o = (1.0 / dv).contiguous()
            self._descale_o = dv
            self.out = torch.empty(b, h, s, d_v, dtype=torch.float8_e4m3fn, device=dev)
        self.amax_s = torch.zeros(1, 1, 1, 1, dtype=torch.float32, device=dev)
        self.amax_o = torch.zeros_like(self.amax_s)
        self._keep = (qf, kf, vf, dq, dk, dv, scale_s, descale_s, scale_o)
        self._pack = {t["q"]: qf, t["k"]: kf, t["v"]: vf, t["descale_q"]: dq, t["descale_k"]: dk,
                      t["descale_v"]: dv, t["descale_s"]: descale_s, t["scale_s"]: scale_s, t["scale_o"]: scale_o,
                      t["o"]: self.out, t["amax_s"]: self.amax_s, t["amax_o"]: self.amax_o}
        ws = int(graph.get_workspace_size())
        self.workspace = torch.empty(max(ws, 1), dtype=torch.uint8, device=dev)
        self.info.update(workspace_bytes=ws, scale_s=E4M3_MAX,
                         timing="attention call only (Q, K, V quantized to e4m3 beforehand; excluded)"
                         + ("" if out_kind == "bf16" else "; FP8 O dequantized outside the timed call"))

    def run(self) -> torch.Tensor:
        """The attention call alone (one cuDNN graph execute on the current stream); returns the raw output."""
        _set_stream(self._cudnn, self._handle)
        self._graph.execute(self._pack, self.workspace, handle=self._handle)
        return self.out

    def __call__(self) -> torch.Tensor:
        o = self.run()
        if self._descale_o is not None:
            return (o.float() * self._descale_o).to(self.out_dtype)
        return o.to(self.out_dtype) if o.dtype != self.out_dtype else o


def make_cudnn_fp8_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float | None = None,
                      out_pref=("bf16", "fp8")):
    """(CudnnFp8Attention, None) or (None, one-line reason). q, k, v: (B, H, S, D) on CUDA, non-causal."""
    try:
        cudnn, reason = import_cudnn()
        if cudnn is None:
            return None, reason
        if not (q.is_cuda and k.is_cuda and v.is_cuda):
            return None, "cuDNN FP8 needs CUDA tensors"
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            return None, "cuDNN FP8 wrapper takes (B, H, S, D) tensors"
        if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1] \
                or q.shape[1] % k.shape[1]:
            return None, f"shapes not supported here: q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}"
        d = q.shape[-1]
        if d % 16 or v.shape[-1] % 16:
            return None, f"cuDNN FP8 needs head dims divisible by 16 (got {d}, {v.shape[-1]})"
        if not hasattr(torch, "float8_e4m3fn"):
            return None, "this torch has no float8_e4m3fn"
        sm_scale = d ** -0.5 if sm_scale is None else float(sm_scale)
        handle = _handle(cudnn, q.device)
        hit = _graph_for(cudnn, handle, tuple(q.shape), tuple(k.shape), sm_scale, q.device, tuple(out_pref))
        if hit[0] == "error":
            return None, hit[1]
        graph, t, kind, info = hit
        qf, dq = quantize_e4m3(q)
        kf, dk = quantize_e4m3(k)
        vf, dv = quantize_e4m3(v)
        return CudnnFp8Attention(cudnn, handle, graph, t, kind, info, q, qf, kf, vf, dq, dk, dv), None
    except Exception as exc:  # noqa: BLE001 - never kill the caller
        return None, f"cuDNN FP8 setup failed: {one_line(exc)}"


def tflops(shape, ms: float) -> float:
    b, h, s, d = shape
    return 4.0 * b * h * s * s * d / ms / 1e9


if __name__ == "__main__":  # quick manual check: python bench/cudnn_fp8.py  (see cudnn_fp8_smoke.py for more)
    import sys
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    print(versions())
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 24, 4608, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    attn, err = make_cudnn_fp8_fn(q, k, v)
    if err:
        sys.exit(err)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    o = attn().float()
    print(attn.info, "cos", torch.nn.functional.cosine_similarity(o.flatten(), ref.flatten(), dim=0).item(),
          "relL1", ((o - ref).abs().sum() / ref.abs().sum()).item())
