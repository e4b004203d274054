"""Wan 2.2 T2V A14B text-to-video (two experts, one step count across both) with Sage3 attention.

    python examples/wan22.py --tiny              # tiny random components, CPU, offline
    python examples/wan22.py                     # hub weights on a GPU, the bundled wan22 policy
    python examples/wan22.py --kernel int8_fp8   # one kernel everywhere
"""
import sys

from _common import run

if __name__ == "__main__":
    sys.exit(run("wan22"))
