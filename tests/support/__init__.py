"""What the tests share, one module per concern (plain functions and constants; fixtures live in conftest.py).

- ``markers``: which tests run on this machine (skip markers, the kernel module with its interpreter guard);
- ``tolerances``: the one tolerance table, and the relative error it bounds;
- ``models``: tiny random Llama configs and models;
- ``data``: the shared evaluation data, found as selkv finds it (``SELKV_DATA``);
- ``storages``: random decode storages for the kernels, and fresh seeds;
- ``references``: the float64 attention the kernels are compared with.

Import them as ``from support.markers import cuda_only``. Importing the package first chooses Triton's CPU
interpreter when there is no GPU.
"""

import os
import sys

import torch

# Without a GPU the kernels run in Triton's CPU interpreter, which must be chosen before Triton's
# first import (conftest.py sets it for the whole session; this covers running a file alone).
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
