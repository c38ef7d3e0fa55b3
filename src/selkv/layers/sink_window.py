"""QuantizedSinkWindowLayer: 16-bit sink and window, every token between them quantized once.

This is selkv's strategy. Tokens leaving the window (in blocks of
``block_length``) are quantized exactly once and appended to the middle store,
which grows by doubling; nothing is ever re-quantized.

Middle store (``B`` batch, ``H`` KV heads, ``C`` capacity, ``D`` head_dim,
``P = D * nbits // 8`` packed bytes, ``G`` = ``q_group_size``, ``T`` = ``block_length``)::

    key_codes    uint8   [B, H, C, P]      codes packed in planes along D (see quant.pack)
    key_scale    float16 [B, H, C, D // G]   axis_key="token":   groups of G channels per token
                 float16 [B, H, C // T, D]   axis_key="channel": groups of T tokens per channel (KIVI)
    key_zero     like key_scale
    value_codes  uint8   [B, H, C, P]      each block of T tokens stored transposed (quant.to_block_major)
    value_scale  float16 [B, H, C, D // G]   values are always grouped per token
    value_zero   like value_scale

Entries ``[:num_stored]`` (tokens) are filled. Dequantized, each element is
``code * scale + zero``.
"""

from __future__ import annotations

import torch

from .. import quant
from .base import SelectiveLayer

_MIDDLE = ("key_codes", "key_scale", "key_zero", "value_codes", "value_scale", "value_zero")


