"""QuantizedSinkWindowLayer: 16-bit sink and window, every token between them quantized once.

This is selkv's strategy. Tokens leaving the window (in blocks of
``block_length``) are quantized exactly once and appended to the middle store;
nothing is ever re-quantized. The store grows in whole blocks and keeps at most
``1 / middle_spare_divisor`` of its tokens as spare room (see ``_ensure_capacity``),
so the memory held stays within a percent of what is filled.

Middle store (``B`` batch, ``H`` KV heads, ``C`` capacity, ``D`` head_dim, ``P_k = D * nbits // 8``
and ``P_v = D * value_nbits // 8`` packed bytes, ``G`` = ``q_group_size``, ``T`` = ``block_length``)::

    key_codes    uint8   [B, H, C, P_k]    codes packed in planes along D (see quant.pack)
    key_scale    float16 [B, H, C, D // G]   axis_key="token":   groups of G channels per token
                 float16 [B, H, C // T, D]   axis_key="channel": groups of T tokens per channel (KIVI)
    key_zero     like key_scale
    value_codes  uint8   [B, H, C, P_v]    each block of T tokens stored transposed (quant.to_block_major)
    value_scale  float16 [B, H, C, D // G]   values are always grouped per token
    value_zero   like value_scale

Entries ``[:num_stored]`` (tokens) are filled. Dequantized, each element is
``code * scale + zero``.

With ``rotate="hadamard"`` or ``"hadamard-signs"`` the keys entering the middle are multiplied by an
orthogonal matrix (``key_rotation``, ``[D, D]``, from ``quant.rotation_matrix``) before they are quantized, which spreads
outlier channels over all channels. Sink and window keys stay as given. Readers of the middle either
rotate the query (the fused kernel: ``(q R) . (k R) = q . k``) or rotate the dequantized keys back
(the dense path and the PyTorch twin).
"""

from __future__ import annotations

import math

import torch

from .. import quant
from ..storage import DecodeStorage, dequantize_middle
from .base import SelectiveLayer

_MIDDLE = ("key_codes", "key_scale", "key_zero", "value_codes", "value_scale", "value_zero")


