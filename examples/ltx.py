"""LTX-Video text-to-video with Sage3 attention.

    python examples/ltx.py --tiny              # tiny random components, CPU, offline
    python examples/ltx.py                     # hub weights on a GPU, the bundled ltx policy
    python examples/ltx.py --kernel int8_fp8   # one kernel everywhere
"""
import sys

from _common import run

if __name__ == "__main__":
    sys.exit(run("ltx"))
