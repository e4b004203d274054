"""`bench kernels --dry-run` runs the whole measuring code path on the CPU (tiny shapes, sdpa and the int8_fp8
reference): the JSON has every mode, host time and accuracy, every number positive; `bench table` turns it into a
speed table perf_model reads. Nothing here says anything about speed."""
import json

import pytest

from sage3_diffusers import bench, perf_model



def test_dry_run_json_schema_and_table(tmp_path, make_problem, fake_perf_table, capsys):
    out = tmp_path / "kernels.json"
    assert bench.main(["kernels", "--dry-run", "--shapes", "tiny-hd64", "--budget-ms", "1", "--max-calls", "3",
                       "--host-calls", "2", "--json", str(out), "--plot", str(tmp_path / "k.png")]) == 0
    result = json.loads(out.read_text())
    meta = result["meta"]
    assert meta["dry_run"] and meta["baseline"] == "sdpa" and meta["card"] == "cpu (dry run)"
    assert list(meta["modes"]) == ["eager_single", "eager_stream", "compile"]  # no CUDA graphs on the CPU
    assert {"date", "command", "torch", "host_us", "peak_mem_mib", "compile_backend"} <= set(meta)
    assert set(result["columns"]) == {"sdpa", "reference_int8_fp8"}
    (row,) = result["rows"]
    assert (row["shape"], row["B"], row["H"], row["S"], row["D"]) == ("tiny-hd64", 1, 2, 96, 64)
    assert row["errors"] == {"sdpa/graph": "CUDA graphs need CUDA", "reference_int8_fp8/graph": "CUDA graphs need CUDA"} \
        or not any("graph" not in k for k in row["errors"])
    for mode in meta["modes"]:
        for col in result["columns"]:
            e = row["modes"][mode][col]
            assert e["ms"] > 0 and e["tflops"] > 0 and e["vs_baseline"] > 0 and e["calls"] >= 3, (mode, col)
            assert e["repeats"] >= 3 and e["spread"] >= 0, (mode, col)
        assert row["modes"][mode]["sdpa"]["vs_baseline"] == 1.0
    assert all(row["host_us"][c] > 0 for c in result["columns"])
    assert row["peak_mem_mib"] == {}  # CUDA only
    acc = row["accuracy"]
    assert acc["sdpa"]["cos_sim"] > 0.99999 and 0.99 < acc["reference_int8_fp8"]["cos_sim"] < 1.0
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "k.png").stat().st_size > 0
    except ImportError:
        assert not (tmp_path / "k.png").exists()
    text = capsys.readouterr().out
    assert "eager_single (" in text and "compile (" in text and "host µs per call" in text

    table_path = tmp_path / "table.json"
    assert bench.main(["table", str(out), "--out", str(table_path)]) == 0
    table = json.loads(table_path.read_text())
    assert table["card"] == "cpu (dry run)" and "dry run" in table["note"]
    assert set(table["modes"]) == {"eager_single", "eager_stream", "compile"}
    assert set(table["tflops"]) == {"sdpa", "reference_int8_fp8"}
    # The table, installed for a pretend card, gives an eager estimate for a call of that shape.
    fake_perf_table({b: {m: {int(hd): pts for hd, pts in per_d.items()} for m, per_d in per_mode.items()}
                     for b, per_mode in table["tflops"].items()})
    p = make_problem(seq_q=96, seq_kv=96, head_dim=64, head_dim_v=64)
    est = perf_model.expected_speed("reference_int8_fp8", p)
    assert est.tflops > 0 and "eager_single" in est.measured_as and "eager_stream" in est.measured_as


def test_unknown_mode_and_shape_are_errors():
    with pytest.raises(SystemExit, match="unknown mode"):
        bench.main(["kernels", "--dry-run", "--modes", "eager,graph"])
    with pytest.raises(SystemExit, match="unknown shape"):
        bench.main(["kernels", "--dry-run", "--shapes", "Flux-2048"])


def test_kernels_needs_cuda_without_dry_run(monkeypatch):
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench.main(["kernels", "--quick"])