def dequantize_middle(
    key_codes: torch.Tensor,
    key_scale: torch.Tensor,
    key_zero: torch.Tensor,
    value_codes: torch.Tensor,
    value_scale: torch.Tensor,
    value_zero: torch.Tensor,
    num_stored: int,
    *,
    nbits: int,
    q_group_size: int,
    axis_key: str,
    block_length: int,
    dtype: torch.dtype = torch.float32,
    out_keys: torch.Tensor | None = None,
    out_values: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``num_stored`` middle tokens as ``[B, H, num_stored, head_dim]`` keys and values in ``dtype``.

    The math is float32, rounded to ``dtype`` at the end. ``out_keys``/``out_values`` (views of
    that shape, e.g. slices of the tensors attention reads) receive the result without a copy.
    """
    codes = quant.unpack(key_codes[:, :, :num_stored], nbits)
    if axis_key == "channel":
        groups = -(-num_stored // block_length)
        keys = quant.dequantize(codes, key_scale[:, :, :groups], key_zero[:, :, :groups], block_length, dim=-2,
                                dtype=dtype, out=out_keys)
    else:
        keys = quant.dequantize(codes, key_scale[:, :, :num_stored], key_zero[:, :, :num_stored], q_group_size,
                                dtype=dtype, out=out_keys)
    value_scale, value_zero = value_scale[:, :, :num_stored], value_zero[:, :, :num_stored]
    if num_stored % block_length == 0:  # whole blocks (always, in decode): read the codes in place, in token order
        blocks = num_stored // block_length
        codes = quant.token_order_view(value_codes[:, :, :num_stored], block_length)
        codes = quant.unpack(codes.contiguous(), nbits)  # transposing bytes, then converting, beats one strided pass
        values = quant.dequantize(  # [B, H, blocks, block_length, head_dim], a view of [B, H, num_stored, head_dim]
            codes, value_scale.unflatten(2, (blocks, block_length)), value_zero.unflatten(2, (blocks, block_length)),
            q_group_size, dtype=dtype, out=None if out_values is None else out_values.unflatten(2, (blocks, block_length)),
        ).flatten(2, 3)
    else:
        whole_blocks = -(-num_stored // block_length) * block_length
        codes = quant.from_block_major(value_codes[:, :, :whole_blocks], block_length)[:, :, :num_stored]
        values = quant.dequantize(quant.unpack(codes, nbits), value_scale, value_zero, q_group_size, dtype=dtype,
                                  out=out_values)
    return keys, values


class QuantizedSinkWindowLayer(SelectiveLayer):
    """Sink + quantized middle + window. Spec: ``quant:bits=B,sink=S,window=W[,group=G][,key_axis=..][,sym=..]``."""

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
    ):
        quant.check_nbits(nbits)
        if axis_key not in ("token", "channel"):
            raise ValueError(f"axis_key must be 'token' or 'channel', got {axis_key!r}")
        super().__init__(num_sink_tokens, window_length, block_length)
        self.nbits = nbits
        self.q_group_size = q_group_size
        self.axis_key = axis_key
        self.sym = sym
        self._reset_middle()

    def _reset_middle(self) -> None:
        for name in _MIDDLE:
            setattr(self, name, None)
        self._num_stored = 0

    @property
    def num_stored(self) -> int:
        return self._num_stored

    # ----------------------------------------------------------- quantization

    def _quantize_keys(self, keys: torch.Tensor):
        if self.axis_key == "channel":
            # Outlier channels dominate per-token ranges at low bit widths; a per-channel group over
            # a block of tokens keeps each channel's own range (KIVI).
            return quant.quantize(keys, self.nbits, self.block_length, dim=-2, sym=self.sym)
        return quant.quantize(keys, self.nbits, self.q_group_size, dim=-1, sym=self.sym)

    def _evict(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        count = keys.shape[-2]
        key_codes, key_scale, key_zero = self._quantize_keys(keys)
        value_codes, value_scale, value_zero = quant.quantize(values, self.nbits, self.q_group_size, dim=-1, sym=self.sym)
        parts = {
            "key_codes": quant.pack(key_codes, self.nbits),
            "key_scale": key_scale,
            "key_zero": key_zero,
            "value_codes": quant.to_block_major(quant.pack(value_codes, self.nbits), self.block_length),
            "value_scale": value_scale,
            "value_zero": value_zero,
        }
        start, end = self._num_stored, self._num_stored + count
        self._ensure_capacity(end, parts)
        for name, part in parts.items():
            lo, hi = (start, end)
            if name.startswith("key_") and name != "key_codes" and self.axis_key == "channel":
                lo, hi = start // self.block_length, end // self.block_length
            getattr(self, name)[:, :, lo:hi] = part
        self._num_stored = end

    def _ensure_capacity(self, needed: int, parts: dict[str, torch.Tensor]) -> None:
        capacity = 0 if self.key_codes is None else self.key_codes.shape[-2]
        if needed <= capacity:
            return
        new_capacity = max(needed, 2 * capacity, 4 * self.block_length)
        new_capacity = -(-new_capacity // self.block_length) * self.block_length  # whole key groups
        for name, part in parts.items():
            rows = new_capacity
            if name.startswith("key_") and name != "key_codes" and self.axis_key == "channel":
                rows = new_capacity // self.block_length
            grown = part.new_zeros(part.shape[:2] + (rows,) + part.shape[3:])
            old = getattr(self, name)
            if old is not None:
                grown[:, :, : old.shape[-2]] = old
            setattr(self, name, grown)

    def _read_stored(
        self, count: int, out_keys: torch.Tensor | None = None, out_values: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return dequantize_middle(
            *(getattr(self, name) for name in _MIDDLE),
            count,
            nbits=self.nbits,
            q_group_size=self.q_group_size,
            axis_key=self.axis_key,
            block_length=self.block_length,
            dtype=self.dtype,
            out_keys=out_keys,
            out_values=out_values,
        )

    # ------------------------------------------------------------- accounting

    def _middle_tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in _MIDDLE if getattr(self, name) is not None}

    def _middle_used(self) -> dict[str, int]:
        if self.key_codes is None:
            return {}
        count = self._num_stored

        def used(name: str, rows: int) -> int:
            tensor = getattr(self, name)
            return rows * tensor[:, :, :1].numel() * tensor.element_size()

        key_scale_rows = count // self.block_length if self.axis_key == "channel" else count
        codes = used("key_codes", count) + used("value_codes", count)
        scales = (
            used("key_scale", key_scale_rows)
            + used("key_zero", key_scale_rows)
            + used("value_scale", count)
            + used("value_zero", count)
        )
        return {"codes": codes, "scales": scales}
