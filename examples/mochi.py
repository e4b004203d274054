"""Mochi 1 preview text-to-video with Sage3 attention (per-sample valid text handled without a mask).

    python examples/mochi.py --tiny              # tiny random components, CPU, offline
    python examples/mochi.py                     # hub weights on a GPU, the bundled mochi policy
    python examples/mochi.py --kernel int8_fp8   # one kernel everywhere
"""
import sys

from _common import run

if __name__ == "__main__":
    sys.exit(run("mochi"))
