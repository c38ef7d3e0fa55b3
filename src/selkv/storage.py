"""DecodeStorage: one cache layer's storage as selkv's decode attention reads it.

A selective layer holds, per batch row and KV head::

    [ sink: 16-bit ][ middle: key_nbits / value_nbits codes + float16 scales/zeros ][ window: 16-bit ]

The layer produces a :class:`DecodeStorage` (``layer.decode_storage()``); the fused kernel's
launcher, its PyTorch twin (``kernels/reference.py``), the tests and the benchmarks consume it.
This module sits just above ``quant`` and below ``layers`` and ``kernels``, so neither of those
imports the other.

Lengths come in two forms:

- Host integers (dynamic caches): ``num_sink``, ``num_stored`` and ``num_recent`` are the filled
  lengths, the window's tokens sit at slots ``[0, num_recent)`` and ``lengths`` is ``None``.
- Device tensors (static caches, whose decode step is captured in a CUDA graph): ``lengths`` is
  int32 ``[4]`` = (num_sink, num_stored, num_recent, recent_start) on the cache's device and the
  integer fields are upper bounds (the capacities), which fix the shapes of everything a step
  computes. The window is then a ring: its ``i``-th oldest token sits at slot
  ``(recent_start + i) % recent_keys.shape[2]``.

How attention reaches a layer's storage: the cache publishes the layer after each one-token
update it can hand over as storage (:func:`publish`, keyed by ``layer_idx``), and selkv's attention
function takes it back for its module's ``layer_idx`` (:func:`take_published`). Both are plain
dict operations, which ``torch.compile`` traces (a tensor attribute would not survive tracing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import quant

__all__ = ["DecodeStorage", "dequantize_middle", "publish", "take_published"]


def dequantize_middle(
    key_codes: torch.Tensor,
    key_scale: torch.Tensor,
    key_zero: torch.Tensor,
    value_codes: torch.Tensor,
    value_scale: torch.Tensor,
    value_zero: torch.Tensor,
    num_stored: int,
    *,
    key_nbits: int,
    value_nbits: int,
    q_group_size: int,
    axis_key: str,
    block_length: int,
    dtype: torch.dtype = torch.float32,
    out_keys: torch.Tensor | None = None,
    out_values: torch.Tensor | None = None,
    key_rotation: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``num_stored`` middle tokens as ``[B, H, num_stored, head_dim]`` keys and values in ``dtype``.

    The math is float32, rounded to ``dtype`` at the end. ``out_keys``/``out_values`` (views of
    that shape, e.g. slices of the tensors attention reads) receive the result without a copy.
    ``key_rotation`` ``[head_dim, head_dim]``: the keys were stored rotated by it; they are rotated back.
    """
    codes = quant.unpack(key_codes[:, :, :num_stored], key_nbits)
    # rotated keys are dequantized in float32 and rotated back before rounding to dtype
    key_dtype, key_out = (dtype, out_keys) if key_rotation is None else (torch.float32, None)
    if axis_key == "channel":
        groups = -(-num_stored // block_length)
        keys = quant.dequantize(codes, key_scale[:, :, :groups], key_zero[:, :, :groups], block_length, dim=-2,
                                dtype=key_dtype, out=key_out)
    else:
        keys = quant.dequantize(codes, key_scale[:, :, :num_stored], key_zero[:, :, :num_stored], q_group_size,
                                dtype=key_dtype, out=key_out)
    if key_rotation is not None:
        keys = quant.unrotate(keys, key_rotation).to(dtype)
        keys = keys if out_keys is None else out_keys.copy_(keys)
    value_scale, value_zero = value_scale[:, :, :num_stored], value_zero[:, :, :num_stored]
    if num_stored % block_length == 0:  # whole blocks (always, in decode): read the codes in place, in token order
        blocks = num_stored // block_length
        codes = quant.token_order_view(value_codes[:, :, :num_stored], block_length)
        codes = quant.unpack(codes.contiguous(), value_nbits)  # transposing bytes, then converting, beats one strided pass
        values = quant.dequantize(  # [B, H, blocks, block_length, head_dim], a view of [B, H, num_stored, head_dim]
            codes, value_scale.unflatten(2, (blocks, block_length)), value_zero.unflatten(2, (blocks, block_length)),
            q_group_size, dtype=dtype, out=None if out_values is None else out_values.unflatten(2, (blocks, block_length)),
        ).flatten(2, 3)
    else:
        whole_blocks = -(-num_stored // block_length) * block_length
        codes = quant.from_block_major(value_codes[:, :, :whole_blocks], block_length)[:, :, :num_stored]
        values = quant.dequantize(quant.unpack(codes, value_nbits), value_scale, value_zero, q_group_size, dtype=dtype,
                                  out=out_values)
    return keys, values


@dataclass(frozen=True)
class DecodeStorage:
    """One layer's decode storage (``B`` batch, ``H`` KV heads, ``D`` head_dim; ``P = D * key_nbits // 8`` packed
    bytes per key, ``D * value_nbits // 8`` per value).

    Attributes:
        sink_keys, sink_values: ``[B, H, sink_capacity, D]`` 16-bit.
        key_codes, value_codes: uint8 ``[B, H, C, P]`` (``P`` of their own bit width), codes packed in planes (``quant.pack``); value
            codes block-major in blocks of ``block_length`` tokens (``quant.to_block_major``; ``C`` a
            multiple of ``block_length``). ``None`` when the layer has no middle yet.
        key_scale, key_zero: float16 ``[B, H, C, D // q_group_size]`` (``axis_key="token"``) or
            ``[B, H, C // block_length, D]`` (``axis_key="channel"``: KIVI groups of ``block_length`` tokens).
        value_scale, value_zero: float16 ``[B, H, C, D // q_group_size]``.
        recent_keys, recent_values: ``[B, H, window_capacity, D]`` 16-bit.
        num_sink, num_stored, num_recent: filled lengths, or their upper bounds when ``lengths`` is set.
        key_nbits, value_nbits: bits per key code and per value code.
        q_group_size, axis_key, block_length: the middle's quantization layout.
        key_rotation: float32 ``[D, D]`` orthogonal matrix the middle's keys were multiplied by before they
            were quantized (``quant:rotate=...``), or ``None``. Attention over the middle then uses
            ``query @ key_rotation``; sink and window keys are never rotated.
        key_rotation_signs: ``key_rotation^T * sqrt(D)`` in the query's dtype, every entry +-1
            (``quant.rotation_signs``), or ``None``. With it the fused kernel rotates the query in its
            prologue; without it the launcher rotates it by a float32 matmul. The twin ignores it.
        row_padding: int32 ``[B]`` left padding of each row (its sink positions below it are padding),
            or ``None``.
        lengths: int32 ``[4]`` on the device (num_sink, num_stored, num_recent, recent_start), or ``None``.
    """

    sink_keys: torch.Tensor
    sink_values: torch.Tensor
    key_codes: torch.Tensor | None
    key_scale: torch.Tensor | None
    key_zero: torch.Tensor | None
    value_codes: torch.Tensor | None
    value_scale: torch.Tensor | None
    value_zero: torch.Tensor | None
    recent_keys: torch.Tensor
    recent_values: torch.Tensor
    num_sink: int
    num_stored: int
    num_recent: int
    key_nbits: int
    value_nbits: int
    q_group_size: int
    axis_key: str = "token"
    block_length: int = 1
    row_padding: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    key_rotation: torch.Tensor | None = None
    key_rotation_signs: torch.Tensor | None = None

    @property
    def num_key_value_heads(self) -> int:
        return self.sink_keys.shape[1]

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Middle tokens ``[:num_stored]`` as float32 ``[B, H, num_stored, D]`` keys (rotated back) and values.

        With device ``lengths``, ``num_stored`` is the capacity: entries past ``lengths[1]`` are
        stale or unwritten and the caller masks them.
        """
        if not self.num_stored:
            empty = self.sink_keys.new_zeros(self.sink_keys.shape[:2] + (0, self.sink_keys.shape[-1]), dtype=torch.float32)
            return empty, empty
        return dequantize_middle(
            self.key_codes, self.key_scale, self.key_zero, self.value_codes, self.value_scale, self.value_zero,
            self.num_stored, key_nbits=self.key_nbits, value_nbits=self.value_nbits, q_group_size=self.q_group_size, axis_key=self.axis_key,
            block_length=self.block_length, key_rotation=self.key_rotation,
        )


# The attention that takes what the cache layers publish (registered under this name by selkv.attention).
ATTENTION_NAME = "selkv"

# layer_idx -> the cache layer whose last update was a one-token step it hands over as storage.
_PUBLISHED: dict[int, object] = {}


def publish(layer_idx: int, layer) -> None:
    """Record ``layer`` (anything with ``decode_storage()``) as ``layer_idx``'s storage for the next attention call."""
    _PUBLISHED[layer_idx] = layer


def take_published(layer_idx: int):
    """The layer published for ``layer_idx`` since the last call, or ``None``; removes it (a stale entry
    must never reach a later model whose cache is not selkv's)."""
    return _PUBLISHED.pop(layer_idx, None)
