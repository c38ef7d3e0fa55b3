"""The quantized middle's layout and store, the storage's flatten pair and the selkv.testing builders."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from support.markers import HAS_CUDA, kernel_module
from support.models import tiny_llama_config
from support.storages import SMALL, fresh_seed, make_storage, with_device_lengths
from support.tolerances import max_relative_error, relative_error

from selkv import quant
from selkv.kernels import reference
from selkv.layers import QuantizedSinkWindowLayer, StaticSinkWindowLayer
from selkv.middle import MiddleLayout, QuantizedMiddle, dequantize_middle, quantize_middle
from selkv.storage import flatten_storage, unflatten_storage
from selkv.testing import fill_layer


def test_layout_refuses_what_no_reader_knows():
    with pytest.raises(ValueError, match="nbits"):
        MiddleLayout(5, 4, 32)
    with pytest.raises(ValueError, match="axis_key"):
        MiddleLayout(4, 4, 32, axis_key="head")
    with pytest.raises(ValueError, match="rotate"):
        MiddleLayout(4, 4, 32, rotate="fourier")
    with pytest.raises(ValueError, match="vrotate must be one of"):
        MiddleLayout(4, 4, 32, vrotate="fourier")
    layout = MiddleLayout(4, 2, 16, "channel", 8)
    assert (layout.rows("key_scale", 24), layout.rows("key_codes", 24), layout.rows("value_zero", 24)) == (3, 24, 24)


@pytest.mark.parametrize("device_lengths", [False, True])
def test_flatten_storage_round_trips(device_lengths):
    gen = torch.Generator().manual_seed(0)
    storage = make_storage(
        gen,
        **SMALL,
        num_sink=3,
        num_stored=48,
        num_recent=5,
        nbits=3,
        value_nbits=4,
        axis_key="channel",
        dtype=torch.float32,
        device="cpu",
        rotate="hadamard",
        vrotate="hadamard-signs",
        row_padding=[0, 1],
    )
    storage = dataclasses.replace(storage, layout=dataclasses.replace(storage.layout, sym=True))
    if device_lengths:
        storage = with_device_lengths(storage, gen)
    tensors, ints = flatten_storage(storage)
    assert all(isinstance(i, int) for i in ints)
    back = unflatten_storage(tensors, ints)
    assert back.layout == storage.layout
    for field in dataclasses.fields(storage):
        got, want = getattr(back, field.name), getattr(storage, field.name)
        assert got is want or got == want, field.name  # the same tensors, not copies


def test_store_writes_at_a_position_grows_and_reads_back_what_quantize_middle_stores():
    layout = MiddleLayout(4, 2, 16, "channel", 8, "hadamard-signs")
    keys, values = torch.randn(2, 3, 40, 32), torch.randn(2, 3, 40, 32)
    store = QuantizedMiddle(layout)
    store.set_head(keys)
    store.write(keys[:, :, :16], values[:, :, :16], 0)
    store.write(keys[:, :, 16:], values[:, :, 16:], 16)
    assert store.capacity == 48  # whole units of lcm(block, 16) tokens
    whole = quantize_middle(keys, values, layout, store.key_rotation)
    assert all(
        torch.equal(a[:, :, : layout.rows(name, 40)], b)
        for name, a, b in zip(whole._fields, store.tensors, whole, strict=True)
    )
    want = dequantize_middle(whole, layout, 40, key_rotation=store.key_rotation)
    got = store.read(40)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert store.used_bytes(40)["bytes_key_codes"] == 2 * 3 * 40 * 32 * 4 // 8


@pytest.mark.parametrize("value_nbits", [2, 3, 4, 8])
def test_symmetric_values_store_no_zero_and_read_back_within_half_a_step(value_nbits):
    """vsym: the value zeros are an empty tensor (no bytes); written through the store (growing) and read back,
    the values are quantize_midrise's levels rotated back, within half a step of the rotated values."""
    layout = MiddleLayout(3, value_nbits, 16, "channel", 8, "hadamard", vrotate="hadamard", vsym=True)
    gen = torch.Generator().manual_seed(5)
    keys = torch.randn(2, 3, 40, 32, generator=gen)
    values = torch.randn(2, 3, 40, 32, generator=gen) * (1 + 19 * (torch.arange(32) == 5))  # an outlier channel
    store = QuantizedMiddle(layout)
    store.set_head(keys)
    store.write(keys[:, :, :16], values[:, :, :16], 0)
    store.write(keys[:, :, 16:], values[:, :, 16:], 16)
    assert store.tensors.value_zero.numel() == 0 and store.tensors.value_zero.shape[:3] == (2, 3, 48)
    assert store.used_bytes(40)["bytes_scales"] == quant.tensor_bytes(
        [store.tensors.key_scale[:, :, :5], store.tensors.key_zero[:, :, :5], store.tensors.value_scale[:, :, :40]]
    )
    _, read_values = store.read(40)
    rotated = quant.rotate(values, store.value_rotation)
    codes, scale = quant.quantize_midrise(rotated, value_nbits, 16)
    want = quant.dequantize(codes, scale, quant.midrise_zero(scale, value_nbits), 16)
    torch.testing.assert_close(read_values, quant.unrotate(want, store.value_rotation), rtol=0, atol=1e-5)
    assert torch.equal(store.tensors.value_scale[:, :, :40], scale)
    error = (quant.rotate(read_values, store.value_rotation) - rotated).abs()
    assert bool((error <= scale.float().repeat_interleave(16, -1) / 2 + 1e-5).all())
    # the layer's other path: partial blocks are read in token order too
    partial_keys, partial_values = dequantize_middle(store.tensors, layout, 37, value_rotation=store.value_rotation)
    torch.testing.assert_close(partial_values, read_values[:, :, :37], rtol=0, atol=1e-6)


