"""LTX-2 text-to-audio-video with Sage3 attention.

    python examples/ltx2.py                            # hub weights on a GPU, the bundled ltx2 policy
    python examples/ltx2.py --kernel int8_fp8          # one kernel everywhere

No --tiny: its Gemma 3 text encoder, connectors, audio VAE and vocoder are not built from config here (the
tiny LTX-2 transformer is tested directly); --tiny says so as a usage error.
"""
import sys

from _common import run

if __name__ == "__main__":
    sys.exit(run("ltx2"))
