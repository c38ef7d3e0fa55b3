"""Fused decode attention over a selective cache: launch configuration and the launcher.

``selective_decode_attention(query_states, storage)`` checks a layer's :class:`DecodeStorage`,
allocates the partial outputs and launches the Triton kernels of ``triton_decode.py``:
one program per (middle split, batch row, KV head) plus one per (row, head) for the 16-bit
sink and window, then the merge. ``DecodeConfig`` holds the launch parameters; the splits are
sized so that all programs run in one wave. ``decode_op.decode_attention`` goes through the
registered custom operator when the lengths are on the device (captured steps).

With ``TRITON_INTERPRET=1`` in the environment before Triton is first imported,
the same kernels run in Triton's CPU interpreter, on CPU tensors (tests without a GPU).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch
import triton

from .. import quant
from ..middle import MiddleTensors
from ..storage import DecodeStorage
from . import interpreter_enabled
from .triton_decode import _merge_partials_kernel, _selective_decode_partial_kernel

__all__ = ["DecodeConfig", "bytes_read", "check_supported", "selective_decode_attention"]

_LOG2E = 1.4426950408889634  # 1/ln(2): the kernels use exp2/log2
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ------------------------------------------------------------------ configs


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the partial kernel (``num_splits=0``: choose from the GPU's size).

    One warp per program was fastest for kernel v4 (docs/kernel_notes.md, H200). ``block_n=0`` (middle tokens per
    tile) chooses by layout: 64 when keys are quantized per channel over blocks that are a multiple
    of 64 tokens (one key scale row per tile; kernel v5) or of exactly 32 tokens (two rows per tile),
    else 32. ``scale_prefetch=None`` chooses by layout too (see ``_resolve``).
    """

    block_n: int = 0
    block_exact: int = 32
    num_warps: int = 1
    num_stages: int = 2
    num_splits: int = 0
    # resident programs per multiprocessor (one warp and ~255 registers each: 8); splits are sized
    # so that every program of a launch runs in one wave
    programs_per_sm: int = 8
    # load the next tile's per-token scales while this one computes; None: where it was faster (_resolve)
    scale_prefetch: bool | None = None
    # the middle's value dot: "dequant" (values dequantized to float16 in the tile) or "fp16" (the value
    # scale folded into p: up to 9 % faster for int4 per-token keys, imprecise on small values); see
    # _value_chunk_update and docs/kernel_notes.md (2026-12-02)
    value_dot: str = "dequant"
    # rotated keys with a +-1 rotation (the Hadamard ones): rotate the query in the kernel's prologue
    # instead of a float32 matmul before the launch
    rotate_in_kernel: bool = True
    # codes converted to 16 bits with inline PTX, four per register (NVIDIA only); off: Triton's own
    # per-byte shifts and masks, the kernel before the PTX conversion (kept to compare)
    codes_asm: bool = True
    # per-channel keys read in several chunks: the tile's key scale and zero rows loaded whole, once (a load the
    # pipeliner prefetches), and split in registers; off: each chunk loads its own slice as it goes. None: where it
    # was faster (_key_scale_rows)
    key_scale_rows: bool | None = None

    def __post_init__(self):
        if self.value_dot not in VALUE_DOTS:
            raise ValueError(f"value_dot={self.value_dot!r}; allowed: {', '.join(VALUE_DOTS)}")


VALUE_DOTS = ("dequant", "fp16")  # DecodeConfig.value_dot, in the kernel's VALUE_DOT order


@functools.lru_cache(maxsize=64)
def _resolve(config: DecodeConfig, axis_key: str, block_length: int) -> DecodeConfig:
    """``config`` with ``block_n`` chosen when it is 0 and ``scale_prefetch`` when it is None (see DecodeConfig);
    cached: it runs every decode call.

    The scale prefetch pays where keys are quantized per token or a tile holds two key blocks (int8, int2:
    1.3x and 1.04x at 8 x 32k); with one per-channel key block per tile (int4, int3) its registers spill and
    the tile without it is 1.27x and 1.04x faster (H100, docs/kernel_notes.md, 2026-12-06)."""
    block_n = config.block_n or (64 if axis_key == "channel" and (block_length % 64 == 0 or block_length == 32) else 32)
    prefetch = config.scale_prefetch
    if prefetch is None:
        prefetch = axis_key == "token" or _key_rows(block_n, block_length) == 2
    return replace(config, block_n=block_n, scale_prefetch=prefetch)


