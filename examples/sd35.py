"""Stable Diffusion 3.5 Large text-to-image with Sage3 attention (SD3 / SD3.5 Medium work the same, --model).

    python examples/sd35.py --tiny              # tiny random components, CPU, offline
    python examples/sd35.py                     # hub weights on a GPU, the bundled sd35 policy
    python examples/sd35.py --kernel int8_fp8   # one kernel everywhere
"""
import sys

from _common import run

if __name__ == "__main__":
    sys.exit(run("sd35"))
