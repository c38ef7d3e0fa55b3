"""The fused decode attention as one ``torch.library`` custom operator (torch.compile / CUDA graphs).

torch.compile sees the launcher as one opaque operator (it needs no shapes from the storage's
lengths, which live on the device), so a compiled decode step calls it and a CUDA graph replays it.
:func:`decode_attention` is what selkv's attention function calls (``check_supported`` first,
re-exported from the launcher).
"""

from __future__ import annotations

import torch

from ..storage import DecodeStorage
from .decode_attention import check_supported, selective_decode_attention

__all__ = ["check_supported", "decode_attention"]


@torch.library.custom_op("selkv::selective_decode_attention", mutates_args=())
def _selective_decode_attention_op(
    query_states: torch.Tensor,
    sink_keys: torch.Tensor,
    sink_values: torch.Tensor,
    key_codes: torch.Tensor,
    key_scale: torch.Tensor,
    key_zero: torch.Tensor,
    value_codes: torch.Tensor,
    value_scale: torch.Tensor,
    value_zero: torch.Tensor,
    recent_keys: torch.Tensor,
    recent_values: torch.Tensor,
    lengths: torch.Tensor,
    row_padding: torch.Tensor | None,
    key_rotation: torch.Tensor | None,
    key_rotation_signs: torch.Tensor | None,
    num_sink: int,
    num_stored: int,
    num_recent: int,
    key_nbits: int,
    value_nbits: int,
    q_group_size: int,
    axis_key: str,
    block_length: int,
    scaling: float,
) -> torch.Tensor:
    storage = DecodeStorage(
        sink_keys=sink_keys, sink_values=sink_values, key_codes=key_codes, key_scale=key_scale, key_zero=key_zero,
        value_codes=value_codes, value_scale=value_scale, value_zero=value_zero, recent_keys=recent_keys,
        recent_values=recent_values, num_sink=num_sink, num_stored=num_stored, num_recent=num_recent,
        key_nbits=key_nbits, value_nbits=value_nbits, q_group_size=q_group_size, axis_key=axis_key,
        block_length=block_length, row_padding=row_padding, lengths=lengths, key_rotation=key_rotation,
        key_rotation_signs=key_rotation_signs,
    )
    return selective_decode_attention(query_states, storage, scaling=scaling)


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
    s = storage
    return _selective_decode_attention_op(
        query_states, s.sink_keys, s.sink_values, s.key_codes, s.key_scale, s.key_zero, s.value_codes,
        s.value_scale, s.value_zero, s.recent_keys, s.recent_values, s.lengths, s.row_padding, s.key_rotation,
        s.key_rotation_signs,
        s.num_sink, s.num_stored, s.num_recent, s.key_nbits, s.value_nbits, s.q_group_size, s.axis_key, s.block_length,
        head_dim**-0.5 if scaling is None else float(scaling),
    )
