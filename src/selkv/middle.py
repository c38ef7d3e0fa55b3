"""The quantized middle: its layout (:class:`MiddleLayout`), its tensors and the store that holds them.

A selective layer keeps, per batch row and KV head::

    [ sink: 16-bit ][ middle: key_nbits / value_nbits codes + float16 scales/zeros ][ window: 16-bit ]

Everything about how the middle is stored lives here, both directions side by side:
:func:`quantize_middle` turns whole blocks of tokens into the stored tensors and
:func:`dequantize_middle` reads them back. The math itself (groups, rotation, packing) is
``quant``'s; this module only decides the layout. :class:`QuantizedMiddle` is the store a cache
layer owns: it writes blocks, grows, reads back and counts its bytes.

Stored tensors (``B`` batch, ``H`` KV heads, ``C`` capacity in tokens, ``D`` head_dim,
``P_k = D * key_nbits // 8`` and ``P_v = D * value_nbits // 8`` packed bytes, ``G`` = ``q_group_size``,
``T`` = ``block_length``)::

    key_codes    uint8   [B, H, C, P_k]    codes packed in planes along D (quant.pack)
    key_scale    float16 [B, H, C, D // G]   axis_key="token":   groups of G channels per token
                 float16 [B, H, C // T, D]   axis_key="channel": groups of T tokens per channel (KIVI)
    key_zero     like key_scale
    value_codes  uint8   [B, H, C, P_v]    each block of T tokens stored transposed (quant.to_block_major)
    value_scale  float16 [B, H, C, D // G]   values are always grouped per token
    value_zero   like value_scale; with ``vsym``, ``[B, H, C, 0]`` (no zero stored: ``quant.midrise_zero``)

Dequantized, each element is ``code * scale + zero``. With ``rotate="hadamard"`` or
``"hadamard-signs"`` the keys are multiplied by an orthogonal matrix (``key_rotation``, ``[D, D]``,
``quant.rotation_matrix``) before they are quantized, which spreads outlier channels over all
channels; readers rotate the query (the fused kernel: ``(q R) . (k R) = q . k``) or rotate the
dequantized keys back (:func:`dequantize_middle`). With ``vrotate`` the values are rotated likewise
(``value_rotation``, ``[D, D]``) before they are quantized; attention is linear in the values, so a reader
either rotates the dequantized values back (:func:`dequantize_middle`) or attends over the rotated values
and rotates the output back (the fused kernel: ``(sum_n p_n v_n R) R^T = sum_n p_n v_n``). A rotation the
keys use too is the same shared tensor: no extra bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import quant

__all__ = ["MiddleLayout", "MiddleTensors", "QuantizedMiddle", "dequantize_middle", "quantize_middle"]

AXES = ("token", "channel")


@dataclass(frozen=True)
class MiddleLayout:
    """How the quantized middle is stored: one value per setting, shared by writers and readers.

    Attributes:
        key_nbits, value_nbits: bits per key code and per value code (``quant.SUPPORTED_NBITS``).
        q_group_size: channels per scale group (values always; keys with ``axis_key="token"``).
        axis_key: ``"token"`` (key groups of ``q_group_size`` channels per token) or ``"channel"``
            (one group per channel over a block of tokens, KIVI).
        block_length: tokens per block: the unit the middle is written in, the value codes'
            block-major tile and the per-channel key group.
        rotate: the keys' rotation before quantization (``quant.ROTATIONS``).
        sym: symmetric groups (``quant.quantize``); readers need not know.
        vrotate: the values' rotation before quantization (``quant.ROTATIONS``).
        vsym: symmetric value groups that store no zero (``quant.quantize_midrise``: a float16 scale per
            group, the zero implied by it); ``value_zero`` is then empty and readers compute the zero.
    """

    key_nbits: int
    value_nbits: int
    q_group_size: int
    axis_key: str = "token"
    block_length: int = 32
    rotate: str = "none"
    sym: bool = False
    vrotate: str = "none"
    vsym: bool = False

    def __post_init__(self):
        quant.check_nbits(self.key_nbits)
        quant.check_nbits(self.value_nbits)
        if self.axis_key not in AXES:
            raise ValueError(f"axis_key must be 'token' or 'channel', got {self.axis_key!r}")
        for name, rotation in (("rotate", self.rotate), ("vrotate", self.vrotate)):
            if rotation not in quant.ROTATIONS:
                raise ValueError(f"{name} must be one of {quant.ROTATIONS}, got {rotation!r}")

    def key_rows(self, tokens: int) -> int:
        """Rows of ``key_scale``/``key_zero`` that ``tokens`` middle tokens use (a partial block counts whole)."""
        return -(-tokens // self.block_length) if self.axis_key == "channel" else tokens

    def per_block(self, name: str) -> bool:
        """Whether the middle tensor ``name`` has one row per block of tokens (per-channel key groups)."""
        return self.axis_key == "channel" and name in ("key_scale", "key_zero")

    def rows(self, name: str, tokens: int) -> int:
        """Rows of the middle tensor ``name`` that ``tokens`` tokens use."""
        return self.key_rows(tokens) if self.per_block(name) else tokens


class MiddleTensors(NamedTuple):
    """The six tensors of a quantized middle (shapes in the module docstring), in the order the kernel takes them."""

    key_codes: torch.Tensor
    key_scale: torch.Tensor
    key_zero: torch.Tensor
    value_codes: torch.Tensor
    value_scale: torch.Tensor
    value_zero: torch.Tensor

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> MiddleTensors:
        return MiddleTensors(*(fn(t) for t in self))


def quantize_middle(
    keys: torch.Tensor,
    values: torch.Tensor,
    layout: MiddleLayout,
    key_rotation: torch.Tensor | None = None,
    value_rotation: torch.Tensor | None = None,
) -> MiddleTensors:
    """Whole blocks of tokens ``[B, H, n, head_dim]`` as the middle stores them (:func:`dequantize_middle` reads them).

    Keys are rotated first (``key_rotation``, or not at all), then grouped per channel over
    ``block_length`` tokens (``axis_key="channel"``) or per token in groups of ``q_group_size``
    channels; values are rotated (``value_rotation``, or not at all), then grouped per token. Codes are
    packed, value codes block-major (:func:`quant.to_block_major`, the order the fused kernel reads).
    """
    lay = layout
    keys = quant.rotate(keys, key_rotation)
    values = quant.rotate(values, value_rotation)
    if lay.axis_key == "channel":
        # Outlier channels dominate per-token ranges at low bit widths; a per-channel group over a block
        # of tokens keeps each channel's own range (KIVI).
        key_codes, key_scale, key_zero = quant.quantize(keys, lay.key_nbits, lay.block_length, dim=-2, sym=lay.sym)
    else:
        key_codes, key_scale, key_zero = quant.quantize(keys, lay.key_nbits, lay.q_group_size, dim=-1, sym=lay.sym)
    if lay.vsym:  # no zero stored: an empty tensor keeps the six-tensor layout (and counts no bytes)
        value_codes, value_scale = quant.quantize_midrise(values, lay.value_nbits, lay.q_group_size, dim=-1)
        value_zero = value_scale.new_empty(value_scale.shape[:-1] + (0,))
    else:
        value_codes, value_scale, value_zero = quant.quantize(
            values, lay.value_nbits, lay.q_group_size, dim=-1, sym=lay.sym
        )
    return MiddleTensors(
        key_codes=quant.pack(key_codes, lay.key_nbits),
        key_scale=key_scale,
        key_zero=key_zero,
        value_codes=quant.to_block_major(quant.pack(value_codes, lay.value_nbits), lay.block_length),
        value_scale=value_scale,
        value_zero=value_zero,
    )


def dequantize_middle(
    tensors: MiddleTensors,
    layout: MiddleLayout,
    num_stored: int,
    *,
    dtype: torch.dtype = torch.float32,
    out_keys: torch.Tensor | None = None,
    out_values: torch.Tensor | None = None,
    key_rotation: torch.Tensor | None = None,
    value_rotation: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``num_stored`` middle tokens as ``[B, H, num_stored, head_dim]`` keys and values in ``dtype``.

    The inverse of :func:`quantize_middle`. The math is float32, rounded to ``dtype`` at the end.
    ``out_keys``/``out_values`` (views of that shape, e.g. slices of the tensors attention reads)
    receive the result without a copy. ``key_rotation`` / ``value_rotation`` ``[head_dim, head_dim]``: the
    keys / values were stored rotated by it; they are rotated back (in float32, before rounding to ``dtype``).
    """
    t, block = tensors, layout.block_length
    codes = quant.unpack(t.key_codes[:, :, :num_stored], layout.key_nbits)
    # rotated keys are dequantized in float32 and rotated back before rounding to dtype
    key_dtype, key_out = (dtype, out_keys) if key_rotation is None else (torch.float32, None)
    rows = layout.key_rows(num_stored)
    key_scale, key_zero = t.key_scale[:, :, :rows], t.key_zero[:, :, :rows]
    if layout.axis_key == "channel":
        keys = quant.dequantize(codes, key_scale, key_zero, block, dim=-2, dtype=key_dtype, out=key_out)
    else:
        keys = quant.dequantize(codes, key_scale, key_zero, layout.q_group_size, dtype=key_dtype, out=key_out)
    if key_rotation is not None:
        keys = quant.unrotate(keys, key_rotation).to(dtype)
        keys = keys if out_keys is None else out_keys.copy_(keys)
    values = _dequantize_values(t, layout, num_stored, dtype, out_values, value_rotation)
    return keys, values


