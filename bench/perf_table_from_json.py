"""Prints sage3_diffusers/perf_model.py's HOPPER_TFLOPS table from a `bench kernels --json` file, so the dispatch
table is copied from a measured run, never typed by hand.

python bench/perf_table_from_json.py kernels.json
"""
import json
import sys

COLUMNS = {"sdpa": "sdpa_cudnn", "triton_int8_fp8": "triton_incl_quant", "cuda_sm90_int8_fp8": "cuda_sm90_int8_fp8"}


def table(result: dict) -> dict:
    out = {}
    for backend, col in COLUMNS.items():
        per_d = {}
        for row in result["rows"]:
            tf = row.get("tflops", {}).get(col)
            if tf is not None and row["B"] * row["H"] > 0:
                per_d.setdefault(row["D"], {})[row["S"]] = round(tf)
        out[backend] = {d: tuple(sorted(pts.items())) for d, pts in sorted(per_d.items(), reverse=True)}
    return out


def main() -> int:
    result = json.load(open(sys.argv[1]))
    print(f"# {result['meta'].get('card')}, {result['meta'].get('date')}")
    print("HOPPER_TFLOPS: dict[str, dict[int, tuple[tuple[int, float], ...]]] = {")
    for backend, per_d in table(result).items():
        print(f'    "{backend}": {{')
        for d, pts in per_d.items():
            print(f"        {d}: ({', '.join(f'({s}, {t})' for s, t in pts)}),")
        print("    },")
    print("}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
