"""LTX-2 text-to-audio-video with Sage3 attention.

    python examples/ltx2.py --tiny                     # tiny random components, CPU, offline
    python examples/ltx2.py                            # hub weights on a GPU, policy configs/ltx2.yaml
    python examples/ltx2.py --kernel int8_fp8          # one kernel everywhere
"""
import sys

from _common import run

if __name__ == "__main__":
    sys.exit(run("ltx2"))
