"""One forward call of the sm90 kernel on a given shape, for `ncu` (profile the attention and quant kernels)."""
import sys

import torch

from sage3_diffusers import _C_sm90 as ext

b, h, s, d = (int(x) for x in (sys.argv[1:5] if len(sys.argv) >= 5 else (4, 16, 4096, 128)))
q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
for _ in range(3):  # warm-up (clocks, allocator)
    res = ext.forward(q, k, v, False, False, d ** -0.5, False)
    assert not isinstance(res, str), res
torch.cuda.synchronize()
res = ext.forward(q, k, v, False, False, d ** -0.5, False)
torch.cuda.synchronize()
print("done", b, h, s, d)
