"""QuantizedSinkWindowLayer: 16-bit sink and window, every token between them quantized once.

This is selkv's strategy. Tokens leaving the window (in blocks of ``block_length``) are
quantized exactly once and written to the layer's middle store, a
:class:`~selkv.middle.QuantizedMiddle` (its tensors and layout are described in
``selkv/middle.py``); nothing is ever re-quantized. The store grows in whole blocks and keeps
at most ``1 / QuantizedMiddle.spare_divisor`` of its tokens as spare room, so the memory held
stays within a percent of what is filled.
"""

from __future__ import annotations

import torch

from ..middle import MiddleLayout, QuantizedMiddle
from ..storage import DecodeStorage
from .base import SelectiveLayer


def middle_layout(nbits: int, q_group_size: int, value_nbits: int | None = None, **settings) -> MiddleLayout:
    """The :class:`MiddleLayout` of a quantized layer's arguments (transformers' names: ``nbits`` for the keys, and
    the values unless ``value_nbits`` is given); ``settings``: ``axis_key``, ``sym``, ``block_length``, ``rotate``."""
    return MiddleLayout(nbits, nbits if value_nbits is None else value_nbits, q_group_size, **settings)


class QuantizedSinkWindowLayer(SelectiveLayer):
    """Sink + quantized middle + window. Spec: ``quant:bits=B,sink=S,window=W[,group=G][,key_axis=..][,sym=..]``.

    ``nbits`` is the bit width of key codes, and of value codes unless ``value_nbits`` is given
    (``quant:kbits=K,vbits=V``: keys usually need more bits than values, KIVI). ``rotate``: one of
    ``quant.ROTATIONS`` (keys rotated before they are quantized; see ``selkv/middle.py``). The
    arguments become the store's :class:`MiddleLayout` (``layer.layout``).
    """

    retains_evicted = True
    supports_fused_decode = True

    def __init__(
        self,
        nbits: int,
        num_sink_tokens: int,
        window_length: int,
        q_group_size: int,
        axis_key: str = "token",
        sym: bool = False,
        block_length: int = 32,
        value_nbits: int | None = None,
        rotate: str = "none",
    ):
        layout = middle_layout(nbits, q_group_size, value_nbits, axis_key=axis_key, sym=sym, block_length=block_length,
                               rotate=rotate)
        super().__init__(num_sink_tokens, window_length, block_length, middle=QuantizedMiddle(layout))
        self._num_stored = 0

    @property
    def layout(self) -> MiddleLayout:
        return self.middle.layout

    def _reset_middle(self) -> None:
        super()._reset_middle()
        self._num_stored = 0

    @property
    def num_stored(self) -> int:
        return self._num_stored

    def _store_evicted(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.middle.write(keys, values, self._num_stored)
        self._num_stored += keys.shape[-2]

    def decode_storage(self) -> DecodeStorage:
        """This layer's storage as selkv's decode attention reads it (lengths as host integers)."""
        return self._storage(self.num_sink, self.num_stored, self.num_recent)
