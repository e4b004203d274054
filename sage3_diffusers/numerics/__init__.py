"""Reference numerics: the readable, pure-torch specification of every quantized kernel."""
from .formats import E2M1_VALUES, e2m1_decode, e2m1_encode, e2m1_round, e4m3_round, int8_round, pack_fp4, unpack_fp4
from .fp8 import quantize_fp8_per_channel
from .int8 import k_token_groups, q_token_groups, quantize_int8_grouped
from .metrics import accuracy_metrics
from .nvfp4 import NVFP4Tensor, fake_quantize_nvfp4, nvfp4_tensor_scale, quantize_nvfp4
from .sage2pp_reference import sage2pp_attention_reference, sage2pp_quantize
from .sage3_reference import sage3_attention_reference, sage3_quantize