def _chunk(head_dim: int, nbits: int, q_group_size: int) -> int:
    """Channels per middle chunk: inside one bit plane (``quant.plane_width``) and one scale group."""
    return min(q_group_size, quant.plane_width(head_dim, nbits))


def _value_chunk(head_dim: int, nbits: int, q_group_size: int) -> int:
    """Channels per value chunk: as ``_chunk``; 3-bit codes at head_dim >= 128: at most an eighth of the channels,
    whose high bits share one bit position (the kernel keeps the eight chunks' accumulators as four pairs)."""
    if nbits == 3 and head_dim >= 128:
        return min(q_group_size, head_dim // 8)
    return _chunk(head_dim, nbits, q_group_size)


def _key_scale_rows(config: DecodeConfig, key_chunk: int) -> bool:
    """``config.key_scale_rows``, chosen when it is None: on where a chunk's own slice of a scale row (2 bytes a
    channel) is narrower than a warp's asynchronous copy of 4 bytes a thread, which the pipeliner needs to
    prefetch it. H100, 8 x 32k (docs/performance.md, 2026-12-07): 3/2 1.23x faster with whole rows, 2/2 1.36x, 3/3
    1.21x; chunks of 64 channels (4-bit keys) 0-3 % slower (the registers spill)."""
    if config.key_scale_rows is not None:
        return config.key_scale_rows
    return 2 * key_chunk < 4 * 32


def _key_chunk(head_dim: int, nbits: int, q_group_size: int, axis_key: str) -> int:
    """Channels per key chunk. Per-token keys: as ``_chunk``. Per-channel keys: a whole bit plane; 3-bit codes
    at head_dim >= 128: an eighth of the channels, whose high bits share one bit position (a constant rotation
    in the code conversion; the kernel keeps the eight chunks' queries as four pairs)."""
    if axis_key != "channel":
        return _chunk(head_dim, nbits, q_group_size)
    if nbits == 3 and head_dim >= 128:
        return head_dim // 8
    return quant.plane_width(head_dim, nbits)


# Tiles a middle program reads at least (each program pays a partial output and its merge).
_MIN_SPLIT_TILES = 4


def _cdiv(a: int, b: int) -> int:
    """Ceiling division (triton.cdiv is a jitted function: ~5 us a call on the launch path)."""
    return -(-a // b)


def _wide_offsets(*tensors: torch.Tensor) -> bool:
    """Whether one of ``tensors`` lies in a storage of more than 2^31 elements: the kernel then computes its
    offsets in 64 bits (32-bit offsets would wrap and read or write elsewhere). A view reaches no further
    than its storage, so this never says no wrongly; it reads one number per tensor (it runs at every launch)."""
    return any(t.untyped_storage().nbytes() > t.element_size() << 31 for t in tensors)


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _key_rows(block_n: int, block_length: int) -> int:
    """Per-channel key blocks (scale rows) per middle tile: 1 when every tile lies inside one block, 2 when
    it is two whole blocks, else 0 (a scale row gathered per token)."""
    if block_length % block_n == 0:
        return 1
    return 2 if block_n == 2 * block_length else 0


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # the interpreter: a few splits, to exercise the merge


def _splits(num_stored: int, rows: int, config: DecodeConfig, device: torch.device) -> tuple[int, int]:
    """(number of middle splits, tokens per split) for ``rows`` (batch row, KV head) pairs.

    Each row gets its middle splits plus one program for its 16-bit tokens. All programs should fit
    in one wave of ``config.programs_per_sm`` resident programs per multiprocessor: a second, barely
    filled wave doubled the kernel's time (docs/kernel_notes.md, kernel v4). Splits keep >= 4 tiles.
    """
    if num_stored == 0:
        return 0, config.block_n
    tiles = _cdiv(num_stored, config.block_n)
    if config.num_splits:
        wanted = config.num_splits
    else:
        wanted = (config.programs_per_sm * _num_sms(device)) // rows - 1  # minus the 16-bit program
        wanted = min(wanted, _cdiv(tiles, _MIN_SPLIT_TILES))  # each split pays a partial: keep >= 4 tiles
    wanted = max(1, min(wanted, tiles))
    # whole tiles per split: every tile starts at a multiple of block_n (the kernel's value loads rely on it)
    tokens_per_split = _cdiv(tiles, wanted) * config.block_n
    return _cdiv(num_stored, tokens_per_split), tokens_per_split


def check_supported(
    head_dim: int,
    num_key_value_groups: int,
    nbits: int,
    q_group_size: int,
    dtype: torch.dtype,
    value_nbits: int | None = None,
) -> str | None:
    """Why the fused kernel cannot take these shapes (``None``: it can); ``nbits`` of keys, ``value_nbits``
    of values (default: ``nbits``)."""
    if dtype not in _SUPPORTED_DTYPES:
        return f"dtype {dtype} (supported: float16, bfloat16, float32)"
    if dtype == torch.bfloat16 and interpreter_enabled():  # seen with Triton 3.9: outputs off by 1e9
        return "bfloat16 in Triton's CPU interpreter, which computes it wrongly (float16 and float32 work there)"
    if not _pow2(head_dim) or head_dim < 16:
        return f"head_dim={head_dim} (a power of two >= 16 is needed)"
    value_nbits = nbits if value_nbits is None else value_nbits
    for bits in (nbits, value_nbits):
        if bits not in quant.SUPPORTED_NBITS:
            return f"nbits={bits}"
    if not _pow2(q_group_size) or head_dim % q_group_size:
        return f"q_group_size={q_group_size} (a power of two dividing head_dim is needed)"
    for bits in (nbits, value_nbits):
        chunk = _chunk(head_dim, bits, q_group_size)
        if chunk < 16 or head_dim // chunk > 4:
            return (
                f"head_dim={head_dim}, nbits={bits}, q_group_size={q_group_size}: the kernel reads the head in "
                f"at most 4 chunks of >= 16 channels (one bit plane and scale group each); this needs {chunk}"
            )
    if num_key_value_groups < 1:
        return f"num_key_value_groups={num_key_value_groups}"
    return None


# ---------------------------------------------------------------- launcher


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _same_strides(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` and ``b`` with their last dimension contiguous and the same strides (the kernel reads both at one
    offset: keys and values, scales and zeros)."""
    a, b = _last_contiguous(a), _last_contiguous(b)
    if a.stride() != b.stride():
        a, b = a.contiguous(), b.contiguous()
    return a, b


def _check_query(query_states: torch.Tensor, storage: DecodeStorage) -> int:
    """Checks the query, the storage's layout and its key and value rotations against the kernel; returns the
    number of query heads per KV head."""
    layout = storage.layout
    _, num_heads, q_len, head_dim = query_states.shape
    num_kv_heads = storage.sink_keys.shape[1]
    if q_len != 1:
        raise ValueError(f"the decode kernel takes one query token, got query length {q_len}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}")
    num_key_value_groups = num_heads // num_kv_heads
    why = check_supported(
        head_dim, num_key_value_groups, layout.key_nbits, layout.q_group_size, query_states.dtype, layout.value_nbits
    )
    if why:
        raise ValueError(f"the fused decode kernel does not support {why}")
    for name in ("key_rotation", "value_rotation"):
        rotation = getattr(storage, name)
        if rotation is not None and tuple(rotation.shape) != (head_dim, head_dim):
            raise ValueError(f"{name} has shape {tuple(rotation.shape)}; expected [{head_dim}, {head_dim}]")
    if layout.axis_key not in ("token", "channel"):
        raise ValueError(f"axis_key must be 'token' or 'channel', got {layout.axis_key!r}")
    return num_key_value_groups


def _check_exact(query_states: torch.Tensor, storage: DecodeStorage) -> None:
    """Checks the 16-bit sink and window: ``[batch_size, num_kv_heads, capacity, head_dim]`` in the query's dtype,
    holding at most their capacity."""
    s = storage
    batch_size, _, _, head_dim = query_states.shape
    num_kv_heads = s.sink_keys.shape[1]
    for name, t in (
        ("sink_keys", s.sink_keys),
        ("sink_values", s.sink_values),
        ("recent_keys", s.recent_keys),
        ("recent_values", s.recent_values),
    ):
        if t.shape[0] != batch_size or t.shape[1] != num_kv_heads or t.shape[-1] != head_dim:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}; expected [{batch_size}, {num_kv_heads}, *, {head_dim}]"
            )
        if t.dtype != query_states.dtype:
            raise ValueError(f"{name} is {t.dtype} but the query is {query_states.dtype}")
    if s.num_sink > s.sink_keys.shape[2] or s.num_recent > s.recent_keys.shape[2]:
        raise ValueError(f"num_sink={s.num_sink} / num_recent={s.num_recent} exceed the sink / window capacity")


def _check_middle(storage: DecodeStorage, head_dim: int) -> None:
    """Checks a filled middle's codes and scales against its layout and ``num_stored``."""
    layout, middle, num_stored = storage.layout, storage.middle, storage.num_stored
    key_nbits, value_nbits, q_group_size, axis_key = (
        layout.key_nbits,
        layout.value_nbits,
        layout.q_group_size,
        layout.axis_key,
    )
    key_packed, value_packed = quant.packed_dim(head_dim, key_nbits), quant.packed_dim(head_dim, value_nbits)
    if middle is None or middle.key_codes.shape[-1] != key_packed or middle.value_codes.shape[-1] != value_packed:
        raise ValueError(
            f"key/value codes must have {key_packed}/{value_packed} packed bytes per token for "
            f"key_nbits={key_nbits}, value_nbits={value_nbits}"
        )
    key_codes, key_scale, _, value_codes, value_scale, value_zero = middle
    # the kernel reads value zeros at the scales' offsets, or none with vsym (it computes them)
    zero_shape = (*value_scale.shape[:-1], 0) if layout.vsym else value_scale.shape
    if value_zero.shape != zero_shape:
        raise ValueError(
            f"value_zero has shape {tuple(value_zero.shape)}; expected {tuple(zero_shape)} for vsym={layout.vsym}"
        )
    if key_codes.shape[2] < num_stored:
        raise ValueError(f"num_stored={num_stored} exceeds the middle capacity {key_codes.shape[2]}")
    if value_codes.shape[:3] != key_codes.shape[:3]:  # the kernel addresses both rows with key_codes' rows
        raise ValueError(
            f"value_codes {tuple(value_codes.shape)} and key_codes {tuple(key_codes.shape)} "
            "must have the same batch, heads and capacity"
        )
    if value_codes.shape[2] % layout.block_length:
        raise ValueError(
            f"the middle capacity {value_codes.shape[2]} is not whole blocks of {layout.block_length} "
            "(value codes are stored block-major)"
        )
    key_scale_width = head_dim if axis_key == "channel" else head_dim // q_group_size  # one per channel / group
    if key_scale.shape[-1] != key_scale_width or value_scale.shape[-1] != head_dim // q_group_size:
        raise ValueError(
            f"scale shapes {tuple(key_scale.shape)} / {tuple(value_scale.shape)} do not match "
            f"axis_key={axis_key!r}, q_group_size={q_group_size}, head_dim={head_dim}"
        )


def _middle_query(
    query_states: torch.Tensor, storage: DecodeStorage, config: DecodeConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(query_states, middle_query, rotation)``: the query, the one the middle's keys are read with, and the
    ``+-1`` rotation the middle programs apply to it in their prologue (``None``: they do not).

    Rotated middle keys are read with the rotated query, (q R) . (k R) = q . k. With its +-1 form
    (key_rotation_signs) the middle programs rotate the query in their prologue; otherwise a float32
    matmul here does (the kernel rounds it to its dot dtype as it does the query).
    """
    s = storage
    if s.key_rotation is None or not s.num_stored:
        return query_states, query_states, None
    head_dim = query_states.shape[-1]
    signs = s.key_rotation_signs
    if config.rotate_in_kernel and signs is not None:
        if tuple(signs.shape) != (head_dim, head_dim) or signs.dtype != query_states.dtype:
            raise ValueError(
                f"key_rotation_signs is {signs.dtype} {tuple(signs.shape)}; expected "
                f"{query_states.dtype} [{head_dim}, {head_dim}]"
            )
        return query_states, query_states, signs
    query_states = query_states.contiguous()
    rotation = s.key_rotation.to(device=query_states.device, dtype=torch.float32)
    return query_states, torch.matmul(query_states.float(), rotation), None


def _value_rotation(storage: DecodeStorage, query_states: torch.Tensor) -> tuple[torch.Tensor, float] | None:
    """``(operand, scale)`` with which the merge rotates the middle's output back (``operand * scale`` is
    ``value_rotation^T``), or ``None`` when the values are not stored rotated (or there is no middle).

    The ``+-1`` form (value_rotation_signs, ``scale = 1 / sqrt(D)``) when the storage has it, else the float32
    transposed matrix (``scale = 1``); the merge multiplies in float32 either way.
    """
    s = storage
    if s.value_rotation is None or not s.num_stored:
        return None
    head_dim = query_states.shape[-1]
    signs = s.value_rotation_signs
    if signs is not None:
        if tuple(signs.shape) != (head_dim, head_dim) or signs.dtype != query_states.dtype:
            raise ValueError(
                f"value_rotation_signs is {signs.dtype} {tuple(signs.shape)}; expected "
                f"{query_states.dtype} [{head_dim}, {head_dim}]"
            )
        return signs.to(query_states.device).contiguous(), head_dim**-0.5
    rotation = s.value_rotation.to(device=query_states.device, dtype=torch.float32)
    return rotation.T.contiguous(), 1.0


def _exact_operands(storage: DecodeStorage, query_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(sink_keys, sink_values, recent_keys, recent_values)`` as the kernel reads them: the last dimension
    contiguous, keys and values with the same strides, any valid pointer for an empty region (it loads nothing)."""
    s = storage
    sink_keys, sink_values = _same_strides(s.sink_keys, s.sink_values)
    recent_keys, recent_values = _same_strides(s.recent_keys, s.recent_values)
    if sink_keys.numel() == 0:  # no sink storage: hand the kernel any valid pointer (it loads nothing)
        sink_keys = sink_values = recent_keys
    if recent_keys.numel() == 0:
        recent_keys = recent_values = sink_keys if sink_keys.numel() else query_states
    return sink_keys, sink_values, recent_keys, recent_values


def _middle_operands(storage: DecodeStorage, head_dim: int, device: torch.device) -> MiddleTensors:
    """The middle's tensors as the kernel reads them (checked; scales and zeros with the same strides), or
    placeholders without a filled middle."""
    if not storage.num_stored:  # no middle yet: placeholders of the right dtypes (the middle programs do not
        # exist, but the kernel is compiled for these pointer types: a 16-bit "codes" pointer breaks the PTX code path)
        codes = torch.zeros(1, 1, 1, 1, dtype=torch.uint8, device=device)
        scales = torch.zeros(1, 1, 1, 1, dtype=torch.float16, device=device)
        return MiddleTensors(codes, scales, scales, codes, scales, scales)
    _check_middle(storage, head_dim)
    key_codes, key_scale, key_zero, value_codes, value_scale, value_zero = storage.middle
    key_codes, value_codes = key_codes.contiguous(), value_codes.contiguous()  # views of the store: no copy
    key_scale, key_zero = _same_strides(key_scale, key_zero)
    if storage.layout.vsym:  # no value zeros stored (the kernel computes them): any valid pointer will do
        value_scale = value_zero = _last_contiguous(value_scale)
    else:
        value_scale, value_zero = _same_strides(value_scale, value_zero)
    return MiddleTensors(key_codes, key_scale, key_zero, value_codes, value_scale, value_zero)


def _length_operands(
    storage: DecodeStorage, device: torch.device, unused: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row_padding, lengths)`` as int32 tensors on ``device``; ``unused`` stands for an absent one (the kernel
    reads neither without HAS_PADDING / DEVICE_LENGTHS)."""
    row_padding, lengths = storage.row_padding, storage.lengths
    if row_padding is not None:
        row_padding = row_padding.to(device=device, dtype=torch.int32).contiguous()
    if lengths is not None:
        lengths = lengths.to(device=device, dtype=torch.int32)
    return (unused if row_padding is None else row_padding), (unused if lengths is None else lengths)


def selective_decode_attention(
    query_states: torch.Tensor,
    storage: DecodeStorage,
    *,
    scaling: float | None = None,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """Attention of one query token over a layer's storage: sink, middle and window (see :class:`DecodeStorage`).

    Args:
        query_states: ``[batch_size, num_heads, 1, head_dim]``; query head ``i`` reads KV head
            ``i // (num_heads // num_key_value_heads)``.
        storage: the layer's storage. With host lengths the grid is sized from ``num_stored``; with
            device ``lengths`` (a static cache) from the capacities, and the kernel reads the lengths
            itself: no host sync, one kernel specialization for the whole decode, capturable in a CUDA graph.
        scaling: softmax scale, ``head_dim ** -0.5`` by default.
    Returns:
        ``[batch_size, 1, num_heads, head_dim]`` in the query's dtype (transformers' attention output layout).
    """
    s = storage
    num_sink, num_stored, num_recent = s.num_sink, s.num_stored, s.num_recent
    lay = s.layout
    key_nbits, value_nbits, q_group_size, axis_key, block_length = (
        lay.key_nbits,
        lay.value_nbits,
        lay.q_group_size,
        lay.axis_key,
        lay.block_length,
    )
    num_key_value_groups = _check_query(query_states, s)
    _check_exact(query_states, s)
    config = _resolve(config or DecodeConfig(), axis_key, block_length)
    batch_size, num_heads, _, head_dim = query_states.shape
    num_kv_heads = s.sink_keys.shape[1]
    device = query_states.device

    query_states, middle_query, rotation = _middle_query(_last_contiguous(query_states), s, config)
    value_rotation = _value_rotation(s, query_states)
    sink_keys, sink_values, recent_keys, recent_values = _exact_operands(s, query_states)
    key_codes, key_scale, key_zero, value_codes, value_scale, value_zero = _middle_operands(s, head_dim, device)
    row_padding, lengths = _length_operands(s, device, unused=sink_keys)

    chunk = _value_chunk(head_dim, value_nbits, q_group_size)
    key_chunk = _key_chunk(head_dim, key_nbits, q_group_size, axis_key)
    num_splits, tokens_per_split = _splits(num_stored, batch_size * num_kv_heads, config, device)
    num_partials = num_splits + 1  # the last one reads the 16-bit regions
    partial_out = torch.empty(batch_size, num_heads, num_partials, head_dim, device=device, dtype=torch.float32)
    partial_lse = torch.empty(batch_size, num_heads, num_partials, device=device, dtype=torch.float32)
    out = torch.empty(batch_size, 1, num_heads, head_dim, device=device, dtype=query_states.dtype)
    scaling = head_dim**-0.5 if scaling is None else float(scaling)

    _selective_decode_partial_kernel[(num_partials, batch_size * num_kv_heads)](
        query_states,
        middle_query,
        sink_keys,
        sink_values,
        recent_keys,
        recent_values,
        key_codes if rotation is None else rotation,  # the rotation operand (unused unless ROTATE)
        key_codes,
        key_scale,
        key_zero,
        value_codes,
        value_scale,
        value_zero,
        row_padding,
        lengths,
        partial_out,
        partial_lse,
        num_sink,
        num_stored,
        num_recent,
        tokens_per_split,
        num_kv_heads,
        num_partials,
        recent_keys.shape[2],
        max(value_codes.shape[2] // block_length - 1, 0),  # the middle's last block (key scale row, value block)
        scaling * _LOG2E,
        head_dim**-0.5,
        query_states.stride(0),
        query_states.stride(1),
        sink_keys.stride(0),
        sink_keys.stride(1),
        sink_keys.stride(2),
        recent_keys.stride(0),
        recent_keys.stride(1),
        recent_keys.stride(2),
        key_codes.stride(0),
        key_codes.stride(1),
        key_codes.stride(2),
        value_codes.stride(0),
        value_codes.stride(1),
        key_scale.stride(0),
        key_scale.stride(1),
        key_scale.stride(2),
        value_scale.stride(0),
        value_scale.stride(1),
        value_scale.stride(2),
        HEADS_PER_KV=num_key_value_groups,
        HEADS_M=max(16, triton.next_power_of_2(num_key_value_groups)),
        HEAD_DIM=head_dim,
        KEY_NBITS=key_nbits,
        VALUE_NBITS=value_nbits,
        Q_GROUP=q_group_size,
        KEY_PER_CHANNEL=axis_key == "channel",
        BLOCK_LENGTH=block_length,
        KEY_ROWS=_key_rows(config.block_n, block_length),
        HAS_PADDING=s.row_padding is not None,
        DEVICE_LENGTHS=s.lengths is not None,
        MIN_SPLIT_TILES=_MIN_SPLIT_TILES,
        BLOCK_N=config.block_n,
        BLOCK_EXACT=config.block_exact,
        DOT_PRECISION="ieee" if query_states.dtype == torch.float32 else "tf32",
        HEADS_N=max(8, triton.next_power_of_2(num_key_value_groups)),
        CHUNK=chunk,
        KEY_CHUNK=key_chunk,
        CODES_ASM=config.codes_asm and device.type == "cuda" and torch.version.hip is None,  # PTX: NVIDIA only
        SCALE_PREFETCH=config.scale_prefetch,
        KEY_SCALE_ROWS=_key_scale_rows(config, key_chunk),
        VALUE_SYM=lay.vsym,
        VALUE_DOT=VALUE_DOTS.index(config.value_dot),
        ROTATE=rotation is not None,
        # the tensors that can grow large (the query is [batch, heads, 1, head_dim], smaller than partial_out)
        WIDE_OFFSETS=_wide_offsets(sink_keys, recent_keys, key_codes, key_scale, value_codes, value_scale, partial_out),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    _merge_partials_kernel[(batch_size * num_heads,)](
        partial_out,
        partial_lse,
        out,
        partial_out if value_rotation is None else value_rotation[0],  # (unused unless VALUE_ROTATE)
        num_heads,
        num_partials,
        out.stride(0),
        out.stride(2),
        1.0 if value_rotation is None else value_rotation[1],
        HEAD_DIM=head_dim,
        BLOCK_S=min(32, triton.next_power_of_2(num_partials)),
        VALUE_ROTATE=value_rotation is not None,
        ROTATE_CHUNK=min(32, head_dim),
        num_warps=4 if head_dim >= 128 else 2,
    )
    return out


def bytes_read(
    batch_size: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    num_exact: int,
    num_stored: int,
    nbits: int,
    q_group_size: int,
    axis_key: str,
    block_length: int,
    element_size: int = 2,
    value_nbits: int | None = None,
    value_sym: bool = False,
) -> int:
    """Bytes one call must read from memory: query, 16-bit tokens, codes and scales/zeros (for GB/s);
    ``nbits`` of keys, ``value_nbits`` of values (default: ``nbits``); ``value_sym``: value groups store no zero."""
    rows = batch_size * num_kv_heads
    exact = rows * num_exact * 2 * head_dim * element_size
    value_nbits = nbits if value_nbits is None else value_nbits
    codes = rows * num_stored * head_dim * (nbits + value_nbits) // 8
    value_scales = rows * num_stored * (1 if value_sym else 2) * (head_dim // q_group_size) * 2
    if axis_key == "channel":
        key_scales = rows * math.ceil(num_stored / block_length) * 2 * head_dim * 2
    else:
        key_scales = rows * num_stored * 2 * (head_dim // q_group_size) * 2
    query = batch_size * num_heads * head_dim * element_size
    return exact + codes + value_scales + key_scales + query