@pytest.mark.parametrize("vrotate", ["none", "hadamard"])
def test_custom_op_attends_over_the_flattened_storage(vrotate):
    """The operator a captured step calls (device lengths) takes the storage through the flatten pair (rotated
    values included)."""
    kernel_module()  # a GPU, or the kernels in Triton's interpreter
    from selkv.kernels import decode_op

    device = "cuda" if HAS_CUDA else "cpu"
    gen = torch.Generator().manual_seed(1)
    shape = dict(SMALL, head_dim=64, q_group_size=32)
    storage = make_storage(
        gen,
        **shape,
        num_sink=3,
        num_stored=32,
        num_recent=6,
        nbits=4,
        value_nbits=2,
        axis_key="channel",
        dtype=torch.float16,
        device=device,
        rotate="hadamard-signs",
        vrotate=vrotate,
    )
    storage = with_device_lengths(storage, gen)
    query = torch.randn(2, 4, 1, 64, generator=gen).half().to(device)
    op = decode_op.decode_attention
    want = reference.selective_decode_attention(query, storage).double().cpu()
    assert relative_error(op(query, storage), want) < max_relative_error(torch.float16)
    # traced: the flatten pair runs inside the graph, the operator stays one opaque call
    compiled = torch.compile(lambda q: op(q, storage), backend="aot_eager", fullgraph=True)
    assert relative_error(compiled(query), want) < max_relative_error(torch.float16)


@pytest.mark.parametrize("static", [False, True])
def test_fill_layer_gives_storage_of_the_context(static):
    layout = MiddleLayout(4, 4, 16, axis_key="channel", block_length=8)
    layer = (
        StaticSinkWindowLayer(4, 16, layout, max_cache_len=128) if static else QuantizedSinkWindowLayer(4, 16, layout)
    )
    fill_layer(layer, 2, 2, 32, 100, "cpu", torch.float32, room=16)
    assert (layer.num_sink, layer.num_stored, layer.num_recent) == (4, 80, 16)
    storage = layer.decode_storage()
    assert storage.middle.key_codes.shape[2] >= 80 + 8
    out = reference.selective_decode_attention(torch.randn(2, 4, 1, 32), storage)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("value_nbits", [2, 3, 4, 8])
