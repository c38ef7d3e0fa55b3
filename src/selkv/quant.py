"""All of selkv's quantization math: group quantization, rotation, bit packing and byte counts.

Nothing else in the package computes scales or packs codes.

A tensor is quantized in groups of ``group_size`` consecutive elements along one
dimension (``dim``). Each group gets a 16-bit ``scale`` and ``zero`` and each
element an unsigned ``nbits`` code, so that

    x ≈ code * scale + zero,        code ∈ [0, 2**nbits - 1]

Asymmetric groups put ``zero`` at the group minimum; symmetric ones put it at
``-2**(nbits-1) * scale`` (except groups whose largest magnitude exceeds
``(2**(nbits-1) - 1) / 2**(nbits-1)`` of float16's maximum, where that zero point
would overflow float16: they stay asymmetric). Both use the same formula, so
readers (the reference path and the Triton kernels) never need to know which was used.

Symmetric groups can also store no zero at all (:func:`quantize_midrise`): the ``2**nbits`` levels sit
at odd multiples of ``scale / 2`` about 0 (for 2 bits: ``±scale/2``, ``±3 scale/2``), none at 0, and the zero
is implied, ``-(2**nbits - 1) / 2 * scale`` (:func:`midrise_zero`): readers compute it from the scale and
apply the same formula. It saves a float16 per group and suits zero-centred data such as rotated values.

Scales and zeros are stored as float16, which has more mantissa than bfloat16.
They are rounded *outwards* (zero down, scale up) before codes are computed, so
that every finite input inside the float16 range reconstructs within
``scale / 2`` of itself (plus float32 rounding). Inputs outside that range
saturate; NaN is stored as 0, and ±inf as the group's largest/smallest finite
value.
"""

from __future__ import annotations

import functools
import math

import torch

SUPPORTED_NBITS = (2, 3, 4, 8)
SCALE_DTYPE = torch.float16
_FP16_MAX = torch.finfo(torch.float16).max
_FP16_TINY = 2.0**-24  # the smallest positive float16 (a subnormal)


def check_nbits(nbits: int) -> None:
    if nbits not in SUPPORTED_NBITS:
        raise ValueError(f"nbits must be one of {SUPPORTED_NBITS}, got {nbits!r}")


def _round_outwards(value: torch.Tensor, direction: float) -> torch.Tensor:
    """float32 -> float16, rounded towards ``direction`` (+inf or -inf) when inexact."""
    rounded = value.to(SCALE_DTYPE)
    limit = torch.full_like(rounded, direction)
    inexact = (rounded.float() < value) if direction > 0 else (rounded.float() > value)
    return torch.where(inexact, torch.nextafter(rounded, limit), rounded)


