"""The end-to-end benchmark builds real-config transformers and inputs that fit them (checked on the meta
device: shapes only, no memory, no GPU)."""
import pytest
import torch

from sage3_diffusers.bench_e2e import DEFAULT_SIZES, MODEL_CONFIGS, build_transformer, main, make_inputs


# Every family of the registry that declares a bench spec (mochi autocasts, HunyuanVideo 1.5 gathers its valid
# text tokens with data-dependent shapes: neither runs on the meta device).
@pytest.mark.parametrize("family", sorted(set(MODEL_CONFIGS) - {"mochi", "hunyuan_video15"}))
def test_real_config_inputs_fit_the_model(family):
    model = build_transformer(family, (1,) * len(MODEL_CONFIGS[family][2]), "meta", torch.bfloat16)
    frames = DEFAULT_SIZES[family][2]
    inputs = make_inputs(family, 1, "meta", torch.bfloat16, height=128, width=128, frames=min(frames, 9), gen=None)
    out = model(**inputs, return_dict=False)[0]
    assert out.shape[0] == 1


def test_layers_argument_is_checked():
    with pytest.raises(ValueError, match="takes 2 numbers"):
        build_transformer("flux", (1,), "meta", torch.bfloat16)


def test_needs_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert main(["--model", "flux"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out


def test_attention_share_from_a_cpu_profile():
    """The share counts the outermost attention op once (SDPA's inner math ops are not counted again)."""
    from torch.profiler import ProfilerActivity, profile

    from sage3_diffusers.bench_e2e import attention_share
    q = torch.randn(1, 2, 256, 64)
    w = torch.randn(2048, 2048)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
        w @ w
    a = attention_share(prof.events(), on_device=False)
    assert a["ops"] == ["aten::scaled_dot_product_attention"] and a["time"] == "CPU time"
    assert 0 < a["attention_ms"] < a["total_ms"] and 0 < a["share"] < 1
    assert a["ceiling"] == pytest.approx(1 / (1 - a["share"]))


def test_attention_share_counts_attention_ops_not_inductor_kernels_named_after_them():
    """A compiled forward's profile: the extern attention ops and our custom op count; inductor's fused kernels do
    not, although their names carry the attention op they feed (names as profiled on an H100)."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from sage3_diffusers.bench_e2e import attention_share

    def op(name, us, parent=None):
        return SimpleNamespace(name=name, device_type=DeviceType.CPU, cpu_parent=parent, device_time_total=us,
                               cpu_time_total=1.0)

    def kernel(us):
        return SimpleNamespace(name="k", device_type=DeviceType.CUDA, cpu_parent=None, device_time_total=us,
                               cpu_time_total=0.0)

    sdpa = op("aten::_scaled_dot_product_cudnn_attention", 40.0)
    events = [
        sdpa, op("aten::_cudnn_attention_forward", 40.0, parent=sdpa),  # inner op: not counted again
        op("sage3::sm90_int8fp8_attn", 300.0),
        op("triton_poi_fused__scaled_dot_product_cudnn_attention_bitwise_and_clone_expand_fill_lift_fresh_repeat_"
           "scalar_tensor_select_transpose_unsqueeze_view_where_1", 15.0),
        op("triton_red_fused_add_mul_rsqrt_0", 45.0),
    ] + [kernel(us) for us in (40.0, 300.0, 15.0, 45.0)]
    a = attention_share(events)
    assert a["ops"] == ["aten::_scaled_dot_product_cudnn_attention", "sage3::sm90_int8fp8_attn"]
    assert a["attention_ms"] == pytest.approx(0.340) and a["total_ms"] == pytest.approx(0.400)
    assert a["share"] == pytest.approx(0.85) and a["time"] == "GPU kernel time"


def test_measure_row_schema_with_cpu_stand_ins(monkeypatch):
    """The row one variant gives (times, attention share), run on the CPU with CUDA events replaced by a clock."""
    import time
    from types import SimpleNamespace

    from torch.profiler import ProfilerActivity, profile

    from sage3_diffusers import bench_e2e
    from sage3_diffusers.integration.tiny import tiny_transformer, transformer_inputs

    class Clock:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = time.perf_counter()

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    def cpu_profile(forward, inputs):
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
            forward(**inputs, return_dict=False)
        return bench_e2e.attention_share(prof.events(), on_device=False)
    monkeypatch.setattr(torch.cuda, "Event", Clock)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(bench_e2e, "profile_attention", cpu_profile)
    model = tiny_transformer("flux", layers=1)
    args = SimpleNamespace(iters=2, warmup=1, fullgraph=False, no_profile=False)
    inputs = {k: v for k, v in transformer_inputs("flux").items() if k != "return_dict"}
    row = bench_e2e._measure(model, inputs, "sdpa_default", "eager", args)
    assert row["variant"] == "sdpa_default" and row["mode"] == "eager" and len(row["times_ms"]) == 2
    assert row["median_ms"] > 0 and row["min_ms"] <= row["median_ms"]
    a = row["attention"]
    assert "aten::scaled_dot_product_attention" in a["ops"] and 0 < a["share"] < 1 and a["ceiling"] > 1