@pytest.mark.parametrize("vrotate", ["hadamard", "hadamard-signs"])
def test_rotated_values_are_the_rotated_values_quantized_and_read_back_rotated_back(vrotate, value_nbits):
    """vrotate: the stored tensors are exactly those of the rotated values quantized without rotation (the keys'
    are untouched); reading back rotates the dequantized values back in float32, then rounds (also into a slice,
    whole blocks or not); each token lies within the L2 norm of its groups' half steps of the given one (the
    rotation is orthogonal: it keeps L2 distances)."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    B, H, n, D, G, T = 2, 3, 48, 32, 16, 16
    layout = MiddleLayout(4, value_nbits, G, "channel", T, "hadamard", vrotate=vrotate)
    plain = dataclasses.replace(layout, vrotate="none")
    key_rotation, value_rotation = quant.rotation_matrix("hadamard", D), quant.rotation_matrix(vrotate, D)
    keys = torch.randn(B, H, n, D, generator=gen)
    values = torch.randn(B, H, n, D, generator=gen) * (1 + 9 * (torch.arange(D) % 7 == 0))  # outlier channels
    stored = quantize_middle(keys, values, layout, key_rotation, value_rotation)
    expected = quantize_middle(keys, quant.rotate(values, value_rotation), plain, key_rotation)
    assert all(torch.equal(a, b) for a, b in zip(stored, expected, strict=True)), f"seed={seed}"
    for num_stored in (48, 40):  # whole blocks, and a partial last block
        _, rotated = dequantize_middle(stored, plain, num_stored)  # the values as stored: rotated
        for dtype in (torch.float32, torch.bfloat16):
            got_keys, got = dequantize_middle(
                stored, layout, num_stored, dtype=dtype, key_rotation=key_rotation, value_rotation=value_rotation
            )
            want_keys, _ = dequantize_middle(stored, plain, num_stored, dtype=dtype, key_rotation=key_rotation)
            assert torch.equal(got_keys, want_keys), f"seed={seed}"
            assert torch.equal(got, quant.unrotate(rotated, value_rotation).to(dtype)), f"seed={seed}"
            buffer = torch.full((B, H, num_stored + 5, D), float("nan"), dtype=dtype)
            dequantize_middle(
                stored,
                layout,
                num_stored,
                dtype=dtype,
                out_values=buffer[:, :, 2 : 2 + num_stored],
                value_rotation=value_rotation,
            )
            assert torch.equal(buffer[:, :, 2 : 2 + num_stored], got), f"seed={seed}"
            assert buffer[:, :, :2].isnan().all() and buffer[:, :, 2 + num_stored :].isnan().all()
        _, read = dequantize_middle(stored, layout, num_stored, value_rotation=value_rotation)
        half_steps = stored.value_scale[:, :, :num_stored].float() / 2  # [B, H, n, D // G]
        bound = (half_steps.square().sum(-1) * G).sqrt()  # per token
        error = (read - values[:, :, :num_stored]).norm(dim=-1)
        assert bool((error <= bound * (1 + 1e-4) + 1e-5).all()), f"seed={seed}: {(error / bound).max():.4f}"


def test_a_store_builds_its_value_rotation_once_and_shares_the_keys_matrix():
    """The value rotation, like the key rotation, is one tensor per (rotation, head_dim, device), built at the first
    update; the same rotation for keys and values is one tensor; a clone keeps them by reference."""
    keys = torch.zeros(1, 2, 1, 32)
    same = QuantizedMiddle(MiddleLayout(4, 4, 16, rotate="hadamard", vrotate="hadamard"))
    other = QuantizedMiddle(MiddleLayout(4, 4, 16, rotate="hadamard-signs", vrotate="hadamard"))
    values_only = QuantizedMiddle(MiddleLayout(4, 4, 16, vrotate="hadamard-signs"))
    for store in (same, other, values_only):
        store.set_head(keys)
    assert same.value_rotation is same.key_rotation and same.value_rotation_signs is same.key_rotation_signs
    assert other.value_rotation is same.value_rotation and other.key_rotation is not other.value_rotation
    assert values_only.key_rotation is None and values_only.value_rotation is other.key_rotation
    assert len(values_only.rotations()) == 2 and len(other.rotations()) == 4
    twin = other.clone()
    assert twin.value_rotation is other.value_rotation and twin.value_rotation_signs is other.value_rotation_signs


def test_kv_bytes_count_a_value_rotation_only_where_the_keys_do_not_share_it():
    """``selkv size`` / ``kv_bytes`` count the tensors held: a value rotation the keys use too is no extra byte;
    another one is its float32 matrix and its +-1 form in the model's dtype (bfloat16 here), once per cache."""
    from selkv.cache import kv_bytes, make_cache
    from selkv.sizing import cache_size

    config = tiny_llama_config(head_dim=64, layers=3)
    base = "quant:bits=4,sink=4,window=16,block=8,rotate=hadamard"
    allocated = {v: cache_size(f"{base},vrotate={v}", config, 300)["allocated"] for v in quant.ROTATIONS}
    matrix = 64 * 64 * (4 + 2)
    assert allocated["hadamard"] == allocated["none"]
    assert allocated["hadamard-signs"] == allocated["none"] + matrix
    values_only = cache_size("quant:bits=4,sink=4,window=16,block=8,rotate=none,vrotate=hadamard", config, 300)
    assert values_only["allocated"] == allocated["none"]  # one matrix either way
    cache = make_cache(f"{base},vrotate=hadamard-signs", config)
    states = torch.randn(1, config.num_key_value_heads, 40, 64, dtype=torch.bfloat16)
    for layer_idx in range(3):
        cache.update(states, states.clone(), layer_idx)
    plain = make_cache(base, config)
    for layer_idx in range(3):
        plain.update(states, states.clone(), layer_idx)
    assert kv_bytes(cache)["allocated"] == kv_bytes(plain)["allocated"] + matrix


def test_two_bit_default_counts_its_value_rotation():
    """int2's default rotates keys and values by one plain Hadamard matrix, held once per cache (``vrotate=none``
    holds the same); with the signed keys of its 2026-12-06 default the values' matrix is a second one."""
    from selkv.sizing import cache_size

    config = tiny_llama_config(head_dim=64, layers=3)
    base = "quant:bits=2,sink=4,window=16,block=8"
    default, rotated, off, signed = (
        cache_size(s, config, 300)["allocated"]
        for s in (base, f"{base},vrotate=hadamard", f"{base},vrotate=none", f"{base},rotate=hadamard-signs")
    )
    assert default == rotated == off
    assert signed == default + 64 * 64 * (4 + 2)
