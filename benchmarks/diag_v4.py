"""Round 5 diagnosis: the src kernel vs the prototype on the same tensors (8 x 32k, int8 per-token)."""
import os
import sys

import torch
from triton.testing import do_bench_cudagraph

sys.path.insert(0, os.path.dirname(__file__))
from decode_attention import random_storage  # noqa: E402
import decode_v4_proto as proto  # noqa: E402
from selkv.kernels import decode_attention as K  # noqa: E402

torch.manual_seed(0)
storage = random_storage(8, 32768, 8, "token", 64)
query = torch.randn(8, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
n = storage["num_stored"]
inputs = (query.view(64, 4, 128), storage["key_codes"].view(64, n, 128), storage["key_scale"].view(64, n, 2),
          storage["key_zero"].view(64, n, 2), storage["value_codes"].view(64, n, 128),
          storage["value_scale"].view(64, n, 2), storage["value_zero"].view(64, n, 2))
ncu = "--ncu" in sys.argv
storage4 = random_storage(8, 32768, 4, "channel", 64)
C = K.DecodeConfig
cases = {
    "proto b bn32 w1 asmK (16 splits)": lambda: proto.launch("b bn32 w1 asmK", inputs, 16, 0.088),
    "src int8 default": lambda: K.selective_decode_attention(query, storage),
    "src int8 scales in the tile": lambda: K.selective_decode_attention(query, storage, config=C(scale_prefetch=False)),
    "src int8 7 programs/SM": lambda: K.selective_decode_attention(query, storage, config=C(programs_per_sm=7)),
    "src int8 bn64": lambda: K.selective_decode_attention(query, storage, config=C(block_n=64)),
    "src int4 default": lambda: K.selective_decode_attention(query, storage4),
    "src int4 scales in the tile": lambda: K.selective_decode_attention(query, storage4, config=C(scale_prefetch=False)),
}
for name, fn in cases.items():
    if ncu:
        fn()
        continue
    fn()
    print(f"{name:40s} graph {do_bench_cudagraph(fn, rep=200):.4f} ms", flush=True)
torch.cuda.synchronize()