def _groups(x: torch.Tensor, group_size: int, dim: int) -> tuple[torch.Tensor, int]:
    """``x`` in float32, saturated to float16's range (NaN as 0), as ``[..., n_groups, group_size]`` groups along
    ``dim`` moved last; and ``dim`` made non-negative."""
    dim = dim % x.dim()
    size = x.shape[dim]
    if group_size < 1 or size % group_size:
        raise ValueError(f"group_size={group_size} must divide the quantized dimension (size {size})")
    xf = torch.nan_to_num(x.float(), nan=0.0, posinf=_FP16_MAX, neginf=-_FP16_MAX).clamp(-_FP16_MAX, _FP16_MAX)
    return xf.movedim(dim, -1).unflatten(-1, (size // group_size, group_size)), dim


def quantize(
    x: torch.Tensor, nbits: int, group_size: int, dim: int = -1, sym: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` in groups of ``group_size`` along ``dim``.

    Args:
        x: any float tensor; ``x.shape[dim]`` must be a multiple of ``group_size``.
    Returns:
        codes: uint8, same shape as ``x``, one (unpacked) code per element.
        scale, zero: float16, shape of ``x`` with ``shape[dim] // group_size`` along ``dim``.
    """
    check_nbits(nbits)
    grouped, dim = _groups(x, group_size, dim)
    levels = 2**nbits - 1
    lo, hi = grouped.amin(dim=-1), grouped.amax(dim=-1)
    zero = _round_outwards(lo, float("-inf"))
    scale = _round_outwards((hi - zero.float()) / levels, float("inf"))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant group: any scale works
    if sym:
        absmax = grouped.abs().amax(dim=-1)
        half = 2 ** (nbits - 1)
        sym_scale = _round_outwards(absmax / (half - 1), float("inf"))
        sym_scale = torch.where(sym_scale > 0, sym_scale, torch.ones_like(sym_scale))
        # The zero point -half * scale must stay finite in float16. Groups whose range needs a larger
        # scale (|x| above (half - 1) / half of float16's maximum) keep the asymmetric scale and zero,
        # which readers decode by the same formula.
        fits = sym_scale <= _FP16_MAX / half
        sym_zero = (-half * sym_scale.float()).to(SCALE_DTYPE)  # exact: scale times a power of two
        scale, zero = torch.where(fits, sym_scale, scale), torch.where(fits, sym_zero, zero)

    codes = torch.round((grouped - zero.float().unsqueeze(-1)) / scale.float().unsqueeze(-1))
    codes = codes.clamp_(0, levels).to(torch.uint8).flatten(-2).movedim(-1, dim)
    return codes, scale.movedim(-1, dim), zero.movedim(-1, dim)


def quantize_midrise(x: torch.Tensor, nbits: int, group_size: int, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` in symmetric groups that store no zero (see the module docstring).

    Each group's scale is its largest magnitude over ``(2**nbits - 1) / 2``, rounded up to float16, so the
    outer levels reach the group's range. Returns ``(codes, scale)`` shaped as :func:`quantize`'s; the zero
    is :func:`midrise_zero` of the scale.
    """
    check_nbits(nbits)
    grouped, dim = _groups(x, group_size, dim)
    levels = 2**nbits - 1
    scale = _round_outwards(grouped.abs().amax(dim=-1) / (levels / 2), float("inf"))
    # An all-zero group: the smallest float16 scale, so that its levels (+-scale/2, ...) read back as zero within 3e-8.
    scale = torch.where(scale > 0, scale, torch.full_like(scale, _FP16_TINY))
    zero = midrise_zero(scale, nbits).unsqueeze(-1)
    codes = torch.round((grouped - zero) / scale.float().unsqueeze(-1))
    codes = codes.clamp_(0, levels).to(torch.uint8).flatten(-2).movedim(-1, dim)
    return codes, scale.movedim(-1, dim)


def midrise_zero(scale: torch.Tensor, nbits: int) -> torch.Tensor:
    """The zero that :func:`quantize_midrise`'s groups imply: ``-(2**nbits - 1) / 2 * scale`` in float32 (exact)."""
    return scale.float() * (-(2**nbits - 1) / 2)


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    dim: int = -1,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse of :func:`quantize` for unpacked ``codes``; returns ``dtype``, written into ``out`` when given.

    ``codes`` may be any strided view (for example block-major value codes seen in token order) and
    ``out`` any view shaped like ``codes`` (a slice of a larger buffer): codes are read once and
    ``out`` written once, which is what a decode step that dequantizes the whole middle pays for.
    """
    dim = dim % codes.dim()
    length = codes.shape[dim]
    if length % group_size:  # a partly filled last group (callers slice codes): repeat scales per element
        scale = scale.float().repeat_interleave(group_size, dim=dim).narrow(dim, 0, length)
        zero = zero.float().repeat_interleave(group_size, dim=dim).narrow(dim, 0, length)
        result = torch.addcmul(zero, codes.float(), scale).to(dtype)
        return result if out is None else out.copy_(result)
    groups = length // group_size
    # Each group's scale and zero broadcast over its group_size elements (no repeated copies). Three
    # in-place passes (convert, scale, shift) over the result beat one broadcasting addcmul on CPU.
    scale = scale.narrow(dim, 0, groups).float().unsqueeze(dim + 1)
    zero = zero.narrow(dim, 0, groups).float().unsqueeze(dim + 1)
    in_place = out is not None and dtype == torch.float32 and out.dtype == torch.float32
    result = out if in_place else torch.empty(codes.shape, dtype=torch.float32, device=codes.device)
    result.copy_(codes)
    result.unflatten(dim, (groups, group_size)).mul_(scale).add_(zero)
    if in_place:
        return out
    result = result.to(dtype)  # float32 math, then rounded
    return result if out is None else out.copy_(result)


# Rotation.
#
# Outlier channels (a few key channels 10-30x larger than the rest) set the range of every per-token
# group they fall in, so the other channels get few levels. An orthogonal rotation spreads each
# outlier over all channels before quantization (QuaRot, SpinQuant), and attention does not change:
# q . k = (q R) . (k R) for any orthogonal R. The normalized Hadamard matrix is orthogonal, symmetric
# (its own inverse) and has entries of one magnitude, so it spreads every channel evenly. Values can be
# rotated the same way (spec ``vrotate``): attention is linear in them, so the output over rotated values
# is rotated back once, (sum_n p_n v_n R) R^T = sum_n p_n v_n.

ROTATIONS = ("none", "hadamard", "hadamard-signs")


@functools.cache
def hadamard(dim: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The normalized Hadamard matrix ``[dim, dim]`` (Sylvester's construction): orthogonal and symmetric.

    ``dim`` must be a power of two. One tensor per (dim, dtype, device) is built and shared (read-only).
    """
    if dim < 1 or dim & (dim - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two head_dim, got {dim}; use rotate=none")
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < dim:  # [[H, H], [H, -H]]
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return (matrix / math.sqrt(dim)).to(dtype=dtype, device=device)


def rotation_matrix(rotate: str, dim: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """The float32 ``[dim, dim]`` matrix of rotation ``rotate`` (one of :data:`ROTATIONS`); ``None`` for "none"."""
    if rotate not in ROTATIONS:
        raise ValueError(f"rotate must be one of {ROTATIONS}, got {rotate!r}")
    if rotate == "none":
        return None
    if rotate == "hadamard":
        return hadamard(dim, torch.float32, torch.device(device))
    return _signed_hadamard(dim, torch.device(device))


@functools.cache
def _signed_hadamard(dim: int, device: torch.device) -> torch.Tensor:
    """``diag(signs) @ H``: channels flip sign (fixed pseudo-random signs, seed 0) before the Hadamard
    matrix mixes them (QuaRot's randomized Hadamard), so that a structure the plain matrix keeps
    aligned, e.g. outliers in channels of one Hadamard pattern, is broken up. Orthogonal."""
    signs = torch.randint(0, 2, (dim,), generator=torch.Generator().manual_seed(0)).double() * 2 - 1
    return (signs[:, None] * hadamard(dim, torch.float64)).to(dtype=torch.float32, device=device)


@functools.cache
def rotation_signs(
    rotate: str, dim: int, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> torch.Tensor | None:
    """``rotation_matrix(rotate, dim)^T * sqrt(dim)`` in ``dtype``: every entry is +-1, exact in any float dtype.

    The fused decode kernel rotates the query with it in its prologue ((q R)^T = R^T q^T, the 1/sqrt(dim)
    applied in float32), instead of a float32 matmul launched before it. ``None`` for ``"none"``. One
    tensor per (rotate, dim, dtype, device) is built and shared (read-only), outside any captured step.
    """
    rotation = rotation_matrix(rotate, dim)
    if rotation is None:
        return None
    signs = (rotation.double() * math.sqrt(dim)).round()
    if not bool((signs.abs() == 1).all()):  # every rotation of ROTATIONS is +-1/sqrt(dim); keep it so
        raise AssertionError(f"rotation {rotate!r} is not a sign matrix times 1/sqrt({dim})")
    return signs.T.contiguous().to(device=torch.device(device), dtype=dtype)


def rotate(x: torch.Tensor, rotation: torch.Tensor | None) -> torch.Tensor:
    """``x [..., dim] @ rotation`` in float32 (``x`` itself when ``rotation`` is None)."""
    return x if rotation is None else torch.matmul(x.float(), rotation)


def unrotate(x: torch.Tensor, rotation: torch.Tensor | None) -> torch.Tensor:
    """Inverse of :func:`rotate` (``rotation`` is orthogonal: its transpose), in float32."""
    return x if rotation is None else torch.matmul(x.float(), rotation.T)


# Bit packing.
#
# Codes are packed along the last (channel) axis in *planes*: with k = 8 // nbits
# codes per byte and D channels, byte j holds channels j, j + D/k, j + 2D/k, ...
# in bits [0, nbits), [nbits, 2 nbits), ... So unpacking plane p of a row is one
# shift and one mask, and a kernel can multiply plane p with the matching
# contiguous slice of the query without interleaving registers.
#
# 3-bit codes are split into their low two bits and their high bit: the low bits are packed as 2-bit
# codes (D/4 bytes), followed by the high bits packed as 1-bit codes (D/8 bytes, byte i holds channels
# i, i + D/8, ..., i + 7D/8), 3D/8 bytes in all. Channel c of 2-bit plane p (c = p D/4 + j) finds its
# high bit in byte D/4 + j mod D/8, bit 2p + j div D/8: a reader of one 2-bit plane reads both parts
# with one shift per column.


def channel_multiple(nbits: int) -> int:
    """head_dim must be a multiple of this to pack ``nbits``-bit codes."""
    check_nbits(nbits)
    return 8 if nbits == 3 else 8 // nbits


def plane_width(head_dim: int, nbits: int) -> int:
    """Channels of one bit plane, read with one shift: ``head_dim * nbits / 8``; for 3-bit codes, those of
    a low 2-bit plane (``head_dim / 4``), whose high bits come with them."""
    return head_dim // 4 if nbits == 3 else head_dim * nbits // 8


def _pack_planes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    k = 8 // nbits  # codes per byte
    if k == 1:
        return codes.to(torch.uint8)
    planes = codes.to(torch.uint8).unflatten(-1, (k, codes.shape[-1] // k))  # [..., plane, D/k]
    packed = planes[..., 0, :].clone()
    for p in range(1, k):
        packed |= planes[..., p, :] << (p * nbits)
    return packed


def _unpack_planes(packed: torch.Tensor, nbits: int) -> torch.Tensor:
    k = 8 // nbits
    if k == 1:
        return packed
    mask = 2**nbits - 1
    return torch.cat([(packed >> (p * nbits)) & mask for p in range(k)], dim=-1)


def pack(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """uint8 codes ``[..., D]`` -> packed bytes ``[..., D * nbits // 8]``."""
    d = codes.shape[-1]
    if d % channel_multiple(nbits):
        raise ValueError(
            f"the last dimension ({d}) must be a multiple of {channel_multiple(nbits)} to pack {nbits}-bit codes"
        )
    if nbits == 3:
        codes = codes.to(torch.uint8)
        return torch.cat([_pack_planes(codes & 3, 2), _pack_planes(codes >> 2, 1)], dim=-1)
    return _pack_planes(codes, nbits)


def unpack(packed: torch.Tensor, nbits: int) -> torch.Tensor:
    """Packed bytes ``[..., D * nbits // 8]`` -> uint8 codes ``[..., D]``."""
    check_nbits(nbits)
    if nbits == 3:
        low_bytes = packed.shape[-1] * 2 // 3  # D/4 of 3D/8
        low, high = packed[..., :low_bytes], packed[..., low_bytes:]
        return _unpack_planes(low, 2) | (_unpack_planes(high, 1) << 2)
    return _unpack_planes(packed, nbits)


def to_block_major(packed: torch.Tensor, block: int) -> torch.Tensor:
    """Packed rows ``[..., n, P]`` -> the same shape, each block of ``block`` rows stored transposed.

    In memory, block ``i`` holds byte ``c`` of its token ``t`` at ``c * block + t``: consecutive
    tokens of one byte column sit side by side. The fused decode kernel reads value codes this way
    (tokens are the inner dimension of its ``p @ values`` product). ``n`` must be a multiple of ``block``.
    """
    *lead, n, p = packed.shape
    if n % block:
        raise ValueError(f"{n} rows are not whole blocks of {block}")
    return packed.reshape(*lead, n // block, block, p).transpose(-1, -2).reshape(*lead, n, p)


def from_block_major(packed: torch.Tensor, block: int) -> torch.Tensor:
    """Inverse of :func:`to_block_major`: rows ``[..., n, P]`` in token order again."""
    *lead, n, p = packed.shape
    if n % block:
        raise ValueError(f"{n} rows are not whole blocks of {block}")
    return packed.reshape(*lead, n // block, p, block).transpose(-1, -2).reshape(*lead, n, p)


def token_order_view(packed: torch.Tensor, block: int) -> torch.Tensor:
    """Block-major rows ``[..., n, P]`` seen in token order without a copy: ``[..., n // block, block, P]``."""
    *lead, n, p = packed.shape
    if n % block:
        raise ValueError(f"{n} rows are not whole blocks of {block}")
    # each block's block * P bytes are contiguous (rows are): regroup them as [P, block] and transpose
    return packed.unflatten(-2, (n // block, block)).flatten(-2).unflatten(-1, (p, block)).transpose(-1, -2)


def packed_dim(head_dim: int, nbits: int) -> int:
    return head_dim * nbits // 8


def tensor_bytes(obj) -> int:
    """Bytes held by every tensor reachable from ``obj`` (tensors, tensor subclasses, containers, objects)."""
    seen: set[int] = set()

    def walk(o) -> int:
        if o is None or id(o) in seen:
            return 0
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            flatten = getattr(o, "__tensor_flatten__", None)
            if flatten is not None and type(o) is not torch.Tensor and not isinstance(o, torch.nn.Parameter):
                names, _ = flatten()
                return sum(walk(getattr(o, n)) for n in names)
            return o.numel() * o.element_size()
        if isinstance(o, dict):
            return sum(walk(v) for v in o.values())
        if isinstance(o, (list, tuple)):
            return sum(walk(v) for v in o)
        if hasattr(o, "__dict__") and not isinstance(o, type):
            return sum(walk(v) for v in vars(o).values())
        return 0

    return walk(obj)
