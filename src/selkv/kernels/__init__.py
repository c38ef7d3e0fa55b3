"""selkv's decode kernels (Triton) and their PyTorch twins.

Nothing here imports Triton until a kernel is asked for, so ``import selkv`` works without it.

- :func:`decode_attention_module` gives the launcher module (``decode_attention``, which imports the
  Triton kernels of ``triton_decode``); :func:`decode_op_module` the custom operator and
  ``decode_attention``, what selkv's attention function calls (``decode_op``).
- :func:`interpreter_enabled` says whether they run in Triton's CPU interpreter
  (``TRITON_INTERPRET=1`` set before Triton's first import: tests on machines without a GPU).
- Launchers and twins take a layer's storage as one :class:`selkv.storage.DecodeStorage`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def decode_attention_module():
    """``selkv.kernels.decode_attention`` (imports Triton)."""
    return importlib.import_module(".decode_attention", __name__)


def decode_op_module():
    """``selkv.kernels.decode_op`` (imports Triton; registers the custom operator)."""
    return importlib.import_module(".decode_op", __name__)


def interpreter_enabled() -> bool:
    """Whether Triton kernels run in its CPU interpreter in this process.

    Triton decides when it is first imported (its own library functions are decorated then), so
    ``TRITON_INTERPRET=1`` must be in the environment before anything imports ``triton``;
    the kernels then run on CPU tensors too.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
