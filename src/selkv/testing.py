"""Filled storage and caches for tests and benchmarks, built through the layers' own stores.

Speed measurements need a cache that holds ``context`` tokens without prefilling them through a
model (minutes at long contexts), and kernel tests need a middle of known layout. These helpers
build both from a :class:`~selkv.middle.MiddleLayout`, so that no test or benchmark writes a
layer's private fields: a change to how layers keep their storage changes this module only.
The content is random (the kernels' speed does not depend on it); tests that compare numbers
quantize real states with :func:`selkv.middle.quantize_middle` instead.
"""

from __future__ import annotations

import torch

from .layers.base import SelectiveLayer
from .layers.sink_window import QuantizedSinkWindowLayer
from .layers.static import StaticSinkWindowLayer
from .middle import MiddleLayout, MiddleTensors, QuantizedMiddle

__all__ = ["fill_layer", "random_middle", "randomize_middle"]


def randomize_middle(tensors: MiddleTensors) -> None:
    """Overwrite a middle with random content in place: every code byte uniform, scales in [0.01, 0.03],
    zeros in [-1, 0] (finite, and small enough that attention over them stays finite)."""
    for name, tensor in tensors._asdict().items():
        if not tensor.is_floating_point():
            tensor.random_(0, 256)
        elif "scale" in name:
            tensor.uniform_(0.01, 0.03)
        else:
            tensor.uniform_(-1.0, 0.0)


def random_middle(
    layout: MiddleLayout,
    batch_size: int,
    num_key_value_heads: int,
    head_dim: int,
    capacity: int,
    device: torch.device | str = "cpu",
) -> MiddleTensors:
    """A random middle of ``capacity`` tokens (whole blocks) in ``layout``, shaped as a layer stores it."""
    store = QuantizedMiddle(layout)
    store.allocate(torch.zeros(batch_size, num_key_value_heads, 1, head_dim, device=device), capacity)
    randomize_middle(store.tensors)
    return store.tensors


def fill_layer(
    layer: SelectiveLayer,
    batch_size: int,
    num_key_value_heads: int,
    head_dim: int,
    context: int,
    device: torch.device | str,
    dtype: torch.dtype,
    room: int = 0,
) -> None:
    """Fill a quantized layer (dynamic or static) with random sink, middle and window as if it had seen ``context``
    positions: the sink full, the middle whole blocks, the window the rest.

    A dynamic layer's middle gets spare capacity for ``room`` more tokens (its evictions then append without the
    store growing) and its window buffer ``window + block`` slots; a static layer keeps its capacities and gets
    its device lengths set (rows past them are never read).
    """
    probe = torch.zeros(batch_size, num_key_value_heads, 1, head_dim, device=device, dtype=dtype)
    layer.lazy_initialization(probe, probe)
    static = isinstance(layer, StaticSinkWindowLayer)
    if not static and not isinstance(layer, QuantizedSinkWindowLayer):
        raise TypeError(f"fill_layer fills selkv's quantized layers, not {type(layer).__name__}")
    sink, window, block = layer.sink_capacity, layer.window_length, layer.block_length
    num_stored = (context - sink - window) // block * block
    num_recent = context - sink - num_stored
    if static:
        if num_stored + block > layer.middle_capacity or num_recent > layer.ring_length:
            raise ValueError(f"context {context} does not fit a static cache of max_cache_len={layer.max_cache_len}")
        for tensor in (layer.sink_keys, layer.sink_values, layer.recent_keys, layer.recent_values):
            tensor.normal_()
        randomize_middle(layer.middle.tensors)
        layer.set_lengths(sink, num_stored, num_recent, 0, context)
        return
    layer.sink_keys.normal_()
    layer.sink_values.normal_()
    # the window buffer as a decode step finds it (the layer grows it with the tokens it holds)
    layer.recent_keys = torch.randn(
        batch_size, num_key_value_heads, window + block, head_dim, device=device, dtype=dtype
    )
    layer.recent_values = torch.randn_like(layer.recent_keys)
    capacity = num_stored + (-(-room // block) + 1) * block
    layer.middle.tensors = random_middle(layer.layout, batch_size, num_key_value_heads, head_dim, capacity, device)
    layer.num_sink, layer._num_stored, layer.num_recent = sink, num_stored, num_recent
    layer.num_evicted = num_stored
    layer.cumulative_length = context
