"""FLUX.2-dev text-to-image with Sage3 attention.

    python examples/flux2.py --tiny              # tiny random components, CPU, offline
    python examples/flux2.py                     # hub weights on a GPU, the bundled flux2 policy
    python examples/flux2.py --kernel int8_fp8   # one kernel everywhere
"""
import sys

from _common import run

if __name__ == "__main__":
    sys.exit(run("flux2"))
