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


class QuantizedSinkWindowLayer(SelectiveLayer):
    """Sink + quantized middle + window. Spec: ``quant:bits=B,sink=S,window=W[,group=G][,key_axis=..][,sym=..]``.

    ``layout`` (:class:`MiddleLayout`, resolved by the spec) says how the middle is stored: key and value
    bits (``quant:kbits=K,vbits=V``: keys usually need more bits than values, KIVI), scale groups, key axis,
    block (the tokens that leave the window together) and rotation (see ``selkv/middle.py``).
    """

    retains_evicted = True
    supports_fused_decode = True

    def __init__(self, num_sink_tokens: int, window_length: int, layout: MiddleLayout):
        super().__init__(num_sink_tokens, window_length, layout.block_length, middle=QuantizedMiddle(layout))
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
