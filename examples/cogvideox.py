"""CogVideoX-2b text-to-video with Sage3 attention (CogVideoX-5b: --model THUDM/CogVideoX-5b).

    python examples/cogvideox.py --tiny              # tiny random components, CPU, offline
    python examples/cogvideox.py                     # hub weights on a GPU, the bundled cogvideox policy
    python examples/cogvideox.py --kernel int8_fp8   # one kernel everywhere
"""
import sys

from _common import run

if __name__ == "__main__":
    sys.exit(run("cogvideox"))
