"""The fused decode attention as one ``torch.library`` custom operator (torch.compile / CUDA graphs).

torch.compile sees the launcher as one opaque operator (it needs no shapes from the storage's
lengths, which live on the device), so a compiled decode step calls it and a CUDA graph replays it.
:func:`decode_attention` is what selkv's attention function calls (``check_supported`` first,
re-exported from the launcher).
"""

from __future__ import annotations

import torch

from ..storage import DecodeStorage, flatten_storage, unflatten_storage
from .decode_attention import check_supported, selective_decode_attention

__all__ = ["check_supported", "decode_attention"]


@torch.library.custom_op("selkv::selective_decode_attention", mutates_args=())
def _selective_decode_attention_op(
    query_states: torch.Tensor, tensors: list[torch.Tensor | None], ints: list[int], scaling: float
) -> torch.Tensor:
    """The launcher on a storage flattened by :func:`~selkv.storage.flatten_storage`."""
    return selective_decode_attention(query_states, unflatten_storage(tensors, ints), scaling=scaling)


@_selective_decode_attention_op.register_fake
def _(query_states, *args, **kwargs):
    batch_size, num_heads, _, head_dim = query_states.shape
    return query_states.new_empty(batch_size, 1, num_heads, head_dim)


def decode_attention(query_states: torch.Tensor, storage: DecodeStorage, scaling: float | None = None) -> torch.Tensor:
    """:func:`selective_decode_attention`, through the registered operator when the lengths are on the device.

    Storage with device lengths (static caches) always has its middle allocated.
    """
    if storage.lengths is None:
        return selective_decode_attention(query_states, storage, scaling=scaling)
    head_dim = query_states.shape[-1]
    tensors, ints = flatten_storage(storage)
    return _selective_decode_attention_op(
        query_states, tensors, ints, head_dim**-0.5 if scaling is None else float(scaling)
    )
