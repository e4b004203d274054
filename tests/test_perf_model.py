"""The per-card speed tables kernel="auto" dispatches by: keys, the shipped files, modes and their fallbacks."""
import json
from pathlib import Path

import pytest
import torch

from sage3_diffusers import bench, perf_model

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name,slug", [("NVIDIA H100 80GB HBM3", "h100-80gb-hbm3"), ("NVIDIA H200", "h200"),
                                       ("NVIDIA H100 PCIe", "h100-pcie"), ("NVIDIA GeForce RTX 5090", "geforce-rtx-5090")])
def test_card_slug(name, slug):
    assert perf_model.card_slug(name) == slug


def test_repeated_runs_join_into_one_averaged_point_per_shape():
    def run(date, tf):
        return {"meta": {"card": "NVIDIA H100 80GB HBM3", "capability": [9, 0], "date": date, "command": "c",
                         "modes": {"graph": "x"}},
                "rows": [{"shape": "a", "B": 1, "H": 16, "S": 4096, "D": 128,
                          "modes": {"graph": {"sdpa_cudnn": {"tflops": 600.0}, "cuda_sm90_int8_fp8": {"tflops": tf}}}}]}
    table = bench.table_from_result(bench.join_results([run("d1", 600.0), run("d2", 700.0)]), "x.json, y.json")
    assert table["tflops"]["cuda_sm90_int8_fp8"]["graph"]["128"] == [[4096, 650.0]]
    assert table["shapes"] == [{"name": "a", "B": 1, "H": 16, "S": 4096, "D": 128}]
    assert table["source"]["date"] == "d1, d2"


def test_shipped_tables_are_generated_from_their_recorded_source():
    """Each shipped table equals `bench table` run again on the results file it names: never typed by hand."""
    assert {"h100-80gb-hbm3", "h200"} <= set(perf_model.available_cards())
    for slug in perf_model.available_cards():
        shipped = json.loads((REPO / "sage3_diffusers" / "data" / "perf" / f"{slug}.json").read_text())
        sources = shipped["source"]["json"].split(", ")
        for name in sources:
            assert name.startswith("docs/results/") and (REPO / name).is_file(), f"{slug}: source {name} missing"
        joined = bench.join_results([json.loads((REPO / name).read_text()) for name in sources])
        regenerated = bench.table_from_result(joined, shipped["source"]["json"])
        assert json.loads(json.dumps(regenerated)) == shipped, slug
        assert shipped["card_slug"] == slug and perf_model.card_slug(shipped["card"]) == slug
        assert set(shipped["modes"]) <= set(perf_model.MODES) and shipped["modes"]
        assert perf_model.load_table(slug).card == shipped["card"]


def test_h100_and_h200_are_different_tables():
    h100, h200 = perf_model.load_table("h100-80gb-hbm3"), perf_model.load_table("h200")
    assert h100.card == "NVIDIA H100 80GB HBM3" and h200.card == "NVIDIA H200"
    assert h100.tflops != h200.tflops


def test_unknown_card_or_cpu_has_no_estimate(make_problem, monkeypatch):
    monkeypatch.setattr(perf_model, "current_card", lambda: "NVIDIA A100-SXM4-80GB")
    p = make_problem(capability=(8, 0))
    assert perf_model.expected_speed("sdpa", p) is None
    assert "no speed table for 'NVIDIA A100-SXM4-80GB'" in perf_model.describe(p)
    assert "static priorities decide" in perf_model.describe(p)
    cpu = make_problem(device_type="cpu", capability=None)
    assert perf_model.estimated_tflops("sdpa", cpu) is None and "off CUDA" in perf_model.describe(cpu)


def test_modes_and_stand_ins(make_problem, fake_perf_table):
    p = make_problem(seq_q=4096, seq_kv=4096, head_dim=128, head_dim_v=128)
    fake_perf_table({"sdpa": {"graph": {128: [[4096, 600]]}, "compile": {128: [[4096, 610]]}},
                     "ours": {"graph": {128: [[4096, 700]]}}})
    eager = perf_model.expected_speed("ours", p)
    assert eager.tflops == 700 and "standing in for eager" in eager.measured_as  # no eager columns at all
    comp = perf_model.expected_speed("ours", p, "compile")
    assert comp.tflops == 700 and "standing in for compile" in comp.measured_as
    assert perf_model.expected_speed("sdpa", p, "compile").measured_as == "compile"
    assert perf_model.expected_speed("ours", p, stand_in=False) is None  # what the dispatcher asks
    assert perf_model.expected_speed("ours", p, "compile", stand_in=False) is None
    assert perf_model.expected_speed("ours", p, "graph", stand_in=False).tflops == 700
    assert perf_model.estimated_tflops("ours", make_problem(head_dim=64, head_dim_v=64)) is None
    text = perf_model.describe(p)
    assert "eager calls: no eager measurement on this card" in text and "compile calls by the compile column" in text
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        perf_model.expected_speed("ours", p, "fast")


def test_points_interpolate_in_log_length_and_average_duplicates():
    result = {"meta": {"card": "NVIDIA H100 80GB HBM3", "capability": [9, 0], "date": "d", "command": "c",
                       "modes": {"eager_single": "x"}},
              "rows": [{"shape": n, "B": b, "H": h, "S": 16384, "D": 128,
                        "modes": {"eager_single": {"sdpa_cudnn": {"tflops": tf}, "sdpa_flash": {"tflops": 1.0},
                                                   "cuda_sm90_int8_fp8": {"tflops": 2 * tf}}}}
                       for n, b, h, tf in (("a", 1, 16, 600.0), ("b", 2, 8, 700.0))]}
    table = bench.table_from_result(result, "x.json")
    assert table["tflops"]["sdpa"]["eager_single"]["128"] == [[16384, 650.0]]  # raw cuDNN stands for sdpa
    assert "sdpa_flash" not in table["tflops"] and table["tflops"]["cuda_sm90_int8_fp8"]
    assert perf_model._interp(((1024, 100.0), (16384, 500.0)), 4096) == pytest.approx(300.0)


def test_current_mode():
    assert perf_model.current_mode() == "eager"

    def f(x):
        return x + (1.0 if perf_model.current_mode() == "compile" else 0.0)
    assert torch.compile(f, backend="eager", fullgraph=True)(torch.zeros(1)).item() == 1.0


def test_results_of_different_cards_do_not_join():
    a = {"meta": {"card": "NVIDIA H100 80GB HBM3"}, "rows": []}
    b = {"meta": {"card": "NVIDIA H200"}, "rows": []}
    with pytest.raises(SystemExit, match="different cards"):
        bench.join_results([a, b])


def test_current_mode_inside_a_constant_result_function():
    """The dispatcher chooses inside torch._dynamo.assume_constant_result: the mode must read "compile" there."""
    @torch._dynamo.assume_constant_result
    def mode_seen_by_dispatch():
        return perf_model.current_mode()

    def f(x):
        return x + (1.0 if mode_seen_by_dispatch() == "compile" else 0.0)
    assert torch.compile(f, backend="eager", fullgraph=True)(torch.zeros(1)).item() == 1.0