def test_legacy_graph_only_results_read_as_graph_mode():
    row = {"shape": "Flux-1024", "B": 1, "H": 24, "S": 4608, "D": 128,
           "tflops": {"sdpa_flash": 300.0, "sdpa_cudnn": 600.0, "triton_kernel": 800.0, "triton_incl_quant": 720.0,
                      "cuda_sm90_int8_fp8": 690.0, "cudnn_fp8": 880.0},
           "timing": {"sdpa_flash": "cuda-graph", "sdpa_cudnn": "cuda-graph", "triton_kernel": "cuda-graph",
                      "triton_incl_quant": "cuda-graph", "cuda_sm90_int8_fp8": "eager", "cudnn_fp8": "cuda-graph"}}
    meta = {"card": "NVIDIA H200", "capability": [9, 0], "timing": "median of CUDA-graph replays"}
    table = bench.table_from_result({"meta": meta, "rows": [row]}, "old.json")
    assert table["modes"] == {"graph": "median of CUDA-graph replays"}
    # sm90's graph capture had failed (timed eagerly): it is left out rather than mixed into the graph column.
    assert table["tflops"] == {"sdpa": {"graph": {"128": [[4608, 600.0]]}},
                               "triton_int8_fp8": {"graph": {"128": [[4608, 720.0]]}}}


def test_auto_column_is_measured_but_never_written_to_the_speed_table():
    """`auto` is what the dispatcher picks from the shipped table: a check of that table, not a backend of it."""
    row = {"shape": "Flux-1024", "B": 1, "H": 24, "S": 4608, "D": 128,
           "modes": {"eager_stream": {"sdpa_cudnn": {"tflops": 600.0}, "cuda_sm90_int8_fp8": {"tflops": 570.0},
                                      "auto": {"tflops": 601.0}}}}
    meta = {"card": "NVIDIA H100 80GB HBM3", "capability": [9, 0], "modes": {"eager_stream": "back to back"}}
    table = bench.table_from_result({"meta": meta, "rows": [row]}, "k.json")
    assert set(table["tflops"]) == {"sdpa", "cuda_sm90_int8_fp8"}


def test_columns_take_turns_within_a_mode(monkeypatch):
    """Every repeat samples every column (after an untimed lead-in call), the order rotating and alternating direction:
    a clock drift over the row cannot favour a column, and no column always follows the same one."""
    log = []

    def column(name):
        def call(q, k, v):
            log.append(name)
            return q
        return call
    monkeypatch.setattr(bench, "columns_for", lambda q, k, v, dry: {"sdpa": column("a"), "x": column("b")})
    args = bench.parse_args(["kernels", "--dry-run", "--modes", "eager_stream", "--max-calls", "3", "--budget-ms",
                             "1", "--no-accuracy"])
    args.mode_list, args.baseline = ["eager_stream"], "sdpa"
    shape = bench.shapes_for(False, "tiny-hd64", dry_run=True)[0]
    log.clear()
    monkeypatch.setattr(bench, "host_us_per_call", lambda *a, **k: 1.0)
    row = bench.measure_row(shape, args, bench.torch.device("cpu"), bench.torch.float32, None)
    # after two warm-ups and one estimate per column: 5 repeats x 2 columns x (1 lead-in + 3 timed calls)
    timed = log[6:6 + 5 * 2 * 4]
    blocks = [timed[i] for i in range(0, len(timed), 4)]
    assert all(timed[i:i + 4] == [timed[i]] * 4 for i in range(0, len(timed), 4))
    assert blocks == ["a", "b", "b", "a", "b", "a", "a", "b", "a", "b"]
    order = [bench.sample_order(["s", "m", "t", "a"], rep) for rep in range(5)]
    assert order == [["s", "m", "t", "a"], ["a", "t", "m", "s"], ["m", "t", "a", "s"], ["s", "a", "t", "m"],
                     ["t", "a", "s", "m"]]
    flat = [c for o in order for c in o]
    assert {flat[i - 1] for i in range(1, len(flat)) if flat[i] == "m"} == {"s", "t"}  # m follows two columns
    assert row["modes"]["eager_stream"]["x"]["repeats"] == 5
