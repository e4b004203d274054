"""Wan 2.1 T2V 14B text-to-video with Sage3 attention.

    python examples/wan.py --tiny              # tiny random components, CPU, offline
    python examples/wan.py                     # hub weights on a GPU, the bundled wan policy
    python examples/wan.py --kernel int8_fp8   # one kernel everywhere
"""
import sys

from _common import run

if __name__ == "__main__":
    sys.exit(run("wan"))
