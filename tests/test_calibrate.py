"""`calibrate`: on tiny pipelines (CPU, emulated kernels) it writes a policy that meets its budget on the final
latent and takes the faster kernel (by the target card's speeds) wherever the measured error allows."""
import json
import math

import pytest
import torch
import yaml

from sage3_diffusers import perf_model
from sage3_diffusers.dispatch import get_backend
from sage3_diffusers.integration import calibrate as cb
from sage3_diffusers.integration.policy import load_policy
from sage3_diffusers.testing import dit_like_qkv


def run(family, budget, target, steps=2, **kw):
    runner = cb._PipelineRunner(family, True, "cpu", torch.float32)
    return cb.calibrate(runner, prompts=["a red cat"], steps=steps, budget=cb.Budget.parse(budget), card=target,
                        speed_shape=cb.real_attention(family), log=lambda *_: None, **kw)


def fastest_within(cal, cell, shape_family):
    """What the choice must be: the fastest (target speeds at the family's real shape) kernel within budget."""
    speed = cb.SpeedModel(cal.card)
    b, h, s, d = cb.real_attention(shape_family)
    p = cb.AttentionProblem(b, h, h, s, s, d, d, torch.bfloat16, "cuda", None, "HND", False, False, False)
    ok = ["sdpa"] + [f for f in cal.families if cal.errors[cell][f] <= cal.budget.allowed]
    return min(ok, key=lambda f: speed.seconds(f, p))


