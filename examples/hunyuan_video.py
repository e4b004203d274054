"""HunyuanVideo text-to-video with Sage3 attention (its right-padding text mask stays on the quantized kernels).

    python examples/hunyuan_video.py --tiny              # tiny random components, CPU, offline
    python examples/hunyuan_video.py                     # hub weights on a GPU, the bundled hunyuan_video policy
    python examples/hunyuan_video.py --kernel int8_fp8   # one kernel everywhere
"""
import sys

from _common import run

if __name__ == "__main__":
    sys.exit(run("hunyuan_video"))
