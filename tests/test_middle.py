"""The quantized middle's layout and store, the storage's flatten pair and the selkv.testing builders."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from support.markers import HAS_CUDA, kernel_module
from support.storages import SMALL, make_storage, with_device_lengths
from support.tolerances import max_relative_error, relative_error

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


def test_custom_op_attends_over_the_flattened_storage():
    """The operator a captured step calls (device lengths) takes the storage through the flatten pair."""
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