def check_policy_file(cal, tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(cb.policy_yaml(cal, cb.to_policy(cal)))
    text = path.read_text()
    assert text.startswith("# Calibrated by") and f"budget: {cal.budget}" in text and f"target card: {cal.card}" in text
    policy = load_policy(str(path))
    for (layer, bucket), kernel in cal.choice.items():
        for step in range(cal.buckets[bucket][0], cal.buckets[bucket][1] + 1):
            assert policy.kernel_for(layer, step=step, num_steps=cal.steps, family=cal.model) == kernel
    return policy


def h100_int8_ratio(family: str = "flux") -> float:
    """The shipped H100 table's eager ratio of the fastest int8_fp8 backend to exact SDPA at the family's real
    attention shape."""
    b, h, s, d = cb.real_attention(family)
    p = cb.AttentionProblem(b, h, h, s, s, d, d, torch.bfloat16, "cuda", (9, 0), "HND", False, False, False)
    slug = perf_model.resolve_card("H100")
    ours = max(perf_model.estimated_tflops(n, p, card=slug) for n in ("cuda_sm90_int8_fp8", "triton_int8_fp8"))
    return ours / perf_model.estimated_tflops("sdpa", p, card=slug)


@pytest.mark.parametrize("family, blocks", [("flux", 2 + 2), ("hunyuan_video", None)])
def test_loose_budget_on_h100_takes_the_faster_of_int8_fp8_and_sdpa(tmp_path, family, blocks):
    """Every cell's error is within the loose budget, so each takes what the H100 table says is faster at the
    family's real shape eagerly: int8_fp8 at HunyuanVideo's 119k tokens (then verified on the final latent), exact
    SDPA at Flux-1024 where int8_fp8 measured slower (nothing to verify); the predicted speed-up is that ratio."""
    cal = run(family, "cos=0.99", "H100")
    assert cal.families == ("int8_fp8",)  # no FP4 kernel on an H100: never asked for there
    assert any("fp4: no kernel on H100" in n for n in cal.notes)
    if blocks is not None:
        assert len(cal.choice) == blocks * 2  # x 2 steps
    ratio = h100_int8_ratio(family)
    want = "int8_fp8" if ratio > 1 else "sdpa"
    for cell, kernel in cal.choice.items():
        assert kernel == fastest_within(cal, cell, family) == want
    assert 0 <= cal.final_error <= cal.budget.allowed
    if want == "int8_fp8":
        assert "reference_int8_fp8" in cal.rounds[0]["backends"]
    else:
        assert cal.rounds[0]["note"] == "exact everywhere: no verification needed" and cal.final_error == 0
    assert cal.predicted_speedup == pytest.approx(max(ratio, 1.0), rel=0.02)
    check_policy_file(cal, tmp_path)


def test_video_family_on_rtx5090_takes_fp4_where_error_allows(tmp_path):
    cal = run("hunyuan_video", "cos=0.99", "RTX5090")
    assert cal.families == ("fp4", "int8_fp8")
    assert any("assumed relative speed" in s for s in cal.speed_sources)  # no measured table for this card
    for cell, kernel in cal.choice.items():
        assert kernel == fastest_within(cal, cell, "hunyuan_video")
    assert "fp4" in cal.choice.values()
    assert cal.final_error <= cal.budget.allowed
    assert cal.predicted_speedup > 3.0
    assert any("reference_fp4" in n for n in cal.notes)  # emulated here, and the output says so
    check_policy_file(cal, tmp_path)
    # A per-cell budget between the cells' fp4 errors: fp4 exactly where it fits, int8_fp8 elsewhere.
    fp4_errors = sorted(e["fp4"] for e in cal.errors.values())
    allowed = fp4_errors[len(fp4_errors) // 2]
    cal.choice = cb.choose(cal, cal.problems, cb.SpeedModel("RTX5090"), allowed)
    for cell, kernel in cal.choice.items():
        assert kernel == ("fp4" if cal.errors[cell]["fp4"] <= allowed else "int8_fp8")
    assert set(cal.choice.values()) == {"fp4", "int8_fp8"}
    policy = check_policy_file(cal, tmp_path)
    assert policy.rules  # the mixed choice needs rules: layers and step ranges


@pytest.mark.parametrize("budget, allowed_kernels", [("cos=0.9999", {"int8_fp8", "sdpa"}),
                                                     ("rel_l1=1e-5", {"sdpa"})])
def test_tight_budget_falls_back_to_more_accurate_kernels(tmp_path, budget, allowed_kernels):
    cal = run("flux", budget, "RTX5090")
    assert set(cal.choice.values()) <= allowed_kernels
    for cell, kernel in cal.choice.items():
        assert kernel == fastest_within(cal, cell, "flux")
        assert cal.errors[cell]["fp4"] > cal.budget.allowed  # fp4 was measured and rejected, not skipped
    assert cal.final_error <= cal.budget.allowed
    check_policy_file(cal, tmp_path)


def test_over_budget_final_latent_tightens_the_worst_cells(monkeypatch):
    """The final latent of a tiny model is far more accurate than its layers; amplify its measured error so
    the verification fails and the tightening loop has to move cells to more accurate kernels."""
    real = cb.final_error
    monkeypatch.setattr(cb, "final_error", lambda budget, outs, exact: (real(budget, outs, exact)[0] * 1e4, []))
    cal = run("flux", "cos=0.99", "RTX5090", steps=2, rounds=6)
    first, last = cal.rounds[0], cal.rounds[-1]
    assert len(cal.rounds) >= 2 and first["final_error"] > cal.budget.allowed
    assert last["final_error"] <= cal.budget.allowed or any("exact SDPA everywhere" in n for n in cal.notes)
    allowed = [r["allowed_per_cell"] for r in cal.rounds]
    assert allowed == sorted(allowed, reverse=True) and allowed[-1] < allowed[0]
    assert cal.final_error <= cal.budget.allowed


def test_cli_writes_policy_heat_map_and_json(tmp_path, capsys):
    out, png, js = tmp_path / "p.yaml", tmp_path / "heat.png", tmp_path / "cal.json"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n\na blue dog\n")
    from sage3_diffusers.cli import main
    assert main(["calibrate", "--model", "flux", "--tiny", "--steps", "2", "--budget", "cos=0.99", "--target",
                 "H100", "--prompts", str(prompts), "--out", str(out), "--plot", str(png), "--json", str(js)]) == 0
    text = capsys.readouterr().out
    result = json.loads(js.read_text())
    assert f"predicted attention speed-up vs exact SDPA on H100: {result['predicted_attention_speedup']:.2f}x" in text
    assert result["predicted_attention_speedup"] == pytest.approx(max(h100_int8_ratio("flux"), 1.0), rel=0.02)
    assert ("measured final-latent error vs exact: cos" in text and "emulated" in text) or \
        "final latent: identical to the exact run (exact SDPA everywhere, nothing to verify)" in text
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert load_policy(str(out)).model == "flux" and "prompts (2): a red cat; a blue dog" in out.read_text()
    assert yaml.safe_load(js.read_text()) is not None


def test_sampled_rows_get_the_full_calls_numerics():
    """The recorder measures a candidate on a few heads and 128-aligned query blocks of a call: those rows must
    come out exactly as in the full call."""
    q, k, v = dit_like_qkv(2, 4, 128 * 6 + 37, 64, hkv=2, skv=300, generator=torch.Generator().manual_seed(0))
    qs, ks, vs = cb._sample(q, k, v, is_causal=False)
    assert qs.shape == (2, 2, 128 * 3 + 37, 64) and ks.shape == (2, 2, 300, 64)
    rows = torch.cat([torch.arange(i * 128, min((i + 1) * 128, q.shape[2])) for i in (0, 2, 4, 6)])
    for name in ("reference_int8_fp8", "reference_fp4"):
        kw = dict(layout="HND", is_causal=False, sm_scale=0.125, return_lse=False)
        full = get_backend(name).forward(q, k, v, **kw)[:, [0, 3]][:, :, rows]
        assert torch.allclose(get_backend(name).forward(qs, ks, vs, **kw), full, atol=1e-6, rtol=0)


def test_budget_parsing_and_step_buckets():
    assert cb.Budget.parse("cos=0.999").allowed == pytest.approx(1e-3)
    assert cb.Budget.parse("rel_l1=0.05").error({"cos_sim": 0.9, "rel_l1": 0.01}) == 0.01
    assert cb.Budget.parse("cos=0.9").error({"cos_sim": math.nan, "rel_l1": 0.0}) == math.inf
    for bad in ("cos", "l2=0.1", "cos=1.5", "rel_l1=-1", "cos=x"):
        with pytest.raises(ValueError, match="--budget"):
            cb.Budget.parse(bad)
    assert cb.step_buckets(28, 4) == [(0, 6), (7, 13), (14, 20), (21, 27)]
    assert cb.step_buckets(2, 4) == [(0, 0), (1, 1)]


def test_unknown_card_uses_the_stated_assumption():
    speed = cb.SpeedModel("TPU9")
    p = cb.AttentionProblem(1, 24, 24, 4608, 4608, 128, 128, torch.bfloat16, "cuda", None, "HND", False, False, False)
    assert speed.families() == ("fp4", "int8_fp8")
    assert speed.seconds("sdpa", p) / speed.seconds("fp4", p) == pytest.approx(4.8)
    assert any("assumed relative speed" in s for s in speed.sources)


class _TinySlice(cb._SliceRunner):
    """The slice runner's Euler loop on a tiny transformer (the real-shape slice needs a GPU)."""

    def __init__(self, family):
        from sage3_diffusers.integration.tiny import tiny_transformer
        self.family, self.target, self.description = family, tiny_transformer(family), "tiny slice"

    def inputs(self, seed):
        from sage3_diffusers.integration.tiny import transformer_inputs
        return transformer_inputs(self.family, seed=seed, config=self.target.config, batch=1)


def test_slice_runner_calibrates_and_measures_speed_plumbing():
    runner = _TinySlice("cogvideox")
    cal = cb.calibrate(runner, prompts=["x"], steps=2, budget=cb.Budget.parse("cos=0.99"), card="H100",
                       log=lambda *_: None)
    assert [b for b in cal.buckets] == [(0, 0), (1, 1)] and len(cal.choice) == 2 * 2  # steps from timesteps
    assert cal.final_error <= cal.budget.allowed
    speed = cb.measure_speed(runner, cb.to_policy(cal), steps=2, repeats=1)
    assert speed["exact"]["backends"] == ["sdpa"]
    assert 0 < speed["exact"]["attention_ms"] < speed["exact"]["loop_ms"]
    assert speed["measured_attention_speedup"] > 0
