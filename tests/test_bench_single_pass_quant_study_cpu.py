"""CPU tests of bench/single_pass_quant_study.py: its baseline is the SageAttention2++ reference itself, and each
swapped statistic changes only what it names."""
import importlib.util
import json
from pathlib import Path

import torch

from sage3_diffusers.numerics.metrics import accuracy_metrics
from sage3_diffusers.numerics.sage2pp_reference import sage2pp_attention_reference

ROOT = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location("single_pass_study_under_test",
                                                  ROOT / "bench" / "single_pass_quant_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_baseline_is_the_reference_and_variants_differ(fresh_seed):
    study = _load()
    q, k, v = study.inputs("joint_text_image", heads=2, seq=300, d=64, seed=fresh_seed)
    base = study.attention(q, k, v, "full", "per_channel")
    ref = sage2pp_attention_reference(q, k, v, row_sum="quantized_p").float()
    # The same computation up to fp32 rounding order (the study folds δ_V into V̂ before P̂·V̂) and the
    # reference's final rounding to bf16: within one bf16 step of the output's scale; the quantization error
    # itself is ~5% (rel L1), so a wrong statistic would show far above this.
    assert (base - ref).abs().max() <= ref.abs().max() * 2 ** -7
    for km, vs in (("first_tile", "per_channel"), ("strided", "per_channel"), ("per_tile", "per_channel"),
                   ("full", "per_tile")):
        out = study.attention(q, k, v, km, vs)
        assert not torch.equal(out, base), (km, vs)
        # Every variant is still attention as accurate as the baseline within 25% (the per-tile shift with the
        # wrong sign doubles the error on these inputs).
        exact = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
        assert accuracy_metrics(out, exact)["rel_l1"] < 1.25 * accuracy_metrics(base, exact)["rel_l1"], (km, vs)


def test_main_writes_every_variant(tmp_path):
    study = _load()
    out = tmp_path / "s.json"
    assert study.main(["--seq", "256", "--heads", "1", "--seeds", "1", "--json", str(out)]) == 0
    assert torch.is_grad_enabled()  # no process-wide side effect on the tests that follow
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 * 2 * len(study.K_MEANS) * len(study.V_SCALES)
    assert all(0 < r["rel_l1"] < 0.5 and 0.9 < r["cos_sim"] <= 1 for r in rows)