class QuantizedSinkWindowLayer(SelectiveLayer):
    """Sink + quantized middle + window. Spec: ``quant:bits=B,sink=S,window=W[,group=G][,key_axis=..][,sym=..]``.

    ``nbits`` is the bit width of key codes, and of value codes unless ``value_nbits`` is given
    (``quant:kbits=K,vbits=V``: keys usually need more bits than values, KIVI). ``rotate``: one of
    ``quant.ROTATIONS`` (keys rotated before they are quantized; see the module docstring).
    """

    retains_evicted = True
    supports_fused_decode = True
    # Spare room of the middle store, at most 1/128 of the stored tokens (costs at most 0.8 % of the
    # compression; a store shorter than 128 blocks grows exactly, block by block).
    middle_spare_divisor = 128

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
        value_nbits = nbits if value_nbits is None else value_nbits
        quant.check_nbits(nbits)
        quant.check_nbits(value_nbits)
        if axis_key not in ("token", "channel"):
            raise ValueError(f"axis_key must be 'token' or 'channel', got {axis_key!r}")
        if rotate not in quant.ROTATIONS:
            raise ValueError(f"rotate must be one of {quant.ROTATIONS}, got {rotate!r}")
        super().__init__(num_sink_tokens, window_length, block_length)
        self.nbits = nbits
        self.value_nbits = value_nbits
        self.q_group_size = q_group_size
        self.axis_key = axis_key
        self.sym = sym
        self.rotate = rotate
        self.key_rotation = None  # [head_dim, head_dim] float32 once the head_dim and device are known
        self.key_rotation_signs = None  # its +-1 form in the model's dtype, for the fused kernel
        self._reset_middle()

    def _reset_middle(self) -> None:
        for name in _MIDDLE:
            setattr(self, name, None)
        self._num_stored = 0

    @property
    def num_stored(self) -> int:
        return self._num_stored

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._init_rotation(key_states)

    def _init_rotation(self, key_states: torch.Tensor) -> None:
        # One matrix per (head_dim, device), shared by every layer: kv_bytes counts it once per cache.
        self.key_rotation = quant.rotation_matrix(self.rotate, key_states.shape[-1], key_states.device)
        # Built here, eagerly: a captured step must not build it (no allocation or host copy while capturing).
        self.key_rotation_signs = quant.rotation_signs(self.rotate, key_states.shape[-1], key_states.dtype,
                                                       key_states.device)

    # ----------------------------------------------------------- quantization

    def _quantize_parts(self, keys: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Middle entries of whole blocks of tokens ``[B, H, n, head_dim]``, by middle tensor name."""
        return quant.quantize_middle(
            keys, values, key_nbits=self.nbits, value_nbits=self.value_nbits, q_group_size=self.q_group_size,
            axis_key=self.axis_key, block_length=self.block_length, key_rotation=self.key_rotation, sym=self.sym,
        )

    def _evict(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        count = keys.shape[-2]
        parts = self._quantize_parts(keys, values)
        start, end = self._num_stored, self._num_stored + count
        self._ensure_capacity(end, parts)
        for name, part in parts.items():
            lo, hi = (start, end)
            if name.startswith("key_") and name != "key_codes" and self.axis_key == "channel":
                lo, hi = start // self.block_length, end // self.block_length
            getattr(self, name)[:, :, lo:hi] = part
        self._num_stored = end

    def _ensure_capacity(self, needed: int, parts: dict[str, torch.Tensor]) -> None:
        """Make room for ``needed`` tokens in every middle tensor, shaped like ``parts``.

        The capacity is counted in units of ``lcm(block_length, 16)`` tokens: whole blocks (the value
        codes are block-major and the fused kernel loads whole blocks), and a multiple of 16 so that the
        store's strides keep their divisibility by 16 as it grows (Triton specializes the kernel on it:
        a changing divisibility would recompile it in the middle of a generation). For the default
        blocks (32 and 64) the unit is one block.

        Growing copies the whole store. The new capacity is ``needed`` rounded up to a unit plus spare
        room of ``needed // middle_spare_divisor`` tokens rounded down to units: the spare room (memory
        held but not filled) is at most that fraction of the store beyond the rounding, and a store
        that has to grow again copies itself once per ``middle_spare_divisor``-th of its length
        (rounded down to units), so the copying amortizes to fewer than ``2 * middle_spare_divisor``
        tokens of storage per evicted token (below ``middle_spare_divisor`` units the store grows
        exactly, by the evicted units, and copies fewer than ``middle_spare_divisor`` units per unit).
        """
        capacity = 0 if self.key_codes is None else self.key_codes.shape[-2]
        if needed <= capacity:
            return
        unit = math.lcm(self.block_length, 16)
        spare = needed // self.middle_spare_divisor // unit * unit
        new_capacity = -(-needed // unit) * unit + spare
        for name, part in parts.items():
            rows = new_capacity
            if name.startswith("key_") and name != "key_codes" and self.axis_key == "channel":
                rows = new_capacity // self.block_length
            grown = part.new_empty(part.shape[:2] + (rows,) + part.shape[3:])
            old = getattr(self, name)
            filled = 0 if old is None else old.shape[-2]
            if filled:
                grown[:, :, :filled] = old
            grown[:, :, filled:] = 0  # rows past the stored tokens are read (with p = 0) by whole-block loads
            setattr(self, name, grown)

    def _read_stored(
        self, count: int, out_keys: torch.Tensor | None = None, out_values: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return dequantize_middle(
            *(getattr(self, name) for name in _MIDDLE),
            count,
            key_nbits=self.nbits,
            value_nbits=self.value_nbits,
            q_group_size=self.q_group_size,
            axis_key=self.axis_key,
            block_length=self.block_length,
            dtype=self.dtype,
            out_keys=out_keys,
            out_values=out_values,
            key_rotation=self.key_rotation,
        )

    def decode_storage(self) -> DecodeStorage:
        """This layer's storage as selkv's decode attention reads it (lengths as host integers)."""
        return self._storage(self.num_sink, self.num_stored, self.num_recent)

    def _storage(self, num_sink: int, num_stored: int, num_recent: int, lengths=None) -> DecodeStorage:
        return DecodeStorage(
            sink_keys=self.sink_keys,
            sink_values=self.sink_values,
            key_codes=self.key_codes,
            key_scale=self.key_scale,
            key_zero=self.key_zero,
            value_codes=self.value_codes,
            value_scale=self.value_scale,
            value_zero=self.value_zero,
            recent_keys=self.recent_keys,
            recent_values=self.recent_values,
            num_sink=num_sink,
            num_stored=num_stored,
            num_recent=num_recent,
            key_nbits=self.nbits,
            value_nbits=self.value_nbits,
            q_group_size=self.q_group_size,
            axis_key=self.axis_key,
            block_length=self.block_length,
            row_padding=self.row_padding,
            lengths=lengths,
            key_rotation=self.key_rotation,
            key_rotation_signs=self.key_rotation_signs,
        )

    # ------------------------------------------------------------- accounting

    def _middle_tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in _MIDDLE if getattr(self, name) is not None}

    def _middle_used(self) -> dict[str, int]:
        if self.key_codes is None:
            return {}
        count = self.num_stored

        def used(name: str, rows: int) -> int:
            tensor = getattr(self, name)
            return rows * tensor[:, :, :1].numel() * tensor.element_size()

        key_scale_rows = count // self.block_length if self.axis_key == "channel" else count
        key_codes, value_codes = used("key_codes", count), used("value_codes", count)
        scales = (
            used("key_scale", key_scale_rows)
            + used("key_zero", key_scale_rows)
            + used("value_scale", count)
            + used("value_zero", count)
        )
        return {"codes": key_codes + value_codes, "key_codes": key_codes, "value_codes": value_codes, "scales": scales}
