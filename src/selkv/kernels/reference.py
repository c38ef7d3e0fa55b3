"""PyTorch twins of selkv's kernel launchers: the same signatures, plain tensor code, any device.

They compute what the reference path computes (dequantize the middle, round it to the
model's dtype, attend), in float32, and are what the fused kernels are tested against.
With device lengths (a static cache) every shape is fixed by the capacities and the unfilled
entries are masked, so ``torch.compile`` can capture a decode step that calls the twin.
"""

from __future__ import annotations

import torch

from ..middle import dequantize_middle
from ..storage import DecodeStorage

__all__ = ["selective_decode_attention", "valid_positions"]


def valid_positions(storage: DecodeStorage) -> torch.Tensor:
    """bool ``[B, num_sink + num_stored + num_recent]``: which of the twin's concatenated positions hold tokens.

    Positions are sink ``[:num_sink]``, middle ``[:num_stored]``, window ``[:num_recent]`` (the bounds).
    Sequence positions below a row's left padding are padding, wherever they lie: in the sink, or past
    it when the cache was given no sink room for the padding.
    """
    s = storage
    device = s.sink_keys.device
    batch_size = s.sink_keys.shape[0]
    sink_pos = torch.arange(s.num_sink, device=device)
    middle_pos = torch.arange(s.num_stored, device=device)
    slot = torch.arange(s.num_recent, device=device)
    if s.lengths is None:
        sink_ok = torch.ones(s.num_sink, dtype=torch.bool, device=device)
        middle_ok = torch.ones(s.num_stored, dtype=torch.bool, device=device)
        recent_ok = torch.ones(s.num_recent, dtype=torch.bool, device=device)
        positions = torch.arange(s.num_sink + s.num_stored + s.num_recent, device=device)
    else:
        lengths = s.lengths.to(device)
        sink_ok = sink_pos < lengths[0]
        middle_ok = middle_pos < lengths[1]
        # ring: the i-th oldest window token sits at slot (recent_start + i) % capacity
        age = torch.remainder(slot - lengths[3], s.recent_keys.shape[2])
        recent_ok = age < lengths[2]
        positions = torch.cat([sink_pos, lengths[0] + middle_pos, lengths[0] + lengths[1] + age])
    valid = torch.cat([sink_ok, middle_ok, recent_ok]).expand(batch_size, -1)
    if s.row_padding is not None:
        valid = valid & (positions[None, :] >= s.row_padding.to(device)[:, None])
    return valid


def selective_decode_attention(
    query_states: torch.Tensor,
    storage: DecodeStorage,
    *,
    scaling: float | None = None,
    config=None,
) -> torch.Tensor:
    """Twin of :func:`selkv.kernels.decode_attention.selective_decode_attention` (``config`` is ignored).

    ``query_states`` ``[batch_size, num_heads, 1, head_dim]``; returns ``[batch_size, 1, num_heads, head_dim]``
    in the query's dtype.
    """
    s = storage
    batch_size, num_heads, q_len, head_dim = query_states.shape
    num_kv_heads = s.num_key_value_heads
    num_key_value_groups = num_heads // num_kv_heads  # query heads per KV head (G below)
    dtype = query_states.dtype
    # sink + middle + window in one float32 buffer; the middle is dequantized straight into its slice,
    # rounded to the model's dtype first as the reference path does
    middle_end = s.num_sink + s.num_stored
    k = query_states.new_empty((batch_size, num_kv_heads, middle_end + s.num_recent, head_dim), dtype=torch.float32)
    v = query_states.new_empty(k.shape[:-1] + s.recent_values.shape[-1:], dtype=torch.float32)
    k[:, :, : s.num_sink] = s.sink_keys[:, :, : s.num_sink]
    v[:, :, : s.num_sink] = s.sink_values[:, :, : s.num_sink]
    if s.num_stored:
        dequantize_middle(
            s.middle,
            s.layout,
            s.num_stored,
            dtype=dtype,
            out_keys=k[:, :, s.num_sink : middle_end],
            out_values=v[:, :, s.num_sink : middle_end],
            key_rotation=s.key_rotation,  # rotated keys rotated back: the same scores as (q R) . (k R)
            value_rotation=s.value_rotation,  # rotated values rotated back: the same output as (p V R) R^T
        )
    k[:, :, middle_end:] = s.recent_keys[:, :, : s.num_recent]  # [B, H, N, D]
    v[:, :, middle_end:] = s.recent_values[:, :, : s.num_recent]
    q = query_states.float().reshape(batch_size, num_kv_heads, num_key_value_groups * q_len, head_dim)  # [B, H, G, D]
    scaling = head_dim**-0.5 if scaling is None else scaling
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling  # [B, H, G, N]
    if s.row_padding is not None or s.lengths is not None:
        valid = valid_positions(s)  # [B, N]
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        v = v.masked_fill(~valid[:, None, :, None], 0.0)  # unwritten entries may hold anything
    out = torch.matmul(torch.softmax(scores, dim=-1), v)  # [B, H, G, D]
    return out.reshape(batch_size, num_heads, q_len, head_dim).transpose(1, 2).to(dtype)
