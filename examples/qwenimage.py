"""Qwen-Image text-to-image with Sage3 attention.

    python examples/qwenimage.py --tiny              # tiny random components, CPU, offline
    python examples/qwenimage.py                     # hub weights on a GPU, the bundled qwenimage policy
    python examples/qwenimage.py --kernel int8_fp8   # one kernel everywhere
"""
import sys

from _common import run

if __name__ == "__main__":
    sys.exit(run("qwenimage"))
