"""PyTorch twins of selkv's kernel launchers: the same signatures, plain tensor code, any device.

They compute what the reference path computes (dequantize the middle, round it to the
model's dtype, attend), in float32, and are what the fused kernels are tested against.
"""

from __future__ import annotations

import torch

from ..layers.sink_window import dequantize_middle

__all__ = ["dequantize_middle", "selective_decode_attention"]


def selective_decode_attention(
    query_states: torch.Tensor,
    sink_keys: torch.Tensor,
    sink_values: torch.Tensor,
    num_sink: int,
    key_codes: torch.Tensor | None,
    key_scale: torch.Tensor | None,
    key_zero: torch.Tensor | None,
    value_codes: torch.Tensor | None,
    value_scale: torch.Tensor | None,
    value_zero: torch.Tensor | None,
    num_stored: int,
    recent_keys: torch.Tensor,
    recent_values: torch.Tensor,
    num_recent: int,
    *,
    nbits: int,
    q_group_size: int,
    axis_key: str = "token",
    block_length: int = 1,
    row_padding: torch.Tensor | None = None,
    scaling: float | None = None,
    config=None,
) -> torch.Tensor:
    """Twin of :func:`selkv.kernels.decode_attention.selective_decode_attention` (``config`` is ignored).

    Returns ``[batch_size, 1, num_heads, head_dim]`` in the query's dtype.
    """
    batch_size, num_heads, q_len, head_dim = query_states.shape
    num_kv_heads = sink_keys.shape[1]
    group = num_heads // num_kv_heads
    dtype = query_states.dtype
    # sink + middle + window in one float32 buffer; the middle is dequantized straight into its slice,
    # rounded to the model's dtype first as the reference path does
    middle_end = num_sink + num_stored
    k = query_states.new_empty((batch_size, num_kv_heads, middle_end + num_recent, head_dim), dtype=torch.float32)
    v = query_states.new_empty(k.shape[:-1] + recent_values.shape[-1:], dtype=torch.float32)
    k[:, :, :num_sink] = sink_keys[:, :, :num_sink]
    v[:, :, :num_sink] = sink_values[:, :, :num_sink]
    if num_stored:
        dequantize_middle(
            key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, num_stored,
            nbits=nbits, q_group_size=q_group_size, axis_key=axis_key, block_length=block_length, dtype=dtype,
            out_keys=k[:, :, num_sink:middle_end], out_values=v[:, :, num_sink:middle_end],
        )
    k[:, :, middle_end:] = recent_keys[:, :, :num_recent]  # [B, H, N, D]
    v[:, :, middle_end:] = recent_values[:, :, :num_recent]
    q = query_states.float().reshape(batch_size, num_kv_heads, group * q_len, head_dim)  # [B, H, G, D]
    scaling = head_dim**-0.5 if scaling is None else scaling
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling  # [B, H, G, N]
    if row_padding is not None:
        positions = torch.arange(k.shape[-2], device=k.device)
        padded = positions[None, :] < row_padding.to(k.device)[:, None]  # [B, N]
        scores = scores.masked_fill(padded[:, None, None, :], float("-inf"))
        v = v.masked_fill(padded[:, None, :, None], 0.0)
    out = torch.matmul(torch.softmax(scores, dim=-1), v)  # [B, H, G, D]
    return out.reshape(batch_size, num_heads, q_len, head_dim).transpose(1, 2).to(dtype)
