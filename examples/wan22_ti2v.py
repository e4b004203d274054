"""Wan 2.2 TI2V 5B text-to-video with Sage3 attention.

    python examples/wan22_ti2v.py --tiny              # tiny random components, CPU, offline
    python examples/wan22_ti2v.py                     # hub weights on a GPU, the bundled wan22_ti2v policy
    python examples/wan22_ti2v.py --kernel int8_fp8   # one kernel everywhere
"""
import sys

from _common import run

if __name__ == "__main__":
    sys.exit(run("wan22_ti2v"))
