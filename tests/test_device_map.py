"""selkv caches on a model split across devices (``device_map``): each cache layer lives on its layer's device.

There is one real device on a CPU machine, so the second device here is ``meta`` (shapes without data):
a decoder layer moved there, with its inputs moved to it as accelerate's hooks do, shows where the
cache allocates, not what it computes. Two real GPUs (tensors, the kernel's launch device) are not
exercised by these tests.
"""

from __future__ import annotations

import pytest
import torch
from support.models import make_tiny_llama, tiny_llama_config
from torch.utils._pytree import tree_map

import selkv
from selkv.attention import kernel_device
from selkv.models import forward_with_cache

SPEC = "quant:bits=4,sink=4,window=8,block=4"


def _cache_tensors(layer) -> dict[str, torch.Tensor]:
    if hasattr(layer, "_all_tensors"):  # selkv layers
        tensors = dict(layer._all_tensors())
        if getattr(layer, "lengths", None) is not None:  # a static layer's device lengths
            tensors.update(lengths=layer.lengths, cumulative_length=layer.cumulative_length)
        return tensors
    return {"keys": layer.keys, "values": layer.values}  # transformers' layers


def _split_model(attn_implementation: str):
    """A tiny Llama whose layer 0 sits on the CPU and whose layer 1 (and the head after it) on ``meta``."""
    model = make_tiny_llama(attn_implementation=attn_implementation)
    for module in (model.model.layers[1], model.model.norm, model.lm_head):
        module.to("meta")

    def to_meta(module, args, kwargs):  # what accelerate's hook does for the layer's execution device
        move = lambda x: x.to("meta") if isinstance(x, torch.Tensor) else x  # noqa: E731
        return tree_map(move, args), tree_map(move, kwargs)

    model.model.layers[1].register_forward_pre_hook(to_meta, with_kwargs=True)
    return model


@pytest.mark.parametrize(("spec", "max_cache_len"), [(SPEC, None), ("full", None), ("full", 64)])
def test_each_cache_layer_allocates_on_its_layers_device(spec, max_cache_len):
    model = _split_model("sdpa")
    cache = selkv.make_cache(spec, model.config, max_cache_len=max_cache_len)
    with torch.no_grad():
        forward_with_cache(model, cache, torch.arange(3, 33).view(1, -1))
    for layer, device in zip(cache.layers, ("cpu", "meta"), strict=True):
        assert {name: t.device.type for name, t in _cache_tensors(layer).items()} == dict.fromkeys(
            _cache_tensors(layer), device
        )
    if max_cache_len is not None:
        return  # transformers' static layer counts its tokens from the key values, which meta does not have
    per_device = selkv.kv_bytes(cache, per_device=True)["per_device"]
    assert sorted(per_device) == ["cpu", "meta"]
    # Both layers hold the same shapes: the meta layer's 16-bit equivalent equals the CPU layer's.
    assert per_device["cpu"]["full16"] == per_device["meta"]["full16"] > 0


def test_static_selective_layer_preallocates_on_the_device_of_its_key_states():
    """The static quantized layer allocates its whole capacity at its first update, where that update's tensors are.

    (Its prefill reads device lengths back to the host, which ``meta`` cannot do, so the
    preallocation itself is checked.)
    """
    config = tiny_llama_config()
    cache = selkv.make_cache(SPEC, config, max_cache_len=64)
    for layer_idx, device in enumerate(("cpu", "meta")):
        states = torch.randn(1, config.num_key_value_heads, 5, config.head_dim, device=device)
        cache.layers[layer_idx].lazy_initialization(states, states)
    for layer, device in zip(cache.layers, ("cpu", "meta"), strict=True):
        tensors = _cache_tensors(layer)
        assert {t.device.type for t in tensors.values()} == {device}
        assert tensors["key_codes"].shape[2] == layer.middle_capacity + layer.block_length  # the whole capacity


def test_kv_bytes_per_device_adds_up_to_the_totals():
    config = tiny_llama_config(layers=3)
    cache = selkv.make_cache(SPEC, config)
    for layer_idx in range(3):
        states = torch.randn(2, config.num_key_value_heads, 40, config.head_dim)
        cache.update(states, states.clone(), layer_idx)
    counted = selkv.kv_bytes(cache, per_device=True)
    assert list(counted["per_device"]) == ["cpu"]
    assert counted["per_device"]["cpu"] == {key: value for key, value in counted.items() if key != "per_device"}
    assert "per_device" not in selkv.kv_bytes(cache)  # the default keeps the flat counts


def test_kernel_launches_on_the_device_of_its_query():
    """Triton launches on the current CUDA device: a layer on another GPU makes its own device current."""
    context = kernel_device(torch.device("cuda", 7))  # built, not entered: entering needs that GPU
    assert isinstance(context, torch.cuda.device) and context.idx == 7
    assert not isinstance(kernel_device(torch.device("cpu")), torch.cuda.device)
