"""Quantization math: error bounds, packing, non-finite inputs, byte counts."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from selkv import quant


def _bound(x: torch.Tensor, scale: torch.Tensor, group_size: int, dim: int) -> torch.Tensor:
    per_element = scale.float().repeat_interleave(group_size, dim=dim)
    # scale/2 from rounding to a level, plus float32 arithmetic on values of |x|'s size.
    return per_element / 2 + 4 * torch.finfo(torch.float32).eps * (x.abs() + per_element * 2**8)


@settings(max_examples=60, deadline=None)
@given(
    nbits=st.sampled_from([2, 3, 4, 8]),
    groups=st.integers(1, 4),
    group_size=st.sampled_from([1, 4, 16, 32, 64]),
    rows=st.integers(1, 5),
    log_scale=st.floats(-6, 4),
    offset=st.floats(-50, 50),
    sym=st.booleans(),
    dim=st.sampled_from([-1, -2]),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_error_is_at_most_half_a_step(nbits, groups, group_size, rows, log_scale, offset, sym, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (rows, groups * group_size) if dim == -1 else (groups * group_size, rows)
    x = torch.randn(shape, generator=gen) * 10**log_scale + offset
    codes, scale, zero = quant.quantize(x, nbits, group_size, dim=dim, sym=sym)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**nbits - 1
    assert scale.dtype == zero.dtype == torch.float16
    y = quant.dequantize(codes, scale, zero, group_size, dim=dim)
    err = (x - y).abs()
    assert bool((err <= _bound(x, scale, group_size, dim)).all()), float(
        (err - _bound(x, scale, group_size, dim)).max()
    )


@pytest.mark.parametrize("nbits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_non_finite_and_constant_groups_give_finite_output(nbits, sym):
    x = torch.tensor(
        [
            [float("nan"), 1.0, float("inf"), -float("inf")],
            [3.5, 3.5, 3.5, 3.5],  # constant group: zero range
            [0.0, 0.0, 0.0, 0.0],
            [1e30, -1e30, 2.0, 1.0],  # beyond float16: saturates
        ]
    )
    codes, scale, zero = quant.quantize(x, nbits, 4, sym=sym)
    y = quant.dequantize(codes, scale, zero, 4)
    assert torch.isfinite(y).all()
    assert torch.isfinite(scale.float()).all() and (scale.float() > 0).all()
    if not sym:  # the minimum of a constant group is stored exactly as the zero point
        assert torch.equal(y[1], x[1]) and torch.equal(y[2], x[2])
    assert y[0, 2] >= y[0, 1] >= y[0, 3]  # +inf saturates high, -inf low


@pytest.mark.parametrize("dim", [1, 2, 16, 64, 128])
def test_hadamard_is_orthogonal_symmetric_and_flat(dim):
    matrix = quant.hadamard(dim)
    assert matrix.dtype == torch.float32 and matrix.shape == (dim, dim)
    torch.testing.assert_close(matrix @ matrix.T, torch.eye(dim), atol=1e-6, rtol=0)
    assert torch.equal(matrix, matrix.T)
    assert torch.allclose(matrix.abs(), torch.full((dim, dim), dim**-0.5))  # every channel spread evenly
    assert quant.hadamard(dim) is matrix  # built once per (dim, dtype, device)
    x = torch.randn(3, 5, dim)
    torch.testing.assert_close(quant.unrotate(quant.rotate(x, matrix), matrix), x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dim", [2, 64, 128])
def test_signed_hadamard_is_orthogonal_and_not_symmetric(dim):
    matrix = quant.rotation_matrix("hadamard-signs", dim)
    torch.testing.assert_close(matrix @ matrix.T, torch.eye(dim), atol=1e-6, rtol=0)
    assert not torch.equal(matrix, matrix.T) and not torch.equal(matrix, quant.hadamard(dim))
    assert torch.equal(quant.rotation_matrix("hadamard-signs", dim), matrix)  # fixed signs: the same every time
    assert quant.rotation_matrix("none", dim) is None


@pytest.mark.parametrize("dim", [0, 3, 96])
def test_hadamard_refuses_other_sizes(dim):
    with pytest.raises(ValueError, match=f"power-of-two head_dim, got {dim}"):
        quant.hadamard(dim)


@pytest.mark.parametrize("nbits", [2, 3, 4, 8])
@pytest.mark.parametrize("head_dim", [8, 64, 128])
def test_pack_unpack_round_trip_and_size(nbits, head_dim):
    codes = torch.randint(0, 2**nbits, (3, 5, head_dim), dtype=torch.uint8)
    packed = quant.pack(codes, nbits)
    assert packed.shape == (3, 5, head_dim * nbits // 8) == (3, 5, quant.packed_dim(head_dim, nbits))
    assert packed.dtype == torch.uint8
    assert torch.equal(quant.unpack(packed, nbits), codes)


@pytest.mark.parametrize("block", [1, 4, 16])
def test_block_major_places_each_block_transposed(block):
    rows, width = 3 * block, 5
    packed = torch.randint(0, 256, (2, rows, width), dtype=torch.uint8)
    stored = quant.to_block_major(packed, block)
    assert stored.shape == packed.shape and stored.is_contiguous()
    flat = stored.reshape(2, -1)
    for t in range(rows):  # byte c of token t sits at (t // block) * block * width + c * block + t % block
        for c in range(width):
            assert flat[:, (t // block) * block * width + c * block + t % block].tolist() == packed[:, t, c].tolist()
    assert torch.equal(quant.from_block_major(stored, block), packed)
    with pytest.raises(ValueError, match="whole blocks of 4"):
        quant.to_block_major(packed[:, :5], 4)


def test_packing_is_planar():
    # Byte j holds channels j, j + D/k, ... in increasing bit positions (what the kernels rely on).
    codes = torch.arange(8, dtype=torch.uint8) % 4  # D=8, 2 bits: k=4 planes of 2 channels
    packed = quant.pack(codes, 2)
    expected = [
        int(codes[j]) | int(codes[j + 2]) << 2 | int(codes[j + 4]) << 4 | int(codes[j + 6]) << 6 for j in range(2)
    ]
    assert packed.tolist() == expected


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="nbits must be one of"):
        quant.quantize(torch.randn(4, 8), 5, 8)
    with pytest.raises(ValueError, match="group_size=3"):
        quant.quantize(torch.randn(4, 8), 4, 3)
    with pytest.raises(ValueError, match="multiple of 4"):
        quant.pack(torch.zeros(6, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="multiple of 8"):
        quant.pack(torch.zeros(12, dtype=torch.uint8), 3)


@pytest.mark.parametrize("head_dim", [8, 64, 128])
def test_three_bit_codes_are_a_low_two_bit_plane_and_a_high_bit_plane(head_dim):
    """The layout the kernel reads: channel p * D/4 + j keeps its low two bits in byte j (bits 2p, 2p + 1) and
    its high bit in byte D/4 + j mod D/8 (bit 2p + j div D/8)."""
    codes = torch.randint(0, 8, (4, head_dim), dtype=torch.uint8)
    packed = quant.pack(codes, 3).long()
    for channel in range(head_dim):
        p, j = divmod(channel, head_dim // 4)
        low = (packed[:, j] >> (2 * p)) & 3
        high = (packed[:, head_dim // 4 + j % (head_dim // 8)] >> (2 * p + j // (head_dim // 8))) & 1
        assert torch.equal(low + 4 * high, codes[:, channel].long()), channel
    assert quant.plane_width(head_dim, 3) == head_dim // 4 and quant.channel_multiple(3) == 8


def test_more_bits_means_less_error():
    x = torch.randn(64, 64)
    errors = []
    for nbits in (2, 3, 4, 8):
        c, s, z = quant.quantize(x, nbits, 64)
        errors.append(float((quant.dequantize(c, s, z, 64) - x).pow(2).mean()))
    assert errors[0] > errors[1] > errors[2] > errors[3]
    # Uniform quantization of a Gaussian: each extra bit cuts the MSE about 4x.
    assert errors[1] / errors[2] > 2.5 and errors[2] / errors[3] > 4**3


def test_tensor_bytes_counts_every_reachable_tensor_once():
    a = torch.zeros(10, dtype=torch.float16)
    b = torch.zeros(3, 4, dtype=torch.uint8)
    assert quant.tensor_bytes([a, {"b": b, "again": a}, None, (b,)]) == 20 + 12
    assert quant.tensor_bytes(None) == 0 and math.isfinite(quant.tensor_bytes([]))


@pytest.mark.parametrize("nbits", [2, 3, 4, 8])
@pytest.mark.parametrize("top", [65504.0, 60000.0, -65504.0, 40000.0])
def test_symmetric_groups_near_the_float16_maximum_stay_within_half_a_step(nbits, top):
    # -2**(nbits-1) * scale must be a finite float16: groups whose range needs a larger scale keep
    # the asymmetric scale and zero (same decoding formula) instead of saturating.
    x = torch.tensor([[top, -3.0, 1.0, top / 2]])
    codes, scale, zero = quant.quantize(x, nbits, 4, sym=True)
    assert torch.isfinite(scale.float()).all() and torch.isfinite(zero.float()).all()
    y = quant.dequantize(codes, scale, zero, 4)
    assert bool(((x - y).abs() <= _bound(x, scale, 4, -1)).all()), (x - y).abs().max()


@pytest.mark.parametrize(
    "axis_key,rotate,key_nbits,value_nbits",
    [
        ("token", "none", 8, 8),
        ("channel", "hadamard-signs", 4, 4),
        ("channel", "hadamard-signs", 2, 4),
        ("token", "hadamard", 4, 2),
        ("channel", "hadamard-signs", 3, 3),
        ("token", "none", 3, 8),
    ],
)
def test_quantize_middle_is_read_back_within_half_a_step(axis_key, rotate, key_nbits, value_nbits):
    from selkv.middle import MiddleLayout, dequantize_middle, quantize_middle

    gen = torch.Generator().manual_seed(3)
    block, group, head_dim, count = 32, 32, 64, 96
    keys = torch.randn(2, 3, count, head_dim, generator=gen) * (1 + 9 * (torch.arange(head_dim) % 16 == 0))
    values = torch.randn(2, 3, count, head_dim, generator=gen) * 0.02
    rotation = quant.rotation_matrix(rotate, head_dim)
    layout = MiddleLayout(key_nbits, value_nbits, group, axis_key, block, rotate)
    parts = quantize_middle(keys, values, layout, key_rotation=rotation)
    assert parts.key_codes.shape[-1] == head_dim * key_nbits // 8
    assert parts.value_codes.shape[-1] == head_dim * value_nbits // 8
    read_keys, read_values = dequantize_middle(parts, layout, count, key_rotation=rotation)
    # per element at most half a step of its own group (keys: in the rotated basis, where they were quantized)
    key_dim, key_group = (-2, block) if axis_key == "channel" else (-1, group)
    key_error = quant.rotate(read_keys, rotation) - quant.rotate(keys, rotation)
    assert (key_error.abs() <= _bound(keys, parts.key_scale, key_group, key_dim) + 1e-5).all()
    assert ((read_values - values).abs() <= _bound(values, parts.value_scale, group, -1)).all()


@settings(max_examples=60, deadline=None)
@given(
    nbits=st.sampled_from([2, 3, 4, 8]),
    group_size=st.sampled_from([1, 4, 16, 64]),
    rows=st.integers(1, 5),
    log_scale=st.floats(-6, 4),
    offset=st.floats(-5, 5),
    outlier=st.sampled_from([1.0, 10.0, 30.0]),
    dim=st.sampled_from([-1, -2]),
    seed=st.integers(0, 2**31 - 1),
)
def test_midrise_groups_are_within_half_a_step_and_store_no_zero(
    nbits, group_size, rows, log_scale, offset, outlier, dim, seed
):
    """Symmetric groups without a zero: every input within scale/2 of its level (small, offset and outlier-heavy
    groups alike), levels at odd multiples of scale/2 (none at 0), the zero implied by the scale."""
    gen = torch.Generator().manual_seed(seed)
    shape = (rows, 2 * group_size) if dim == -1 else (2 * group_size, rows)
    x = (torch.randn(shape, generator=gen) + offset) * 10**log_scale
    x.view(-1)[0] *= outlier  # an outlier sets its group's range
    x = x.clamp(-60000, 60000)  # within float16 (beyond it inputs saturate: the next test)
    codes, scale = quant.quantize_midrise(x, nbits, group_size, dim=dim)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**nbits - 1 and scale.dtype == torch.float16
    zero = quant.midrise_zero(scale, nbits)
    y = quant.dequantize(codes, scale, zero, group_size, dim=dim)
    excess = (x - y).abs() - _bound(x, scale, group_size, dim)
    assert bool((excess <= 0).all()), float(excess.max())
    half_steps = y / scale.float().repeat_interleave(group_size, dim=dim) * 2  # odd integers
    assert torch.equal(half_steps.round().remainder(2), torch.ones_like(half_steps))


@pytest.mark.parametrize("nbits", [2, 3, 4, 8])
def test_midrise_groups_of_non_finite_zero_and_extreme_inputs_stay_finite(nbits):
    x = torch.tensor(
        [
            [float("nan"), 1.0, float("inf"), -float("inf")],
            [0.0, 0.0, 0.0, 0.0],  # no level is 0: the smallest scale keeps the levels +-scale/2 next to it
            [65504.0, -65504.0, 2.0, 1.0],  # float16's extremes: the scale stays finite
            [1e30, -1e30, 2.0, 1.0],  # beyond float16: saturates
        ]
    )
    codes, scale = quant.quantize_midrise(x, nbits, 4)
    y = quant.dequantize(codes, scale, quant.midrise_zero(scale, nbits), 4)
    assert torch.isfinite(y).all() and torch.isfinite(scale.float()).all() and (scale.float() > 0).all()
    assert y[0, 2] >= y[0, 1] >= y[0, 3]  # +inf saturates high, -inf low
    assert bool(((x[2] - y[2]).abs() <= scale[2].float() / 2 * (1 + 1e-3)).all())
    assert (y[1].abs() <= 2.0**-24).all()  # the all-zero group: the smallest float16 scale, levels +-2**-25
