"""selkv's decode kernels (Triton) and their PyTorch twins.

Nothing here imports Triton until a kernel is asked for, so ``import selkv`` works without it.

- :func:`decode_attention_module` gives the compiled kernel module (``decode_attention``).
- :func:`interpreter_enabled` says whether they run in Triton's CPU interpreter
  (``TRITON_INTERPRET=1`` set before Triton's first import: tests on machines without a GPU).
- :func:`storage_arguments` turns a cache layer into the launcher's (and the twin's) arguments.
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


def interpreter_enabled() -> bool:
    """Whether Triton kernels run in its CPU interpreter in this process.

    Triton decides when it is first imported (its own library functions are decorated then), so
    ``TRITON_INTERPRET=1`` must be in the environment before anything imports ``triton``;
    the kernels then run on CPU tensors too.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def storage_arguments(layer) -> dict:
    """Keyword arguments of the decode launcher (and its twin) for one selkv cache layer, minus the query."""
    return dict(
        sink_keys=layer.sink_keys,
        sink_values=layer.sink_values,
        num_sink=layer.num_sink,
        key_codes=layer.key_codes,
        key_scale=layer.key_scale,
        key_zero=layer.key_zero,
        value_codes=layer.value_codes,
        value_scale=layer.value_scale,
        value_zero=layer.value_zero,
        num_stored=layer.num_stored,
        recent_keys=layer.recent_keys,
        recent_values=layer.recent_values,
        num_recent=layer.num_recent,
        nbits=layer.nbits,
        q_group_size=layer.q_group_size,
        axis_key=layer.axis_key,
        block_length=layer.block_length,
        row_padding=layer.row_padding,
    )
