"""DecodeStorage: one cache layer's storage as selkv's decode attention reads it.

A selective layer holds, per batch row and KV head::

    [ sink: 16-bit ][ middle: key_nbits / value_nbits codes + float16 scales/zeros ][ window: 16-bit ]

The layer produces a :class:`DecodeStorage` (``layer.decode_storage()``): its tensors, the middle's
:class:`~selkv.middle.MiddleLayout` and its lengths. The fused kernel's launcher, its PyTorch twin
(``kernels/reference.py``), the tests and the benchmarks consume it; the custom operator takes it as
flat arguments (:func:`flatten_storage`, :func:`unflatten_storage`). This module sits just above
``middle`` and below ``layers`` and ``kernels``, so neither of those imports the other.

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
from .middle import AXES, MiddleLayout, MiddleTensors, dequantize_middle

__all__ = ["DecodeStorage", "flatten_storage", "publish", "take_published", "unflatten_storage"]


@dataclass(frozen=True)
class DecodeStorage:
    """One layer's decode storage (``B`` batch, ``H`` KV heads, ``D`` head_dim).

    Attributes:
        sink_keys, sink_values: ``[B, H, sink_capacity, D]`` 16-bit.
        middle: the quantized middle's six tensors (shapes in :mod:`selkv.middle`), ``None`` when the
            layer has no middle yet. The capacity ``C`` (``middle.key_codes.shape[2]``) is whole blocks.
        recent_keys, recent_values: ``[B, H, window_capacity, D]`` 16-bit.
        num_sink, num_stored, num_recent: filled lengths, or their upper bounds when ``lengths`` is set.
        layout: how the middle is stored (bits, groups, key axis, block, rotation).
        row_padding: int32 ``[B]`` left padding of each row (its sink positions below it are padding),
            or ``None``.
        lengths: int32 ``[4]`` on the device (num_sink, num_stored, num_recent, recent_start), or ``None``.
        key_rotation: float32 ``[D, D]`` orthogonal matrix the middle's keys were multiplied by before they
            were quantized (``layout.rotate``), or ``None``. Attention over the middle then uses
            ``query @ key_rotation``; sink and window keys are never rotated.
        key_rotation_signs: ``key_rotation^T * sqrt(D)`` in the query's dtype, every entry +-1
            (``quant.rotation_signs``), or ``None``. With it the fused kernel rotates the query in its
            prologue; without it the launcher rotates it by a float32 matmul. The twin ignores it.
        value_rotation: float32 ``[D, D]`` orthogonal matrix the middle's values were multiplied by before they
            were quantized (``layout.vrotate``), or ``None``. Attention over the middle then gives its output
            rotated, ``(sum_n p_n v_n R) R^T`` rotates it back; sink and window values are never rotated.
        value_rotation_signs: ``value_rotation^T * sqrt(D)`` in the query's dtype, every entry +-1, or ``None``.
            The fused kernel's merge rotates the middle's output back with it (with the float32 matrix when
            there is none). The twin ignores it.
    """

    sink_keys: torch.Tensor
    sink_values: torch.Tensor
    middle: MiddleTensors | None
    recent_keys: torch.Tensor
    recent_values: torch.Tensor
    num_sink: int
    num_stored: int
    num_recent: int
    layout: MiddleLayout
    row_padding: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    key_rotation: torch.Tensor | None = None
    key_rotation_signs: torch.Tensor | None = None
    value_rotation: torch.Tensor | None = None
    value_rotation_signs: torch.Tensor | None = None

    @property
    def num_key_value_heads(self) -> int:
        return self.sink_keys.shape[1]

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Middle tokens ``[:num_stored]`` as float32 ``[B, H, num_stored, D]`` keys and values (rotated back).

        With device ``lengths``, ``num_stored`` is the capacity: entries past ``lengths[1]`` are
        stale or unwritten and the caller masks them.
        """
        if not self.num_stored:
            empty = self.sink_keys.new_zeros(
                self.sink_keys.shape[:2] + (0, self.sink_keys.shape[-1]), dtype=torch.float32
            )
            return empty, empty
        return dequantize_middle(
            self.middle,
            self.layout,
            self.num_stored,
            key_rotation=self.key_rotation,
            value_rotation=self.value_rotation,
        )


# The custom operator's schema takes tensors, integers and floats only (no strings in a list, no
# dataclasses): a storage travels as one list of optional tensors and one list of integers.


def flatten_storage(storage: DecodeStorage) -> tuple[list[torch.Tensor | None], list[int]]:
    """``storage`` as (tensors, integers), what the custom operator takes; :func:`unflatten_storage` inverts it."""
    s, lay = storage, storage.layout
    middle = s.middle if s.middle is not None else (None,) * len(MiddleTensors._fields)
    tensors = [
        s.sink_keys,
        s.sink_values,
        *middle,
        s.recent_keys,
        s.recent_values,
        s.row_padding,
        s.lengths,
        s.key_rotation,
        s.key_rotation_signs,
        s.value_rotation,
        s.value_rotation_signs,
    ]
    ints = [
        s.num_sink,
        s.num_stored,
        s.num_recent,
        lay.key_nbits,
        lay.value_nbits,
        lay.q_group_size,
        AXES.index(lay.axis_key),
        lay.block_length,
        quant.ROTATIONS.index(lay.rotate),
        int(lay.sym),
        quant.ROTATIONS.index(lay.vrotate),
        int(lay.vsym),
    ]
    return tensors, ints


def unflatten_storage(tensors: list[torch.Tensor | None], ints: list[int]) -> DecodeStorage:
    """The :class:`DecodeStorage` that :func:`flatten_storage` flattened."""
    *exact_and_middle, row_padding, lengths, rotation, signs, value_rotation, value_signs = tensors
    sink_keys, sink_values, *middle, recent_keys, recent_values = exact_and_middle
    num_sink, num_stored, num_recent, key_nbits, value_nbits, q_group_size, axis, block, rotate, sym, vrotate, vsym = (
        ints
    )
    layout = MiddleLayout(
        key_nbits,
        value_nbits,
        q_group_size,
        AXES[axis],
        block,
        quant.ROTATIONS[rotate],
        bool(sym),
        quant.ROTATIONS[vrotate],
        bool(vsym),
    )
    return DecodeStorage(
        sink_keys,
        sink_values,
        None if middle[0] is None else MiddleTensors(*middle),
        recent_keys,
        recent_values,
        num_sink,
        num_stored,
        num_recent,
        layout,
        row_padding=row_padding,
        lengths=lengths,
        key_rotation=rotation,
        key_rotation_signs=signs,
        value_rotation=value_rotation,
        value_rotation_signs=value_signs,
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
