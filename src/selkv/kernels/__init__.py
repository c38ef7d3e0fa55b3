"""selkv's decode kernels (Triton) and their PyTorch twins.

- ``decode_attention``: launch configuration and launcher of the Triton kernels of ``triton_decode``;
  ``decode_op``: the custom operator over the launcher and ``decode_attention``, what selkv's attention
  function calls; ``reference``: the PyTorch twins (no Triton).
- :func:`triton_available` says whether Triton is installed, :func:`interpreter_enabled` whether the
  kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` set before Triton's first import:
  tests on machines without a GPU).
- Launchers and twins take a layer's storage as one :class:`selkv.storage.DecodeStorage`.

None of the Triton modules is imported here: ``import selkv`` works without Triton, and selkv itself
imports Triton only when a kernel is asked for. Triton fixes its interpreter mode at its first import
(which torch's compiler, imported by transformers, may already make: set ``TRITON_INTERPRET`` before
importing selkv). Code that launches a kernel checks :func:`triton_available`, then imports the module
by name inside the function that needs it (``from selkv.kernels import decode_op``).
"""

from __future__ import annotations

import importlib.util
import os


def triton_available() -> bool:
    """Whether Triton is installed (looked up without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """Whether Triton kernels run in its CPU interpreter in this process.

    Triton decides when it is first imported (its own library functions are decorated then), so
    ``TRITON_INTERPRET=1`` must be in the environment before anything imports ``triton``;
    the kernels then run on CPU tensors too.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