def _dequantize_values(
    t: MiddleTensors,
    layout: MiddleLayout,
    num_stored: int,
    dtype: torch.dtype,
    out_values: torch.Tensor | None,
    value_rotation: torch.Tensor | None,
) -> torch.Tensor:
    """:func:`dequantize_middle`'s values: the first ``num_stored`` tokens, rotated back by ``value_rotation``."""
    if value_rotation is not None:  # rotated values are dequantized in float32 and rotated back before rounding
        values = _dequantize_values(t, layout, num_stored, torch.float32, None, None)
        values = quant.unrotate(values, value_rotation).to(dtype)
        return values if out_values is None else out_values.copy_(values)
    block = layout.block_length
    value_scale = t.value_scale[:, :, :num_stored]
    if layout.vsym:
        value_zero = quant.midrise_zero(value_scale, layout.value_nbits)
    else:
        value_zero = t.value_zero[:, :, :num_stored]
    if num_stored % block == 0:  # whole blocks (always, in decode): read the codes in place, in token order
        blocks = num_stored // block
        codes = quant.token_order_view(t.value_codes[:, :, :num_stored], block)
        codes = quant.unpack(
            codes.contiguous(), layout.value_nbits
        )  # transposing bytes, then converting, beats one strided pass
        values = quant.dequantize(  # [B, H, blocks, block, head_dim], a view of [B, H, num_stored, head_dim]
            codes,
            value_scale.unflatten(2, (blocks, block)),
            value_zero.unflatten(2, (blocks, block)),
            layout.q_group_size,
            dtype=dtype,
            out=None if out_values is None else out_values.unflatten(2, (blocks, block)),
        ).flatten(2, 3)
    else:
        whole_blocks = -(-num_stored // block) * block
        codes = quant.from_block_major(t.value_codes[:, :, :whole_blocks], block)[:, :, :num_stored]
        values = quant.dequantize(
            quant.unpack(codes, layout.value_nbits),
            value_scale,
            value_zero,
            layout.q_group_size,
            dtype=dtype,
            out=out_values,
        )
    return values


class QuantizedMiddle:
    """One cache layer's quantized middle: the tensors, their :class:`MiddleLayout` and the key and value rotations.

    The layer owns the lengths (host integers, or device tensors in a static cache); the store owns the
    storage. :meth:`write` quantizes whole blocks and writes them at a token position, growing the store
    when a host position needs room (the dynamic layer) or writing into a fixed capacity
    (:meth:`allocate`, the static layer, whose position may be a device tensor). :meth:`read` dequantizes.
    """

    # Spare room, at most 1/128 of the stored tokens (costs at most 0.8 % of the compression; a store
    # shorter than 128 blocks grows exactly, block by block).
    spare_divisor = 128

    def __init__(self, layout: MiddleLayout):
        self.layout = layout
        self.tensors: MiddleTensors | None = None
        self.key_rotation: torch.Tensor | None = None  # [head_dim, head_dim] float32, or None (rotate="none")
        self.key_rotation_signs: torch.Tensor | None = None  # its +-1 form in the model's dtype (fused kernel)
        self.value_rotation: torch.Tensor | None = None  # the values' [head_dim, head_dim], or None (vrotate="none")
        self.value_rotation_signs: torch.Tensor | None = None  # its +-1 form in the model's dtype (fused kernel)

    def set_head(self, key_states: torch.Tensor) -> None:
        """Build the key and value rotations for ``key_states``' head_dim, dtype and device (at a layer's first
        update)."""
        head_dim, dtype, device = key_states.shape[-1], key_states.dtype, key_states.device
        # One matrix per (rotation, head_dim, device), shared by every layer (and by keys and values when they
        # use the same rotation): kv_bytes counts it once per cache.
        self.key_rotation = quant.rotation_matrix(self.layout.rotate, head_dim, device)
        self.value_rotation = quant.rotation_matrix(self.layout.vrotate, head_dim, device)
        # Built here, eagerly: a captured step must not build them (no allocation or host copy while capturing).
        self.key_rotation_signs = quant.rotation_signs(self.layout.rotate, head_dim, dtype, device)
        self.value_rotation_signs = quant.rotation_signs(self.layout.vrotate, head_dim, dtype, device)

    def rotations(self) -> list[torch.Tensor]:
        """The rotation tensors the store holds (shared with the cache's other layers), for byte counts."""
        held = (self.key_rotation, self.key_rotation_signs, self.value_rotation, self.value_rotation_signs)
        return [t for t in held if t is not None]

    @property
    def capacity(self) -> int:
        """Tokens the store has room for."""
        return 0 if self.tensors is None else self.tensors.key_codes.shape[-2]

    def quantize(self, keys: torch.Tensor, values: torch.Tensor) -> MiddleTensors:
        """Whole blocks of tokens ``[B, H, n, head_dim]`` as this store keeps them."""
        return quantize_middle(keys, values, self.layout, self.key_rotation, self.value_rotation)

    def allocate(self, key_states: torch.Tensor, capacity: int) -> None:
        """Zeroed tensors for ``capacity`` tokens (whole blocks), shaped for ``key_states``' batch, heads and
        head_dim."""
        batch_size, num_heads, _, head_dim = key_states.shape
        # The tensors take their shapes and dtypes from quantizing one block of zeros.
        block = key_states.new_zeros(batch_size, num_heads, self.layout.block_length, head_dim)
        self.tensors = MiddleTensors(
            *(
                part.new_zeros(part.shape[:2] + (self.layout.rows(name, capacity),) + part.shape[3:])
                for name, part in self.quantize(block, block)._asdict().items()
            )
        )

    def write(self, keys: torch.Tensor, values: torch.Tensor, first: int | torch.Tensor) -> None:
        """Quantize whole blocks of tokens ``[B, H, n, head_dim]`` and write them from token ``first``.

        ``first`` is a multiple of ``block_length``. A host integer grows the store when the blocks do not
        fit (:meth:`_grow`); a device tensor (a captured step) writes into the capacity as it is.
        """
        parts = self.quantize(keys, values)
        count = keys.shape[-2]
        if isinstance(first, int):
            self._grow(first + count, parts)
        for name, store, part in zip(MiddleTensors._fields, self.tensors, parts, strict=True):
            per_block = self.layout.per_block(name)
            start = first // self.layout.block_length if per_block else first
            length = count // self.layout.block_length if per_block else count
            if isinstance(start, int):
                store[:, :, start : start + length] = part
            else:
                rows = start + torch.arange(length, device=store.device)
                store.index_copy_(2, rows, part)

    def _grow(self, needed: int, parts: MiddleTensors) -> None:
        """Make room for ``needed`` tokens in every tensor, shaped like ``parts``.

        The capacity is counted in units of ``lcm(block_length, 16)`` tokens: whole blocks (the value
        codes are block-major and the fused kernel loads whole blocks), and a multiple of 16 so that the
        store's strides keep their divisibility by 16 as it grows (Triton specializes the kernel on it:
        a changing divisibility would recompile it in the middle of a generation). For the default
        blocks (32 and 64) the unit is one block.

        Growing copies the whole store. The new capacity is ``needed`` rounded up to a unit plus spare
        room of ``needed // spare_divisor`` tokens rounded down to units: the spare room (memory held but
        not filled) is at most that fraction of the store beyond the rounding, and a store that has to
        grow again copies itself once per ``spare_divisor``-th of its length (rounded down to units), so
        the copying amortizes to fewer than ``2 * spare_divisor`` tokens of storage per written token
        (below ``spare_divisor`` units the store grows exactly, by the written units, and copies fewer
        than ``spare_divisor`` units per unit).
        """
        if needed <= self.capacity:
            return
        unit = math.lcm(self.layout.block_length, 16)
        spare = needed // self.spare_divisor // unit * unit
        new_capacity = -(-needed // unit) * unit + spare
        old = self.tensors
        grown = []
        for i, (name, part) in enumerate(zip(MiddleTensors._fields, parts, strict=True)):
            tensor = part.new_empty(part.shape[:2] + (self.layout.rows(name, new_capacity),) + part.shape[3:])
            filled = 0 if old is None else old[i].shape[-2]
            if filled:
                tensor[:, :, :filled] = old[i]
            tensor[:, :, filled:] = 0  # rows past the stored tokens are read (with p = 0) by whole-block loads
            grown.append(tensor)
        self.tensors = MiddleTensors(*grown)

    def read(
        self,
        count: int,
        dtype: torch.dtype = torch.float32,
        out_keys: torch.Tensor | None = None,
        out_values: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``count`` tokens dequantized (keys and values rotated back) in ``dtype``, written into
        ``out_*`` when given."""
        return dequantize_middle(
            self.tensors,
            self.layout,
            count,
            dtype=dtype,
            out_keys=out_keys,
            out_values=out_values,
            key_rotation=self.key_rotation,
            value_rotation=self.value_rotation,
        )

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors by name (none before the first write or allocation)."""
        return {} if self.tensors is None else self.tensors._asdict()

    def used_bytes(self, count: int) -> dict[str, int]:
        """Bytes that hold the first ``count`` tokens (spare capacity excluded), under ``kv_bytes``' names:
        ``bytes_codes`` (``bytes_key_codes`` + ``bytes_value_codes``) and ``bytes_scales`` (scales and zeros)."""
        if self.tensors is None:
            return {}

        def used(name: str) -> int:
            tensor = getattr(self.tensors, name)
            return self.layout.rows(name, count) * tensor[:, :, :1].numel() * tensor.element_size()

        key_codes, value_codes = used("key_codes"), used("value_codes")
        scales = used("key_scale") + used("key_zero") + used("value_scale") + used("value_zero")
        return {
            "bytes_codes": key_codes + value_codes,
            "bytes_key_codes": key_codes,
            "bytes_value_codes": value_codes,
            "bytes_scales": scales,
        }

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``fn`` to every tensor (batch reordering, beam search); the rotations have no batch dimension."""
        if self.tensors is not None:
            self.tensors = self.tensors.map(fn)

    def clear(self) -> None:
        """Drop the tensors (the rotations stay: they depend on the model only)."""
        self.tensors = None

    def clone(self) -> QuantizedMiddle:
        """A copy that owns its tensors (a snapshot); the rotations, shared by every layer and never written, are
        kept by reference so that kv_bytes still counts them once per cache."""
        twin = QuantizedMiddle(self.layout)
        twin.key_rotation, twin.key_rotation_signs = self.key_rotation, self.key_rotation_signs
        twin.value_rotation, twin.value_rotation_signs = self.value_rotation, self.value_rotation_signs
        twin.tensors = None if self.tensors is None else self.tensors.map(torch.Tensor.clone)
        return twin
