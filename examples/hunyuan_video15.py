"""HunyuanVideo 1.5 (480p) text-to-video with Sage3 attention.

    python examples/hunyuan_video15.py --tiny              # tiny random components, CPU, offline
    python examples/hunyuan_video15.py                     # hub weights on a GPU, the bundled hunyuan_video15 policy
    python examples/hunyuan_video15.py --kernel int8_fp8   # one kernel everywhere
"""
import sys

from _common import run

if __name__ == "__main__":
    sys.exit(run("hunyuan_video15"))
